"""The conversation an LLM sees in a cascaded (STT -> LLM -> TTS) call: pipecat's context aggregators.

Pipecat's LLMUserAggregator (before the LLM: caller transcripts into the context, then an
LLMContextFrame that runs it) and LLMAssistantAggregator (after the TTS: the bot's words into
the context) must share one LLMContext per call, an object YAML cannot name. So both halves are
this processor, `role: user` and `role: assistant`: the user half builds the call's
LLMContextAggregatorPair and hands it to the assistant half, which the builder makes next for the
same call (processors are built in list order, synchronously), through a hand-off the two halves
share in the deployment's plan (`prepare`), never between plans. Each half is a one-processor
Pipeline around pipecat's own aggregator. The user half also gives the LLM its system
instruction, right behind the StartFrame: pipecat 1.14 takes it as a service setting (a system
message in the context is deprecated), and settings objects cannot be written in YAML either.

A caller turn starts at VAD speech (or a transcript) and ends `user_speech_timeout_secs` after VAD
stopped, once its transcript is in: pipecat's speech-timeout strategy, not the smart-turn model
it would otherwise load for every call. Turn starts do not interrupt the bot; `barge_in` does,
with its guards. The bot's words reach the context as the TTS makes them, ahead of playout, so
after a barge-in the context may hold a little the caller did not hear.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pipecat.frames.frames import Frame, LLMUpdateSettingsFrame, StartFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import LLMSettings
from pipecat.turns.user_start import TranscriptionUserTurnStartStrategy, VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.errors import ParamsError
from processors.pipecat_adapter import set_name

USER_HALF_ONLY = ("system_instruction", "user_speech_timeout_secs", "interruptions")


class LLMContextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"] = Field(description="user: before the LLM; assistant: after the TTS")
    system_instruction: str | None = Field(None, min_length=1, description="the LLM's system prompt, set at call start (user half)")
    user_speech_timeout_secs: float = Field(0.6, ge=0, description="pause after the caller's speech that ends a turn (user half)")
    interruptions: bool = Field(False, description="every turn start also interrupts the bot (pipecat's default); off: barge_in decides")

    @model_validator(mode="after")
    def _user_half_keys(self) -> "LLMContextParams":
        misplaced = [key for key in USER_HALF_ONLY if key in self.model_fields_set and self.role == "assistant"]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} belong(s) on the `role: user` half")
        return self


class _Handoff:
    """One per user half in a plan: carries each call's aggregator pair from its user half to its
    assistant half; `claimed` once an assistant half is planned with it."""

    def __init__(self):
        self.pair: LLMContextAggregatorPair | None = None
        self.claimed = False


class LLMContextProcessor(Pipeline):
    """One half (user or assistant) of pipecat's LLM context aggregator pair, one shared context per call."""

    Params = LLMContextParams

    @classmethod
    def prepare(cls, params: LLMContextParams, *dirs: Path, earlier: Sequence = ()) -> _Handoff:
        """Pair the halves at load time: a `role: assistant` takes the latest `role: user` earlier in
        the list (`earlier`: what the builder prepared before it in this plan), if no assistant half
        has taken it. Nothing is kept between plans."""
        if params.role == "user":
            return _Handoff()
        handoff = next((h for h in reversed(earlier) if isinstance(h, _Handoff)), None)
        if handoff is None or handoff.claimed:
            raise ParamsError(("role",), "no `llm_context` with role: user earlier in the list to share a context with")
        handoff.claimed = True
        return handoff

    def __init__(self, params: LLMContextParams, *, prepared: _Handoff | None = None, **kwargs):
        handoff = prepared or _Handoff()  # built alone (a unit test): a user half with its own context
        if params.role == "user":
            handoff.pair = _new_pair(params)
            aggregator: LLMUserAggregator | LLMAssistantAggregator = handoff.pair.user()
        else:
            if handoff.pair is None:
                raise RuntimeError("llm_context: an assistant half was built before its call's user half")
            aggregator, handoff.pair = handoff.pair.assistant(), None
        super().__init__([aggregator])
        if kwargs.get("name"):
            set_name(self, kwargs["name"])  # pipecat's Pipeline takes no name
        self.aggregator = aggregator
        self._instruction = params.system_instruction if params.role == "user" else None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._instruction:
            # into the aggregator's queue behind the StartFrame: the LLM has it before any turn
            settings = LLMUpdateSettingsFrame(delta=LLMSettings(system_instruction=self._instruction))
            await self.entry_processors[0].queue_frame(settings, direction)

    @property
    def context(self) -> LLMContext:
        return self.aggregator.context


def _new_pair(params: LLMContextParams) -> LLMContextAggregatorPair:
    interrupt = params.interruptions
    strategies = UserTurnStrategies(
        start=[VADUserTurnStartStrategy(enable_interruptions=interrupt), TranscriptionUserTurnStartStrategy(enable_interruptions=interrupt)],
        stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=params.user_speech_timeout_secs)],
    )
    return LLMContextAggregatorPair(LLMContext(), user_params=LLMUserAggregatorParams(user_turn_strategies=strategies))
