"""A simulated caller: dials a bot the way Exotel's Voicebot applet or Twilio Media Streams do.

Written from the provider's side of docs/telephony-protocols.md §1-2, independently of the
transports, so it catches our own protocol bugs instead of sharing them. It plays the phone too:
bot audio goes through a real-time playout buffer, marks are echoed when the playout reaches them
(at once when nothing is queued), `clear` cuts what is queued and echoes pending marks, and every
breach of the provider's rules is reported. As Twilio, it fetches the TwiML from the voice webhook
first and signs both requests when given the auth token.
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

    def __init__(self, ws: ClientConnection, rate: int, stream_sid: str, dialect: "Exotel | Twilio"):
        self.ws = ws
        self.rate = rate
        self.sid = stream_sid
        self.dialect = dialect
        self.result = CallResult(heard=np.zeros(0, np.int16), sample_rate=rate)
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.segments: list[tuple[int, np.ndarray]] = []  # (start sample, audio), in play order
        self.play_end = 0  # sample where queued audio runs out
        self.pending_marks: list[tuple[int, str]] = []  # (due sample, name)
        self.seq = 0
        self.send_lock = asyncio.Lock()
        self.server_closed = asyncio.Event()
        self.media_received = 0

    def now(self) -> float:
        return self.loop.time() - self.t0

    def now_sample(self) -> int:
        return round(max(self.now(), 0.0) * self.rate)

    async def send(self, message: dict) -> bool:
        """Send with the next sequence number; False once the socket is gone."""
        async with self.send_lock:
            self.seq += 1
            message = {"event": message["event"], **self.dialect.envelope(self.seq, self.sid)} | {
                k: v for k, v in message.items() if k != "event"}
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
        event = msg.get("event")
        if event not in BOT_EVENTS:
            return self.violation(t, f"unknown event {event!r}")
        sid = msg.get(self.dialect.sid_key)
        if sid != self.sid:
            self.violation(t, f"{event} with {self.dialect.sid_key} {sid!r}, call is {self.sid!r}")
        self.dialect.check_fields(self, t, msg)
        if event == "media":
            self.on_media(t, msg)
        elif event == "mark":
            await self.on_mark(t, msg)
        else:
            await self.on_clear()

    def on_media(self, t: float, msg: dict) -> None:
        self.media_received += 1
        media = msg.get("media")
        b64 = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(b64, str):
            return self.violation(t, "media without media.payload")
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

    async def on_mark(self, t: float, msg: dict) -> None:
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            return self.violation(t, "mark without mark.name")
        if self.play_end <= self.now_sample():
            await self.echo(name)
        else:
            self.pending_marks.append((self.play_end, name))

    async def on_clear(self) -> None:
        """Cut queued audio at this instant; pending marks are echoed now, as Twilio documents
        (Exotel does not say, doc §1.8)."""
        self.result.clears += 1
        cut = self.now_sample()
        self.segments = [(s, a[: cut - s]) for s, a in self.segments if s < cut]
        self.play_end = cut
        pending, self.pending_marks = self.pending_marks, []
        for _, name in pending:
            await self.echo(name)

    async def echo(self, name: str) -> None:
        self.result.marks_echoed.append(name)
        await self.send({"event": "mark", "mark": {"name": name}})

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


class Exotel:
    """Exotel's Voicebot applet: snake_case, PCM16 at the URL's rate, ~100 ms media, strict chunk sizes."""

    name = "exotel"
    sid_key = "stream_sid"
    chunk_ms = 100

    def __init__(self, min_chunk_bytes: int = 3200):
        self.min_chunk_bytes = min_chunk_bytes

    def envelope(self, seq: int, sid: str) -> dict:
        return {"sequence_number": str(seq), "stream_sid": sid}

    def start(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
        """The documented `start` event, values as strings like Exotel's own examples."""
        return {"event": "start", "start": {
            "stream_sid": phone.sid, "call_sid": call_sid, "account_sid": "simulated",
            "from": "09999999999", "to": "08000000000", "custom_parameters": dict(custom_parameters),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(phone.rate), "bit_rate": "16"}}}

    def media(self, k: int, ms: int, pcm: bytes) -> dict:
        return {"chunk": str(k + 1), "timestamp": str((k + 1) * ms), "payload": base64.b64encode(pcm).decode("ascii")}

    def stop(self, call_sid: str) -> dict:
        return {"event": "stop", "stop": {"call_sid": call_sid, "account_sid": "simulated", "reason": "callended"}}

    def decode(self, wire: bytes) -> bytes:
        return wire

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        pass  # Exotel documents no error for extra fields

    def check_chunk(self, phone: _Phone, t: float, size: int) -> None:
        """Exotel's outbound rules (doc §1.7): 320-byte multiples, >= minimum, <= 100 kB."""
        n = phone.media_received
        if size % PACKET_BYTES:
            phone.violation(t, f"media #{n}: {size} bytes is not a multiple of {PACKET_BYTES}")
        if size < self.min_chunk_bytes:
            phone.violation(t, f"media #{n}: {size} bytes is below the {self.min_chunk_bytes}-byte minimum")
        if size > MAX_CHUNK_BYTES:
            phone.violation(t, f"media #{n}: {size} bytes is above the {MAX_CHUNK_BYTES}-byte maximum")


class Twilio:
    """Twilio Media Streams: camelCase, μ-law 8 kHz, 20 ms media; error 31951 on any extra field."""

    name = "twilio"
    sid_key = "streamSid"
    chunk_ms = 20
    FIELDS = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
              "clear": {"event", "streamSid"}}

    def envelope(self, seq: int, sid: str) -> dict:
        return {"sequenceNumber": str(seq), "streamSid": sid}

    def start(self, phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
        return {"event": "start", "start": {
            "streamSid": phone.sid, "accountSid": "ACsimulated", "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": dict(custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    def media(self, k: int, ms: int, pcm: bytes) -> dict:
        return {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * ms),
                "payload": base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode("ascii")}

    def stop(self, call_sid: str) -> dict:
        return {"event": "stop", "stop": {"accountSid": "ACsimulated", "callSid": call_sid}}

    def decode(self, wire: bytes) -> bytes:
        return audioop.ulaw2lin(wire, 2)

    def check_fields(self, phone: _Phone, t: float, msg: dict) -> None:
        expected = self.FIELDS.get(msg.get("event"), set(msg))
        if set(msg) != expected:
            phone.violation(t, f"{msg.get('event')} fields {sorted(msg)}, Twilio wants {sorted(expected)} (error 31951)")
        inner = msg.get("media")
        if msg.get("event") == "media" and isinstance(inner, dict) and set(inner) != {"payload"}:
            phone.violation(t, f"media.{sorted(inner)}: Twilio wants only media.payload (error 31951)")

    def check_chunk(self, phone: _Phone, t: float, size: int) -> None:
        if size == 0:
            phone.violation(t, f"media #{phone.media_received}: empty payload")


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
    """Stream the caller's audio in real time against absolute deadlines, so pacing never drifts."""
    for k in range(len(speech) // chunk):
        deadline = phone.t0 + (k + 1) * chunk / phone.rate  # a chunk leaves once it was "recorded"
        await asyncio.sleep(max(0.0, deadline - phone.loop.time()))
        if phone.server_closed.is_set():
            return
        pcm = speech[k * chunk : (k + 1) * chunk].astype("<i2").tobytes()
        media = phone.dialect.media(k, chunk * 1000 // phone.rate, pcm)
        if not await phone.send({"event": "media", "media": media}):
            return
        phone.result.sent_seconds = (k + 1) * chunk / phone.rate


async def _listen(phone: _Phone) -> None:
    try:
        async for raw in phone.ws:
            await phone.on_message(raw)
    except ConnectionClosed:
        pass
    finally:
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
) -> CallResult:
    """Dial `url` as the provider, say `audio`, and return what the caller heard and what the bot broke.

    Exotel dials the stream URL with the rate and custom parameters in its query. Twilio takes the
    voice webhook (http[s]://) and follows its TwiML, or a ws[s]:// stream URL directly; its audio is
    always 8 kHz.
    """
    custom_parameters = dict(custom_parameters or {})
    stream_sid = stream_sid or f"MZ{uuid.uuid4().hex}"
    call_sid = call_sid or f"CA{uuid.uuid4().hex}"
    headers = {}
    if provider == "twilio":
        dialect: Exotel | Twilio = Twilio()
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
    else:
        raise ValueError(f"the simulated caller speaks exotel or twilio, not {provider!r}")
    chunk = sample_rate * (chunk_ms or dialect.chunk_ms) // 1000
    speech = _speech(audio, sample_rate, seconds, chunk)
    async with connect(url, max_size=16 * 2**20, open_timeout=10, additional_headers=headers) as ws:
        connected = {"event": "connected"} if provider == "exotel" else {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        await ws.send(json.dumps(connected))
        phone = _Phone(ws, sample_rate, stream_sid, dialect)
        await phone.send(dialect.start(phone, call_sid, custom_parameters))
        listener = asyncio.create_task(_listen(phone), name=f"caller-listen-{stream_sid}")
        clock = asyncio.create_task(_clock(phone, progress), name=f"caller-clock-{stream_sid}")
        try:
            await _speak(phone, speech, chunk)
            if hangup and not phone.server_closed.is_set():
                await phone.send(dialect.stop(call_sid))
            try:
                await asyncio.wait_for(phone.server_closed.wait(), linger)
                phone.result.close_code = ws.close_code
            except TimeoutError:
                pass
            end = phone.now_sample()
        finally:
            clock.cancel()
            await ws.close()
            listener.cancel()
            await asyncio.gather(listener, clock, return_exceptions=True)
    phone.result.heard = phone.render(end)
    return phone.result
