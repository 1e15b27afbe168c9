"""A simulated Exotel caller: dials a bot the way Exotel's Voicebot applet does.

Written from the provider's side of docs/telephony-protocols.md §1, independently of
transports/exotel.py, so it catches our own protocol bugs instead of sharing them. It plays
the phone too: bot audio goes through a real-time playout buffer, marks are echoed when the
playout reaches them, `clear` cuts what is queued, and every chunk-rule breach is reported.
"""

import asyncio
import base64
import binascii
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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

    def __init__(self, ws: ClientConnection, rate: int, stream_sid: str, min_chunk_bytes: int):
        self.ws = ws
        self.rate = rate
        self.sid = stream_sid
        self.min_chunk_bytes = min_chunk_bytes
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
            message = {"event": message["event"], "sequence_number": str(self.seq),
                       "stream_sid": self.sid} | {k: v for k, v in message.items() if k != "event"}
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
            return self.violation(t, f"binary frame of {len(raw)} bytes (Exotel expects JSON text)")
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
        sid = msg.get("stream_sid", msg.get("streamSid"))
        if sid != self.sid:
            self.violation(t, f"{event} with stream_sid {sid!r}, call is {self.sid!r}")
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
            pcm = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return self.violation(t, f"media #{self.media_received}: payload is not base64")
        self.check_chunk(t, len(pcm))
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int16)
        start = max(round(max(t, 0.0) * self.rate), self.play_end)
        self.segments.append((start, samples))
        self.play_end = start + len(samples)

    def check_chunk(self, t: float, size: int) -> None:
        """Exotel's outbound rules (doc §1.7): 320-byte multiples, >= minimum, <= 100 kB."""
        n = self.media_received
        if size % PACKET_BYTES:
            self.violation(t, f"media #{n}: {size} bytes is not a multiple of {PACKET_BYTES}")
        if size < self.min_chunk_bytes:
            self.violation(t, f"media #{n}: {size} bytes is below the {self.min_chunk_bytes}-byte minimum")
        if size > MAX_CHUNK_BYTES:
            self.violation(t, f"media #{n}: {size} bytes is above the {MAX_CHUNK_BYTES}-byte maximum")

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
        """Cut queued audio at this instant; pending marks are echoed now, as Twilio does
        (Exotel does not document this, doc §1.8)."""
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


def _start_message(phone: _Phone, call_sid: str, custom_parameters: dict[str, str]) -> dict:
    """The documented `start` event, values as strings like Exotel's own examples."""
    return {
        "event": "start",
        "start": {
            "stream_sid": phone.sid,
            "call_sid": call_sid,
            "account_sid": "simulated",
            "from": "09999999999",
            "to": "08000000000",
            "custom_parameters": dict(custom_parameters),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(phone.rate), "bit_rate": "16"},
        },
    }


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
        media = {"chunk": str(k + 1), "timestamp": str((k + 1) * chunk * 1000 // phone.rate),
                 "payload": base64.b64encode(pcm).decode("ascii")}
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
    seconds: float | None = None,
    custom_parameters: dict[str, str] | None = None,
    chunk_ms: int = 100,
    min_chunk_bytes: int = 3200,
    stream_sid: str | None = None,
    call_sid: str | None = None,
    progress: Callable[[str], None] | None = None,
    hangup: bool = True,
    linger: float = 1.0,
) -> CallResult:
    """Dial `url` as Exotel, say `audio`, and return what the caller heard and what the bot broke."""
    custom_parameters = dict(custom_parameters or {})
    if len(custom_parameters) > 3 or len(urlencode(custom_parameters)) > 256:
        logger.warning("caller: Exotel allows at most 3 custom parameters, 256 characters in all")
    stream_sid = stream_sid or f"MZ{uuid.uuid4().hex}"
    call_sid = call_sid or uuid.uuid4().hex
    chunk = sample_rate * chunk_ms // 1000
    speech = _speech(audio, sample_rate, seconds, chunk)
    async with connect(dial_url(url, sample_rate, custom_parameters), max_size=16 * 2**20,
                       open_timeout=10) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        phone = _Phone(ws, sample_rate, stream_sid, min_chunk_bytes)
        await phone.send(_start_message(phone, call_sid, custom_parameters))
        listener = asyncio.create_task(_listen(phone), name=f"caller-listen-{stream_sid}")
        clock = asyncio.create_task(_clock(phone, progress), name=f"caller-clock-{stream_sid}")
        try:
            await _speak(phone, speech, chunk)
            if hangup and not phone.server_closed.is_set():
                await phone.send({"event": "stop", "stop": {"call_sid": call_sid, "account_sid": "simulated",
                                                            "reason": "callended"}})
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
