"""Barge-in: caller speech over bot audio interrupts the bot, with guards against false triggers.

Pipecat's UserTurnProcessor interrupts on every turn start, bot speaking or not, and only after its
turn strategies ran. Here the interruption is broadcast the moment VAD confirms speech while the
bot is audible (the pacer's BotStarted/StoppedSpeaking, which follow the provider's mark echoes):
the pacer drops its queue, the output sends the provider's `clear`, and the bot-speech detector
silences the rest of the interrupted utterance.

Guards, all counted in caller audio rather than wall time so they behave the same under load:
`min_speech_secs` of speech beyond VAD's own start_secs, a `start_mute_secs` window at call start
(ringback, the caller's own "hello?" over the greeting), and `half_duplex`, which never interrupts
and feeds the model silence while the bot talks (for echoing speakerphones).
"""

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    StartFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict, Field


class BargeInParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_speech_secs: float = Field(0.0, ge=0, description="caller speech needed after VAD confirms it (VAD start_secs comes first)")
    start_mute_secs: float = Field(1.0, ge=0, description="no barge-in during the call's first seconds (ringback, greeting)")
    half_duplex: bool = Field(False, description="never interrupt; the model hears silence while the bot speaks")


class BargeInProcessor(FrameProcessor):
    """Interrupt the bot when the caller talks over it: the provider gets `clear`, queued audio is dropped."""

    Params = BargeInParams

    def __init__(self, params: BargeInParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or BargeInParams()
        self._call_secs = 0.0
        self._bot_speaking = False
        self._user_speaking = False
        self._speech_secs = 0.0
        self._fired = False  # one interruption per caller turn
        self.stats = {"interruptions": 0, "muted_at_start": 0, "too_short": 0, "half_duplex_secs": 0.0}

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            frame = await self._caller_audio(frame)
        elif isinstance(frame, StartFrame):
            self._call_secs = 0.0
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            await self._maybe_interrupt()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._user_speaking, self._speech_secs, self._fired = True, 0.0, False
            await self._maybe_interrupt()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            if self._user_speaking and self._bot_speaking and not self._fired and not self._params.half_duplex:
                self.stats["too_short"] += 1
            self._user_speaking = False
        await self.push_frame(frame, direction)

    async def _caller_audio(self, frame: InputAudioRawFrame) -> InputAudioRawFrame:
        secs = len(frame.audio) / 2 / frame.num_channels / frame.sample_rate
        self._call_secs += secs
        if self._user_speaking:
            self._speech_secs += secs
            await self._maybe_interrupt()
        if self._params.half_duplex and self._bot_speaking:
            self.stats["half_duplex_secs"] += secs
            return InputAudioRawFrame(audio=bytes(len(frame.audio)), sample_rate=frame.sample_rate, num_channels=frame.num_channels)
        return frame

    async def _maybe_interrupt(self):
        if not (self._user_speaking and self._bot_speaking) or self._fired or self._params.half_duplex:
            return
        if self._call_secs < self._params.start_mute_secs:
            self.stats["muted_at_start"] += 1
            self._fired = True  # this turn began in the mute window: it never barges in
            return
        if self._speech_secs < self._params.min_speech_secs:
            return
        self._fired = True
        self.stats["interruptions"] += 1
        await self.broadcast_interruption()
