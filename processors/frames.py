"""Frames the conversation processors exchange; pipecat has no equivalent for these.

Bot utterances themselves are bracketed with pipecat's own TTSStartedFrame/TTSStoppedFrame
(context_id `bot-N` for model speech, `holding:NAME` for a clip), so stock processors that
understand TTS segments understand ours too.
"""

from dataclasses import dataclass, field

from pipecat.frames.frames import ControlFrame, SystemFrame, UninterruptibleFrame

HOLDING_CONTEXT = "holding:"


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
    onset that counts (the caller's onset, or the bot's start for "overlap").
    """

    rule: str = "floor"
    speech_secs: float = 0.0
    onset_secs_ago: float = 0.0


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


@dataclass
class EngineEventFrame(SystemFrame):
    """Something happened between the call and its engine (acquired, ready, failed, released).

    For the call record and metrics; processors pass it on untouched. A SystemFrame, so a
    barge-in never drops it.
    """

    event: str = ""
    data: dict = field(default_factory=dict)
