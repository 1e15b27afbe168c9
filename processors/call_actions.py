"""Call actions: what a call does at its edges, and the YAML rules that ask for it.

A phone bot is judged by "press 0 for an agent", "are you still there?" and "we have to wrap up":
things the speech model does not decide. This processor carries out `CallActionFrame`s (hang up,
transfer, switch persona, play a clip, send an event; transports/frames.py) from its own rules or
from any processor before or after it (an experimenter's keyword or intent trigger), and has three
kinds of rule:

- **dtmf**: a digit or a sequence ("0", "*9") asks for an action; digits of one sequence follow
  each other within `dtmf_gap_secs`.
- **idle**: nobody has spoken for `prompt_after_secs` (the caller silent and the bot not audible):
  a prompt clip; still nobody `hang_up_after_secs` after it: the goodbye clip and the hang-up.
  Counted from the end of the last speech, so a long bot answer is not idleness.
- **max_duration**: a warning clip at `warn_at_secs`, the goodbye and the hang-up at
  `hang_up_at_secs`, from the call's start.

Hang-up and transfer are final: the bot is interrupted (a `clear`, its queued audio dropped), the
clip plays, then the call ends cleanly (the pacer lets the clip play out); model and holding
audio that still arrives is dropped. A transfer leaves a TransferFrame for the output, which hands
the call over the provider's way once the clip has played. Everything is named in YAML and checked
at start-up: clips, transfer targets (the only numbers a call can be sent to), personas. Each
action taken or refused becomes an ActionTakenFrame for the record and the call events.

Place it after `holding` and before `pacer`, so its clips are paced like any utterance.
"""

import asyncio
import re

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    InputDTMFFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from processors.holding import ClipBank, prepare_clips
from transports.frames import ActionTakenFrame, CallAction, CallActionFrame, PersonaSwitchFrame, TransferFrame, action_context, call_of

DTMF_KEYS = re.compile(r"^[0-9*#A-D]{1,8}$")
TARGET = re.compile(r"^(\+[1-9][0-9]{6,14}|sips?:[^\s<>\"&']{3,200})$")  # E.164, or a SIP URI with nothing TwiML would escape
FINAL = (CallAction.HANG_UP, CallAction.TRANSFER)


class ActionSpec(BaseModel):
    """One action, as a rule asks for it."""

    model_config = ConfigDict(extra="forbid")

    action: CallAction
    clip: str | None = Field(None, description="a name in `clips`, played first")
    target: str | None = Field(None, description="transfer: a name in `transfer_targets`")
    persona: str | None = Field(None, description="persona: a name in personaplex's `personas`")
    event: str | None = Field(None, description="event: its name in the record and the call events")
    data: dict[str, str | int | float | bool] = Field(default_factory=dict, description="event: what goes with it")

    @model_validator(mode="after")
    def _complete(self) -> "ActionSpec":
        needs = {CallAction.TRANSFER: "target", CallAction.PERSONA: "persona", CallAction.PLAY: "clip", CallAction.EVENT: "event"}
        field = needs.get(self.action)
        if field and not getattr(self, field):
            raise ValueError(f"a {self.action.value} action needs `{field}`")
        return self


class IdleRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_after_secs: float = Field(gt=0, description="nobody spoke this long: the prompt clip")
    prompt_clip: str | None = Field(None, description="e.g. 'Are you still there?'; none: straight to the hang-up rule")
    hang_up_after_secs: float = Field(gt=0, description="still nobody this long after the prompt: goodbye and hang up")
    goodbye_clip: str | None = None


class MaxDurationRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    warn_at_secs: float | None = Field(None, gt=0, description="call seconds at which the warning clip plays")
    warn_clip: str | None = None
    hang_up_at_secs: float = Field(gt=0, description="call seconds at which the goodbye clip plays and the call ends")
    goodbye_clip: str | None = None

    @model_validator(mode="after")
    def _order(self) -> "MaxDurationRule":
        if self.warn_at_secs is not None and self.warn_at_secs >= self.hang_up_at_secs:
            raise ValueError("warn_at_secs must come before hang_up_at_secs")
        return self


class CallActionsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clips: dict[str, str] = Field(default_factory=dict, description=(
        "name: WAV path (relative to the YAML file, then the shipped clips), as holding's clips"))
    transfer_targets: dict[str, str] = Field(default_factory=dict, description=(
        "name: +E.164 number or sip: URI; the only places a call can be transferred to"))
    dtmf: dict[str, ActionSpec] = Field(default_factory=dict, description="digit or sequence (0-9 * # A-D): the action")
    dtmf_gap_secs: float = Field(2.0, gt=0, description="digits of one sequence follow each other within this")
    idle: IdleRule | None = None
    max_duration: MaxDurationRule | None = None

    @field_validator("transfer_targets")
    @classmethod
    def _targets(cls, targets: dict[str, str]) -> dict[str, str]:
        for name, to in targets.items():
            if not TARGET.match(to):
                raise ValueError(f"transfer target {name!r}: {to!r} is neither a +E.164 number nor a sip: URI")
        return targets

    @model_validator(mode="after")
    def _names(self) -> "CallActionsParams":
        for keys, spec in self.dtmf.items():
            if not DTMF_KEYS.match(keys):
                raise ValueError(f"dtmf {keys!r}: digits 0-9, *, #, A-D, at most 8")
            longer = [k for k in self.dtmf if k != keys and k.startswith(keys)]
            if longer:
                raise ValueError(f"dtmf {keys!r} is the start of {longer[0]!r}: the longer one could never be dialled")
            if spec.target is not None and spec.target not in self.transfer_targets:
                raise ValueError(f"dtmf {keys!r}: target {spec.target!r} is not in transfer_targets ({', '.join(self.transfer_targets) or 'none'})")
        clips = [spec.clip for spec in self.dtmf.values()]
        for rule in (self.idle, self.max_duration):
            if rule is not None:
                clips += [getattr(rule, k) for k in ("prompt_clip", "warn_clip", "goodbye_clip") if hasattr(rule, k)]
        for clip in clips:
            if clip is not None and clip not in self.clips:
                raise ValueError(f"clip {clip!r} is not in clips ({', '.join(self.clips) or 'none'})")
        return self


class CallActionsProcessor(FrameProcessor):
    """Carry out call actions (hang up, transfer, persona, clip, event) asked by DTMF, idle and duration rules or any processor."""

    Params = CallActionsParams

    @classmethod
    def prepare(cls, params: CallActionsParams, *dirs) -> ClipBank:
        return prepare_clips(params.clips, *dirs)

    def __init__(self, params: CallActionsParams | None = None, *, prepared: ClipBank | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or CallActionsParams()
        self._bank = prepared or self.prepare(self._params)
        self._rate = 0
        self._call_id = "?"
        self._ending = False
        self._digits = ""
        self._digit_at = 0.0
        self._caller_speaking = False
        self._bot_audible = False
        self._quiet_since = 0.0
        self._prompted = False
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.stats = {"taken": {}, "refused": 0, "dropped_frames": 0}

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, CallActionFrame):
            await self.act(frame)
            return
        if self._ending and isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self.stats["dropped_frames"] += 1  # the model or a holding clip after the last words: never heard
            return
        if isinstance(frame, InputDTMFFrame):
            await self._digit(frame.button.value)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._caller_speaking, self._prompted = True, False
            self._quiet()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._caller_speaking = False
            self._quiet()
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_audible = True
            self._quiet()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_audible = False
            self._quiet()
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._start(frame)
            return
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop_tasks()
        await self.push_frame(frame, direction)

    # ---- the rules ------------------------------------------------------------------------------

    def _start(self, frame: StartFrame):
        call = call_of(frame)
        self._call_id = call.call_id if call else self._call_id
        self._quiet_since = self._now()
        if self._params.idle:
            self._tasks.append(self.create_task(self._idle_rule(self._params.idle), name=f"call-actions-idle-{self._call_id}"))
        if self._params.max_duration:
            self._tasks.append(self.create_task(self._duration_rule(self._params.max_duration), name=f"call-actions-duration-{self._call_id}"))

    async def _digit(self, digit: str):
        now = self._now()
        if now - self._digit_at > self._params.dtmf_gap_secs:
            self._digits = ""
        self._digit_at = now
        self._digits += digit
        # the longest tail of what was dialled that still leads somewhere ("1" then "0": "0" may match)
        while self._digits and not any(k.startswith(self._digits) for k in self._params.dtmf):
            self._digits = self._digits[1:]
        spec = self._params.dtmf.get(self._digits)
        if spec is not None:
            keys, self._digits = self._digits, ""
            await self.act(_frame(spec, f"dtmf {keys}"))

    def _quiet(self):
        if not (self._caller_speaking or self._bot_audible):
            self._quiet_since = self._now()
        self._changed.set()

    async def _idle_rule(self, rule: IdleRule):
        while not self._ending:
            if self._caller_speaking or self._bot_audible:
                await self._changed.wait()
                self._changed.clear()
                continue
            due = self._quiet_since + (rule.hang_up_after_secs if self._prompted else rule.prompt_after_secs)
            if due > self._now():
                try:
                    await asyncio.wait_for(self._changed.wait(), due - self._now())
                except TimeoutError:
                    pass
                self._changed.clear()
                continue
            if self._prompted or not rule.prompt_clip:
                await self.act(CallActionFrame(action=CallAction.HANG_UP, clip=rule.goodbye_clip, reason="idle"))
                return
            self._prompted, self._quiet_since = True, self._now()
            await self.act(CallActionFrame(action=CallAction.PLAY, clip=rule.prompt_clip, reason="idle"))

    async def _duration_rule(self, rule: MaxDurationRule):
        started = self._now()
        if rule.warn_at_secs is not None and rule.warn_clip:
            await asyncio.sleep(rule.warn_at_secs)
            await self.act(CallActionFrame(action=CallAction.PLAY, clip=rule.warn_clip, reason="max_duration"))
        await asyncio.sleep(max(0.0, started + rule.hang_up_at_secs - self._now()))
        await self.act(CallActionFrame(action=CallAction.HANG_UP, clip=rule.goodbye_clip, reason="max_duration"))

    async def _stop_tasks(self):
        tasks, self._tasks = self._tasks, []
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                await self.cancel_task(task)

    # ---- carrying them out -----------------------------------------------------------------------

    async def act(self, frame: CallActionFrame):
        """Carry out one action (or refuse it, saying why); either way an ActionTakenFrame follows."""
        refused = self._refusal(frame)
        outcome = None
        if refused is None and frame.action in FINAL:
            outcome = "transferred" if frame.action == CallAction.TRANSFER else {"idle": "caller_idle", "max_duration": "max_duration"}.get(
                frame.reason, "bot_hung_up")
        taken = ActionTakenFrame(action=frame.action, reason=frame.reason, clip=frame.clip, target=frame.target, persona=frame.persona,
                                 event=frame.event, data=dict(frame.data), refused=refused, outcome=outcome)
        await self.push_frame(taken)
        if refused is not None:
            self.stats["refused"] += 1
            logger.warning(f"call {self._call_id}: {frame.action.value} action ({frame.reason or 'no reason'}) refused: {refused}")
            return
        taken_stats = self.stats["taken"]
        taken_stats[frame.action.value] = taken_stats.get(frame.action.value, 0) + 1
        logger.info(f"call {self._call_id}: {frame.action.value} ({frame.reason or 'no reason'})")
        if frame.action in FINAL or frame.action == CallAction.PERSONA:
            await self.broadcast_interruption()  # the bot stops now; what follows is the action's
        if frame.action in FINAL:
            self._ending = True
            await self._stop_tasks()
        if frame.clip:
            await self._play(frame.clip)
        if frame.action == CallAction.PERSONA:
            switch = PersonaSwitchFrame(persona=frame.persona)
            await self.push_frame(switch, FrameDirection.UPSTREAM)  # personaplex normally sits before this processor
            await self.push_frame(PersonaSwitchFrame(persona=frame.persona))
        elif frame.action == CallAction.TRANSFER:
            await self.push_frame(TransferFrame(target=frame.target, to=self._params.transfer_targets[frame.target]))
        if frame.action in FINAL:
            await self.push_frame(EndWorkerFrame(reason=f"{frame.action.value}: {frame.reason or 'asked'}"))

    def _refusal(self, frame: CallActionFrame) -> str | None:
        if self._ending:
            return "the call is already ending"
        if frame.clip is not None and frame.clip not in self._params.clips:
            return f"no clip named {frame.clip!r}"
        if frame.action == CallAction.TRANSFER and frame.target not in self._params.transfer_targets:
            return f"no transfer target named {str(frame.target)[:40]!r}"
        if frame.action == CallAction.PERSONA and not frame.persona:
            return "no persona named"
        if frame.action == CallAction.PLAY and not frame.clip:
            return "no clip named"
        if frame.action == CallAction.EVENT and not frame.event:
            return "no event named"
        return None

    async def _play(self, name: str):
        pcm = self._bank.get(name, self._rate)
        context = action_context(name)
        await self.push_frame(TTSStartedFrame(context_id=context))
        await self.push_frame(TTSAudioRawFrame(audio=pcm, sample_rate=self._rate, num_channels=1, context_id=context))
        await self.push_frame(TTSStoppedFrame(context_id=context))


def _frame(spec: ActionSpec, reason: str) -> CallActionFrame:
    return CallActionFrame(action=spec.action, clip=spec.clip, target=spec.target, persona=spec.persona, event=spec.event,
                           data=dict(spec.data), reason=reason)
