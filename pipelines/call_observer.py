"""What the processors did, as call events: a pipecat observer on the call's pipeline.

An observer sees every frame each time a processor pushes it, so the processors stay unaware of
the record. Only a frame's first push counts. Frames that are broadcast both ways (the pacer's
BotStarted/Stopped, VAD's, the turn's) count downstream only. Errors, which travel upstream,
count either way.

Observers run from a queue, a little behind the pipeline. Where a time goes into a latency (the
bot becoming audible, a barge-in decision), it is taken from the push's own pipeline-clock stamp.
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
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection

from pipelines.call_log import CallLog
from transports.frames import BargeInFrame, EngineEventFrame, EngineFailedFrame, ModelMuteFrame, holding_clip

_WATCHED = (VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame,
            BotStartedSpeakingFrame, BotStoppedSpeakingFrame, BargeInFrame, ModelMuteFrame,
            TTSStartedFrame, TTSStoppedFrame, TTSAudioRawFrame, TTSTextFrame, EngineEventFrame, EngineFailedFrame, ErrorFrame)


class CallObserver(BaseObserver):
    def __init__(self, log: CallLog, **kwargs):
        super().__init__(**kwargs)
        self._log = log

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if not data.first_push or not isinstance(frame, _WATCHED):
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
            log.bot_started(pushed_at(log, data))
        elif isinstance(frame, BotStoppedSpeakingFrame):
            log.bot_stopped()
        elif isinstance(frame, BargeInFrame):
            log.barge_in_decided(pushed_at(log, data), frame.rule, frame.speech_secs, frame.onset_secs_ago)
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
            if holding_clip(frame.context_id) is None:
                log.speech_started(frame.context_id)
        elif isinstance(frame, TTSStoppedFrame):
            if holding_clip(frame.context_id) is None:
                log.speech_stopped(frame.context_id)
        elif isinstance(frame, TTSTextFrame):
            log.text(frame.text if frame.includes_inter_frame_spaces else f" {frame.text}")
        elif isinstance(frame, EngineEventFrame):
            log.engine(frame)
        elif isinstance(frame, EngineFailedFrame):
            log.apology(frame.reason)


def pushed_at(log: CallLog, data: FramePushed) -> float:
    """When the frame was pushed, on the call's clock: now, less how far the observer's queue lags."""
    try:
        clock_now = data.source.get_clock().get_time()
    except Exception:  # pipecat raises a bare Exception for a processor not set up: no clock, no lag known
        return log.now()
    lag = (clock_now - data.timestamp) / 1e9 if clock_now and data.timestamp else 0.0
    return log.now() - max(0.0, lag)
