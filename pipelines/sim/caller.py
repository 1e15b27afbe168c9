"""A simulated caller: dials a bot the way Exotel's Voicebot applet, Twilio Media Streams or the
browser page (transports/browser_page/) do.

Written from the providers' own documentation (summarised in docs/protocols.md) and from the page's script,
independently of the transports, so it catches our own protocol bugs instead of sharing them. It
plays the phone too: bot audio goes through a real-time playout buffer, marks are echoed when the
playout reaches them (at once when nothing is queued), `clear` cuts what is queued and echoes
pending marks, and every breach of the provider's rules is reported. As Twilio, it fetches the TwiML
from the voice webhook first and signs both requests when given the auth token.

Timed actions (`events=`): DTMF digits (Exotel and Twilio `dtmf` events; the page has none) and a
hang-up (Exotel/Twilio `stop`, the page's `end`), after which the server must close the socket.
Every media chunk received is kept with its arrival time and level, and every `clear` and `mark`
with its arrival time, so what was heard can be judged afterwards (pipelines/sim/scenarios/checks.py).
"""

import asyncio
import audioop
import base64
import binascii
import hashlib
import hmac
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import numpy as np
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

PACKET_BYTES = 320  # Exotel plays 320-byte packets
MAX_CHUNK_BYTES = 100_000  # documented maximum media payload
BOT_EVENTS = ("media", "mark", "clear")  # all a Voicebot may send
TICK = 0.01  # playout clock resolution (mark echo latency)
VOICED_RMS = 100.0  # a received chunk above this int16 RMS (about -50 dBFS) counts as voiced


@dataclass
class Received:
    """One media chunk as it arrived: when, where its playout starts on the heard track, and its level."""

    t: float  # arrival, seconds on the call's timeline
    start: int  # first sample on the heard track (playout starts at arrival or when the queue runs out)
    samples: int
    rms: float

    @property
    def voiced(self) -> bool:
        return self.rms > VOICED_RMS


@dataclass
class Dtmf:
    """Press `digit` at `at` seconds on the call's timeline (Exotel and Twilio only)."""

    at: float
    digit: str
    duration_ms: int = 250


@dataclass
class HangUp:
    """Stop talking at `at` seconds and hang up: Exotel/Twilio `stop`, the page's `end`."""

    at: float


@dataclass
class CallResult:
    heard: np.ndarray  # int16 at the call rate on the call's timeline (index 0 = `start` sent)
    sample_rate: int
    messages: list[tuple[float, dict]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    clears: int = 0
    close_code: int | None = None
    sent_seconds: float = 0.0
    unsent_seconds: float = 0.0  # audio "recorded" before the bot accepted the call, never sent
    provider: str = "exotel"
    chunks: list[Received] = field(default_factory=list)  # every media chunk, in arrival order
    clear_times: list[float] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (arrival, name) of the bot's marks
    dtmf_sent: list[tuple[float, str]] = field(default_factory=list)
    hung_up_at: float | None = None  # when we sent stop / end
    server_closed_at: float | None = None  # when the server closed the socket (None: we closed it)
    bot_errors: list[str] = field(default_factory=list)  # the page's `error` messages
    ended: str | None = None  # the page's `session_ended` reason


def dial_url(url: str, sample_rate: int, custom_parameters: dict[str, str]) -> str:
    """The URL as configured in the applet: rate and custom parameters ride in the query."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.setdefault("sample-rate", str(sample_rate))
    for key, value in custom_parameters.items():
        query.setdefault(key, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


class _Phone:
    """Shared state of one call: the playout timeline, pending marks and what the bot did."""

    def __init__(self, ws: ClientConnection, rate: int, stream_sid: str, dialect: "Exotel | Twilio | Browser"):
        self.ws = ws
        self.rate = rate
        self.sid = stream_sid
        self.dialect = dialect
        self.result = CallResult(heard=np.zeros(0, np.int16), sample_rate=rate, provider=dialect.name)
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.segments: list[tuple[int, np.ndarray]] = []  # (start sample, audio), in play order
        self.play_end = 0  # sample where queued audio runs out
        self.pending_marks: list[tuple[int, str]] = []  # (due sample, name)
        self.seq = 0
        self.send_lock = asyncio.Lock()
        self.server_closed = asyncio.Event()
        self.media_received = 0
        self.closing = False  # we are closing the socket (so its end is not the server's doing)
        self.ready = asyncio.Event()  # the bot accepted the call (the page waits for init_success)
        if not dialect.waits_for_ready:
            self.ready.set()

    def now(self) -> float:
        return self.loop.time() - self.t0

    def now_sample(self) -> int:
        return round(max(self.now(), 0.0) * self.rate)

    async def send(self, message: dict) -> bool:
        """Send with the next sequence number; False once the socket is gone."""
        async with self.send_lock:
            self.seq += 1
            message = self.dialect.wrap(self.seq, self.sid, message)
            try:
                await self.ws.send(json.dumps(message))
                return True
            except ConnectionClosed:
                return False

    def violation(self, t: float, text: str) -> None:
        self.result.violations.append(f"{t:.3f}s {text}")
        logger.warning(f"caller {self.sid}: bot violation at {t:.3f}s: {text}")

    # ---- what the bot sends -------------------------------------------------------------

    async def on_message(self, raw: str | bytes) -> None:
        t = self.now()
        if isinstance(raw, bytes):
            return self.violation(t, f"binary frame of {len(raw)} bytes ({self.dialect.name} expects JSON text)")
        try:
            msg = json.loads(raw)
        except ValueError:
            return self.violation(t, f"bad JSON: {raw[:60]!r}")
        if not isinstance(msg, dict):
            return self.violation(t, f"JSON {type(msg).__name__}, not an object")
        self.result.messages.append((t, msg))
        event = msg.get(self.dialect.event_key)
        if event not in self.dialect.bot_events:
            return self.violation(t, f"unknown {self.dialect.event_key} {event!r}")
        self.dialect.check_fields(self, t, msg)
        if event == "media" or (event == "audio" and self.dialect.name == "browser"):
            self.on_media(t, msg)
        elif event == "mark":
            await self.on_mark(t, msg)
        elif event == "clear":
            await self.on_clear()
        else:
            self.dialect.on_other(self, t, event, msg)

    def on_media(self, t: float, msg: dict) -> None:
        self.media_received += 1
        b64 = self.dialect.payload(msg)
        if not isinstance(b64, str):
            return self.violation(t, f"{self.dialect.media_field} without {self.dialect.payload_field}")
        try:
            wire = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return self.violation(t, f"media #{self.media_received}: payload is not base64")
        self.dialect.check_chunk(self, t, len(wire))
        pcm = self.dialect.decode(wire)
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int16)
        start = max(round(max(t, 0.0) * self.rate), self.play_end)
        self.segments.append((start, samples))
        self.play_end = start + len(samples)
        level = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
        self.result.chunks.append(Received(t, start, len(samples), level))
        self.dialect.check_backlog(self, t)

    async def on_mark(self, t: float, msg: dict) -> None:
        name = self.dialect.mark_name(msg)
        if not isinstance(name, str):
            return self.violation(t, f"mark without {self.dialect.mark_field}")
        self.result.marks.append((t, name))
        if self.play_end <= self.now_sample():
            await self.echo(name)
        else:
            self.pending_marks.append((self.play_end, name))

    async def on_clear(self) -> None:
        """Cut queued audio at this instant; pending marks are echoed now, as Twilio documents
        (Exotel does not say)."""
        self.result.clears += 1
        self.result.clear_times.append(self.now())
        cut = self.now_sample()
        self.segments = [(s, a[: cut - s]) for s, a in self.segments if s < cut]
        self.play_end = cut
        pending, self.pending_marks = self.pending_marks, []
        for _, name in pending:
            await self.echo(name)

    async def echo(self, name: str) -> None:
        self.result.marks_echoed.append(name)
        await self.send(self.dialect.mark_echo(name))

    async def tick(self) -> None:
        """Echo marks whose audio has played out."""
        now = self.now_sample()
        while self.pending_marks and self.pending_marks[0][0] <= now:
            _, name = self.pending_marks.pop(0)
            await self.echo(name)

    def heard_seconds(self) -> float:
        now = self.now_sample()
        return sum(min(len(a), max(0, now - s)) for s, a in self.segments) / self.rate

    def render(self, end_sample: int) -> np.ndarray:
        heard = np.zeros(end_sample, dtype=np.int16)
        for start, audio in self.segments:
            if start < end_sample:
                part = audio[: end_sample - start]
                heard[start : start + len(part)] = part
        return heard


class _Telephony:
    """What Exotel and Twilio share: `event` messages with a stream id, `media.payload`, `mark.name`."""

    event_key = "event"
    bot_events = BOT_EVENTS
    media_field, payload_field, mark_field = "media", "media.payload", "mark.name"
    waits_for_ready = False
    name = sid_key = ""

    def envelope(self, seq: int, sid: str) -> dict:
        raise NotImplementedError

    def wrap(self, seq: int, sid: str, message: dict) -> dict:
        return {"event": message["event"], **self.envelope(seq, sid)} | {k: v for k, v in message.items() if k != "event"}

    def payload(self, msg: dict):
        media = msg.get("media")
        return media.get("payload") if isinstance(media, dict) else None

    def mark_name(self, msg: dict):
        mark = msg.get("mark")
        return mark.get("name") if isinstance(mark, dict) else None

    def mark_echo(self, name: str) -> dict:
        return {"event": "mark", "mark": {"name": name}}

    def check_envelope(self, phone: _Phone, t: float, msg: dict) -> None:
        sid = msg.get(self.sid_key)
        if sid != phone.sid:
            phone.violation(t, f"{msg.get('event')} with {self.sid_key} {sid!r}, call is {phone.sid!r}")

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        self.check_envelope(phone, t, msg)

    def check_backlog(self, phone: _Phone, t: float) -> None:
        pass  # neither provider documents a limit on queued audio

    def on_other(self, phone: _Phone, t: float, event: str, msg: dict) -> None:
        pass  # BOT_EVENTS are all handled

    def media(self, k: int, ms: int, pcm: bytes) -> dict:
        raise NotImplementedError

    def media_message(self, k: int, ms: int, pcm: bytes) -> dict:
        """Caller chunk `k` (`ms` long) as the message that carries it."""
        return {"event": "media", "media": self.media(k, ms, pcm)}

    def opening(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> list[dict]:
        """The messages that open the call, after `connected`."""
        return [self.start(phone, call_sid, custom_parameters)]

    def start(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
        raise NotImplementedError

    def hang_up(self, call_sid: str) -> dict:
        return self.stop(call_sid)

    def stop(self, call_sid: str) -> dict:
        raise NotImplementedError


class Exotel(_Telephony):
    """Exotel's Voicebot applet: snake_case, PCM16 at the URL's rate, ~100 ms media, strict chunk sizes."""

    name = "exotel"
    sid_key = "stream_sid"
    chunk_ms = 100

    def __init__(self, min_chunk_bytes: int = 3200):
        self.min_chunk_bytes = min_chunk_bytes

    def envelope(self, seq: int, sid: str) -> dict:
        return {"sequence_number": str(seq), "stream_sid": sid}

    def connected(self) -> dict:
        return {"event": "connected"}

    def start(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
        """The documented `start` event, values as strings like Exotel's own examples."""
        return {"event": "start", "start": {
            "stream_sid": phone.sid, "call_sid": call_sid, "account_sid": "simulated",
            "from": "09999999999", "to": "08000000000", "custom_parameters": dict(custom_parameters),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(phone.rate), "bit_rate": "16"}}}

    def media(self, k: int, ms: int, pcm: bytes) -> dict:
        return {"chunk": str(k + 1), "timestamp": str((k + 1) * ms), "payload": base64.b64encode(pcm).decode("ascii")}

    def dtmf(self, digit: str, duration_ms: int) -> dict:
        """Exotel's `dtmf` event: the digit and how long it was held, as strings."""
        return {"event": "dtmf", "dtmf": {"digit": digit, "duration": str(duration_ms)}}

    def stop(self, call_sid: str) -> dict:
        return {"event": "stop", "stop": {"call_sid": call_sid, "account_sid": "simulated", "reason": "callended"}}

    def decode(self, wire: bytes) -> bytes:
        return wire

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        self.check_envelope(phone, t, msg)  # Exotel documents no error for extra fields

    def check_chunk(self, phone: _Phone, t: float, size: int) -> None:
        """Exotel's outbound rules (docs/protocols.md, Exotel): 320-byte multiples, >= minimum, <= 100 kB."""
        n = phone.media_received
        if size % PACKET_BYTES:
            phone.violation(t, f"media #{n}: {size} bytes is not a multiple of {PACKET_BYTES}")
        if size < self.min_chunk_bytes:
            phone.violation(t, f"media #{n}: {size} bytes is below the {self.min_chunk_bytes}-byte minimum")
        if size > MAX_CHUNK_BYTES:
            phone.violation(t, f"media #{n}: {size} bytes is above the {MAX_CHUNK_BYTES}-byte maximum")


class Twilio(_Telephony):
    """Twilio Media Streams: camelCase, μ-law 8 kHz, 20 ms media; error 31951 on any extra field."""

    name = "twilio"
    sid_key = "streamSid"
    chunk_ms = 20
    FIELDS = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
              "clear": {"event", "streamSid"}}

    def envelope(self, seq: int, sid: str) -> dict:
        return {"sequenceNumber": str(seq), "streamSid": sid}

    def connected(self) -> dict:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
        return {"event": "start", "start": {
            "streamSid": phone.sid, "accountSid": "ACsimulated", "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": dict(custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    def media(self, k: int, ms: int, pcm: bytes) -> dict:
        return {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * ms),
                "payload": base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode("ascii")}

    def dtmf(self, digit: str, duration_ms: int) -> dict:
        """Twilio's `dtmf` message (bidirectional streams): the track and the digit, nothing else."""
        return {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}}

    def stop(self, call_sid: str) -> dict:
        return {"event": "stop", "stop": {"accountSid": "ACsimulated", "callSid": call_sid}}

    def decode(self, wire: bytes) -> bytes:
        return audioop.ulaw2lin(wire, 2)

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        self.check_envelope(phone, t, msg)
        expected = self.FIELDS.get(msg.get("event"), set(msg))
        if set(msg) != expected:
            phone.violation(t, f"{msg.get('event')} fields {sorted(msg)}, Twilio wants {sorted(expected)} (error 31951)")
        inner = msg.get("media")
        if msg.get("event") == "media" and isinstance(inner, dict) and set(inner) != {"payload"}:
            phone.violation(t, f"media.{sorted(inner)}: Twilio wants only media.payload (error 31951)")

    def check_chunk(self, phone: _Phone, t: float, size: int) -> None:
        if size == 0:
            phone.violation(t, f"media #{phone.media_received}: empty payload")


class Browser:
    """The call page (transports/browser_page/main.js): `type` messages, base64 PCM16LE at the page's
    rate both ways, no envelope. The page sends `init` once the socket is open and microphone audio
    only after `init_success`; it echoes a `mark` when playback passes it (or a `clear` drops it),
    keeps at most `max_buffer_ms` queued, and hangs up with `end`."""

    name = "browser"
    event_key = "type"
    bot_events = ("init_success", "state", "transcript", "audio", "mark", "clear", "error", "call_event", "transfer", "session_ended")
    media_field, payload_field, mark_field = "audio", "data", "name"
    waits_for_ready = True
    chunk_ms = 40
    STATES = ("listening", "thinking", "speaking")

    def __init__(self, max_buffer_ms: int = 2000):
        self.max_buffer_ms = max_buffer_ms
        self.init_at: float | None = None
        self.rate = 16000

    def wrap(self, seq: int, sid: str, message: dict) -> dict:
        return message

    def connected(self) -> dict | None:
        return None  # nothing before `init`

    def opening(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> list[dict]:
        self.rate = phone.rate
        return [{"type": "init", "sample_rate": phone.rate, "session_id": phone.sid, **custom_parameters}]

    def media_message(self, k: int, ms: int, pcm: bytes) -> dict:
        return {"type": "audio", "data": base64.b64encode(pcm).decode("ascii")}

    def dtmf(self, digit: str, duration_ms: int) -> dict:
        raise ValueError("the browser page has no DTMF")

    def hang_up(self, call_sid: str) -> dict:
        return {"type": "end"}

    def payload(self, msg: dict):
        return msg.get("data")

    def mark_name(self, msg: dict):
        name = msg.get("name")
        return name if isinstance(name, str) and name else None

    def mark_echo(self, name: str) -> dict:
        return {"type": "mark", "name": name}

    def decode(self, wire: bytes) -> bytes:
        return wire

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        kind = msg.get("type")
        if kind in ("audio", "mark", "clear", "state", "transcript") and self.init_at is None:
            phone.violation(t, f"{kind} before init_success")

    def check_chunk(self, phone: _Phone, t: float, size: int) -> None:
        if size == 0 or size % 2:
            phone.violation(t, f"audio #{phone.media_received}: {size} bytes is not whole PCM16 samples")

    def check_backlog(self, phone: _Phone, t: float) -> None:
        """The page drops the oldest audio beyond max_buffer_ms: a bot that far ahead loses speech."""
        queued = (phone.play_end - phone.now_sample()) / phone.rate
        if queued * 1000 > self.max_buffer_ms:
            phone.violation(t, f"audio #{phone.media_received}: {queued * 1000:.0f} ms queued, the page keeps "
                               f"{self.max_buffer_ms} ms and drops the rest")

    def on_other(self, phone: _Phone, t: float, event: str, msg: dict) -> None:
        if event == "init_success":
            if self.init_at is not None:
                phone.violation(t, "a second init_success")
            self.init_at = t
            if msg.get("session_id") != phone.sid:
                phone.violation(t, f"init_success for session {msg.get('session_id')!r}, the page sent {phone.sid!r}")
            if msg.get("sample_rate") != phone.rate:
                phone.violation(t, f"init_success at {msg.get('sample_rate')!r} Hz, the page runs {phone.rate}")
            phone.ready.set()
        elif event == "state":
            if msg.get("state") not in self.STATES:
                phone.violation(t, f"state {msg.get('state')!r}, the page knows {', '.join(self.STATES)}")
        elif event == "transcript":
            if not isinstance(msg.get("text"), str):
                phone.violation(t, "transcript without text")
        elif event == "error":
            phone.result.bot_errors.append(f"{t:.3f}s {msg.get('message')}")
        elif event == "call_event":
            if not isinstance(msg.get("event"), str):
                phone.violation(t, "call_event without an event name")
        elif event == "transfer":
            if not (isinstance(msg.get("target"), str) and isinstance(msg.get("to"), str)):
                phone.violation(t, "transfer without target and to")
        elif event == "session_ended":
            phone.result.ended = str(msg.get("reason"))


def twilio_signature(auth_token: str, url: str, form: dict[str, str] | None = None) -> str:
    """Twilio's X-Twilio-Signature: HMAC-SHA1 over the URL and the sorted POST fields, base64."""
    data = url + "".join(k + v for k, v in sorted((form or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


async def fetch_twiml(url: str, call_sid: str, auth_token: str | None) -> tuple[str, dict[str, str]]:
    """POST the voice webhook as Twilio does; return the <Connect><Stream> url and its <Parameter>s."""
    form = {"CallSid": call_sid, "AccountSid": "ACsimulated", "From": "+15550001111", "To": "+15550002222",
            "Direction": "inbound", "CallStatus": "ringing"}
    headers = {"X-Twilio-Signature": twilio_signature(auth_token, url, form)} if auth_token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.post(url, data=form, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ConnectionError(f"TwiML webhook {url} answered HTTP {resp.status}: {body[:200]}")
    stream = ET.fromstring(body).find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise ConnectionError(f"TwiML from {url} has no <Connect><Stream url>: {body[:200]}")
    return stream.get("url"), {p.get("name"): p.get("value") for p in stream.findall("Parameter")}


def _speech(audio: np.ndarray, rate: int, seconds: float | None, chunk: int) -> np.ndarray:
    """What the caller says: the audio, then silence up to `seconds`, in whole chunks."""
    audio = np.asarray(audio)
    if audio.dtype.kind == "f":
        audio = np.round(np.clip(audio, -1.0, 1.0) * 32767)
    audio = audio.astype(np.int16).reshape(-1)
    total = len(audio) if seconds is None else round(seconds * rate)
    total = -(-total // chunk) * chunk
    out = np.zeros(total, dtype=np.int16)
    out[: min(total, len(audio))] = audio[:total]
    return out


async def _speak(phone: _Phone, speech: np.ndarray, chunk: int) -> None:
    """Stream the caller's audio in real time against absolute deadlines, so pacing never drifts.
    Chunks "recorded" before the bot accepted the call are not sent (the page drops them too)."""
    for k in range(len(speech) // chunk):
        deadline = phone.t0 + (k + 1) * chunk / phone.rate  # a chunk leaves once it was "recorded"
        await asyncio.sleep(max(0.0, deadline - phone.loop.time()))
        if phone.server_closed.is_set():
            return
        if not phone.ready.is_set():
            phone.result.unsent_seconds = (k + 1) * chunk / phone.rate
            continue
        pcm = speech[k * chunk : (k + 1) * chunk].astype("<i2").tobytes()
        if not await phone.send(phone.dialect.media_message(k, chunk * 1000 // phone.rate, pcm)):
            return
        phone.result.sent_seconds = (k + 1) * chunk / phone.rate


async def _press(phone: _Phone, events: list[Dtmf]) -> None:
    """Send each DTMF digit at its time on the call's timeline."""
    for event in sorted(events, key=lambda e: e.at):
        await asyncio.sleep(max(0.0, phone.t0 + event.at - phone.loop.time()))
        if phone.server_closed.is_set():
            return
        if await phone.send(phone.dialect.dtmf(event.digit, event.duration_ms)):
            phone.result.dtmf_sent.append((phone.now(), event.digit))


async def _listen(phone: _Phone) -> None:
    try:
        async for raw in phone.ws:
            await phone.on_message(raw)
    except ConnectionClosed:
        pass
    finally:
        if phone.result.server_closed_at is None and not phone.closing:
            phone.result.server_closed_at = phone.now()
        phone.server_closed.set()


async def _clock(phone: _Phone, progress: Callable[[str], None] | None) -> None:
    next_report = 1.0
    while True:
        await phone.tick()
        if progress and phone.now() >= next_report:
            next_report += 1.0
            r = phone.result
            progress(f"call {phone.now():4.1f}s: sent {r.sent_seconds:.1f}s, heard {phone.heard_seconds():.1f}s, "
                     f"{len(r.messages)} messages, {len(r.violations)} violations")
        await asyncio.sleep(TICK)


async def place_call(
    url: str,
    audio: np.ndarray,
    sample_rate: int,
    *,
    provider: str = "exotel",
    seconds: float | None = None,
    custom_parameters: dict[str, str] | None = None,
    chunk_ms: int | None = None,
    min_chunk_bytes: int = 3200,
    auth_token: str | None = None,
    stream_sid: str | None = None,
    call_sid: str | None = None,
    progress: Callable[[str], None] | None = None,
    hangup: bool = True,
    linger: float = 1.0,
    events: list[Dtmf | HangUp] | None = None,
    max_buffer_ms: int = 2000,
) -> CallResult:
    """Dial `url` as the provider, say `audio`, and return what the caller heard and what the bot broke.

    Exotel dials the stream URL with the rate and custom parameters in its query. Twilio takes the
    voice webhook (http[s]://) and follows its TwiML, or a ws[s]:// stream URL directly; its audio is
    always 8 kHz. The browser dials the page's WebSocket and sends `init` (with `stream_sid` as its
    session id and the custom parameters); its audio is at the page's rate (`sample_rate`).

    `events`: DTMF digits at their times, and at most one HangUp, which ends the caller's audio
    there (instead of after `seconds`). After the hang-up (or the audio's end, with `hangup`) the
    server has `linger` seconds to close the socket.
    """
    custom_parameters = dict(custom_parameters or {})
    stream_sid = stream_sid or f"MZ{uuid.uuid4().hex}"
    call_sid = call_sid or f"CA{uuid.uuid4().hex}"
    events = list(events or [])
    presses = [e for e in events if isinstance(e, Dtmf)]
    hang_ups = [e for e in events if isinstance(e, HangUp)]
    if len(hang_ups) > 1:
        raise ValueError("a caller hangs up once")
    headers = {}
    if provider == "twilio":
        dialect: Exotel | Twilio | Browser = Twilio()
        if sample_rate != 8000:
            raise ValueError(f"Twilio streams are 8000 Hz, not {sample_rate}")
        if url.startswith(("http://", "https://")):
            url, from_twiml = await fetch_twiml(url, call_sid, auth_token)
            custom_parameters = from_twiml | custom_parameters
        if auth_token:
            headers["X-Twilio-Signature"] = twilio_signature(auth_token, url)
    elif provider == "exotel":
        dialect = Exotel(min_chunk_bytes)
        if len(custom_parameters) > 3 or len(urlencode(custom_parameters)) > 256:
            logger.warning("caller: Exotel allows at most 3 custom parameters, 256 characters in all")
        url = dial_url(url, sample_rate, custom_parameters)
    elif provider == "browser":
        dialect = Browser(max_buffer_ms)
        if presses:
            raise ValueError("the browser page has no DTMF")
    else:
        raise ValueError(f"the simulated caller speaks exotel, twilio or browser, not {provider!r}")
    chunk = sample_rate * (chunk_ms or dialect.chunk_ms) // 1000
    if hang_ups:
        seconds, hangup = hang_ups[0].at, True
    speech = _speech(audio, sample_rate, seconds, chunk)
    if hang_ups:
        speech = speech[: round(hang_ups[0].at * sample_rate) // chunk * chunk]
    async with connect(url, max_size=16 * 2**20, open_timeout=10, additional_headers=headers) as ws:
        connected = dialect.connected()
        if connected:
            await ws.send(json.dumps(connected))
        phone = _Phone(ws, sample_rate, stream_sid, dialect)
        for message in dialect.opening(phone, call_sid, custom_parameters):
            await phone.send(message)
        listener = asyncio.create_task(_listen(phone), name=f"caller-listen-{stream_sid}")
        clock = asyncio.create_task(_clock(phone, progress), name=f"caller-clock-{stream_sid}")
        keys = asyncio.create_task(_press(phone, presses), name=f"caller-dtmf-{stream_sid}")
        try:
            await _speak(phone, speech, chunk)
            if hang_ups:
                await asyncio.sleep(max(0.0, phone.t0 + hang_ups[0].at - phone.loop.time()))
            keys.cancel()
            if hangup and not phone.server_closed.is_set():
                phone.result.hung_up_at = phone.now()
                await phone.send(dialect.hang_up(call_sid))
            try:
                await asyncio.wait_for(phone.server_closed.wait(), linger)
                phone.result.close_code = ws.close_code
            except TimeoutError:
                pass
            end = phone.now_sample()
        finally:
            phone.closing = True
            clock.cancel()
            keys.cancel()
            await ws.close()
            listener.cancel()
            await asyncio.gather(listener, clock, keys, return_exceptions=True)
    phone.result.heard = phone.render(end)
    return phone.result
