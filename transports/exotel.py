"""Exotel Voicebot (AgentStream) wire protocol as pure code.

Kept free of sockets, clocks and tasks so every rule in
docs/protocols.md (Exotel) can be unit-tested with plain strings; the
WebSocket transport only moves the strings this class produces.
"""

import audioop
import base64
import math
from collections.abc import Mapping
from typing import Any, Literal

from loguru import logger
from pipecat.frames.frames import Frame
from pydantic import BaseModel, ConfigDict, Field, model_validator

from transports.base import (
    CALL_RATES,
    ENVELOPE_BYTES,
    CallRate,
    Drop,
    JsonProtocol,
    RateLimit,
    audio_frames,
    base64_len,
    dtmf_frame,
    dump,
    pick,
    str_or_none,
)
from transports.frames import CallInfo, CallStartedFrame

SUPPORTED_RATES = CALL_RATES
DEFAULT_RATE = 8000  # Exotel's documented default when ?sample-rate= is absent
PACKET_BYTES = 320  # Exotel plays 320-byte packets; any other size leaves gaps (docs/protocols.md, Exotel)
DOC_MAX_CHUNK_BYTES = 100_000
# The largest inbound message the platform may send: a 100 KB payload (read as KiB, to be safe),
# base64, in its JSON envelope. Anything larger is refused before it is decoded.
MAX_MESSAGE_BYTES = base64_len(102_400) + ENVELOPE_BYTES
MULAW_NAMES = ("mulaw", "mu-law", "ulaw", "pcmu")


class ExotelParams(BaseModel):
    """Transport settings; also the `exotel` block of the pipeline YAML."""

    model_config = ConfigDict(extra="forbid")

    path: str = "/exotel"
    sample_rate: CallRate | None = None
    min_chunk_bytes: int = 3200
    max_chunk_bytes: int = DOC_MAX_CHUNK_BYTES
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, description=(
        "inbound messages over this many bytes are dropped undecoded; default: a 100 KB chunk, base64, in JSON"))
    rate_limit: RateLimit | None = Field(default_factory=RateLimit, description=(
        "per-call ceilings far above Exotel's ~10 media messages/s of at most 64 kB/s (24 kHz); null: none"))
    key_style: Literal["snake", "camel"] = "snake"

    @model_validator(mode="after")
    def _check(self) -> "ExotelParams":
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/': {self.path!r}")
        if self.min_chunk_bytes < PACKET_BYTES or self.min_chunk_bytes % PACKET_BYTES:
            raise ValueError(f"min_chunk_bytes must be a multiple of {PACKET_BYTES} and >= {PACKET_BYTES}")
        if not self.min_chunk_bytes <= self.max_chunk_bytes <= DOC_MAX_CHUNK_BYTES:
            raise ValueError(
                f"need min_chunk_bytes <= max_chunk_bytes <= {DOC_MAX_CHUNK_BYTES}, "
                f"got {self.min_chunk_bytes} and {self.max_chunk_bytes}"
            )
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        for rate in (self.sample_rate,) if self.sample_rate else SUPPORTED_RATES:
            size = chunk_bytes(rate, 2, self.min_chunk_bytes)
            if size > self.max_chunk_bytes:
                raise ValueError(
                    f"at {rate} Hz the smallest legal chunk is {size} B, above max_chunk_bytes="
                    f"{self.max_chunk_bytes}; raise it or force another sample_rate"
                )
        return self


def chunk_bytes(sample_rate: int, sample_width: int, min_bytes: int) -> int:
    """Smallest payload of whole 20 ms frames that is also a multiple of 320 B and >= min_bytes."""
    frame = sample_rate // 50 * sample_width
    step = math.lcm(frame, PACKET_BYTES)
    return math.ceil(min_bytes / step) * step


def parse_sample_rate(value: Any) -> int | None:
    """Read '8000', 8000, '8000Hz', '8khz' or '16 kHz'; None unless it is a rate Exotel supports."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().lower().replace(" ", "")
    scale = 1
    if text.endswith("khz"):
        text, scale = text[:-3], 1000
    elif text.endswith("hz"):
        text = text[:-2]
    try:
        rate = float(text) * scale
    except ValueError:
        return None
    return int(rate) if rate in SUPPORTED_RATES else None


class ExotelProtocol(JsonProtocol):
    """One call's Exotel stream: inbound JSON -> pipecat frames, bot PCM -> legal `media` messages."""

    name = "exotel"

    def __init__(self, params: ExotelParams, query: Mapping[str, str] | None = None):
        super().__init__(params.max_message_bytes, params.rate_limit)
        self.params = params
        self.query = dict(query or {})
        self._chunk = 0  # wire bytes per outbound media message, fixed at start
        self._pending = bytearray()  # bot PCM not yet sent
        self._seq = 0
        self._chunks_sent = 0
        self._samples_sent = 0
        snake = params.key_style == "snake"
        self._sid_key = "stream_sid" if snake else "streamSid"
        self._seq_key = "sequence_number" if snake else "sequenceNumber"

    # ---- inbound -------------------------------------------------------------

    def _on_start(self, data: dict) -> list[Frame]:
        start = self.start_body(data, pick(data, "stream_sid", "streamSid"))
        stream_id = pick(start, "stream_sid", "streamSid") or pick(data, "stream_sid", "streamSid")
        call_id = pick(start, "call_sid", "callSid")
        if not stream_id:
            raise Drop("missing_stream_sid", f"call {call_id}")
        if not call_id:
            raise Drop("missing_call_sid", f"stream {stream_id}")
        media_format = pick(start, "media_format", "mediaFormat")
        encoding, rate = self._format(media_format, f"call {call_id}")
        width = 1 if encoding == "mulaw" else 2
        self._chunk = chunk_bytes(rate, width, self.params.min_chunk_bytes)
        self.call = CallInfo(
            provider=self.name,
            stream_id=str(stream_id),
            call_id=str(call_id),
            sample_rate=rate,
            encoding=encoding,
            account_id=str_or_none(pick(start, "account_sid", "accountSid")),
            from_number=str_or_none(start.get("from")),
            to_number=str_or_none(start.get("to")),
            custom_parameters=self._custom_parameters(start),
            chunk_samples=self._chunk // width,
        )
        logger.info(
            f"exotel call {call_id}: stream {stream_id} started, {rate} Hz {encoding}, "
            f"{self._chunk} B per outbound media message"
        )
        return [CallStartedFrame(call=self.call)]

    def _format(self, media_format: Any, where: str) -> tuple[str, int]:
        """Encoding and call rate: forced param, else media_format, else URL, else 8 kHz."""
        if isinstance(media_format, str):  # Beta form: "audio/x-mulaw;rate=8000"
            encoding_text = media_format
            fields = dict(p.split("=", 1) for p in media_format.split(";")[1:] if "=" in p)
            announced = pick({k.strip(): v for k, v in fields.items()}, "rate")
        else:
            encoding_text = pick(media_format, "encoding") or ""
            announced = pick(media_format, "sample_rate", "sampleRate")
        encoding = "mulaw" if any(n in str(encoding_text).lower() for n in MULAW_NAMES) else "pcm16"
        if self.params.sample_rate:
            return encoding, self.params.sample_rate
        from_url = self.query.get("sample-rate") or self.query.get("sample_rate")
        for source, value in (("media_format", announced), ("URL", from_url)):
            if value is None:
                continue
            rate = parse_sample_rate(value)
            if rate is None:
                raise Drop("bad_sample_rate", f"{where}: {source} sample rate {value!r}")
            if source == "media_format" and from_url and parse_sample_rate(from_url) != rate:
                logger.warning(f"exotel {where}: URL asks {from_url} Hz, start says {rate} Hz; using {rate}")
            return encoding, rate
        logger.warning(f"exotel {where}: no sample rate in start or URL, assuming {DEFAULT_RATE} Hz")
        return encoding, DEFAULT_RATE

    def _custom_parameters(self, start: Mapping) -> dict[str, str]:
        """URL query parameters (minus sample-rate) overlaid by start.custom_parameters."""
        params = {k: str(v) for k, v in self.query.items() if k not in ("sample-rate", "sample_rate")}
        custom = pick(start, "custom_parameters", "customParameters")
        if isinstance(custom, Mapping):
            params.update({str(k): str(v) for k, v in custom.items()})
        return params

    def _on_media(self, data: dict) -> list[Frame]:
        call = self.require_call("media")
        media = data.get("media")
        return audio_frames(pick(media, "payload"), call, f"chunk {pick(media, 'chunk')}")

    def _on_dtmf(self, data: dict) -> list[Frame]:
        self.require_call("dtmf")
        return [dtmf_frame(pick(data.get("dtmf"), "digit"))]

    _handlers = {
        "connected": JsonProtocol._on_connected,
        "start": _on_start,
        "media": _on_media,
        "dtmf": _on_dtmf,
        "mark": JsonProtocol._on_mark,
        "stop": JsonProtocol._on_stop,
    }

    # ---- outbound ------------------------------------------------------------

    @property
    def _width(self) -> int:
        return 1 if self.call and self.call.encoding == "mulaw" else 2

    @property
    def chunk_bytes(self) -> int:
        """Wire bytes per outbound media message (0 before `start`)."""
        return self._chunk

    def audio(self, pcm: bytes) -> list[str]:
        """Buffer bot PCM16 at the call rate; emit only full legal chunks."""
        call = self._started()
        if len(pcm) % 2:
            raise ValueError(f"PCM16 needs an even byte count, got {len(pcm)}")
        self._pending += pcm
        size = self._chunk * 2 // self._width  # PCM bytes per chunk
        out = []
        while len(self._pending) >= size:
            out.append(self._media(call, bytes(self._pending[:size])))
            del self._pending[:size]
        return out

    def flush(self) -> list[str]:
        """Send the utterance tail zero-padded to one full chunk, so nothing waits for more audio."""
        if not self._pending:
            return []
        call = self._started()
        size = self._chunk * 2 // self._width
        pcm = bytes(self._pending) + bytes(size - len(self._pending))
        self._pending.clear()
        return [self._media(call, pcm)]

    def mark(self, name: str) -> list[str]:
        """Flush first so the mark lands after every sample queued before it."""
        call = self._started()
        out = self.flush()
        out.append(dump({"event": "mark", self._sid_key: call.stream_id,
                               self._seq_key: self._next_seq(), "mark": {"name": name}}))
        return out

    def clear(self) -> list[str]:
        """Barge-in: forget unsent audio and ask Exotel to drop what it has queued."""
        self._pending.clear()
        if self.call is None:
            return []
        return [dump({"event": "clear", self._sid_key: self.call.stream_id})]

    def _media(self, call: CallInfo, pcm: bytes) -> str:
        wire = audioop.lin2ulaw(pcm, 2) if call.encoding == "mulaw" else pcm
        self._chunks_sent += 1
        self._samples_sent += len(pcm) // 2
        return dump({
            "event": "media",
            self._sid_key: call.stream_id,
            self._seq_key: self._next_seq(),
            "media": {
                "chunk": str(self._chunks_sent),
                # ms of audio sent up to the end of this chunk, as in Exotel's own example
                "timestamp": str(self._samples_sent * 1000 // call.sample_rate),
                "payload": base64.b64encode(wire).decode("ascii"),
            },
        })

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)
