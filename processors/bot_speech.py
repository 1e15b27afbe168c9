"""Where the model's continuous audio is speech: utterances bracketed with TTSStarted/TTSStopped.

PersonaPlex streams audio all the time, silence included, so message boundaries say nothing about
speech. An utterance starts at the first 20 ms window above the level threshold or at a text piece
(the model's words arrive with their audio), and ends after `hangover_secs` with neither. The
pacer turns these brackets into marks and the caller-facing bot-speaking state.

After a barge-in the rest of the interrupted utterance is the model finishing a sentence nobody
wants: it is replaced by silence (keeping the stream's timing) and its text is dropped until the
model has been quiet for `hangover_secs` with the caller silent too. Quiet while the caller is
still talking does not count: a model that pauses for breath and carries on over the caller is
still in the turn that was interrupted.
"""

import numpy as np
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field


class BotSpeechParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold_dbfs: float = Field(-40.0, le=0, description="20 ms window RMS that counts as speech")
    hangover_secs: float = Field(0.4, gt=0, description="quiet this long (no text either) ends an utterance")
    use_text: bool = Field(True, description="the model's text pieces also mark speech")


WINDOW_SECS = 0.02


class BotSpeechProcessor(FrameProcessor):
    """Bot speech detection on model audio (level + text pieces): TTSStarted/TTSStopped brackets."""

    Params = BotSpeechParams

    def __init__(self, params: BotSpeechParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or BotSpeechParams()
        self._threshold = 32768.0 * 10 ** (self._params.threshold_dbfs / 20)
        self._speaking = False  # inside an utterance
        self._muted = False  # inside the rest of an interrupted utterance
        self._quiet = 0.0  # seconds since the last speech window or text piece
        self._caller_speaking = False
        self._count = 0
        self.stats = {"utterances": 0, "muted_secs": 0.0, "text_dropped": 0}

    @property
    def _context(self) -> str:
        return f"bot-{self._count}"

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, OutputAudioRawFrame):
            await self._audio(frame)
            return
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, TTSTextFrame) and self._params.use_text:
            if self._muted:
                self.stats["text_dropped"] += 1
                return
            self._quiet = 0.0
            if not self._speaking:
                await self.push_frame(self._open())
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._caller_speaking = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._caller_speaking = False
        elif isinstance(frame, StartFrame):
            self._speaking = self._muted = False
        elif isinstance(frame, InterruptionFrame):
            await self.push_frame(frame, direction)
            if self._speaking:
                self._speaking = False
                self._muted = True
                self._quiet = 0.0
                await self.push_frame(TTSStoppedFrame(context_id=self._context))
            return
        await self.push_frame(frame, direction)

    def _open(self) -> TTSStartedFrame:
        self._speaking = True
        self._count += 1
        self.stats["utterances"] += 1
        return TTSStartedFrame(context_id=self._context)

    async def _audio(self, frame: OutputAudioRawFrame):
        before: list[Frame] = []
        for loud, secs in self._windows(frame):
            if loud:
                self._quiet = 0.0
                if not self._speaking and not self._muted:
                    before.append(self._open())
                continue
            if not (self._muted and self._caller_speaking):
                self._quiet += secs
            if self._quiet >= self._params.hangover_secs:
                if self._speaking:
                    self._speaking = False
                    before.append(TTSStoppedFrame(context_id=self._context))
                self._muted = False
        for f in before:
            await self.push_frame(f)
        if self._muted:
            self.stats["muted_secs"] += len(frame.audio) / 2 / frame.sample_rate
            frame = type(frame)(audio=bytes(len(frame.audio)), sample_rate=frame.sample_rate, num_channels=frame.num_channels)
        await self.push_frame(frame)

    def _windows(self, frame: OutputAudioRawFrame):
        """(window is speech, its seconds) for each 20 ms window of the frame, in one numpy pass."""
        pcm = np.frombuffer(frame.audio, dtype=np.int16).astype(np.float32)
        if not len(pcm):
            return []
        step = max(1, round(frame.sample_rate * WINDOW_SECS))
        starts = np.arange(0, len(pcm), step)
        sizes = np.diff(np.append(starts, len(pcm)))
        loud = np.add.reduceat(pcm * pcm, starts) / sizes >= self._threshold**2
        return zip(loud.tolist(), (sizes / frame.sample_rate).tolist())
