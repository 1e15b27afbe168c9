"""The call's frame vocabulary: every frame of ours, in one module at the bottom layer.

Pipecat has no notion of a telephony call's start, stop or playback marks, so the provider
protocols translate those events into the call frames below. The conversation frames after them
carry what pipecat has no equivalent for either (the caller's voice, barge-in decisions, the mute,
engine failures). Bot utterances themselves are bracketed with pipecat's own
TTSStartedFrame/TTSStoppedFrame (context_id `bot-N` for model speech, `holding:NAME` for a clip), so
stock processors that understand TTS segments understand ours too.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from pipecat.frames.frames import ControlFrame, DataFrame, OutputAudioRawFrame, StartFrame, SystemFrame, UninterruptibleFrame


@dataclass(frozen=True)
class CallInfo:
    """What the provider told us about one call when its stream started."""

    provider: str
    stream_id: str
    call_id: str
    sample_rate: int
    encoding: str = "pcm16"
    account_id: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    chunk_samples: int = 0  # samples per outbound media message the provider wants; 0: any size
    caller_note: str | None = None  # what the deployment remembers of a returning caller (caller_memory), in words

    def start_metadata(self) -> dict:
        """StartFrame.metadata for the call's pipeline: every processor reads it with `call_of`."""
        return {CALL_KEY: self}


CALL_KEY = "call"


def call_of(frame: StartFrame) -> CallInfo | None:
    """The call a pipeline serves, from its StartFrame; None where no call started it (a unit test,
    another framework's pipeline): processors then use their defaults."""
    call = frame.metadata.get(CALL_KEY)
    return call if isinstance(call, CallInfo) else None


@dataclass
class CallStartedFrame(SystemFrame):
    """The provider's `start` event: the call's identity and audio format."""

    call: CallInfo = None  # type: ignore[assignment]


@dataclass
class CallStoppedFrame(SystemFrame):
    """The provider's `stop` event: the caller hung up or the applet ended."""

    reason: str = ""


@dataclass
class MarkFrame(DataFrame):
    """Ask the provider to report when the audio queued before this frame has played.

    The field is `mark`, not `name`: pipecat's Frame.name is the frame's own label.
    """

    mark: str = ""


@dataclass
class MarkPlayedFrame(SystemFrame):
    """The provider reports that the audio before `mark` finished playing."""

    mark: str = ""


@dataclass
class PacedAudioFrame(OutputAudioRawFrame):
    """One provider-sized chunk released by the pacer at its send time.

    `epoch` counts the interruptions the pacer had seen when it released the chunk, so the output
    can refuse a chunk that reaches it after the `clear` it belongs before.
    """

    epoch: int = 0


# ---- conversation frames ----------------------------------------------------------------------

_HOLDING = "holding:"


def holding_context(clip: str) -> str:
    """The TTS context id of a holding clip's utterance; the pacer names the utterance's mark after it."""
    return _HOLDING + clip


def holding_clip(context_id: str | None) -> str | None:
    """The clip a context id or mark name belongs to, or None for the model's speech. One place reads
    the tag, so no module parses ids by hand."""
    if context_id and context_id.startswith(_HOLDING):
        return context_id[len(_HOLDING):]
    return None


@dataclass
class CallerVoiceFrame(SystemFrame):
    """Silero's verdict on the caller's latest 32 ms windows changed: voiced (True) or not (False).

    VAD's start/stop frames lag speech by start_secs/stop_secs; this follows it window by window,
    so barge-in can count how long the caller has really been talking (a backchannel vs taking
    the floor) without VAD's stop hangover in the count.
    """

    voiced: bool = False


@dataclass
class BargeInFrame(SystemFrame):
    """Barge-in decided that the caller took the floor from the audible bot; an interruption follows.

    `rule`: "floor" (caller speech began over the bot and lasted min_speech_secs) or "overlap" (the
    bot began over a talking caller, who kept talking for overlap_secs). `speech_secs`: the caller's
    voiced speech counted for the rule. `onset_secs_ago`: seconds of caller audio since the speech
    onset that counts (the caller's onset, or the bot's start for "overlap"). `audio_secs`: caller
    audio received by then, so a measurement can tell which of the caller's chunks decided it.
    """

    rule: str = "floor"
    speech_secs: float = 0.0
    onset_secs_ago: float = 0.0
    audio_secs: float = 0.0


@dataclass
class ModelMuteFrame(SystemFrame):
    """bot_speech began (muted=True) or ended (muted=False) silencing the model after a barge-in.

    The end frame carries what was dropped: `secs` of model audio and the model's `words` (text
    pieces) in that span, which the caller never heard, and `speech_secs`: how far into the mute the
    model was still speaking (a model that yields stops well inside it; `mute_secs` is sized by it).
    """

    muted: bool = False
    secs: float = 0.0
    words: str = ""
    speech_secs: float = 0.0


@dataclass
class FadeOutFrame(ControlFrame):
    """Fade the queued rest of the current utterance out over `secs` and drop it.

    Ordered with the audio (a ControlFrame), so it lands right after the clip it cuts and
    before the model speech that takes over.
    """

    secs: float = 0.02


@dataclass
class EngineFailedFrame(ControlFrame, UninterruptibleFrame):
    """The speech engine is gone; the call will end. Holding messages answer with the apology.

    Uninterruptible: a barge-in at that moment must not swallow it.
    """

    reason: str = ""


class EngineEvent(StrEnum):
    """What happened between a call and its engine; the value is the call record's event name."""

    NO_ENGINE = "no_engine"
    WAITING = "engine_waiting"
    ACQUIRED = "engine_acquired"
    READY = "engine_ready"
    FAILED = "engine_failed"
    RELEASED = "engine_released"


@dataclass
class EngineEventFrame(SystemFrame):
    """Something happened between the call and its engine, with what is known about it.

    For the call record and metrics; processors pass it on untouched. A SystemFrame, so a
    barge-in never drops it.
    """

    event: EngineEvent = EngineEvent.RELEASED
    url: str | None = None
    reason: str | None = None
    wait_ms: int | None = None  # ACQUIRED: how long the call waited for a free engine
    handshake_ms: int | None = None  # READY: connect plus the prompt phase
    busy: int | None = None  # WAITING: engines serving other calls

    def details(self) -> dict:
        """The fields that were given, as the call record's event carries them."""
        return {k: v for k in ("url", "reason", "wait_ms", "handshake_ms", "busy") if (v := getattr(self, k)) is not None}


# ---- call actions ----------------------------------------------------------------------------


class CallAction(StrEnum):
    """What a call can be asked to do (processors/call_actions.py carries it out)."""

    HANG_UP = "hang_up"  # the clip, then a clean end of the call
    TRANSFER = "transfer"  # the clip, then the call goes to a named target, the provider's way
    PERSONA = "persona"  # the clip, then the model continues as another allow-listed persona
    PLAY = "play"  # the clip, after what is already queued
    EVENT = "event"  # nothing audible: an `action` event in the record and the call events


@dataclass
class CallActionFrame(SystemFrame):
    """A request to act on the call, from `call_actions`' own rules or from any processor.

    Names, never free text: `clip` and `target` name entries of call_actions' `clips` and
    `transfer_targets`, `persona` one of personaplex's `personas`; anything else is refused and
    recorded. A SystemFrame, so a barge-in never drops it.
    """

    action: CallAction = CallAction.PLAY
    clip: str | None = None
    target: str | None = None
    persona: str | None = None
    event: str | None = None
    data: dict = field(default_factory=dict)
    reason: str = ""  # what asked for it: "dtmf 0", "idle", "max_duration", a processor's words


@dataclass
class ActionTakenFrame(SystemFrame):
    """What `call_actions` did about a CallActionFrame (for the record and the call events);
    `refused` says why it did nothing."""

    action: CallAction = CallAction.PLAY
    reason: str = ""
    clip: str | None = None
    target: str | None = None
    persona: str | None = None
    event: str | None = None
    data: dict = field(default_factory=dict)
    refused: str | None = None
    outcome: str | None = None  # a final action: the call's outcome ("transferred", "caller_idle", ...)

    def details(self) -> dict:
        """The fields that were given; an event action's name as `name` (an `event` key is the record's own)."""
        given = {k: v for k in ("reason", "clip", "target", "persona", "data", "refused") if (v := getattr(self, k))}
        return given | ({"name": self.event} if self.event else {})


@dataclass
class TransferFrame(SystemFrame):
    """Hand the call to `to` (a phone number or SIP URI) once the bot's queued words have played:
    the output does it at the call's end, the provider's way."""

    target: str = ""
    to: str = ""


@dataclass
class PersonaSwitchFrame(SystemFrame):
    """Continue the conversation as the allow-listed persona `persona` (personaplex reopens its session)."""

    persona: str = ""


_ACTION = "action:"


def action_context(clip: str) -> str:
    """The TTS context of a call-action clip (holding clips use `holding:NAME`)."""
    return _ACTION + clip


def is_clip(context_id: str | None) -> bool:
    """Whether a TTS context is a pre-rendered clip (holding or call action) rather than the model's speech."""
    return bool(context_id) and (context_id.startswith(_HOLDING) or context_id.startswith(_ACTION))
