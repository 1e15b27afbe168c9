"""CallActionsProcessor alone with run_test: DTMF, idle and duration rules, actions from other processors, refusals.

Clips of real speech written into tmp_path and short rule timings keep the tests quick; assertions
are about which frames come out and in what order, never how long anything took.
"""

import re

import numpy as np
import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndWorkerFrame,
    Frame,
    InputDTMFFrame,
    InterruptionFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pydantic import ValidationError

from processors.audio import write_wav
from processors.call_actions import CallActionsParams, CallActionsProcessor
from tests.speech import speech
from transports.frames import ActionTakenFrame, CallAction, CallActionFrame, PersonaSwitchFrame, TransferFrame, action_context

RATE = 8000
CLIPS = ("goodbye", "transferring", "still_there", "wrapping_up")


def actions(tmp_path, **params) -> CallActionsProcessor:
    for name in CLIPS:
        write_wav(tmp_path / f"{name}.wav", np.resize(speech(24000), 4800), 24000)  # 0.2 s of real speech
    p = CallActionsParams(clips={name: f"{name}.wav" for name in CLIPS}, transfer_targets={"agent": "+15551234567"}, **params)
    return CallActionsProcessor(p, prepared=CallActionsProcessor.prepare(p, tmp_path))


async def run(processor, frames: list[Frame]) -> tuple[list[Frame], list[Frame]]:
    return await run_test(processor, frames_to_send=frames, expected_down_frames=None, expected_up_frames=None,
                          pipeline_params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))


def dtmf(*digits: str) -> list[Frame]:
    return [InputDTMFFrame(button=KeypadEntry(d)) for d in digits]


def taken(frames: list[Frame]) -> list[ActionTakenFrame]:
    return [f for f in frames if isinstance(f, ActionTakenFrame)]


def clips_played(frames: list[Frame]) -> list[str]:
    return [f.context_id.split(":", 1)[1] for f in frames if isinstance(f, TTSStartedFrame)]


def kinds(frames: list[Frame], *types) -> list[type]:
    return [type(f) for f in frames if isinstance(f, types)]


async def test_a_digit_transfers_the_call_after_its_clip(tmp_path):
    p = actions(tmp_path, dtmf={"0": {"action": "transfer", "target": "agent", "clip": "transferring"}})
    down, up = await run(p, dtmf("5", "0") + [SleepFrame(0.1)])
    [action] = taken(down)
    assert (action.action, action.reason, action.target, action.outcome, action.refused) == (CallAction.TRANSFER, "dtmf 0", "agent", "transferred", None)
    # the bot is cut first (a `clear`), then the clip, then the hand-over and a clean end, in this order
    order = kinds(down, InterruptionFrame, TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame, TransferFrame, EndWorkerFrame)
    assert order == [InterruptionFrame, TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame, TransferFrame, EndWorkerFrame]
    assert clips_played(down) == ["transferring"]
    [transfer] = [f for f in down if isinstance(f, TransferFrame)]
    assert (transfer.target, transfer.to) == ("agent", "+15551234567")
    assert InterruptionFrame in kinds(up, InterruptionFrame)
    assert p.stats["taken"] == {"transfer": 1}


async def test_a_sequence_needs_its_digits_within_the_gap(tmp_path):
    p = actions(tmp_path, dtmf={"*9": {"action": "hang_up", "clip": "goodbye"}}, dtmf_gap_secs=0.2)
    down, _ = await run(p, dtmf("*") + [SleepFrame(0.3)] + dtmf("9") + [SleepFrame(0.05)])
    assert taken(down) == []  # "*", too long a pause, "9": no sequence
    p = actions(tmp_path, dtmf={"*9": {"action": "hang_up", "clip": "goodbye"}}, dtmf_gap_secs=0.2)
    down, _ = await run(p, dtmf("1", "*", "9") + [SleepFrame(0.05)])  # a stray digit before it does not matter
    [action] = taken(down)
    assert (action.action, action.reason, action.outcome) == (CallAction.HANG_UP, "dtmf *9", "bot_hung_up")
    assert clips_played(down) == ["goodbye"] and EndWorkerFrame in kinds(down, EndWorkerFrame)


async def test_actions_from_other_processors_are_checked_by_name(tmp_path):
    p = actions(tmp_path)
    asked = [CallActionFrame(action=CallAction.TRANSFER, target="+15550000000", reason="intent: agent"),  # a number, not a name
             CallActionFrame(action=CallAction.PLAY, clip="nope", reason="keyword"),
             CallActionFrame(action=CallAction.EVENT, event="lead", data={"score": 3}, reason="intent: buy"),
             CallActionFrame(action=CallAction.PLAY, clip="still_there", reason="keyword")]
    down, _ = await run(p, asked + [SleepFrame(0.05)])
    results = [(a.action, a.refused) for a in taken(down)]
    assert results == [(CallAction.TRANSFER, "no transfer target named '+15550000000'"), (CallAction.PLAY, "no clip named 'nope'"),
                       (CallAction.EVENT, None), (CallAction.PLAY, None)]
    assert taken(down)[2].details() == {"reason": "intent: buy", "name": "lead", "data": {"score": 3}}
    assert clips_played(down) == ["still_there"]
    assert kinds(down, TransferFrame, EndWorkerFrame, InterruptionFrame) == []  # nothing final, nothing cut
    assert p.stats["refused"] == 2


async def test_a_persona_switch_goes_to_personaplex_both_ways(tmp_path):
    p = actions(tmp_path, dtmf={"2": {"action": "persona", "persona": "sales"}})
    down, up = await run(p, dtmf("2") + [SleepFrame(0.05)])
    assert [f.persona for f in up if isinstance(f, PersonaSwitchFrame)] == ["sales"]
    assert [f.persona for f in down if isinstance(f, PersonaSwitchFrame)] == ["sales"]
    assert EndWorkerFrame not in kinds(down, EndWorkerFrame)


async def test_after_a_final_action_nothing_else_is_heard_or_done(tmp_path):
    p = actions(tmp_path, dtmf={"9": {"action": "hang_up", "clip": "goodbye"}, "0": {"action": "transfer", "target": "agent"}})
    model = SpeechOutputAudioRawFrame(audio=bytes(1600), sample_rate=RATE, num_channels=1)
    down, _ = await run(p, dtmf("9") + [model] + dtmf("0"))  # what was on its way before the call ended
    assert [(a.action, a.refused) for a in taken(down)] == [(CallAction.HANG_UP, None), (CallAction.TRANSFER, "the call is already ending")]
    assert not any(isinstance(f, SpeechOutputAudioRawFrame) for f in down)
    assert p.stats["dropped_frames"] == 1


async def test_idle_prompts_then_hangs_up_and_speech_resets_it(tmp_path):
    idle = {"prompt_after_secs": 0.15, "prompt_clip": "still_there", "hang_up_after_secs": 0.15, "goodbye_clip": "goodbye"}
    # the caller talks before the first prompt is due: it is not due until 0.15 s after they stop
    frames = [SleepFrame(0.08), VADUserStartedSpeakingFrame(), SleepFrame(0.3), VADUserStoppedSpeakingFrame(), SleepFrame(0.1)]
    down, _ = await run(actions(tmp_path, idle=idle), frames)
    assert taken(down) == []
    # silence: the prompt, then (the bot's prompt audible and done) the goodbye
    frames = [SleepFrame(0.2), BotStartedSpeakingFrame(), SleepFrame(0.1), BotStoppedSpeakingFrame(), SleepFrame(0.3)]
    down, _ = await run(actions(tmp_path, idle=idle), frames)
    assert [(a.action, a.reason, a.outcome) for a in taken(down)] == [(CallAction.PLAY, "idle", None), (CallAction.HANG_UP, "idle", "caller_idle")]
    assert clips_played(down) == ["still_there", "goodbye"]


async def test_a_long_bot_answer_is_not_idleness(tmp_path):
    idle = {"prompt_after_secs": 0.15, "prompt_clip": "still_there", "hang_up_after_secs": 0.15}
    frames = [SleepFrame(0.05), BotStartedSpeakingFrame(), SleepFrame(0.4), BotStoppedSpeakingFrame(), SleepFrame(0.1)]
    down, _ = await run(actions(tmp_path, idle=idle), frames)
    assert taken(down) == []


async def test_max_duration_warns_then_says_goodbye(tmp_path):
    rule = {"warn_at_secs": 0.1, "warn_clip": "wrapping_up", "hang_up_at_secs": 0.25, "goodbye_clip": "goodbye"}
    down, _ = await run(actions(tmp_path, max_duration=rule), [SleepFrame(0.4)])
    assert [(a.action, a.reason, a.outcome) for a in taken(down)] == [(CallAction.PLAY, "max_duration", None),
                                                                      (CallAction.HANG_UP, "max_duration", "max_duration")]
    assert clips_played(down) == ["wrapping_up", "goodbye"]
    assert [f.context_id for f in down if isinstance(f, TTSStoppedFrame)] == [action_context("wrapping_up"), action_context("goodbye")]


@pytest.mark.parametrize("params, message", [
    ({"dtmf": {"1": {"action": "hang_up"}, "12": {"action": "hang_up"}}}, "'1' is the start of '12'"),
    ({"dtmf": {"0": {"action": "transfer", "target": "boss"}}}, "target 'boss' is not in transfer_targets"),
    ({"dtmf": {"0": {"action": "play", "clip": "music"}}}, "clip 'music' is not in clips"),
    ({"dtmf": {"x": {"action": "hang_up"}}}, "digits 0-9"),
    ({"dtmf": {"0": {"action": "transfer"}}}, "a transfer action needs `target`"),
    ({"transfer_targets": {"agent": "5551234"}}, "neither a +E.164 number nor a sip: URI"),
    ({"transfer_targets": {"agent": "sip:a@b.c<Play>x</Play>"}}, "neither a +E.164 number nor a sip: URI"),
    ({"max_duration": {"warn_at_secs": 60, "hang_up_at_secs": 30}}, "warn_at_secs must come before"),
])
def test_a_wrong_rule_is_refused_at_start_up(params, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        CallActionsParams(**params)
