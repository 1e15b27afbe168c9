"""PersonaPlex speech-to-speech: caller audio in, the model's continuous speech and text out.

The server is input-clocked (no audio in, no audio out), eats everything sent before its 0x00
handshake, and has no keepalive or error message (docs/personaplex-protocol.md §3-§6). So this
processor streams every caller frame once the handshake is in, starts one Ogg-Opus writer per
session whose first page goes first, and treats a close, an error or an engine that stays silent
while audio flows as a failure: an ErrorFrame upstream, an EngineFailedFrame downstream (the
holding messages answer it with an apology), then a graceful end of the call.
"""

import asyncio
import ssl
import time

import numpy as np
import sphn
import websockets
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field

from processors import personaplex_wire as wire
from processors.frames import EngineFailedFrame

MODEL_RATE = 24000
DEFAULT_TEXT_PROMPT = "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voice_prompt: str
    text_prompt: str = Field(min_length=1)


class PersonaPlexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="ws(s)://host:8998; empty: the deployment's engine")
    voice_prompt: str = "NATF0.pt"
    text_prompt: str = Field(DEFAULT_TEXT_PROMPT, min_length=1)
    personas: dict[str, Persona] = Field(default_factory=dict, description="allow-list selectable per call")
    persona_parameter: str = Field("persona", description="provider custom parameter naming a persona")
    verify_tls: bool = Field(False, description="PersonaPlex serves self-signed mkcert certificates")
    ca_file: str | None = None
    connect_timeout: float = Field(5.0, gt=0)
    handshake_timeout: float = Field(20.0, gt=0, description="prompt phase is 2-9 s, plus queueing")
    silence_timeout: float = Field(2.0, gt=0, description="no model audio this long while audio flows = failure")


class PersonaPlexProcessor(FrameProcessor):
    """Full-duplex PersonaPlex session per call over its WebSocket API (Ogg-Opus via sphn)."""

    Params = PersonaPlexParams

    def __init__(self, params: PersonaPlexParams | None = None, *, engine_url: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or PersonaPlexParams()
        self._base_url = self._params.url or engine_url
        if not self._base_url:
            raise ValueError("PersonaPlex needs a URL: params.url or the deployment's engine.url")
        self._ws = None
        self._writer: sphn.OpusStreamWriter | None = None
        self._reader: sphn.OpusStreamReader | None = None
        self._session_task: asyncio.Task | None = None
        self._watchdog_task: asyncio.Task | None = None
        self._call_id = "unknown"
        self._closing = False
        self._failed = False
        self._last_sent = 0.0
        self._last_heard = 0.0
        self.stats = {"persona": "default", "frames_before_handshake": 0, "pages_sent": 0, "pages_received": 0, "text_pieces": 0}

    @property
    def ready(self) -> bool:
        return self._writer is not None

    def persona_for(self, custom_parameters: dict[str, str]) -> Persona:
        """The allow-listed persona a call asked for, else the configured default; never free text."""
        default = Persona(voice_prompt=self._params.voice_prompt, text_prompt=self._params.text_prompt)
        wanted = custom_parameters.get(self._params.persona_parameter)
        if wanted is None:
            self.stats["persona"] = "default"
            return default
        if wanted not in self._params.personas:
            logger.warning(f"call {self._call_id}: persona {wanted[:40]!r} refused: not on the allow-list "
                           f"({', '.join(sorted(self._params.personas)) or 'empty'}); using the default")
            self.stats["persona"] = "default (refused)"
            return default
        self.stats["persona"] = wanted
        return self._params.personas[wanted]

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self._send_audio(frame)
            return
        if isinstance(frame, StartFrame):
            call = frame.metadata.get("call", {})
            self._call_id = call.get("call_id") or self._call_id
            persona = self.persona_for(call.get("custom_parameters") or {})
            self._session_task = self.create_task(self._run_session(persona), name=f"personaplex-{self._call_id}")
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await self._close()
        await super().cleanup()

    async def _send_audio(self, frame: InputAudioRawFrame):
        if self._writer is None or self._ws is None or self._closing:
            self.stats["frames_before_handshake"] += not self._closing
            return
        if frame.sample_rate != MODEL_RATE:
            await self._fail(f"caller audio reaches PersonaPlex at {frame.sample_rate} Hz, not {MODEL_RATE}: put a resample processor before it")
            return
        pcm = np.frombuffer(frame.audio, dtype=np.int16).astype(np.float32) / 32768.0
        ogg = self._writer.append_pcm(pcm)
        self._last_sent = time.monotonic()
        if ogg:
            try:
                await self._ws.send(wire.audio_message(ogg))
                self.stats["pages_sent"] += 1
            except websockets.ConnectionClosed as exc:
                await self._fail(f"engine closed the connection ({exc.rcvd.code if exc.rcvd else 'abnormal, no close frame'})")

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self._base_url.startswith("wss://"):
            return None
        ctx = ssl.create_default_context(cafile=self._params.ca_file)
        if not self._params.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _run_session(self, persona: Persona):
        url = wire.chat_url(self._base_url, persona.voice_prompt, persona.text_prompt)
        try:
            self._ws = await websockets.connect(
                url, ssl=self._ssl_context(), open_timeout=self._params.connect_timeout,
                ping_interval=None, compression=None, max_size=None,
            )
            await self._await_handshake()
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
            await self._fail(self._describe(exc))
            return
        logger.info(f"call {self._call_id}: PersonaPlex session open (voice {persona.voice_prompt})")
        self._writer = sphn.OpusStreamWriter(MODEL_RATE)
        self._reader = sphn.OpusStreamReader(MODEL_RATE)
        self._last_heard = time.monotonic()
        self._watchdog_task = self.create_task(self._watch_silence(), name=f"personaplex-watchdog-{self._call_id}")
        try:
            async for message in self._ws:
                await self._on_message(message)
        except websockets.ConnectionClosed:
            pass
        if not self._closing:
            await self._fail(self._describe_close())

    async def _await_handshake(self):
        deadline = time.monotonic() + self._params.handshake_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            message = await asyncio.wait_for(self._ws.recv(), remaining)
            if isinstance(message, bytes) and wire.split(message)[0] == wire.HANDSHAKE:
                return

    async def _on_message(self, message):
        if not isinstance(message, bytes):
            return
        kind, payload = wire.split(message)
        if kind == wire.AUDIO:
            self.stats["pages_received"] += 1
            self._last_heard = time.monotonic()
            pcm = self._reader.append_bytes(payload)
            if len(pcm):
                audio = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()
                await self.push_frame(SpeechOutputAudioRawFrame(audio=audio, sample_rate=MODEL_RATE, num_channels=1))
        elif kind == wire.TEXT:
            piece = wire.text_piece(payload)
            if piece is not None:
                self.stats["text_pieces"] += 1
                text = TTSTextFrame(text=piece, text_type="word")
                text.includes_inter_frame_spaces = True
                await self.push_frame(text)

    async def _watch_silence(self):
        limit = self._params.silence_timeout
        while not self._closing:
            await asyncio.sleep(min(0.25, limit / 4))
            now = time.monotonic()
            if now - self._last_sent < 0.5 and now - self._last_heard > limit:
                await self._fail(f"engine sent no audio for {now - self._last_heard:.1f} s while caller audio flowed")
                return

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.TimeoutError):
            return "no handshake from the engine within the timeout" if self._ws else "connecting to the engine timed out"
        if isinstance(exc, websockets.ConnectionClosed):
            return f"engine closed the connection before its handshake ({self._describe_close()}); check voice_prompt/text_prompt"
        return f"cannot connect to the engine at {self._base_url}: {exc}"

    def _describe_close(self) -> str:
        rcvd = getattr(self._ws, "close_code", None)
        return f"engine closed the session (code {rcvd})" if rcvd else "engine connection lost (abnormal close, no close frame)"

    async def _fail(self, reason: str):
        """Report once, then end the call gracefully so the caller hears whatever is queued."""
        if self._failed or self._closing:
            return
        self._failed = True
        logger.error(f"call {self._call_id}: PersonaPlex failure: {reason}")
        await self.push_error(f"PersonaPlex: {reason}")
        await self.push_frame(EngineFailedFrame(reason=reason))  # holding messages apologise
        await self.push_frame(EndWorkerFrame(reason=f"engine failure: {reason}"))

    async def _close(self):
        if self._closing:
            return
        self._closing = True
        current = asyncio.current_task()
        for task in (self._watchdog_task, self._session_task):
            if task and task is not current and not task.done():
                await self.cancel_task(task)
        if self._ws is not None:
            await self._ws.close()
