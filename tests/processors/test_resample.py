"""ResampleProcessor alone with run_test: rates, steady release of 20 ms frames, frames it leaves alone."""

import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame, InterruptionFrame, OutputAudioRawFrame, SpeechOutputAudioRawFrame, TextFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from processors.resample import ResampleParams, ResampleProcessor
from tests.speech import speech


def frames_of(pcm: np.ndarray, rate: int, cls=InputAudioRawFrame, ms: int = 20):
    n = rate * ms // 1000
    return [cls(audio=pcm[i : i + n].tobytes(), sample_rate=rate, num_channels=1) for i in range(0, len(pcm) - n + 1, n)]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Peak normalised cross-correlation, tolerant of the filter's delay."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    c = np.correlate(a, b, "full")
    return float(np.max(np.abs(c)) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_input_audio_to_model_rate_keeps_the_speech(rate):
    pcm = speech(rate)
    down, up = await run_test(
        ResampleProcessor(ResampleParams(audio="input", rate=24000)),
        frames_to_send=frames_of(pcm, rate),
    )
    assert up == []
    assert all(isinstance(f, InputAudioRawFrame) and f.sample_rate == 24000 for f in down)
    out = np.frombuffer(b"".join(f.audio for f in down), np.int16)
    assert abs(len(out) - len(pcm) * 3 * 24000 // (3 * rate)) < 24000 * 0.04  # under 40 ms held in the filter
    reference = speech(24000)
    assert correlation(out, reference[: len(out)]) > 0.9


async def test_lq_releases_20ms_frames_steadily_where_vhq_bursts():
    """Count frames in versus frames out: LQ emits at least every third 20 ms frame, VHQ every fifth or worse."""
    pcm = speech(8000)
    longest_wait = {}
    for quality in ("LQ", "VHQ"):
        processor = ResampleProcessor(ResampleParams(audio="input", rate=24000, quality=quality))
        frames = frames_of(pcm, 8000)
        released = []
        for i, f in enumerate(frames):
            out = await processor._resampler.resample(f.audio, 8000, 24000)
            if out:
                released.append(i)
        longest_wait[quality] = max(b - a for a, b in zip([-1] + released, released))
    assert longest_wait["LQ"] <= 3
    assert longest_wait["VHQ"] >= 5


async def test_output_audio_to_call_rate_preserves_frame_class():
    pcm = speech(24000)
    down, _ = await run_test(
        ResampleProcessor(ResampleParams(audio="output", rate="call")),
        frames_to_send=frames_of(pcm, 24000, SpeechOutputAudioRawFrame, ms=80) + [TextFrame("hi")],
        pipeline_params=PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000),
    )
    audio = [f for f in down if isinstance(f, OutputAudioRawFrame)]
    assert audio and all(type(f) is SpeechOutputAudioRawFrame and f.sample_rate == 8000 for f in audio)
    assert isinstance(down[-1], TextFrame)
    out = np.frombuffer(b"".join(f.audio for f in audio), np.int16)
    assert correlation(out, speech(8000)[: len(out)]) > 0.9


async def test_leaves_the_other_direction_alone_and_forwards_interruptions():
    caller = InputAudioRawFrame(audio=b"\x01\x00" * 160, sample_rate=8000, num_channels=1)
    down, _ = await run_test(
        ResampleProcessor(ResampleParams(audio="output", rate=8000)),
        frames_to_send=[caller, InterruptionFrame()],
        expected_down_frames=[InputAudioRawFrame, InterruptionFrame],
    )
    assert down[0].audio == b"\x01\x00" * 160 and down[0].sample_rate == 8000
