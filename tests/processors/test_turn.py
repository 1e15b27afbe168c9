"""TurnProcessor behind the real VAD on espeak recordings: pauses inside a sentence stay one turn."""

import numpy as np
import pytest
from pipecat.frames.frames import (
    InputAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from pipelines.sim.speech import fixture_wav
from processors.turn import TurnParams, TurnProcessor
from processors.vad import VADParams, VADProcessor
from tests.processors.test_vad import MS, frames_of


def silence(secs: float, rate: int) -> np.ndarray:
    return np.zeros(int(secs * rate), np.int16)


async def turns(pcm: np.ndarray, rate: int, end_secs: float = 0.5):
    """(VAD segments, turn frames with the caller audio before each) for `pcm` through vad -> turn."""
    turn = TurnProcessor(TurnParams(end_secs=end_secs))
    down, _ = await run_test(Pipeline([VADProcessor(VADParams()), turn]), frames_to_send=[SleepFrame(0.5), *frames_of(pcm, rate)],
                             pipeline_params=PipelineParams(audio_in_sample_rate=rate))
    segments = sum(isinstance(f, VADUserStartedSpeakingFrame) for f in down)
    marks, fed = [], 0
    for f in down:
        if isinstance(f, InputAudioRawFrame):
            fed += 1
        elif isinstance(f, (UserStartedSpeakingFrame, UserStoppedSpeakingFrame)):
            marks.append((type(f).__name__, fed * MS / 1000))
    return segments, marks, turn


@pytest.mark.parametrize("pause", [0.3, 0.45])
async def test_a_pause_inside_a_sentence_is_one_turn_though_vad_splits_it(pause):
    question, rate = fixture_wav("question_8k")
    words = question[int(0.2 * rate) : -int(0.2 * rate)]  # the fixture pads 0.2 s of silence each side
    pcm = np.concatenate([silence(0.5, rate), words, silence(pause, rate), words, silence(1.5, rate)])
    segments, marks, turn = await turns(pcm, rate)
    assert segments >= 2  # VAD's 0.2 s stop ends a segment in the pause
    assert [name for name, _ in marks] == ["UserStartedSpeakingFrame", "UserStoppedSpeakingFrame"]
    assert turn.stats["turns"] == 1 and turn.stats["segments"] == segments


async def test_the_turn_ends_end_secs_after_vads_stop():
    question, rate = fixture_wav("question_8k")
    pcm = np.concatenate([silence(0.5, rate), question, silence(2.0, rate)])
    down, _ = await run_test(Pipeline([VADProcessor(VADParams()), TurnProcessor(TurnParams(end_secs=0.5))]),
                             frames_to_send=[SleepFrame(0.5), *frames_of(pcm, rate)], pipeline_params=PipelineParams(audio_in_sample_rate=rate))
    fed, stop_at, end_at = 0, None, None
    for f in down:
        if isinstance(f, InputAudioRawFrame):
            fed += 1
        elif isinstance(f, VADUserStoppedSpeakingFrame):
            stop_at = fed
        elif isinstance(f, UserStoppedSpeakingFrame):
            end_at = fed
    assert (end_at - stop_at) * MS / 1000 == pytest.approx(0.5, abs=MS / 1000)


async def test_two_sentences_a_second_apart_are_two_turns():
    question, rate = fixture_wav("interrupt_16k")
    pcm = np.concatenate([silence(0.5, rate), question, silence(1.2, rate), question, silence(1.5, rate)])
    _, marks, turn = await turns(pcm, rate)
    assert [name for name, _ in marks] == ["UserStartedSpeakingFrame", "UserStoppedSpeakingFrame"] * 2
    assert turn.stats["turns"] == 2


def test_params_schema_rejects_unknown_keys_and_negative_times():
    with pytest.raises(ValueError):
        TurnParams(end=0.5)
    with pytest.raises(ValueError):
        TurnParams(end_secs=-1)
