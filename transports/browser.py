"""A web page as the caller: the call's JSON protocol as pure code, and the page's HTTP routes.

The page (transports/browser_page/) captures the microphone at the call rate and plays bot audio
through a small jitter buffer; both directions carry base64 PCM16LE mono in JSON, so one message
shape serves audio, marks and control and the page needs no binary framing. Marks mean what they
mean to Twilio: echoed once the audio before them has played, or was dropped by a `clear`.

The state the page shows (listening / thinking / speaking) is derived from the frames that reach
the output: the caller's turn frames (a pause inside a sentence does not end a turn) and the
pacer's bot speaking frames (which follow the
audio as played, marks included). "Thinking" is the gap between the caller's turn and the bot's
answer (a turn that ends while the bot talks needs no wait); a full-duplex model may never answer,
so it lasts until someone speaks.
"""

import base64
import html
import ipaddress
import json
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    StartFrame,
    TranscriptionFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.utils.time import time_now_iso8601
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from transports.base import ENVELOPE_BYTES, CallRate, Drop, HttpReply, HttpRequest, JsonProtocol, RateLimit, audio_frames, base64_len, dump
from transports.frames import (
    ActionTakenFrame,
    BargeInFrame,
    CallInfo,
    CallStartedFrame,
    CallStoppedFrame,
    EngineEvent,
    EngineEventFrame,
    EngineFailedFrame,
    MarkPlayedFrame,
    holding_clip,
)

PAGE_DIR = Path(__file__).parent / "browser_page"
ASSETS = {"main.js": "text/javascript", "capture.js": "text/javascript", "playback.js": "text/javascript"}
MAX_ID = 128  # characters of a custom parameter value we keep
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's own id goes into logs and /stats


class BrowserParams(BaseModel):
    """Transport settings; also the `transport.params` block of a browser deployment's YAML."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field("/browser/ws", description="WebSocket path the page connects to")
    page_path: str = Field("/", description="where the page is served; its scripts live under assets_path")
    assets_path: str = Field("/browser/assets", description="URL folder of the page's scripts")
    sample_rate: CallRate = Field(16000, description="both directions; the VAD takes 8/16 kHz")
    chunk_ms: int = Field(40, ge=10, le=1000, description="audio per message, both directions; a multiple of 10 ms")
    prebuffer_ms: int = Field(80, ge=0, le=2000, description="the page starts playing once this much is queued")
    max_buffer_ms: int = Field(2000, ge=100, description="the page drops the oldest audio beyond this backlog")
    max_message_bytes: int | None = Field(None, gt=0, description=(
        "inbound messages over this are dropped undecoded; default: two audio chunks, base64, plus 16 KiB "
        "for `init` parameters and typed `text`"))
    rate_limit: RateLimit | None = Field(
        default_factory=lambda: RateLimit(messages_per_sec=250, bytes_per_sec=500_000),
        description="per-call ceilings: 2.5x the page's cadence at chunk_ms=10, ~8x its bytes at 24 kHz; null: none")
    allowed_origins: list[str] = Field(default_factory=list, description=(
        "origins (scheme://host[:port]) besides the page's own whose pages may open the WebSocket; '*': any"))
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "host names (no port) the page may be reached by, besides localhost and IP addresses: the public name "
        "behind a TLS proxy; '*': any. A name not listed is refused, so a rebound DNS name cannot open calls"))

    @field_validator("path", "page_path", "assets_path")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value:
            raise ValueError(f"must start with '/' and carry no query string: {value!r}")
        return value

    @field_validator("chunk_ms")
    @classmethod
    def _whole_10ms(cls, value: int) -> int:
        if value % 10:
            raise ValueError(f"must be a multiple of 10 ms, got {value}")
        return value

    @model_validator(mode="after")
    def _message_limit(self) -> "BrowserParams":
        """The page sends one chunk_ms of PCM16 per audio message; room for two, and for text."""
        if self.max_message_bytes is None:
            chunk = self.sample_rate * self.chunk_ms // 1000 * 2
            self.max_message_bytes = 2 * base64_len(chunk) + 4 * ENVELOPE_BYTES
        return self

    @model_validator(mode="after")
    def _distinct(self) -> "BrowserParams":
        assets = self.assets_path.rstrip("/") + "/"
        if self.path == self.page_path or any(p.startswith(assets) for p in (self.path, self.page_path)):
            raise ValueError("path, page_path and assets_path must not overlap")
        return self

    def page_config(self) -> dict:
        """What the page needs to know, inlined into index.html."""
        return {"ws_path": self.path, "assets_path": self.assets_path.rstrip("/"), "sample_rate": self.sample_rate,
                "chunk_ms": self.chunk_ms, "prebuffer_ms": self.prebuffer_ms, "max_buffer_ms": self.max_buffer_ms}


class BrowserProtocol(JsonProtocol):
    """One page's call: `init`/`audio`/`text`/`mark`/`end` in; audio, marks, state and transcript out."""

    name = "browser"
    type_key = "type"

    def __init__(self, params: BrowserParams, query: Mapping[str, str] | None = None):
        super().__init__(params.max_message_bytes, params.rate_limit)
        self.params = params
        self.query = {str(k): str(v)[:MAX_ID] for k, v in (query or {}).items()}
        self._ended = False
        self._end_reason = "ended"
        self._user_speaking = False
        self._bot_speaking = False
        self._awaiting_bot = False  # the caller's turn ended; the bot has not answered yet
        self._state = ""
        self._open_text = False  # transcript pieces sent since the last final

    # ---- inbound -------------------------------------------------------------

    def _on_init(self, data: dict) -> list[Frame]:
        if self.call is not None:
            raise Drop("duplicate_init", f"session {self.call.call_id}")
        rate = data.get("sample_rate")
        if rate is not None and rate != self.params.sample_rate:
            raise Drop("unsupported_sample_rate", f"page asks {rate!r}, this deployment runs {self.params.sample_rate} Hz")
        session = data.get("session_id")
        if session is not None and not (isinstance(session, str) and SESSION_ID.fullmatch(session)):
            raise Drop("bad_session_id", repr(str(session)[:40]))
        call_id = session or f"browser-{uuid.uuid4().hex[:12]}"
        custom = dict(self.query)
        custom.update({k: v[:MAX_ID] for k, v in data.items()
                       if isinstance(v, str) and k not in ("type", "session_id")})
        self.call = CallInfo(
            provider=self.name,
            stream_id=call_id,
            call_id=call_id,
            sample_rate=self.params.sample_rate,
            custom_parameters=custom,
            chunk_samples=self.params.sample_rate * self.params.chunk_ms // 1000,
        )
        logger.info(f"browser call {call_id}: started, {self.params.sample_rate} Hz, params {custom}")
        return [CallStartedFrame(call=self.call)]

    def _on_audio(self, data: dict) -> list[Frame]:
        return audio_frames(data.get("data"), self.require_call("audio"))

    def _on_text(self, data: dict) -> list[Frame]:
        """Typed text as a final transcript of the caller, which a cascaded pipeline's LLM takes as a turn."""
        call = self.require_call("text")
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Drop("empty_text")
        return [TranscriptionFrame(text=text.strip(), user_id=call.call_id, timestamp=time_now_iso8601(), finalized=True)]

    def _on_mark(self, data: dict) -> list[Frame]:
        self.require_call("mark")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise Drop("missing_mark_name")
        return [MarkPlayedFrame(mark=name)]

    def _on_end(self, data: dict) -> list[Frame]:
        # Accepted before `init` too: the page is gone either way and the pipeline must end.
        if self._ended:
            raise Drop("duplicate_end")
        self._ended = True
        self._end_reason = "hang-up"
        logger.info(f"browser call {self.call_id}: the page hung up")
        return [CallStoppedFrame(reason="hang-up")]

    _handlers = {"init": _on_init, "audio": _on_audio, "text": _on_text, "mark": _on_mark, "end": _on_end}

    # ---- outbound ------------------------------------------------------------

    def audio(self, pcm: bytes) -> list[str]:
        """One message per pacer chunk: the pacer already sized and timed it."""
        self._started()
        if len(pcm) % 2:
            raise ValueError(f"PCM16 needs an even byte count, got {len(pcm)}")
        return [dump({"type": "audio", "data": base64.b64encode(pcm).decode("ascii")})]

    def flush(self) -> list[str]:
        return []  # nothing is held back

    def mark(self, name: str) -> list[str]:
        """The pacer marks each utterance's end (it keeps TTSStoppedFrame): the bot's transcript line
        ends there too, unless the mark is a holding clip's (clips have no text; one fading out may
        end after the model's first word)."""
        self._started()
        return [dump({"type": "mark", "name": name})] + ([] if holding_clip(name) is not None else self._end_text())

    def clear(self) -> list[str]:
        """The page drops its queue at once and echoes every pending mark."""
        return [] if self.call is None else [dump({"type": "clear"})] + self._end_text()

    def _end_text(self) -> list[str]:
        if not self._open_text:
            return []
        self._open_text = False
        return [dump({"type": "transcript", "text": "", "final": True})]

    def event(self, frame: Frame) -> list[str]:
        if isinstance(frame, StartFrame) and self.call is not None:
            call = self.call
            return [dump({"type": "init_success", "session_id": call.call_id, "sample_rate": call.sample_rate,
                          "chunk_samples": call.chunk_samples})] + self._state_change()
        if isinstance(frame, TTSTextFrame):
            self._open_text = True
            return [dump({"type": "transcript", "text": frame.text, "final": False})]
        if isinstance(frame, TTSStoppedFrame):  # where no pacer consumes it
            return self._end_text()
        if isinstance(frame, EngineFailedFrame):
            self._end_reason = "engine failed"
            return [dump({"type": "error", "message": f"the speech engine failed: {frame.reason}"})]
        if isinstance(frame, EngineEventFrame) and frame.event in (EngineEvent.ACQUIRED, EngineEvent.READY):
            return [dump({"type": "call_event", "event": frame.event.value, **{k: v for k, v in frame.details().items() if k != "url"}})]
        if isinstance(frame, BargeInFrame):
            return [dump({"type": "call_event", "event": "barge_in", "rule": frame.rule, "speech_ms": round(frame.speech_secs * 1000)})]
        if isinstance(frame, ActionTakenFrame):
            return [dump({"type": "call_event", "event": "action", "action": frame.action.value, **frame.details()})]
        if isinstance(frame, UserStartedSpeakingFrame):
            self._user_speaking, self._awaiting_bot = True, False
        elif isinstance(frame, UserStoppedSpeakingFrame):  # over the bot, the bot's speech is the answer
            self._user_speaking, self._awaiting_bot = False, not self._bot_speaking
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking, self._awaiting_bot = True, False
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        else:
            return []
        return self._state_change()

    def _state_change(self) -> list[str]:
        if self._bot_speaking and not self._user_speaking:
            state = "speaking"
        else:
            state = "thinking" if self._awaiting_bot else "listening"
        if state == self._state:
            return []
        self._state = state
        return [dump({"type": "state", "state": state})]

    def goodbye(self) -> list[str]:
        return [dump({"type": "session_ended", "reason": self._end_reason})]

    transfer_by = "page"

    def transfer(self, target: str, to: str) -> list[str]:
        """The page is told where the call would go; a browser call has no phone line to hand over."""
        self._end_reason = f"transferred to {target}"
        return [dump({"type": "transfer", "target": target, "to": to})]

    # ---- the page ------------------------------------------------------------

    @classmethod
    def authorize(cls, params: BrowserParams, request: HttpRequest) -> str | None:
        """Another site's page may not open calls here (cross-site WebSocket); clients with no Origin may.

        "The page's own origin" is judged by the Host header, which a DNS-rebinding page controls (its
        name, resolved to this server): so a same-origin page must also come by a known host name.
        """
        origin = request.headers.get("Origin")
        if not origin or "*" in params.allowed_origins or origin in params.allowed_origins:
            return None
        if urlsplit(origin).netloc.lower() == request.host.lower():
            if _known_host(request.host, params.allowed_hosts):
                return None
            return f"host {request.host[:80]!r} is not localhost, an IP address or in allowed_hosts (DNS rebinding?)"
        return f"origin {origin[:80]!r} is not this page's ({request.host}) nor in allowed_origins"

    @classmethod
    def routes(cls, params: BrowserParams) -> dict[str, Any]:
        """The page and its scripts, read once here at server start (a missing file fails start-up)."""
        config = json.dumps(params.page_config()).replace("</", "<\\/")
        index = (PAGE_DIR / "index.html").read_text("utf-8")
        index = index.replace("{{CONFIG}}", config).replace("{{ASSETS}}", html.escape(params.page_config()["assets_path"]))
        files = {params.page_path: HttpReply(200, index, "text/html")}
        for name, kind in ASSETS.items():
            files[f"{params.assets_path.rstrip('/')}/{name}"] = HttpReply(200, (PAGE_DIR / name).read_text("utf-8"), kind)
        return {path: _static(reply) for path, reply in files.items()}


def _known_host(host: str, allowed: list[str]) -> bool:
    """localhost, an IP literal, or a name the deployment lists (ports ignored)."""
    name = urlsplit(f"//{host}").hostname or ""
    if "*" in allowed or name == "localhost" or name.endswith(".localhost") or name in {a.lower() for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _static(reply: HttpReply):
    def serve(params: BrowserParams, request: HttpRequest) -> HttpReply:
        if request.method not in ("GET", "HEAD"):
            return HttpReply(405, f"{request.method} not allowed\n")
        return reply

    return serve
