"""Holding messages: pre-rendered clips that fill the silences a caller must never hear.

PersonaPlex spends 2-9 s in its prompt phase before it says anything, and Exotel drops a bot that
stays silent for 10 s; a model can also go quiet after the caller's turn, or die. A clip plays
(a) from call start until the engine answers (repeated while it still has not), (b) when the
caller's turn ended (the turn processor's UserStoppedSpeakingFrame, not a pause inside it) and
the model produced no speech for `slow_after_secs`, never over model speech or its muted rest
after a barge-in, (c) as an apology
when the engine fails, before the call is hung up.

Clips are WAV files named in YAML, read and resampled to every telephony rate once at start-up
(`prepare`), so starting one is a memory copy. A clip is an utterance like any other
(TTSStarted/TTSAudioRaw/TTSStopped, context `holding:NAME`): the pacer paces and marks it and the
caller can barge in on it. When the model starts speaking over a clip, a FadeOutFrame fades the
clip's queued rest out over `fade_secs` so the take-over has no click.
"""

import asyncio
from pathlib import Path

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.audio import read_wav
from processors.errors import ParamsError
from transports.frames import EngineFailedFrame, FadeOutFrame, ModelMuteFrame, holding_clip, holding_context

TELEPHONY_RATES = (8000, 16000, 24000)
DEFAULT_CLIPS = {"greeting": "clips/greeting.wav", "one_moment": "clips/one_moment.wav", "apology": "clips/apology.wav"}


class HoldingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clips: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CLIPS), description=(
        "name: WAV path (relative to the YAML file, then the shipped clips: configs/, installed as pipelines/deployments/)"))
    prompt_clip: str | None = Field("greeting", description="plays from call start until the engine answers")
    prompt_repeat_secs: float = Field(5.0, gt=0, description="pause before the prompt clip repeats while the engine is still silent")
    slow_clip: str | None = Field("one_moment", description="plays when the model is silent after the caller's turn")
    slow_after_secs: float = Field(3.0, gt=0)
    apology_clip: str | None = Field("apology", description="plays when the engine fails, before the hang-up")
    fade_secs: float = Field(0.02, ge=0, description="fade-out when model speech takes over a clip")

    @model_validator(mode="after")
    def _named_clips_exist(self) -> "HoldingParams":
        for key in ("prompt_clip", "slow_clip", "apology_clip"):
            name = getattr(self, key)
            if name is not None and name not in self.clips:
                raise ValueError(f"{key} {name!r} is not in clips ({', '.join(self.clips) or 'none'})")
        return self


class ClipBank:
    """Every clip as int16 PCM at each telephony rate, rendered once and shared by all calls."""

    def __init__(self, paths: dict[str, Path]):
        self._paths = paths
        self._pcm: dict[tuple[str, int], bytes] = {}

    def get(self, name: str, rate: int) -> bytes:
        key = (name, rate)
        if key not in self._pcm:
            if rate not in TELEPHONY_RATES:
                logger.warning(f"holding clip {name!r} rendered on demand at {rate} Hz (not pre-rendered)")
            self._pcm[key] = read_wav(self._paths[name], rate).tobytes()
        return self._pcm[key]


def prepare_clips(clips: dict[str, str], *dirs: Path) -> ClipBank:
    """Resolve and render `clips` (name: WAV path) once, at start-up; a missing or unreadable file names
    its clip. A relative path is looked up in `dirs` in order (the builder gives the YAML's directory,
    then the shipped deployments'), or in the working directory without any."""
    paths = {}
    for name, given in clips.items():
        path = Path(given)
        candidates = [path] if path.is_absolute() or not dirs else [d / path for d in dirs]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ParamsError(("clips", name), f"no such file {given!r} (looked in {', '.join(str(c.parent) for c in candidates)})")
        paths[name] = found
    bank = ClipBank(paths)
    for name, path in paths.items():
        try:
            for rate in TELEPHONY_RATES:
                bank.get(name, rate)
        except (OSError, RuntimeError) as exc:  # soundfile's errors are RuntimeErrors
            raise ParamsError(("clips", name), f"cannot read {path}: {exc}") from None
    return bank


class HoldingProcessor(FrameProcessor):
    """Holding messages: prompt-phase, slow-engine and apology clips, cut cleanly by model speech."""

    Params = HoldingParams

    @classmethod
    def prepare(cls, params: HoldingParams, *dirs: Path) -> ClipBank:
        return prepare_clips(params.clips, *dirs)

    def __init__(self, params: HoldingParams | None = None, *, prepared: ClipBank | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or HoldingParams()
        self._bank = prepared or self.prepare(self._params)
        self._rate = 0
        self._engine_ready = asyncio.Event()
        self._failed = False
        self._clip_until = 0.0  # loop time the clip now playing ends (0: none)
        self._model_speaking = False
        self._model_muted = False
        self._prompt_task: asyncio.Task | None = None
        self._slow_task: asyncio.Task | None = None
        self.stats: dict = {"played": {}, "faded": 0}

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        downstream = direction == FrameDirection.DOWNSTREAM
        if downstream and isinstance(frame, OutputAudioRawFrame) and not isinstance(frame, TTSAudioRawFrame):
            self._engine_ready.set()
        elif downstream and isinstance(frame, TTSStartedFrame) and not _is_clip(frame):
            self._engine_ready.set()  # a TTS (cascade) sends no audio before it speaks
            self._model_speaking = True
            await self._cancel_slow()
            await self._fade_clip()
        elif downstream and isinstance(frame, TTSStoppedFrame) and not _is_clip(frame):
            self._model_speaking = False
        elif isinstance(frame, UserStartedSpeakingFrame):
            await self._cancel_slow()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            await self._arm_slow()
        elif isinstance(frame, ModelMuteFrame):
            self._model_muted = frame.muted
        elif isinstance(frame, InterruptionFrame):
            self._clip_until = 0.0  # the pacer dropped it
        elif isinstance(frame, EngineFailedFrame):
            await self._on_failure()
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self._params.prompt_clip:
                self._prompt_task = self.create_task(self._prompt_phase(), name="holding-prompt")
            return
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop_tasks()
        await self.push_frame(frame, direction)

    async def _play(self, name: str, trigger: str):
        pcm = self._bank.get(name, self._rate)
        context = holding_context(name)
        self._clip_until = self._now() + len(pcm) / 2 / self._rate
        played = self.stats["played"]
        played[trigger] = played.get(trigger, 0) + 1
        await self.push_frame(TTSStartedFrame(context_id=context))
        await self.push_frame(TTSAudioRawFrame(audio=pcm, sample_rate=self._rate, num_channels=1, context_id=context))
        await self.push_frame(TTSStoppedFrame(context_id=context))

    async def _fade_clip(self):
        if self._clip_until > self._now():
            self._clip_until = 0.0
            self.stats["faded"] += 1
            await self.push_frame(FadeOutFrame(secs=self._params.fade_secs))

    async def _prompt_phase(self):
        """The prompt clip now, and again after each pause while the engine has not answered."""
        name = self._params.prompt_clip
        while not self._engine_ready.is_set() and not self._failed:
            await self._play(name, "prompt")
            wait = self._clip_until - self._now() + self._params.prompt_repeat_secs
            try:
                await asyncio.wait_for(self._engine_ready.wait(), wait)
            except TimeoutError:
                pass

    async def _arm_slow(self):
        await self._cancel_slow()
        if self._params.slow_clip and self._engine_ready.is_set() and not self._failed and not self._model_busy():
            self._slow_task = self.create_task(self._slow_engine(), name="holding-slow")

    async def _cancel_slow(self):
        if self._slow_task:
            await self.cancel_task(self._slow_task)
            self._slow_task = None

    async def _slow_engine(self):
        await asyncio.sleep(self._params.slow_after_secs)
        self._slow_task = None  # from here on the clip is pushed whole, never cut between its frames
        if not self._model_busy() and not self._failed and self._clip_until <= self._now():
            await self._play(self._params.slow_clip, "slow_engine")

    def _model_busy(self) -> bool:
        """Model speech is going out, or its muted rest after a barge-in: no clip over either."""
        return self._model_speaking or self._model_muted

    async def _on_failure(self):
        if self._failed:
            return
        self._failed = True
        await self._stop_tasks()
        if self._model_speaking or self._clip_until > self._now():
            self._clip_until = 0.0
            await self.push_frame(FadeOutFrame(secs=self._params.fade_secs))
        if self._params.apology_clip:
            await self._play(self._params.apology_clip, "apology")

    async def _stop_tasks(self):
        await self._cancel_slow()
        if self._prompt_task:
            await self.cancel_task(self._prompt_task)
            self._prompt_task = None


def _is_clip(frame: TTSStartedFrame | TTSStoppedFrame) -> bool:
    return holding_clip(frame.context_id) is not None
