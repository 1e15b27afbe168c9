"""What the processors did, as call events, seen where each frame is first pushed.

The worker's observer (processors/pipecat_adapter.py `observe_inline`) hands this the first push
of each `WATCHED` frame synchronously, so the processors stay unaware of the record and a time
taken here (the bot becoming audible, a barge-in decision) is the push's own. Frames that are
broadcast both ways (the pacer's BotStarted/Stopped, VAD's, the turn's) count downstream only.
Errors, which travel upstream, count either way.
"""

import time

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection

from pipelines.call_log import CallLog
from transports.frames import ActionTakenFrame, BargeInFrame, EngineEventFrame, EngineFailedFrame, ModelMuteFrame, holding_clip, is_clip

WATCHED = (VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame,
            BotStartedSpeakingFrame, BotStoppedSpeakingFrame, BargeInFrame, ModelMuteFrame,
            TTSStartedFrame, TTSStoppedFrame, TTSAudioRawFrame, TTSTextFrame, EngineEventFrame, EngineFailedFrame, ErrorFrame,
           ActionTakenFrame)


class CallObserver:
    WATCHED = WATCHED

    def __init__(self, log: CallLog):
        self._log = log

    def record(self, data: FramePushed):
        """One frame's first push (of a WATCHED type)."""
        frame = data.frame
        if not isinstance(frame, WATCHED):
            return
        if isinstance(frame, ErrorFrame):
            self._log.emit("error", message=str(frame.error)[:500], fatal=frame.fatal)
            return
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        log = self._log
        if isinstance(frame, VADUserStartedSpeakingFrame):
            waited = max(0.0, time.time() - frame.timestamp)
            log.user_started(log.now() - waited - frame.start_secs)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            log.user_stopped()
        elif isinstance(frame, UserStartedSpeakingFrame):
            log.turn_started()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            log.turn_ended()
        elif isinstance(frame, BotStartedSpeakingFrame):
            log.bot_started(log.now())
        elif isinstance(frame, BotStoppedSpeakingFrame):
            log.bot_stopped()
        elif isinstance(frame, BargeInFrame):
            log.barge_in_decided(log.now(), frame.rule, frame.speech_secs, frame.onset_secs_ago, frame.audio_secs)
        elif isinstance(frame, ModelMuteFrame):
            if frame.muted:
                log.mute_started()
            else:
                log.mute_ended(frame.secs, frame.words, frame.speech_secs)
        elif isinstance(frame, TTSAudioRawFrame):
            clip = holding_clip(frame.context_id)
            if clip is not None:  # a clip is pushed whole, as one frame
                log.holding(clip, len(frame.audio) / 2 / frame.sample_rate)
        elif isinstance(frame, TTSStartedFrame):
            if not is_clip(frame.context_id):
                log.speech_started(frame.context_id)
        elif isinstance(frame, TTSStoppedFrame):
            if not is_clip(frame.context_id):
                log.speech_stopped(frame.context_id)
        elif isinstance(frame, TTSTextFrame):
            log.text(frame.text if frame.includes_inter_frame_spaces else f" {frame.text}")
        elif isinstance(frame, EngineEventFrame):
            log.engine(frame)
        elif isinstance(frame, EngineFailedFrame):
            log.apology(frame.reason)
        elif isinstance(frame, ActionTakenFrame):
            log.action(frame)

