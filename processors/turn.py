"""Caller turns: VAD's speech segments joined into turns, so a comma pause is not two turns.

VAD stops a segment after `stop_secs` (0.2 s) of silence: fast enough for barge-in, but a caller who
pauses at a comma ("Hello, ... I would like") makes two segments, and a second "start" used to
interrupt the answer to the first. A turn starts with the first segment and ends only after
`end_secs` more silence beyond VAD's stop, i.e. 0.2 + 0.5 = 0.7 s of silence by default (people
pause 0.2-0.5 s inside a sentence; the field's end-of-turn silences sit at 0.5-0.8 s). The turn
frames are pipecat's own (UserStarted/UserStoppedSpeakingFrame), so stock processors that follow
turns understand them; the speech-segment frames pass on untouched for barge-in.

Silence is counted in caller audio, not wall time, so the rule behaves the same under load.
"""

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    StartFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field


class TurnParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_secs: float = Field(0.5, ge=0, description="silence after VAD's stop (itself after stop_secs) that ends the caller's turn")


class TurnProcessor(FrameProcessor):
    """Caller turns from VAD segments: UserStartedSpeakingFrame at the first, UserStoppedSpeakingFrame after the pause."""

    Params = TurnParams

    def __init__(self, params: TurnParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or TurnParams()
        self._in_turn = False
        self._speaking = False
        self._silence = 0.0  # caller audio since VAD's stop, inside a turn
        self.stats = {"turns": 0, "segments": 0}

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            await self.push_frame(frame, direction)
            self._speaking = True
            self.stats["segments"] += 1
            if not self._in_turn:
                self._in_turn = True
                self.stats["turns"] += 1
                await self.push_frame(UserStartedSpeakingFrame())
            return
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speaking, self._silence = False, 0.0
        elif isinstance(frame, InputAudioRawFrame) and self._in_turn and not self._speaking:
            self._silence += len(frame.audio) / 2 / frame.num_channels / frame.sample_rate
            if self._silence >= self._params.end_secs:
                await self.push_frame(frame, direction)
                self._in_turn = False
                await self.push_frame(UserStoppedSpeakingFrame())
                return
        elif isinstance(frame, StartFrame):
            self._in_turn = self._speaking = False
        await self.push_frame(frame, direction)
