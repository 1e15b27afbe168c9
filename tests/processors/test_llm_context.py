"""LLMContextProcessor: the two halves of pipecat's context aggregator pair, paired at load time and per call."""

import textwrap

import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMUpdateSettingsFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.tests.utils import run_test
from pydantic import ValidationError

from pipelines import builder, config
from pipelines.errors import ConfigError
from processors.llm_context import LLMContextParams, LLMContextProcessor

PAIR = """\
transport: {type: exotel}
processors:
  - type: llm_context
    params: {role: user, system_instruction: Be brief.}
  - type: pipecat.processors.filters.identity_filter.IdentityFilter
  - type: llm_context
    params: {role: assistant}
"""
SWAPPED = """\
transport: {type: exotel}
processors:
  - type: llm_context
    params: {role: assistant}
  - type: llm_context
    params: {role: user}
"""


def plan(tmp_path, text: str):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(text))
    return builder.plan(config.load(path, {}))


def test_each_call_gets_one_context_shared_by_its_two_halves(tmp_path):
    deployment = plan(tmp_path, PAIR)
    first = builder.new_call_processors(deployment, None)
    second = builder.new_call_processors(deployment, None)
    assert first[0].context is first[2].context and second[0].context is second[2].context
    assert first[0].context is not second[0].context


def test_an_assistant_half_needs_a_user_half_before_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, SWAPPED)
    assert (info.value.line, info.value.key) == (4, "processors[0].params.role")
    assert "role: user" in info.value.problem
    with pytest.raises(RuntimeError):
        LLMContextProcessor(LLMContextParams(role="assistant"))


USER_ONLY = """\
transport: {type: exotel}
processors:
  - type: llm_context
    params: {role: user}
"""
ASSISTANT_ONLY = """\
transport: {type: exotel}
processors:
  - type: llm_context
    params: {role: assistant}
"""
TWO_ASSISTANTS = PAIR + """\
  - type: llm_context
    params: {role: assistant}
"""


def test_two_plans_in_a_row_do_not_pair_across_each_other(tmp_path):
    plan(tmp_path, USER_ONLY)  # a user half left waiting in the first plan...
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, ASSISTANT_ONLY)  # ...is not the second plan's
    assert info.value.key == "processors[0].params.role"
    first, second = plan(tmp_path, PAIR), plan(tmp_path, PAIR)
    halves = [p.prepared for d in (first, second) for p in d.processors if p.entry.name == "llm_context"]
    assert halves[0] is halves[1] and halves[2] is halves[3] and halves[0] is not halves[2]
    a, b = builder.new_call_processors(first, None), builder.new_call_processors(second, None)
    assert a[0].context is a[2].context and b[0].context is b[2].context and a[0].context is not b[0].context


def test_one_user_half_pairs_with_one_assistant_half(tmp_path):
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, TWO_ASSISTANTS)
    assert info.value.key == "processors[3].params.role"


def test_user_half_keys_are_refused_on_the_assistant_half():
    with pytest.raises(ValidationError, match="system_instruction"):
        LLMContextParams(role="assistant", system_instruction="Be brief.")
    with pytest.raises(ValidationError):
        LLMContextParams(role="narrator")


async def test_the_user_half_sets_the_llms_system_instruction_behind_the_start_frame():
    user = LLMContextProcessor(LLMContextParams(role="user", system_instruction="Be brief."))
    down, _ = await run_test(user, frames_to_send=[])
    assert [type(f) for f in down] == [LLMUpdateSettingsFrame]
    assert down[0].delta.system_instruction == "Be brief."
    assert user.context.get_messages() == []  # a system message in the context is deprecated in pipecat 1.14


@pytest.mark.parametrize("interruptions", [False, True])
async def test_a_turn_start_interrupts_the_bot_only_when_asked(interruptions):
    user = LLMContextProcessor(LLMContextParams(role="user", interruptions=interruptions))
    down, up = await run_test(user, frames_to_send=[VADUserStartedSpeakingFrame(start_secs=0.1)])
    assert (InterruptionFrame in [type(f) for f in up]) is interruptions  # barge_in decides by default
    assert VADUserStartedSpeakingFrame in [type(f) for f in down] and UserStartedSpeakingFrame in [type(f) for f in down]
    assert not [f for f in down if isinstance(f, TranscriptionFrame)]
