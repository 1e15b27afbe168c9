"""What every provider protocol shares: refusing bad messages, and the hooks the server calls.

A protocol object is pure: the server hands it each WebSocket message and sends the strings it
returns. Malformed input is dropped, counted by reason and logged with the call id (the first few
of each reason, then every Nth, so a flood stays readable); the call goes on.
"""

import audioop
import base64
import binascii
import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import Frame, InputAudioRawFrame, InputDTMFFrame
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from transports.frames import CallInfo, CallStoppedFrame, MarkPlayedFrame

LOG_FIRST = 5
LOG_EVERY = 100
ENVELOPE_BYTES = 4096  # JSON around a media payload: ids, sequence numbers, timestamps


def base64_len(n: int) -> int:
    """Characters of base64 for n bytes: what a payload of n bytes costs on the wire."""
    return (n + 2) // 3 * 4


def _call_rate(rate: int) -> int:
    if rate not in CALL_RATES:
        raise ValueError(f"must be one of {', '.join(map(str, CALL_RATES))}")
    return rate


CALL_RATES = (8000, 16000, 24000)
# A call's sample rate in a params model: an int, so `${RATE}` (a string) converts like a literal would
CallRate = Annotated[int, AfterValidator(_call_rate)]


class RateLimit(BaseModel):
    """Per-call ceilings on what a peer may make us decode and play into the pipeline.

    Sized far above any real provider's cadence, so a real call never meets them; a flood costs one
    counted drop per excess message instead of the event loop's time (issue 14: one 1 MB message
    once stalled every call for 0.7 s). Buckets hold `burst_secs` of each rate, and always at least
    one largest legal message, so jitter that bunches messages up is never mistaken for a flood.
    """

    model_config = ConfigDict(extra="forbid")

    messages_per_sec: float = Field(250.0, gt=0, description="messages a call may send per second, any kind")
    bytes_per_sec: float = Field(2_000_000.0, gt=0, description=(
        "message bytes per second we agree to decode; bounds JSON/base64 work (about 1 ms per MB)"))
    audio_speed: float = Field(4.0, gt=0, description=(
        "seconds of caller audio accepted per second of call time (real time is 1); bounds the pipeline's work"))
    burst_secs: float = Field(2.0, gt=0, description="bucket depth, in seconds of each rate")


class TokenBucket:
    """Refills at `rate` per second up to `capacity`; the time comes from the caller (pure code)."""

    def __init__(self, rate: float, capacity: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last: float | None = None

    def take(self, amount: float, now: float) -> bool:
        """Refill up to `now`, then spend `amount` if it is there; False (nothing spent) if not."""
        if self.last is not None and now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class Drop(Exception):
    """An inbound message we refuse; carries the counter key and a detail for the log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request (or WebSocket upgrade) as the server saw it, for pure route and auth code."""

    method: str
    scheme: str  # "http" or "https" as the server itself was reached
    host: str  # the Host header
    path: str
    query: dict[str, str] = field(default_factory=dict)
    query_string: str = ""  # as received, for signatures computed over the exact URL
    headers: Mapping[str, str] = field(default_factory=dict)  # case-insensitive in the server
    form: dict[str, str] = field(default_factory=dict)  # POST form fields


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: str | bytes
    content_type: str = "text/plain"


def pick(obj: Any, *keys: str) -> Any:
    """First present value among alternative spellings of one field."""
    if isinstance(obj, Mapping):
        for key in keys:
            if obj.get(key) is not None:
                return obj[key]
    return None


def str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def dump(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


class JsonProtocol:
    """Base of the JSON-over-WebSocket protocols: decode, dispatch on a type key, count drops.

    Subclasses set `name`, `type_key` and `_handlers` (type -> method returning frames), and
    implement the outbound side: audio(), flush(), mark(), clear(). The optional hooks below
    default to "nothing to add".
    """

    name = "json"
    type_key = "event"
    _handlers: dict = {}

    def __init__(self, max_message_bytes: int, rate_limit: RateLimit | None = None):
        self.max_message_bytes = max_message_bytes
        self.rate_limit = rate_limit
        if rate_limit is not None:
            depth = rate_limit.burst_secs
            self._messages = TokenBucket(rate_limit.messages_per_sec, max(1.0, rate_limit.messages_per_sec * depth))
            self._bytes = TokenBucket(rate_limit.bytes_per_sec, max(max_message_bytes, rate_limit.bytes_per_sec * depth))
            # one largest message of base64 μ-law at 8 kHz: the most audio a legal message can carry
            most_audio = max_message_bytes * 3 / 4 / 8000
            self._audio = TokenBucket(rate_limit.audio_speed, max(most_audio, rate_limit.audio_speed * depth))
        self.call: CallInfo | None = None
        self.dropped: collections.Counter[str] = collections.Counter()
        self.on_drop = None  # the server's callback(reason, count): metrics and the call record

    @property
    def call_id(self) -> str:
        """Identity used in logs: the call id once the call started."""
        return self.call.call_id if self.call else "unknown"

    def receive(self, message: str | bytes, now: float | None = None) -> list[Frame]:
        """Translate one WebSocket message; malformed ones are dropped, counted and logged.

        `now` (seconds, any monotonic clock; the server passes its loop time) enables the rate
        limit; without it only the size limit applies.
        """
        try:
            data = self._decode(message, now)
            kind = data.get(self.type_key)
            if not isinstance(kind, str) or not kind:
                raise Drop(f"missing_{self.type_key}", f"keys={sorted(data)[:8]}")
            handler = self._handlers.get(kind)
            if handler is None:
                raise Drop(f"unknown_{self.type_key}", repr(kind[:40]))
            frames = handler(self, data)
            if now is not None and self.rate_limit is not None:
                self._admit_audio(frames, now)
            return frames
        except Drop as drop:
            self.count(drop.reason, drop.detail)
            return []
        except Exception as exc:  # a handler bug must cost one message, never the call's reader
            self.count("handler_error", f"{type(exc).__name__}: {str(exc)[:80]}")
            return []

    def _decode(self, message: str | bytes, now: float | None = None) -> dict:
        """Size and rate checks first, in O(1) for ASCII text: nothing is decoded before both pass."""
        admit = now is not None and self.rate_limit is not None
        if admit and not self._messages.take(1, now):
            raise Drop("rate_limited", f"over {self.rate_limit.messages_per_sec:g} messages/s")
        if isinstance(message, (bytes, bytearray, memoryview)):
            raise Drop("binary_frame", f"{len(message)} bytes")
        if len(message) > self.max_message_bytes:  # UTF-8 is never shorter than the characters
            raise Drop("too_large", f"{len(message)}+ bytes > {self.max_message_bytes}")
        size = len(message) if message.isascii() else len(message.encode("utf-8", "surrogatepass"))
        if size > self.max_message_bytes:
            raise Drop("too_large", f"{size} bytes > {self.max_message_bytes}")
        if admit and not self._bytes.take(size, now):
            raise Drop("rate_limited", f"{size} bytes, over {self.rate_limit.bytes_per_sec:g} bytes/s")
        try:
            data = json.loads(message)
        except ValueError as exc:
            raise Drop("invalid_json", str(exc)[:80]) from None
        except RecursionError:  # nesting no provider uses; json gives up after ~1000 levels
            raise Drop("too_deep", "nesting beyond the decoder's limit") from None
        if not isinstance(data, dict):
            raise Drop("not_object", type(data).__name__)
        return data

    def _admit_audio(self, frames: list[Frame], now: float) -> None:
        """Caller audio faster than `audio_speed` x real time is dropped before the pipeline sees it."""
        seconds = sum(len(f.audio) / 2 / f.sample_rate for f in frames if isinstance(f, InputAudioRawFrame))
        if seconds and not self._audio.take(seconds, now):
            raise Drop("rate_limited", f"{seconds:.2f} s of audio, over {self.rate_limit.audio_speed:g}x real time")

    def count(self, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        n = self.dropped[reason]
        if self.on_drop is not None:
            self.on_drop(reason, n)
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            logger.warning(f"{self.name} call {self.call_id}: dropped {reason} #{n}: {detail}")

    def require_call(self, kind: str) -> CallInfo:
        if self.call is None:
            raise Drop(f"{kind}_before_start")
        return self.call

    def _started(self) -> CallInfo:
        """The call, for outbound messages: nothing can be rendered before the call started."""
        if self.call is None:
            raise RuntimeError(f"{self.name}: the call has not started, so its stream id and rate are unknown")
        return self.call

    # ---- the media-stream events Exotel and Twilio share -----------------------------

    _stopped = False

    def _on_connected(self, data: dict) -> list[Frame]:
        logger.debug(f"{self.name} connected {({k: v for k, v in data.items() if k != self.type_key})}")
        return []

    def start_body(self, data: dict, sid: Any) -> Mapping:
        """The `start` object of the first `start` event; a second one is refused."""
        if self.call is not None:
            raise Drop("duplicate_start", f"stream {sid}")
        start = data.get("start")
        if not isinstance(start, Mapping):
            raise Drop("missing_start", "no start object")
        return start

    def _on_mark(self, data: dict) -> list[Frame]:
        self.require_call("mark")
        name = pick(data.get("mark"), "name")
        if name is None:
            raise Drop("missing_mark_name")
        return [MarkPlayedFrame(mark=str(name))]

    def _on_stop(self, data: dict) -> list[Frame]:
        # Accepted before `start` too: the call is over either way and the pipeline must end.
        if self._stopped:
            raise Drop("duplicate_stop")
        self._stopped = True
        reason = str(pick(data.get("stop"), "reason") or "")
        logger.info(f"{self.name} call {self.call_id}: stop ({reason or 'no reason'})")
        return [CallStoppedFrame(reason=reason)]

    # ---- optional hooks ------------------------------------------------------------

    def event(self, frame: Frame) -> list[str]:
        """Messages for a frame other than audio, marks and interruptions (e.g. a transcript)."""
        return []

    def goodbye(self) -> list[str]:
        """Messages to send just before the server closes the socket at the end of a call."""
        return []

    # How a call is handed to someone else (a call action's transfer): "stream_end" (closing the stream
    # lets the provider's flow go on to its next step), "provider_rest" (transfer_request) or "page".
    transfer_by = "stream_end"
    handed_over = False  # set once the provider took the call elsewhere: no REST hang-up after that

    def transfer(self, target: str, to: str) -> list[str]:
        """Messages that hand the call to `to` (named `target`) just before the socket closes."""
        return []

    def transfer_request(self, params, to: str) -> dict | None:
        """The HTTP request that hands the live call to `to`, where the provider does it over REST."""
        return None

    @classmethod
    def authorize(cls, params, request: HttpRequest) -> str | None:
        """Why this WebSocket upgrade must be refused with 403, or None to accept it."""
        return None

    @classmethod
    def routes(cls, params) -> dict[str, Any]:
        """Extra HTTP endpoints: path -> callable(params, HttpRequest) -> HttpReply."""
        return {}

    def hangup_request(self, params) -> dict | None:
        """An HTTP request that ends the call at the provider after the socket closed, if any."""
        return None


MAX_FRAME_SECS = 0.2


def audio_frames(payload: Any, call: CallInfo, where: str = "") -> list[InputAudioRawFrame]:
    """A `media` payload (base64 PCM16LE or μ-law, per the call) as caller audio at the call rate, in
    frames of at most 200 ms: the pipeline works one frame at a time, so a legal 6.4 s chunk (Exotel's
    100 KiB) costs the event loop many short turns instead of one long one. Any real cadence is one
    frame, built from the decoded bytes as they are (no copy)."""
    pcm = _caller_pcm(payload, call, where)
    step = max(2, int(call.sample_rate * MAX_FRAME_SECS) * 2)
    if len(pcm) <= step:
        return [InputAudioRawFrame(audio=pcm, sample_rate=call.sample_rate, num_channels=1)]
    view = memoryview(pcm)
    return [InputAudioRawFrame(audio=bytes(view[i : i + step]), sample_rate=call.sample_rate, num_channels=1)
            for i in range(0, len(pcm), step)]


def _caller_pcm(payload: Any, call: CallInfo, where: str) -> bytes:
    if not isinstance(payload, str):
        raise Drop("missing_payload", where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Drop("invalid_base64", f"{len(payload)} chars") from None
    if not raw:
        raise Drop("empty_payload", where)
    if call.encoding == "mulaw":
        return audioop.ulaw2lin(raw, 2)
    if len(raw) % 2:
        raise Drop("odd_length_pcm", f"{len(raw)} bytes")
    return raw


def dtmf_frame(digit: Any) -> InputDTMFFrame:
    if digit is None:
        raise Drop("missing_digit")
    try:
        return InputDTMFFrame(button=KeypadEntry(str(digit).strip()))
    except ValueError:
        raise Drop("bad_dtmf_digit", repr(str(digit)[:10])) from None
