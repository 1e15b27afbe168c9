"""PacerProcessor alone with run_test, in real time: the adapter around the playout.

The playout's rules (lead, cadence, jitter, chunking, marks, epochs, silence, underruns, fades) are
unit-tested in virtual time in test_playout.py; these few check the adapter on the loop clock: the
frames it pushes and in what order, the provider's chunk rule, real-time pacing, the end-of-call
drain, the rate check and pass-through.

Timing checks here are one-sided (a busy machine only makes chunks later, never earlier), so the
lead bound holds however noisy the box is.
"""

import asyncio

import numpy as np
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from processors.pacer import PacerParams, PacerProcessor
from tests.speech import speech
from transports.frames import CallInfo, MarkFrame, MarkPlayedFrame, PacedAudioFrame

RATE = 8000
CHUNK = 1600  # Exotel at 8 kHz: 3200 B = 200 ms


class Clock(FrameProcessor):
    """Records when each frame reaches the end of the pipeline."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[float, Frame]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        self.seen.append((asyncio.get_running_loop().time(), frame))
        await self.push_frame(frame, direction)


def params(chunk_samples: int = CHUNK) -> PipelineParams:
    return PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE,
                          start_metadata=CallInfo("test", "T", "T", RATE, chunk_samples=chunk_samples).start_metadata())


def audio(pcm: np.ndarray, cls=OutputAudioRawFrame, ms: int = 80) -> list[Frame]:
    n = RATE * ms // 1000
    return [cls(audio=pcm[i : i + n].tobytes(), sample_rate=RATE, num_channels=1) for i in range(0, len(pcm), n)]


def utterance(pcm: np.ndarray, context: str = "bot-1") -> list[Frame]:
    return [TTSStartedFrame(context_id=context), *audio(pcm), TTSStoppedFrame(context_id=context)]


def paced(frames) -> list[PacedAudioFrame]:
    return [f for f in frames if isinstance(f, PacedAudioFrame)]


async def test_chunks_have_the_providers_size_and_the_utterance_end_is_padded_and_marked():
    pcm = speech(RATE)  # 0.73 s: not a whole number of 200 ms chunks
    down, up = await run_test(PacerProcessor(PacerParams(mark_timeout_secs=0.05)), frames_to_send=utterance(pcm),
                              pipeline_params=params())
    chunks = paced(down)
    assert chunks and all(len(c.audio) == 2 * CHUNK and c.sample_rate == RATE for c in chunks)
    out = np.frombuffer(b"".join(c.audio for c in chunks), np.int16)
    assert len(out) == -(-len(pcm) // CHUNK) * CHUNK
    assert np.array_equal(out[: len(pcm)], pcm) and not out[len(pcm):].any()
    mark = next(i for i, f in enumerate(down) if isinstance(f, MarkFrame))
    assert down[mark].mark == "bot-1" and mark > down.index(chunks[-1])
    started = [f for f in down if isinstance(f, BotStartedSpeakingFrame)]
    assert len(started) == 1 and down.index(started[0]) > down.index(chunks[0])
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]  # the unechoed mark timed out


async def test_provider_without_chunk_rule_gets_20ms_chunks_and_chunk_ms_overrides():
    pcm = speech(RATE)
    quick = {"mark_timeout_secs": 0.05}  # the call ends when the unechoed mark has timed out
    down, _ = await run_test(PacerProcessor(PacerParams(**quick)), frames_to_send=utterance(pcm), pipeline_params=params(chunk_samples=0))
    assert {len(c.audio) for c in paced(down)} == {2 * RATE // 50}
    down, _ = await run_test(PacerProcessor(PacerParams(chunk_ms=100, **quick)), frames_to_send=utterance(pcm), pipeline_params=params())
    assert {len(c.audio) for c in paced(down)} == {2 * RATE // 10}


async def test_audio_leaves_in_real_time_never_more_than_the_lead_ahead():
    """2 s of speech handed over at once: each chunk is sent at most lead_secs before it plays."""
    lead = 0.2
    clock = Clock()
    pcm = np.tile(speech(RATE), 3)[: 2 * RATE]
    await run_test(Pipeline([PacerProcessor(PacerParams(lead_secs=lead)), clock]),
                   frames_to_send=utterance(pcm), pipeline_params=params())
    sends = [t for t, f in clock.seen if isinstance(f, PacedAudioFrame)]
    play_end, leads = sends[0], []
    for t in sends:
        leads.append(max(play_end, t) - t)
        play_end = max(play_end, t) + CHUNK / RATE
    assert max(leads) <= lead + 0.005
    assert sends[-1] - sends[0] >= len(sends) * CHUNK / RATE - lead - CHUNK / RATE - 0.005  # paced, not a burst


async def test_mark_echo_ends_bot_speaking():
    pacer = PacerProcessor(PacerParams(mark_timeout_secs=30))
    pcm = speech(RATE)
    down, up = await run_test(
        pacer,
        frames_to_send=[*utterance(pcm), SleepFrame(sleep=1.2), MarkPlayedFrame(mark="bot-1"), SleepFrame(sleep=0.1)],
        pipeline_params=params(),
    )
    assert pacer.stats["marks_echoed"] == 1 and pacer.stats["marks_missed"] == 0
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]
    assert any(isinstance(f, MarkPlayedFrame) for f in down)  # forwarded for anyone else listening


async def test_interruption_drops_the_queue_and_later_chunks_carry_the_next_epoch():
    pcm = np.tile(speech(RATE), 4)  # ~3 s queued at once
    again = speech(RATE)
    pacer = PacerProcessor()
    down, up = await run_test(
        pacer,
        frames_to_send=[*utterance(pcm), SleepFrame(sleep=0.5), InterruptionFrame(), SleepFrame(sleep=0.1), *utterance(again, "bot-2")],
        pipeline_params=params(),
    )
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = paced(down[:cut]), paced(down[cut:])
    assert all(c.epoch == 0 for c in before) and all(c.epoch == 1 for c in after)
    assert len(before) * CHUNK < len(pcm) / 2  # most of the 3 s never left
    assert len(after) == -(-len(again) // CHUNK)  # the next utterance plays whole
    assert BotStoppedSpeakingFrame in [type(f) for f in down[cut - 2 : cut + 1]] or any(isinstance(f, BotStoppedSpeakingFrame) for f in up)
    assert [m.mark for m in down if isinstance(m, MarkFrame)] == ["bot-2"]  # the interrupted one is never marked
    assert pacer.stats["interruptions"] == 1


async def test_model_silence_beyond_the_lead_is_dropped_between_utterances():
    silence = np.zeros(2 * RATE, np.int16)
    pacer = PacerProcessor(PacerParams(lead_secs=0.2))
    down, up = await run_test(pacer, frames_to_send=audio(silence), pipeline_params=params())
    assert len(paced(down)) * CHUNK <= 0.4 * RATE  # what was queued when the backlog limit hit
    assert pacer.stats["silence_dropped_secs"] >= 1.5
    assert not any(isinstance(f, (BotStartedSpeakingFrame, MarkFrame)) for f in down)  # silence is not speech


async def test_end_of_call_waits_for_queued_audio_to_play():
    pcm = np.tile(speech(RATE), 2)
    clock = Clock()
    await run_test(Pipeline([PacerProcessor(), clock]), frames_to_send=utterance(pcm, "holding:apology"), pipeline_params=params())
    kinds = [type(f) for _, f in clock.seen]
    last_chunk = max(i for i, k in enumerate(kinds) if k is PacedAudioFrame)
    end = kinds.index(EndFrame)
    assert end > last_chunk
    assert clock.seen[end][0] - clock.seen[0][0] >= len(pcm) / RATE - 0.3  # it played (minus the lead), then hung up


async def test_audio_at_the_wrong_rate_is_refused_not_chunked():
    wrong = [OutputAudioRawFrame(audio=bytes(480 * 2), sample_rate=24000, num_channels=1)]
    down, _ = await run_test(PacerProcessor(), frames_to_send=wrong, pipeline_params=params())
    assert paced(down) == []


async def test_upstream_frames_pass_through():
    _, up = await run_test(PacerProcessor(), frames_to_send=[MarkPlayedFrame(mark="x")],
                           frames_to_send_direction=FrameDirection.UPSTREAM, pipeline_params=params())
    assert [type(f) for f in up] == [MarkPlayedFrame]
