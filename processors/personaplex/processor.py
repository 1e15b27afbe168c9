"""PersonaPlex speech-to-speech: caller audio in, the model's continuous speech and text out.

The server is input-clocked (no audio in, no audio out), eats everything sent before its 0x00
handshake, and has no keepalive or error message. So this processor opens the session (leasing an
engine) with the call's first audio, streams every caller frame once the handshake is in, starts
one Ogg-Opus writer per session whose first page goes first, and treats a close, an error or an engine that stays silent
while audio flows as a failure: an ErrorFrame upstream, an EngineFailedFrame downstream (the
holding messages answer it with an apology), then a graceful end of the call. What the bytes and
the times mean is the session machine's (protocol.py); this processor moves them and reads the clock.
"""

import asyncio
import time
from typing import Literal

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

from processors.personaplex.pool import EnginePool, NoEngine, PoolParams, State
from processors.personaplex.protocol import MODEL_RATE, Audio, Event, Failed, Phase, SessionMachine, TextPiece
from processors.personaplex.session import EngineBusy, EngineUnreachable, SessionRejected, open_session, tls_context
from processors.personaplex.uplink import OpusUplinkWriter
from transports.frames import EngineEvent, EngineEventFrame, EngineFailedFrame, PersonaSwitchFrame, call_of

BUSY_RETRY_SECS = 0.5  # after a guard's "busy", before the next lease: the store catches up within a renewal
DEFAULT_TEXT_PROMPT = "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voice_prompt: str
    text_prompt: str = Field(min_length=1)


class PersonaPlexParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="ws(s)://host:8998, comma-separated for several; empty: the deployment's engines")
    voice_prompt: str = "NATF0.pt"
    text_prompt: str = Field(DEFAULT_TEXT_PROMPT, min_length=1)
    personas: dict[str, Persona] = Field(default_factory=dict, description="allow-list selectable per call")
    persona_parameter: str = Field("persona", description="provider custom parameter naming a persona")
    caller_note: bool = Field(True, description="add what the deployment remembers of a returning caller (caller_memory) to the text prompt")
    verify_tls: bool = Field(False, description="PersonaPlex serves self-signed mkcert certificates")
    ca_file: str | None = None
    connect_timeout_secs: float = Field(5.0, gt=0)
    handshake_timeout_secs: float = Field(20.0, gt=0, description="connect plus handshake; the prompt phase is 2-9 s, plus queueing")
    silence_timeout_secs: float = Field(2.0, gt=0, description="no model audio this long while audio flows = failure")
    # Caller-audio encoder (processors/personaplex/uplink.py); CPU and PESQ per setting: python -m pipelines bench uplink
    uplink_complexity: int = Field(5, ge=0, le=10, description="libopus complexity of the caller-audio encoder; "
                                   "in lowdelay mode 1-10 score alike on phone speech, 0 is worse")
    uplink_application: Literal["lowdelay", "audio", "voip"] = Field(
        "lowdelay", description="libopus mode: lowdelay is CELT only, 1/3 of sphn's CPU at its PESQ; voip (SILK) "
        "costs 2x lowdelay; audio picks SILK itself at complexity 7 and up")
    uplink_bitrate: int = Field(48000, ge=6000, le=510000, description="caller-audio encoder target, bit/s; VBR: "
                                "~70 kbit/s of speech in lowdelay mode, PESQ drops ~0.3 at 32000")


class PersonaPlexProcessor(FrameProcessor):
    """Full-duplex PersonaPlex session per call over its WebSocket API (Ogg-Opus: libopus up, sphn down)."""

    Params = PersonaPlexParams

    def __init__(self, params: PersonaPlexParams | None = None, *, engines: EnginePool | None = None,
                 engine_url: str | None = None, **kwargs):
        """`engines`: the deployment's pool (the server shares it between calls); `engine_url`: a pool
        of this processor's own, for a processor used alone (tests, notebooks)."""
        super().__init__(**kwargs)
        self._params = params or PersonaPlexParams()
        if engines is None:
            urls = self._params.url or engine_url
            if not urls:
                raise ValueError("PersonaPlex needs an engine: params.url or the deployment's engine.urls")
            engines = EnginePool(PoolParams(urls=urls))
        self._pool = engines
        self._engine = None  # the pool's engine this call holds
        self._ws = None
        self._machine: SessionMachine | None = None  # the session with the current engine
        self._session_task: asyncio.Task | None = None
        self._persona: Persona | None = None  # chosen at the call's start; the session opens with its first audio
        self._note: str | None = None  # a returning caller's note, added to every persona's text prompt
        self._watchdog_task: asyncio.Task | None = None
        self._call_id = "unknown"
        self._closing = False
        self._failed = False
        self.stats = {"persona": "default", "engine": None, "frames_before_handshake": 0, "pages_sent": 0, "pages_received": 0, "text_pieces": 0}

    @property
    def ready(self) -> bool:
        return self._machine is not None and self._machine.open

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
            if self._session_task is None and self._persona is not None and not self._closing:
                # The engine is leased once media flows: a socket that only says `start` holds none.
                self._session_task = self.create_task(self._run_session(self._persona), name=f"personaplex-{self._call_id}")
            await self._send_audio(frame)
            return
        if isinstance(frame, StartFrame):
            call = call_of(frame)
            self._call_id = call.call_id if call else self._call_id
            self._note = call.caller_note if call and self._params.caller_note else None
            self._persona = self._noted(self.persona_for(call.custom_parameters if call else {}))
        elif isinstance(frame, PersonaSwitchFrame):
            await self._switch(frame.persona)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
        await self.push_frame(frame, direction)

    async def _switch(self, name: str):
        """A call action: the conversation goes on as another allow-listed persona. The prompts are set
        when a session opens, so the session is reopened on the engine the call already holds."""
        persona = self._params.personas.get(name)
        if persona is None:
            logger.warning(f"call {self._call_id}: persona switch to {name[:40]!r} refused: not on the allow-list "
                           f"({', '.join(sorted(self._params.personas)) or 'empty'})")
            return
        self._persona, self.stats["persona"] = self._noted(persona), name
        persona = self._persona
        if self._session_task is None or self._closing or self._failed:
            return  # no session yet: the first one opens with this persona
        await self._end_session()  # the engine stays leased to this call
        self.stats["persona_switches"] = self.stats.get("persona_switches", 0) + 1
        self._session_task = self.create_task(self._run_session(persona), name=f"personaplex-{self._call_id}")

    def _noted(self, persona: Persona) -> Persona:
        if not self._note:
            return persona
        return Persona(voice_prompt=persona.voice_prompt, text_prompt=f"{persona.text_prompt} {self._note}")

    async def cleanup(self):
        await self._close()
        await super().cleanup()

    async def _send_audio(self, frame: InputAudioRawFrame):
        if self._closing:
            return
        machine = self._machine
        if machine is None or self._ws is None or machine.phase is Phase.HANDSHAKE:
            self.stats["frames_before_handshake"] += 1
            return
        message, events = machine.send_audio(frame.audio, frame.sample_rate, time.monotonic())
        if message:
            try:
                await self._ws.send(message)
            except websockets.ConnectionClosed as exc:
                events = machine.closed(exc.rcvd.code if exc.rcvd else None, while_sending=True)
        await self._handle(events)

    async def _run_session(self, persona: Persona):
        try:
            self._ws = await self._open(persona)
        except NoEngine as exc:
            await self._event(EngineEvent.NO_ENGINE, reason=str(exc))
            await self._fail(str(exc))
            return
        except SessionRejected as exc:
            await self._fail(str(exc))
            return
        logger.info(f"call {self._call_id}: PersonaPlex session open on {self._engine.url} (voice {persona.voice_prompt})")
        self._watchdog_task = self.create_task(self._watch_silence(), name=f"personaplex-watchdog-{self._call_id}")
        try:
            async for message in self._ws:
                await self._handle(self._machine.receive(message, time.monotonic()))
        except websockets.ConnectionClosed:
            pass
        if not self._closing:
            await self._handle(self._machine.closed(self._ws.close_code))

    async def _open(self, persona: Persona):
        """Lease engines until one hand-shakes; one that does not leaves the rotation and the next is tried.
        A call that holds an engine already (a persona switch) opens its new session there."""
        deadline = time.monotonic() + self._pool.params.wait_secs
        while True:
            asked = time.monotonic()
            if self._engine is None:
                if self._pool.count(State.IDLE) == 0 and self._pool.available:
                    await self._event(EngineEvent.WAITING, busy=self._pool.count(State.BUSY))
                self._engine = await self._pool.acquire(self._call_id, max(0.0, deadline - time.monotonic()))
                await self._event(EngineEvent.ACQUIRED, url=self._engine.url, wait_ms=_ms(asked))
            url = self._engine.url
            self.stats["engine"] = url
            opened = time.monotonic()
            self._machine = self._new_machine(url)
            try:
                ws = await open_session(url, persona.voice_prompt, persona.text_prompt, machine=self._machine,
                                        connect_timeout_secs=self._params.connect_timeout_secs, token=self._engine.token,
                                        tls=tls_context(url, self._params.verify_tls, self._params.ca_file))
            except EngineBusy as exc:
                # Its guard serves another session (a lease the store forgot, or a bridge that shares no
                # leases): busy, not broken. Give it back and take the next, keeping the call's place in the
                # queue; a released engine goes last.
                self._pool.busy(self._engine)
                self._engine = None
                await self._event(EngineEvent.RELEASED, url=url)
                logger.warning(f"call {self._call_id}: {exc}; trying another engine")
                await asyncio.sleep(BUSY_RETRY_SECS)
                continue
            except EngineUnreachable as exc:
                await self._engine_failed(str(exc))
                logger.warning(f"call {self._call_id}: {exc}; trying another engine")
                continue
            except SessionRejected:
                self._pool.release(self._engine)
                self._engine = None
                await self._event(EngineEvent.RELEASED, url=url)
                raise
            await self._event(EngineEvent.READY, url=url, handshake_ms=_ms(opened))
            return ws

    def _new_machine(self, url: str) -> SessionMachine:
        def uplink() -> OpusUplinkWriter:
            return OpusUplinkWriter(MODEL_RATE, complexity=self._params.uplink_complexity,
                                    application=self._params.uplink_application, bitrate=self._params.uplink_bitrate)

        return SessionMachine(url, handshake_timeout_secs=self._params.handshake_timeout_secs,
                              silence_timeout_secs=self._params.silence_timeout_secs, uplink=uplink)

    async def _engine_failed(self, reason: str):
        engine, self._engine = self._engine, None
        if engine is not None:
            self._pool.failed(engine, reason)
            await self._event(EngineEvent.FAILED, url=engine.url, reason=reason)

    async def _event(self, event: EngineEvent, **details):
        await self.push_frame(EngineEventFrame(event=event, **details))

    async def _handle(self, events: list[Event]):
        """The machine's events as frames; its counters into the stats."""
        for event in events:
            if isinstance(event, Audio):
                await self.push_frame(SpeechOutputAudioRawFrame(audio=event.pcm, sample_rate=event.sample_rate, num_channels=1))
            elif isinstance(event, TextPiece):
                text = TTSTextFrame(text=event.text, text_type="word")
                text.includes_inter_frame_spaces = True
                await self.push_frame(text)
            elif isinstance(event, Failed):
                await self._fail(event.reason, engine_fault=event.engine_fault)
        if self._machine is not None:
            self.stats.update(self._machine.counters.as_stats())

    async def _watch_silence(self):
        """The machine's clock: a tick every quarter of the silence timeout (at most 250 ms)."""
        machine = self._machine
        while not self._closing and machine.open:
            await asyncio.sleep(min(0.25, machine.silence_timeout_secs / 4))
            if not self._closing:
                await self._handle(machine.tick(time.monotonic()))

    async def _fail(self, reason: str, engine_fault: bool = False):
        """Report once, then end the call gracefully so the caller hears whatever is queued."""
        if self._failed or self._closing:
            return
        self._failed = True
        if engine_fault:
            await self._engine_failed(reason)
        logger.error(f"call {self._call_id}: PersonaPlex failure: {reason}")
        await self.push_error(f"PersonaPlex: {reason}")
        await self.push_frame(EngineFailedFrame(reason=reason))  # holding messages apologise
        await self.push_frame(EndWorkerFrame(reason=f"engine failure: {reason}"))

    async def _close(self):
        if self._closing:
            return
        self._closing = True
        await self._end_session()
        if self._engine is not None:
            self._pool.release(self._engine)
            await self._event(EngineEvent.RELEASED, url=self._engine.url)
            self._engine = None


    async def _end_session(self):
        """Stop the session's tasks (first, so that this close reads as no failure), close its socket and machine."""
        current = asyncio.current_task()
        for task in (self._watchdog_task, self._session_task):
            if task and task is not current and not task.done():
                await self.cancel_task(task)
        if self._ws is not None:
            await self._ws.close()
        if self._machine is not None:
            self._machine.close()  # frees the encoder (and PyAV's two libopus threads) now, not at some later GC
        self._ws = self._machine = None


def _ms(since: float) -> int:
    return round((time.monotonic() - since) * 1000)
