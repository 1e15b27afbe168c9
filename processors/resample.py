"""Streaming resampling of caller or bot audio between the call's rate and the model's rate.

Pipecat's default stream resampler runs libsoxr at VHQ, which releases 20 ms telephony frames in
100-140 ms bursts; LQ keeps the anti-alias filter and emits every 20-40 ms (see BENCHMARKS.md,
`python -m pipelines bench resample`). The filter state is never cleared on idle: providers stream
continuously, and clearing it drops the tail of every utterance (pipecat#5769).
"""

from typing import Literal

from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.frames.frames import Frame, InputAudioRawFrame, InterruptionFrame, OutputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pydantic import BaseModel, ConfigDict, Field


class ResampleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audio: Literal["input", "output"] = Field(description="caller audio (input) or bot audio (output)")
    rate: int | Literal["call"] = Field(description="target rate in Hz, or `call` for the call's own rate")
    quality: Literal["VHQ", "HQ", "MQ", "LQ", "QQ"] = "LQ"


class ResampleProcessor(FrameProcessor):
    """Resample caller (input) or bot (output) audio frames to a fixed rate or the call's rate."""

    Params = ResampleParams

    def __init__(self, params: ResampleParams, **kwargs):
        super().__init__(**kwargs)
        self._params = params
        self._kind = InputAudioRawFrame if params.audio == "input" else OutputAudioRawFrame
        self._target = params.rate if isinstance(params.rate, int) else None
        self._resampler = SOXRStreamAudioResampler(quality=params.quality, clear_after_secs=None)

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        if self._target is None:
            self._target = setup.audio_in_sample_rate if self._params.audio == "input" else setup.audio_out_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, self._kind) and frame.sample_rate != self._target:
            audio = await self._resampler.resample(frame.audio, frame.sample_rate, self._target)
            if not audio:
                return  # held inside the filter; released with the next frame
            frame.audio, frame.sample_rate = audio, self._target
            frame.num_frames = len(audio) // (2 * frame.num_channels)
        elif isinstance(frame, InterruptionFrame) and self._params.audio == "output":
            await self._resampler.reset()  # interrupted speech must not leak into the next reply
        await self.push_frame(frame, direction)
