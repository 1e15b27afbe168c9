"""BargeInProcessor alone with run_test: caller speech over the bot interrupts it, guards counted in caller audio.

In a call, BotStarted/StoppedSpeakingFrame come *upstream* from the pacer further down the pipeline.
run_test sends everything in one direction, so a stand-in pacer sits after the processor and turns
`Upstream(frame)` markers around: the processor sees the bot-speaking frames from below, as in a call.
A SleepFrame after each marker lets the turned-around frame arrive before the next caller frame.
"""

from dataclasses import dataclass

import numpy as np
import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    SystemFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from processors.barge_in import BargeInParams, BargeInProcessor
from tests.speech import speech

RATE = 8000
MS = 20
N = RATE * MS // 1000  # samples per 20 ms caller frame
SETTLE = 0.15  # seconds for a turned-around frame to reach the processor


@dataclass
class Upstream(SystemFrame):
    """Marker: the stand-in pacer pushes `frame` back upstream."""

    frame: Frame | None = None


class PacerStandIn(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, Upstream):
            await self.push_frame(frame.frame, FrameDirection.UPSTREAM)
        else:
            await self.push_frame(frame, direction)


def caller(secs: float, pcm: np.ndarray | None = None) -> list[InputAudioRawFrame]:
    """`secs` of 20 ms caller frames: real speech (looped) unless `pcm` is given."""
    n = round(secs * 1000 / MS)
    source = speech(RATE) if pcm is None else pcm
    looped = np.resize(source, n * N)
    return [InputAudioRawFrame(audio=looped[i * N : (i + 1) * N].tobytes(), sample_rate=RATE, num_channels=1) for i in range(n)]


def quiet(secs: float) -> list[InputAudioRawFrame]:
    return caller(secs, np.zeros(N, np.int16))


def bot_starts() -> list[Frame]:
    return [Upstream(frame=BotStartedSpeakingFrame()), SleepFrame(SETTLE)]


def bot_stops() -> list[Frame]:
    return [Upstream(frame=BotStoppedSpeakingFrame()), SleepFrame(SETTLE)]


async def run(params: BargeInParams, frames: list[Frame]):
    barge_in = BargeInProcessor(params)
    down, up = await run_test(Pipeline([barge_in, PacerStandIn()]), frames_to_send=frames + [SleepFrame(SETTLE)])
    return barge_in, down, up


def sent_downstream(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if not isinstance(f, (SleepFrame, Upstream))]


def without_interruptions(frames) -> list[Frame]:
    return [f for f in frames if not isinstance(f, InterruptionFrame)]


def count(frames, cls) -> int:
    return sum(isinstance(f, cls) for f in frames)


def audio_secs_between(down, first: Frame, last_type: type) -> float:
    """Caller audio forwarded after `first` (by identity) until the first `last_type` frame."""
    secs, counting = 0.0, False
    for f in down:
        if f is first:
            counting = True
        elif counting and isinstance(f, last_type):
            return secs
        elif counting and isinstance(f, InputAudioRawFrame):
            secs += len(f.audio) / 2 / f.sample_rate
    raise AssertionError(f"no {last_type.__name__} after {first}")


async def test_caller_over_the_bot_after_the_mute_window_interrupts_once_both_ways():
    started = VADUserStartedSpeakingFrame()
    frames = quiet(1.2) + bot_starts() + caller(0.2) + [started] + caller(0.6) + [VADUserStoppedSpeakingFrame()] + quiet(0.2) + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)

    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    # downstream: at the VAD start, before any more caller audio
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert started in (down[i - 1], down[i + 1])
    # upstream: while the bot was speaking
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, InterruptionFrame, BotStoppedSpeakingFrame]
    # every frame forwarded, in order, untouched
    assert without_interruptions(down) == sent_downstream(frames)
    assert barge_in.stats["interruptions"] == 1 and barge_in.stats["too_short"] == 0


async def test_no_interruption_while_the_bot_is_silent():
    frames = quiet(1.2) + [VADUserStartedSpeakingFrame()] + caller(0.8) + [VADUserStoppedSpeakingFrame()]
    frames += bot_starts() + bot_stops() + quiet(0.2)  # bot speaks only after the turn ended
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    assert down == sent_downstream(frames)
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]
    assert barge_in.stats["interruptions"] == 0


async def test_a_turn_starting_in_the_start_mute_window_never_interrupts_but_the_next_turn_does():
    # the bot greets from 0.2 s; the caller says "hello?" at 0.4 s and goes on past the 1 s window
    first, second = VADUserStartedSpeakingFrame(), VADUserStartedSpeakingFrame()
    frames = quiet(0.2) + bot_starts() + caller(0.2) + [first] + caller(1.4) + [VADUserStoppedSpeakingFrame()]
    frames += quiet(0.4) + [second] + caller(0.4) + [VADUserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)

    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert down.index(second) in (i - 1, i + 1)  # the second turn, not the first
    assert barge_in.stats["muted_at_start"] == 1 and barge_in.stats["interruptions"] == 1
    assert without_interruptions(down) == sent_downstream(frames)


async def test_start_mute_is_counted_in_caller_audio():
    """The window is the caller audio seen so far, not wall time: 0.9 s of audio, however long it took."""
    frames = quiet(0.5) + [SleepFrame(0.6)] + quiet(0.4) + bot_starts() + [VADUserStartedSpeakingFrame()] + caller(0.4)
    barge_in, down, _ = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 0
    assert barge_in.stats["muted_at_start"] == 1


async def test_min_speech_interrupts_only_after_that_much_caller_audio():
    started = VADUserStartedSpeakingFrame()
    frames = quiet(1.2) + bot_starts() + [started] + caller(0.6) + [VADUserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0, min_speech_secs=0.3), frames)

    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    # the interruption goes out with the 20 ms frame that completes 0.3 s of caller speech
    before = audio_secs_between(down, started, InterruptionFrame)
    assert 0.3 - 0.02 <= before + 1e-9 and before < 0.3 + 1e-9
    assert without_interruptions(down) == sent_downstream(frames)
    assert barge_in.stats["too_short"] == 0


async def test_a_turn_shorter_than_min_speech_never_interrupts():
    frames = quiet(1.2) + bot_starts() + [VADUserStartedSpeakingFrame()] + caller(0.2) + [VADUserStoppedSpeakingFrame()]
    frames += quiet(0.6) + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0, min_speech_secs=0.3), frames)
    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    assert barge_in.stats["too_short"] == 1 and barge_in.stats["interruptions"] == 0
    assert down == sent_downstream(frames)


async def test_bot_starting_while_the_caller_is_mid_turn_interrupts():
    frames = quiet(1.2) + [VADUserStartedSpeakingFrame()] + caller(0.4) + bot_starts() + caller(0.4)
    frames += [VADUserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    # it comes with the bot's start: after the caller audio sent before it, before the audio sent after
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert count(down[:i], InputAudioRawFrame) == round(1.6 / 0.02)
    # it is broadcast while the bot's start is handled, not at the next caller frame
    assert [type(f) for f in up] == [InterruptionFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame]
    assert without_interruptions(down) == sent_downstream(frames)


async def test_one_interruption_per_caller_turn():
    frames = quiet(1.2) + bot_starts() + [VADUserStartedSpeakingFrame()] + caller(0.4)
    frames += bot_stops() + bot_starts() + caller(0.4)  # the bot resumes within the same turn
    frames += [VADUserStoppedSpeakingFrame()] + quiet(0.2)
    frames += [VADUserStartedSpeakingFrame()] + caller(0.4) + [VADUserStoppedSpeakingFrame()] + bot_stops()  # a new turn
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 2 and count(up, InterruptionFrame) == 2
    assert barge_in.stats["interruptions"] == 2
    # the second one belongs to the second turn
    starts = [k for k, f in enumerate(down) if isinstance(f, VADUserStartedSpeakingFrame)]
    interruptions = [k for k, f in enumerate(down) if isinstance(f, InterruptionFrame)]
    assert starts[1] in (interruptions[1] - 1, interruptions[1] + 1)
    assert without_interruptions(down) == sent_downstream(frames)


async def test_half_duplex_never_interrupts_and_feeds_silence_while_the_bot_speaks():
    before, during, after = caller(1.2), caller(0.6), caller(0.4)
    frames = before + bot_starts() + [VADUserStartedSpeakingFrame()] + during + [VADUserStoppedSpeakingFrame()]
    frames += bot_stops() + after
    barge_in, down, up = await run(BargeInParams(start_mute_secs=0.0, half_duplex=True), frames)

    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    audio = [f for f in down if isinstance(f, InputAudioRawFrame)]
    assert len(audio) == len(before) + len(during) + len(after)
    assert [f.audio for f in audio[: len(before)]] == [f.audio for f in before]
    assert all(f.audio == bytes(len(g.audio)) for f, g in zip(audio[len(before) : -len(after)], during))
    assert all(f.sample_rate == RATE and f.num_channels == 1 for f in audio)
    assert any(np.frombuffer(g.audio, np.int16).any() for g in during)  # it was speech going in
    assert [f.audio for f in audio[-len(after) :]] == [f.audio for f in after]
    # the other frames are forwarded as they were, in order
    others = [f for f in down if not isinstance(f, InputAudioRawFrame)]
    assert others == [f for f in sent_downstream(frames) if not isinstance(f, InputAudioRawFrame)]
    assert barge_in.stats["too_short"] == 0 and barge_in.stats["half_duplex_secs"] == pytest.approx(0.6)


def test_params_schema_rejects_unknown_keys_and_negative_times():
    with pytest.raises(ValueError):
        BargeInParams(min_speech=0.2)
    with pytest.raises(ValueError):
        BargeInParams(start_mute_secs=-1)
