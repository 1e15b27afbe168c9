// The call page: microphone -> `audio` messages, bot `audio` -> jitter-buffered playback, marks
// echoed as they play, `clear` flushes at once. window.callStatus is a read-only snapshot for
// tests and debugging. Plain modern JS, no build step, no external URLs.
const cfg = JSON.parse(document.getElementById("call-config").textContent);
const $ = (id) => document.getElementById(id);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const status = {
  connected: false, state: "", transcript: "", audioSamplesReceived: 0, audioSamplesPlayed: 0,
  marksEchoed: 0, clears: 0, underruns: 0, sessionEnded: false, endReason: "", sessionId: "", error: "",
  events: [], transferTo: "",
};
Object.defineProperty(window, "callStatus", { get: () => Object.freeze({ ...status }), enumerable: true });

let ws = null, ctx = null, mic = null, capture = null, playback = null, line = null, hangupTimer = null;

function show() {
  $("status").textContent = status.sessionEnded ? `ended (${status.endReason})` : status.connected ? "connected" : ws ? "connecting" : "idle";
  $("state").textContent = status.connected ? status.state || "-" : "-";
  $("state").className = status.connected ? status.state : "";
  $("error").textContent = status.error;
  $("call").disabled = ws !== null;
  $("hangup").disabled = ws === null;
}

function fail(message) {
  status.error = message;
  show();
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function pcmFromBase64(data) {
  const s = atob(data);
  const bytes = new Uint8Array(s.length & ~1);
  for (let i = 0; i < bytes.length; i++) bytes[i] = s.charCodeAt(i);
  if (!LITTLE_ENDIAN) swapBytes(bytes);
  return bytes.buffer; // Int16 samples, native order
}

function swapBytes(bytes) {
  for (let i = 0; i + 1 < bytes.length; i += 2) [bytes[i], bytes[i + 1]] = [bytes[i + 1], bytes[i]];
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function addTranscript(text, final) {
  if (!line) {
    line = document.createElement("p");
    $("transcript").append(line);
  }
  line.textContent += text;
  status.transcript += text;
  if (final) {
    line = null;
    status.transcript += "\n";
  }
}

const handlers = {
  init_success(m) {
    status.connected = true;
    status.sessionId = m.session_id;
  },
  state(m) { status.state = m.state; },
  transcript(m) { addTranscript(m.text || "", m.final); },
  audio(m) {
    const buffer = pcmFromBase64(m.data);
    status.audioSamplesReceived += buffer.byteLength / 2;
    if (playback && hangupTimer === null) playback.port.postMessage({ type: "audio", buffer }, [buffer]);
  },
  mark(m) {
    if (playback && hangupTimer === null) playback.port.postMessage({ type: "mark", name: m.name });
    else echoMark(m.name); // nothing more plays: let the server finish at once
  },
  clear() {
    status.clears++;
    if (playback) playback.port.postMessage({ type: "clear" });
  },
  error(m) { status.error = m.message || "error"; },
  session_ended(m) {
    status.sessionEnded = true;
    status.endReason = m.reason || "";
  },
  call_event(m) {
    const { type, event, ...details } = m;
    status.events = [...status.events, { event, ...details }];
    const item = document.createElement("li");
    item.textContent = `${event}${Object.keys(details).length ? ": " + JSON.stringify(details) : ""}`;
    $("events").append(item);
  },
  transfer(m) {
    status.transferTo = m.to || "";
    handlers.call_event({ event: "transfer", target: m.target, to: m.to });
  },
};

function echoMark(name) {
  status.marksEchoed++;
  send({ type: "mark", name });
}

async function startAudio() {
  if (!window.isSecureContext || !navigator.mediaDevices) throw new Error("the microphone needs https (or localhost)");
  ctx = new AudioContext({ sampleRate: cfg.sample_rate, latencyHint: "interactive" });
  await ctx.audioWorklet.addModule(`${cfg.assets_path}/capture.js`);
  await ctx.audioWorklet.addModule(`${cfg.assets_path}/playback.js`);
  const rate = cfg.sample_rate;
  playback = new AudioWorkletNode(ctx, "playback", {
    numberOfInputs: 0, outputChannelCount: [1],
    processorOptions: { prebufferSamples: rate * cfg.prebuffer_ms / 1000, maxBufferSamples: rate * cfg.max_buffer_ms / 1000 },
  });
  playback.port.onmessage = ({ data }) => {
    if (data.type === "mark") echoMark(data.name);
    else if (data.type === "stats") {
      status.audioSamplesPlayed = data.played;
      status.underruns = data.underruns;
    }
  };
  playback.connect(ctx.destination);
  mic = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  capture = new AudioWorkletNode(ctx, "capture", {
    numberOfOutputs: 0, processorOptions: { chunkSamples: rate * cfg.chunk_ms / 1000 },
  });
  capture.port.onmessage = ({ data }) => {
    if (!status.connected || hangupTimer !== null) return;
    const bytes = new Uint8Array(data);
    if (!LITTLE_ENDIAN) swapBytes(bytes);
    send({ type: "audio", data: toBase64(bytes) });
  };
  ctx.createMediaStreamSource(mic).connect(capture);
  await ctx.resume();
}

function stopAudio() {
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  mic = ctx = capture = playback = null;
}

async function call() {
  Object.assign(status, { connected: false, state: "", transcript: "", audioSamplesReceived: 0, audioSamplesPlayed: 0,
    marksEchoed: 0, clears: 0, underruns: 0, sessionEnded: false, endReason: "", sessionId: "", error: "",
    events: [], transferTo: "" });
  $("transcript").textContent = "";
  $("events").textContent = "";
  line = null;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}${cfg.ws_path}`);
  show();
  const socket = ws;
  socket.onmessage = ({ data }) => {
    let m;
    try { m = JSON.parse(data); } catch { return; }
    const handler = handlers[m && m.type];
    if (handler) handler(m);
    show();
  };
  socket.onclose = (e) => {
    if (!status.sessionEnded && !status.error && e.code !== 1000) status.error = `connection closed (${e.code})`;
    status.connected = false;
    clearTimeout(hangupTimer);
    hangupTimer = null;
    ws = null;
    stopAudio();
    show();
  };
  try {
    await startAudio();
  } catch (err) {
    if (socket === ws) fail(`audio: ${err.message || err}`); // else the socket closed first and said why
    socket.close();
    return;
  }
  const init = { type: "init", sample_rate: cfg.sample_rate };
  const persona = new URLSearchParams(location.search).get("persona");
  if (persona) init.persona = persona;
  if (socket.readyState === WebSocket.CONNECTING) {
    await new Promise((done) => ["open", "close"].forEach((e) => socket.addEventListener(e, done, { once: true })));
  }
  if (socket === ws) send(init);
}

function hangUp() {
  if (!ws || hangupTimer !== null) return;
  send({ type: "end" });
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (playback) playback.port.postMessage({ type: "clear" }); // pending marks echo; the server drains at once
  const socket = ws;
  hangupTimer = setTimeout(() => socket.close(1000, "hang-up"), 3000); // the server closes first, normally
}

$("call").addEventListener("click", call);
$("hangup").addEventListener("click", hangUp);
show();
