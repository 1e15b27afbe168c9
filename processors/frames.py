"""Frames the conversation processors exchange; pipecat has no equivalent for these.

Bot utterances themselves are bracketed with pipecat's own TTSStartedFrame/TTSStoppedFrame
(context_id `bot-N` for model speech, `holding:NAME` for a clip), so stock processors that
understand TTS segments understand ours too.
"""

from dataclasses import dataclass, field

from pipecat.frames.frames import ControlFrame, SystemFrame, UninterruptibleFrame

HOLDING_CONTEXT = "holding:"


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
