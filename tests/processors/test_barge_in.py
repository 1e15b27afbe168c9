"""BargeInProcessor alone with run_test: the caller taking the floor from the audible bot interrupts it.

Speech is what the VAD says it is: VAD segment frames plus CallerVoiceFrames (Silero's per-window
verdict), written out here so each case states exactly what the caller did; tests/processors/
test_conversation_core.py runs the real VAD and turn processors in front on real speech.

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
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from processors.barge_in import BargeInParams, BargeInProcessor
from tests.speech import speech
from transports.frames import BargeInFrame, CallerVoiceFrame

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


def voiced(secs: float) -> list[Frame]:
    """Speech, with the VAD's verdict after its first frame, where the real VAD pushes it."""
    frames = caller(secs)
    return frames[:1] + [CallerVoiceFrame(voiced=True)] + frames[1:]


def unvoiced(secs: float) -> list[Frame]:
    frames = quiet(secs)
    return frames[:1] + [CallerVoiceFrame(voiced=False)] + frames[1:]


def talk(secs: float, *, start: bool = True, stop: bool = True, turn: str = "") -> list[Frame]:
    """A speech segment as the VAD reports it: confirmed after 0.1 s, voiced for `secs`, stopped 0.2 s later.

    `turn`: "start" and/or "end" add the turn processor's frames around it.
    """
    frames: list[Frame] = voiced(0.1)
    if start:
        frames += [VADUserStartedSpeakingFrame(start_secs=0.1)]
    if "start" in turn:
        frames += [UserStartedSpeakingFrame()]
    frames += caller(secs - 0.1) + unvoiced(0.2)
    if stop:
        frames += [VADUserStoppedSpeakingFrame(stop_secs=0.2)]
    if "end" in turn:
        frames += quiet(0.5) + [UserStoppedSpeakingFrame()]
    return frames


def sent_downstream(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if not isinstance(f, (SleepFrame, Upstream))]


def without_interruptions(frames) -> list[Frame]:
    return [f for f in frames if not isinstance(f, (InterruptionFrame, BargeInFrame))]


def barge_ins(frames) -> list[BargeInFrame]:
    return [f for f in frames if isinstance(f, BargeInFrame)]


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


async def test_caller_starting_over_the_bot_takes_the_floor_after_min_speech():
    frames = quiet(1.2) + bot_starts() + talk(0.8, turn="start end") + bot_stops()
    barge_in, down, up = await run(BargeInParams(min_speech_secs=0.4), frames)

    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    [decision] = barge_ins(down)
    assert decision.rule == "floor" and 0.4 <= decision.speech_secs < 0.42
    assert decision.onset_secs_ago == pytest.approx(decision.speech_secs)  # voiced all along
    # it goes out with the frame that completes 0.4 s of speech: 0.1 s to the VAD start, then 0.3 s
    started = next(f for f in down if isinstance(f, VADUserStartedSpeakingFrame))
    before = audio_secs_between(down, started, InterruptionFrame)
    assert 0.28 <= before + 1e-9 <= 0.32
    # the caller audio received by then: 1.2 s quiet + the 0.4 s that decided it
    assert decision.audio_secs == pytest.approx(1.2 + decision.speech_secs, abs=0.021)
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, InterruptionFrame, BotStoppedSpeakingFrame]
    assert without_interruptions(down) == sent_downstream(frames)  # every frame forwarded, in order
    assert barge_in.stats["interruptions"] == 1 and barge_in.stats["backchannels"] == 0


async def test_a_backchannel_over_the_bot_does_not_cut_it():
    frames = quiet(1.2) + bot_starts() + talk(0.3, turn="start end") + quiet(0.4) + bot_stops()
    barge_in, down, up = await run(BargeInParams(min_speech_secs=0.4), frames)
    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    assert barge_in.stats["backchannels"] == 1 and barge_in.stats["interruptions"] == 0
    assert down == sent_downstream(frames)


async def test_short_segments_of_one_turn_add_up_to_taking_the_floor():
    """ "Wait, ... stop, ..." is two 0.3 s segments of one turn: together they take the floor."""
    frames = quiet(1.2) + bot_starts() + talk(0.3, turn="start") + talk(0.3) + quiet(0.5) + [UserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, _ = await run(BargeInParams(min_speech_secs=0.4), frames)
    [decision] = barge_ins(down)
    assert decision.rule == "floor" and 0.4 <= decision.speech_secs < 0.42
    assert decision.onset_secs_ago == pytest.approx(0.6, abs=0.021)  # from the first segment's onset: 0.3 + 0.2 + 0.1
    assert barge_in.stats["backchannels"] == 0


async def test_two_backchannels_in_two_turns_do_not_add_up():
    frames = quiet(1.2) + bot_starts() + talk(0.3, turn="start end") + talk(0.3, turn="start end") + bot_stops()
    barge_in, down, _ = await run(BargeInParams(min_speech_secs=0.4), frames)
    assert count(down, InterruptionFrame) == 0 and barge_in.stats["backchannels"] == 2


async def test_without_a_turn_processor_a_segment_is_the_turn():
    frames = quiet(1.2) + bot_starts() + talk(0.3) + talk(0.3) + bot_stops()
    barge_in, down, _ = await run(BargeInParams(min_speech_secs=0.4), frames)
    assert count(down, InterruptionFrame) == 0 and barge_in.stats["backchannels"] == 2


async def test_only_voiced_audio_counts_not_the_vad_hangover_or_a_pause():
    # 0.3 s "uh-huh", a 0.15 s gap inside the segment, 0.05 s more: 0.35 s voiced in a 0.7 s segment
    frames = quiet(1.2) + bot_starts() + voiced(0.1)
    frames += [VADUserStartedSpeakingFrame(start_secs=0.1)] + caller(0.2) + unvoiced(0.14)
    frames += voiced(0.06) + unvoiced(0.2)
    frames += [VADUserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, _ = await run(BargeInParams(min_speech_secs=0.4), frames)
    assert count(down, InterruptionFrame) == 0 and barge_in.stats["backchannels"] == 1


async def test_no_interruption_while_the_bot_is_silent():
    frames = quiet(1.2) + talk(0.8, turn="start end") + bot_starts() + bot_stops() + quiet(0.2)
    barge_in, down, up = await run(BargeInParams(), frames)
    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    assert down == sent_downstream(frames)
    assert [type(f) for f in up] == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]


async def test_the_bot_starting_over_a_talking_caller_goes_through():
    """A full-duplex model may start its answer over the caller's last words: that is not an interruption."""
    frames = quiet(1.2) + talk(0.6, stop=False, turn="start")
    frames += bot_starts() + voiced(0.3) + unvoiced(0.2) + [VADUserStoppedSpeakingFrame()]
    frames += quiet(0.5) + [UserStoppedSpeakingFrame()] + quiet(0.4) + bot_stops()
    barge_in, down, up = await run(BargeInParams(overlap_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    assert barge_in.stats["overlaps"] == 1


async def test_a_pause_inside_the_turn_is_not_a_new_floor_taking():
    """The bot starts in the caller's comma pause; the caller's next words are still the same turn."""
    frames = quiet(1.2) + talk(0.6, turn="start") + bot_starts() + talk(0.7) + quiet(0.5) + [UserStoppedSpeakingFrame()]
    frames += bot_stops()
    barge_in, down, _ = await run(BargeInParams(min_speech_secs=0.4, overlap_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 0 and barge_in.stats["overlaps"] == 1


async def test_a_caller_who_keeps_talking_over_the_bot_takes_the_floor_back():
    frames = quiet(1.2) + talk(0.5, stop=False, turn="start") + bot_starts() + voiced(1.2)
    frames += unvoiced(0.2) + [VADUserStoppedSpeakingFrame()] + bot_stops()
    barge_in, down, up = await run(BargeInParams(overlap_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    [decision] = barge_ins(down)
    assert decision.rule == "overlap" and 1.0 <= decision.speech_secs < 1.02
    # counted from the bot's start
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert count(down[:i], InputAudioRawFrame) in (round((1.2 + 0.7 + 1.0) / 0.02), round((1.2 + 0.7 + 1.0) / 0.02) + 1)


async def test_speech_starting_in_the_start_mute_window_never_interrupts_but_later_speech_does():
    # the greeting plays from 0.2 s; the caller says "hello?" at 0.4 s and goes on past the 1 s window
    frames = quiet(0.2) + bot_starts() + quiet(0.2) + talk(1.4, turn="start end") + talk(0.6, turn="start end") + bot_stops()
    barge_in, down, up = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 1 and count(up, InterruptionFrame) == 1
    assert barge_in.stats["muted_at_start"] == 1 and barge_in.stats["interruptions"] == 1
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert sum(isinstance(f, VADUserStartedSpeakingFrame) for f in down[:i]) == 2  # the second segment's


async def test_start_mute_is_counted_in_caller_audio():
    """The window is the caller audio seen so far, not wall time: 0.9 s of audio, however long it took."""
    frames = quiet(0.5) + [SleepFrame(0.6)] + quiet(0.3) + bot_starts() + talk(0.8)  # confirmed at 0.9 s
    barge_in, down, _ = await run(BargeInParams(start_mute_secs=1.0), frames)
    assert count(down, InterruptionFrame) == 0
    assert barge_in.stats["muted_at_start"] == 1


async def test_min_speech_zero_interrupts_at_the_vad_start():
    frames = quiet(1.2) + bot_starts() + talk(0.6)
    _, down, _ = await run(BargeInParams(min_speech_secs=0.0), frames)
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert isinstance(down[i - 1], BargeInFrame) and isinstance(down[i + 1], VADUserStartedSpeakingFrame)


async def test_one_interruption_per_floor_taking():
    frames = quiet(1.2) + bot_starts() + talk(0.8, turn="start end") + bot_starts() + talk(0.8, turn="start end") + bot_stops()
    barge_in, down, up = await run(BargeInParams(), frames)
    assert count(down, InterruptionFrame) == 2 and count(up, InterruptionFrame) == 2
    assert [d.rule for d in barge_ins(down)] == ["floor", "floor"]


async def test_half_duplex_never_interrupts_and_feeds_silence_while_the_bot_speaks():
    before, during, after = caller(1.2), caller(0.6), caller(0.4)
    frames = before + bot_starts() + [CallerVoiceFrame(voiced=True), VADUserStartedSpeakingFrame()] + during
    frames += [CallerVoiceFrame(voiced=False), VADUserStoppedSpeakingFrame()] + bot_stops() + after  # no effect
    barge_in, down, up = await run(BargeInParams(start_mute_secs=0.0, half_duplex=True), frames)

    assert count(down, InterruptionFrame) == 0 and count(up, InterruptionFrame) == 0
    audio = [f for f in down if isinstance(f, InputAudioRawFrame)]
    assert len(audio) == len(before) + len(during) + len(after)
    assert [f.audio for f in audio[: len(before)]] == [f.audio for f in before]
    assert all(f.audio == bytes(len(g.audio)) for f, g in zip(audio[len(before) : -len(after)], during))
    assert all(f.sample_rate == RATE and f.num_channels == 1 for f in audio)
    assert any(np.frombuffer(g.audio, np.int16).any() for g in during)  # it was speech going in
    assert [f.audio for f in audio[-len(after) :]] == [f.audio for f in after]
    others = [f for f in down if not isinstance(f, InputAudioRawFrame)]
    assert others == [f for f in sent_downstream(frames) if not isinstance(f, InputAudioRawFrame)]
    assert barge_in.stats["half_duplex_secs"] == pytest.approx(0.6)


def test_params_schema_rejects_unknown_keys_and_negative_times():
    with pytest.raises(ValueError):
        BargeInParams(min_speech=0.2)
    with pytest.raises(ValueError):
        BargeInParams(start_mute_secs=-1)
    with pytest.raises(ValueError):
        BargeInParams(overlap_secs=-0.1)
