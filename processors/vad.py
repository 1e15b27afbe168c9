"""Silero voice activity detection on caller audio, tuned for phone calls.

Pipecat's defaults (confidence 0.7, start 0.2 s, min_volume 0.6) confirm speech 360-880 ms of audio
after its energy onset on our espeak fixtures (860-920 ms at -20 dB; 2 s or never at -30 dB):
min_volume is a smoothed loudness that ramps up slowly, so it mostly adds delay. Ours confirm after
120-160 ms at normal level and 160-180 ms at -20 dB; three 32 ms windows (start 0.1 s) rather than
two keeps a click or cough from barging in. No white, pink or brown noise or 1 kHz tone from -60 to
-20 dBFS triggers either setting
(`python -m pipelines bench vad`, BENCHMARKS.md).

Calls share one Silero session and score their windows in batches (processors/silero.py); the
builder loads it before serving (`prepare`). Built without the builder, the first call loads the
session (~40 ms of blocking work), so the analyzer is built in a worker thread after setup() and
the call does not wait for it: audio passes unanalysed for those first tens of milliseconds,
inside barge-in's start mute window. Besides pipecat's speech start/stop frames
(which lag speech by start_secs/stop_secs), a CallerVoiceFrame follows Silero's window-by-window
verdict, so barge-in can tell a short backchannel from a caller taking the floor. The analyzer
follows the rate of the audio frames (a resampler may sit in front); Silero only knows 8 and
16 kHz, and any other rate is reported once as an ErrorFrame and the audio passed through.
"""

import asyncio
import dataclasses

from pipecat.audio.vad.vad_analyzer import VADParams as PipecatVADParams
from pipecat.frames.frames import Frame, InputAudioRawFrame, StartFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pydantic import BaseModel, ConfigDict, Field

from processors.pipecat_adapter import LateAnalyzerVADProcessor, silero_loaded
from processors.silero import RATES as SILERO_RATES
from processors.silero import BatchedSileroAnalyzer, silero_session
from transports.frames import CallerVoiceFrame


class VADParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    confidence: float = Field(0.7, ge=0, le=1, description="Silero speech probability a 32 ms window needs")
    start_secs: float = Field(0.1, ge=0, description="speech needed before the user counts as speaking (3 windows)")
    stop_secs: float = Field(0.2, ge=0, description="non-speech needed before the user counts as stopped")
    min_volume: float = Field(
        0.2, ge=0, le=1, description="floor on smoothed loudness (-110..-10 LUFS as 0..1); 0.6 misses quiet callers"
    )

    def pipecat(self) -> PipecatVADParams:
        return PipecatVADParams(**self.model_dump())


class VADProcessor(LateAnalyzerVADProcessor):
    """Silero VAD on caller audio (8 or 16 kHz): user started/stopped speaking frames."""

    Params = VADParams

    @classmethod
    def prepare(cls, params: VADParams, *dirs) -> None:
        """Load the shared Silero session before serving (the builder calls this once per deployment)."""
        silero_session()

    def __init__(self, params: VADParams | None = None, **kwargs):
        # pipecat's VADController only stores the analyzer until setup(); ours is attached after it.
        super().__init__(**kwargs)
        self._params = params or VADParams()
        self._analyzer: BatchedSileroAnalyzer | None = None
        self._loading: asyncio.Task | None = None
        self._started = False
        self._bad_rate_reported = False
        self._voiced = False

    async def setup(self, setup: FrameProcessorSetup):
        # Skip pipecat's VADProcessor.setup (it needs the analyzer): the call starts, and its greeting
        # plays, while Silero loads in a worker thread.
        await self.setup_without_analyzer(setup)
        rate = setup.audio_in_sample_rate
        # Audio at other rates is checked per frame; the controller would raise here.
        controller_setup = setup if rate in SILERO_RATES else dataclasses.replace(setup, audio_in_sample_rate=16000)
        self._loading = self.create_task(self._load(controller_setup), name="vad-load")

    async def _load(self, setup: FrameProcessorSetup):
        params = self._params.pipecat()
        # Loaded at plan time (prepare), the analyzer is built here; only a bare processor (unit tests)
        # loads the session, in a worker thread. 50 calls starting at once then take no 50 thread hand-offs.
        analyzer = BatchedSileroAnalyzer(params=params) if silero_loaded() else await asyncio.to_thread(BatchedSileroAnalyzer, params=params)
        await self.attach_analyzer(analyzer, setup)
        self._analyzer = analyzer
        if self._started:
            await self.start_vad()

    async def cleanup(self):
        if self._loading:
            await self.cancel_task(self._loading)
        await super().cleanup()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if self._analyzer is None:  # still loading: everything passes on, nothing is analysed yet
            await self.process_without_vad(frame, direction)
            self._started |= isinstance(frame, StartFrame)
            await self.push_frame(frame, direction)
            return
        if isinstance(frame, InputAudioRawFrame) and frame.sample_rate != self._analyzer.sample_rate:
            if frame.sample_rate not in SILERO_RATES:
                await self._reject(frame, direction)
                return
            self._analyzer.set_sample_rate(frame.sample_rate)  # resets the VAD state, as a new stream should
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and self._analyzer.voiced != self._voiced:
            self._voiced = self._analyzer.voiced
            await self.push_frame(CallerVoiceFrame(voiced=self._voiced))

    async def _reject(self, frame: InputAudioRawFrame, direction: FrameDirection):
        await self.process_without_vad(frame, direction)
        if not self._bad_rate_reported:
            self._bad_rate_reported = True
            await self.push_error(
                f"{self}: Silero VAD needs 8000 or 16000 Hz caller audio, got {frame.sample_rate} Hz;"
                " put a resample processor (rate: 16000) in front of it"
            )
        await self.push_frame(frame, direction)
