"""Where the model's continuous audio is speech: utterances bracketed with TTSStarted/TTSStopped.

PersonaPlex streams audio all the time, silence included, so message boundaries say nothing about
speech. An utterance starts at the first 20 ms window above the level threshold or at a text piece
(the model's words arrive with their audio), and ends after `hangover_secs` with neither. The
pacer turns these brackets into marks and the caller-facing bot-speaking state.

After a barge-in the model is still finishing what it said before it could have heard the caller:
that rest is replaced by silence (keeping the stream's timing) and its words are dropped, for at
`mute_secs` of model audio: the engine round trip plus the model's own reaction, by which time a
full-duplex model has stopped by itself. Whatever comes after is the model's answer to the caller
and passes, whoever is talking (barge-in judges it again if the caller keeps the floor).
ModelMuteFrames mark the span and carry the dropped words for the call record.
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
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field

from transports.frames import ModelMuteFrame


class BotSpeechParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold_dbfs: float = Field(-40.0, le=0, description="20 ms window RMS that counts as speech")
    hangover_secs: float = Field(0.4, gt=0, description="quiet this long (no text either) ends an utterance")
    use_text: bool = Field(True, description="the model's text pieces also mark speech")
    mute_secs: float = Field(0.5, ge=0, description="after a barge-in, model audio silenced at most this long (engine round trip + reaction)")


WINDOW_SECS = 0.02


class BotSpeechProcessor(FrameProcessor):
    """Bot speech detection on model audio (level + text pieces): TTSStarted/TTSStopped brackets."""

    Params = BotSpeechParams

    def __init__(self, params: BotSpeechParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or BotSpeechParams()
        self._threshold = 32768.0 * 10 ** (self._params.threshold_dbfs / 20)
        self._speaking = False  # inside an utterance
        self._muted = False  # silencing what the model said before it heard a barge-in
        self._muted_secs = 0.0  # model audio silenced in this mute
        self._muted_speech = 0.0  # where in it the model's audio was last loud
        self._muted_words: list[str] = []
        self._quiet = 0.0  # seconds since the last speech window or text piece
        self._count = 0
        self.stats = {"utterances": 0, "mutes": 0, "muted_secs": 0.0, "text_dropped": 0}

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
                self._muted_words.append(frame.text if frame.includes_inter_frame_spaces else f" {frame.text}")
                return
            self._quiet = 0.0
            if not self._speaking:
                await self.push_frame(self._open())
        elif isinstance(frame, StartFrame):
            self._speaking = self._muted = False
        elif isinstance(frame, InterruptionFrame):
            await self.push_frame(frame, direction)
            await self._mute()
            return
        await self.push_frame(frame, direction)

    def _open(self) -> TTSStartedFrame:
        self._speaking = True
        self._count += 1
        self.stats["utterances"] += 1
        return TTSStartedFrame(context_id=self._context)

    async def _mute(self):
        """A barge-in: end the utterance and silence the model until it could be answering the caller."""
        if self._speaking:
            self._speaking = False
            await self.push_frame(TTSStoppedFrame(context_id=self._context))
        if not self._muted and self._params.mute_secs > 0:
            self._muted, self._muted_secs, self._muted_speech, self._quiet = True, 0.0, 0.0, 0.0
            self.stats["mutes"] += 1
            await self.push_frame(ModelMuteFrame(muted=True))

    def _unmute(self) -> ModelMuteFrame:
        self._muted = False
        words, self._muted_words = "".join(self._muted_words).strip(), []
        return ModelMuteFrame(muted=False, secs=round(self._muted_secs, 3), words=words, speech_secs=round(self._muted_speech, 3))

    async def _audio(self, frame: OutputAudioRawFrame):
        before: list[Frame] = []
        muted = 0  # bytes of the frame silenced, from its start
        for loud, secs, size in self._windows(frame):
            if self._muted:
                muted += size
                self._muted_secs += secs
                if loud:
                    self._muted_speech = self._muted_secs
                self.stats["muted_secs"] += secs
                if self._muted_secs >= self._params.mute_secs - 1e-9:
                    before.append(self._unmute())
            elif loud:
                self._quiet = 0.0
                if not self._speaking:
                    before.append(self._open())
            else:
                self._quiet += secs
                if self._speaking and self._quiet >= self._params.hangover_secs:
                    self._speaking = False
                    before.append(TTSStoppedFrame(context_id=self._context))
        for f in before:
            await self.push_frame(f)
        if muted:
            audio = bytes(muted) + frame.audio[muted:]
            frame = type(frame)(audio=audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels)
        await self.push_frame(frame)

    def _windows(self, frame: OutputAudioRawFrame):
        """(window is speech, its seconds, its bytes) for each 20 ms window of the frame, in one numpy pass."""
        pcm = np.frombuffer(frame.audio, dtype=np.int16).astype(np.float32)
        if not len(pcm):
            return []
        step = max(1, round(frame.sample_rate * WINDOW_SECS))
        starts = np.arange(0, len(pcm), step)
        sizes = np.diff(np.append(starts, len(pcm)))
        loud = np.add.reduceat(pcm * pcm, starts) / sizes >= self._threshold**2
        return zip(loud.tolist(), (sizes / frame.sample_rate).tolist(), (2 * sizes).tolist())
