"""One PersonaPlex session as a state machine: no sockets, no tasks, no clock (docs/protocols.md, PersonaPlex).

The adapters (session.py opens the WebSocket, processor.py streams a call through it) move bytes and
read the clock; every rule about what those bytes and times mean is here, so it is unit-tested in
virtual time (tests/processors/personaplex/test_protocol.py). Inputs, each with the time `now` where
time matters:

- ``connecting(now)``: the connect starts; the handshake deadline runs from here.
- ``receive(message, now)``: a WebSocket message from the engine -> ``HandshakeDone``, ``Audio``
  (PCM16 at 24 kHz), ``TextPiece`` or ``Failed`` events. Anything else is ignored, as the server may
  send it: text messages, unknown kinds, empty messages, and everything before the 0x00 handshake.
- ``send_audio(pcm16, sample_rate, now)``: caller audio -> the 0x01 message to send, or ``b""`` while
  the encoder has no page complete (or before the handshake: the server eats what comes before it).
- ``closed(code)``: the socket closed -> ``Failed``; before the handshake that is the server refusing
  the prompts (the engine stays in rotation), after it the engine failed.
- ``tick(now)``: the timers: no handshake by the deadline, or no engine audio for
  ``silence_timeout_secs`` while caller audio flows -> ``Failed`` (the engine's fault).

The first ``Failed`` ends the machine: later inputs give nothing, so a failure is reported once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import sphn

from processors.personaplex import wire

MODEL_RATE = 24000
FLOWING_SECS = 0.5  # caller audio sent this recently counts as flowing, for the silence watchdog
LOST = 1006  # websockets' code for a connection lost without a close frame; never sent by a peer


class Phase(enum.Enum):
    HANDSHAKE = "handshake"  # connecting, or waiting for 0x00
    OPEN = "open"  # past the handshake: audio both ways
    ENDED = "ended"  # failed or closed; inputs are ignored


class Outcome(enum.Enum):
    """Whose fault a failure is, which decides what the pool does with the engine."""

    PROMPTS_REFUSED = "prompts_refused"  # closed before its handshake: the call's prompts; the engine stays
    ENGINE_FAILED = "engine_failed"  # unreachable, no handshake in time, closed or silent: out of rotation
    BAD_CALLER_AUDIO = "bad_caller_audio"  # the pipeline's fault (caller audio not at 24 kHz); the engine stays


@dataclass(frozen=True)
class HandshakeDone:
    pass


@dataclass(frozen=True)
class Audio:
    pcm: bytes  # PCM16 mono, little-endian
    sample_rate: int = MODEL_RATE


@dataclass(frozen=True)
class TextPiece:
    text: str  # one SentencePiece piece, its leading space kept


@dataclass(frozen=True)
class Failed:
    reason: str
    outcome: Outcome

    @property
    def engine_fault(self) -> bool:
        return self.outcome is Outcome.ENGINE_FAILED


Event = HandshakeDone | Audio | TextPiece | Failed


class Encoder(Protocol):
    def append_pcm(self, pcm: np.ndarray) -> bytes: ...


class Decoder(Protocol):
    def append_bytes(self, data: bytes) -> np.ndarray: ...


@dataclass
class Counters:
    pages_sent: int = 0
    pages_received: int = 0
    text_pieces: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # engine messages ignored, by reason

    def as_stats(self) -> dict[str, int]:
        return {"pages_sent": self.pages_sent, "pages_received": self.pages_received, "text_pieces": self.text_pieces}


def _default_decoder() -> Decoder:
    return sphn.OpusStreamReader(MODEL_RATE)


class SessionMachine:
    """One session with one engine, from the connect to the close.

    `url` only labels reasons. `uplink` makes the Ogg-Opus encoder (one per session: a second BOS page
    kills the server's reader); it is made with the first caller audio after the handshake, so a probe
    that never sends audio never makes one. `downlink` makes the decoder for the engine's Ogg pages.
    """

    def __init__(self, url: str, *, handshake_timeout_secs: float, silence_timeout_secs: float = 2.0,
                 uplink: Callable[[], Encoder] | None = None, downlink: Callable[[], Decoder] = _default_decoder):
        self.url = url
        self.handshake_timeout_secs = handshake_timeout_secs
        self.silence_timeout_secs = silence_timeout_secs
        self.phase = Phase.HANDSHAKE
        self.counters = Counters()
        self.failure: Failed | None = None
        self._uplink = uplink
        self._downlink = downlink
        self._encoder: Encoder | None = None
        self._decoder: Decoder | None = None
        self._deadline: float | None = None
        self._last_sent: float | None = None  # caller audio last handed to the encoder
        self._last_heard: float | None = None  # engine audio last received (the handshake, at first)

    @property
    def open(self) -> bool:
        return self.phase is Phase.OPEN

    # --- inputs ---------------------------------------------------------------------------------

    def connecting(self, now: float) -> None:
        """The connect starts: connect plus handshake must be done by now + handshake_timeout_secs."""
        self._deadline = now + self.handshake_timeout_secs

    def time_left(self, now: float) -> float:
        """Seconds until the handshake deadline (the adapter's receive timeout); inf before `connecting`."""
        return float("inf") if self._deadline is None else self._deadline - now

    def receive(self, message: bytes | str, now: float) -> list[Event]:
        if self.phase is Phase.ENDED:
            return []
        if not isinstance(message, bytes):
            return self._ignore("text_message")
        kind, payload = wire.split(message)
        if self.phase is Phase.HANDSHAKE:
            if kind != wire.HANDSHAKE:
                return self._ignore("before_handshake")  # the server's prompt phase; nothing is due yet
            self.phase = Phase.OPEN
            self._last_heard = now
            return [HandshakeDone()]
        if kind == wire.AUDIO:
            return self._audio(payload, now)
        if kind == wire.TEXT:
            piece = wire.text_piece(payload)
            if piece is None:
                return self._ignore("control_token")
            self.counters.text_pieces += 1
            return [TextPiece(piece)]
        return self._ignore("handshake_again" if kind == wire.HANDSHAKE else "empty" if kind < 0 else "unknown_kind")

    def send_audio(self, pcm16: bytes, sample_rate: int, now: float) -> tuple[bytes, list[Event]]:
        """(the message to send, or b""; events). Caller audio must be PCM16 mono at 24 kHz."""
        if self.phase is not Phase.OPEN:
            return b"", []
        if sample_rate != MODEL_RATE:
            return b"", self._fail(f"caller audio reaches PersonaPlex at {sample_rate} Hz, not {MODEL_RATE}: "
                                   "put a resample processor before it", Outcome.BAD_CALLER_AUDIO)
        if self._encoder is None:
            if self._uplink is None:
                raise RuntimeError("this session has no uplink encoder: it cannot send audio")
            self._encoder = self._uplink()
        ogg = self._encoder.append_pcm(np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768.0)
        self._last_sent = now
        if not ogg:
            return b"", []
        self.counters.pages_sent += 1
        return wire.audio_message(ogg), []

    def closed(self, code: int | None, *, while_sending: bool = False) -> list[Event]:
        """The socket closed with `code` (None or 1006: lost with no close frame). `while_sending`: a
        send found it closed, rather than the receive loop."""
        if self.phase is Phase.ENDED:
            return []
        if code == LOST:
            code = None
        if self.phase is Phase.HANDSHAKE:
            how = f"code {code}" if code else "abnormal close, no close frame"
            return self._fail(f"{self.url} closed the connection before its handshake ({how}); check voice_prompt/text_prompt",
                              Outcome.PROMPTS_REFUSED)
        if while_sending:
            return self._fail(f"engine closed the connection ({code or 'abnormal, no close frame'})", Outcome.ENGINE_FAILED)
        reason = f"engine closed the session (code {code})" if code else "engine connection lost (abnormal close, no close frame)"
        return self._fail(reason, Outcome.ENGINE_FAILED)

    def tick(self, now: float) -> list[Event]:
        """The timers. Call it at least every quarter of the silence timeout while open."""
        if self.phase is Phase.HANDSHAKE:
            if self._deadline is not None and now >= self._deadline:
                return self._fail(f"{self.url}: no handshake within {self.handshake_timeout_secs:g} s", Outcome.ENGINE_FAILED)
            return []
        if self.phase is Phase.OPEN and self._last_sent is not None and now - self._last_sent < FLOWING_SECS:
            silent = now - self._last_heard
            if silent > self.silence_timeout_secs:
                return self._fail(f"engine sent no audio for {silent:.1f} s while caller audio flowed", Outcome.ENGINE_FAILED)
        return []

    def close(self) -> None:
        """Our side ends the session: drop the codecs now (the encoder holds two libopus threads)."""
        self.phase = Phase.ENDED
        self._encoder = self._decoder = None

    # --- internals ------------------------------------------------------------------------------

    def _audio(self, payload: bytes, now: float) -> list[Event]:
        self.counters.pages_received += 1
        self._last_heard = now
        if self._decoder is None:
            self._decoder = self._downlink()
        try:
            pcm = self._decoder.append_bytes(payload)
        except ValueError as exc:  # sphn: not Ogg, or not Opus; its reader stays broken afterwards
            return self._fail(f"engine sent audio that does not decode ({exc})", Outcome.ENGINE_FAILED)
        if not len(pcm):
            return []
        return [Audio((np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes())]

    def _ignore(self, why: str) -> list[Event]:
        self.counters.ignored[why] = self.counters.ignored.get(why, 0) + 1
        return []

    def _fail(self, reason: str, outcome: Outcome) -> list[Event]:
        self.failure = Failed(reason, outcome)
        self.close()
        return [self.failure]
