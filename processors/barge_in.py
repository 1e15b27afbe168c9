"""Barge-in: the caller taking the floor from an audible bot interrupts it; nothing else does.

A full-duplex model listens while it talks, may start its answer over the caller's last words,
and stops by itself when talked over. So "caller speech while the bot speaks" is not enough to
cut the bot; what counts is who holds the floor:

- **floor**: caller speech that *starts* while bot audio is audible at the provider (the pacer's
  BotStarted/StoppedSpeaking, which follow the provider's mark echoes) interrupts once the caller
  has talked `min_speech_secs`, counted from the speech onset over the rest of the caller's turn
  ("Wait, ... stop" is two short segments of one turn). A turn with less ("uh-huh", "okay") is a
  backchannel and leaves the bot alone.
- **overlap**: when the bot starts over a caller whose turn is still going on, that is the
  model's choice and its audio goes through, unless the caller keeps talking over it for
  `overlap_secs` of speech: then they are taking the floor back.

Speech is counted from Silero's window-by-window verdict (CallerVoiceFrame), not VAD's segment,
whose 0.2 s stop hangover would make every "uh-huh" look 0.2 s longer. On an interruption a
BargeInFrame (for the record) goes downstream, then pipecat's interruption is broadcast: the
pacer drops its queue, the output sends the provider's `clear`, bot_speech mutes the model's
interrupted rest for a bounded time.

Guards, counted in caller audio rather than wall time so they behave the same under load: a
`start_mute_secs` window at call start (ringback, the caller's "hello?" over the greeting), and
`half_duplex`, which never interrupts and feeds the model silence while the bot talks (for
echoing speakerphones).
"""

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
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

from transports.frames import BargeInFrame, CallerVoiceFrame


class BargeInParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_speech_secs: float = Field(
        0.4, ge=0, description="caller speech, from its onset over the audible bot, that takes the floor; shorter is a backchannel")
    overlap_secs: float = Field(
        1.0, ge=0, description="when the bot starts over a talking caller: caller speech over it that takes the floor back")
    start_mute_secs: float = Field(1.0, ge=0, description="no barge-in for speech starting in the call's first seconds (ringback, greeting)")
    half_duplex: bool = Field(False, description="never interrupt; the model hears silence while the bot speaks")


class BargeInProcessor(FrameProcessor):
    """Interrupt the bot when the caller takes the floor from it: `clear` at the provider, queued audio dropped."""

    Params = BargeInParams

    def __init__(self, params: BargeInParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or BargeInParams()
        self._call_secs = 0.0
        self._bot_audible = False
        self._in_turn = False  # the caller's turn (turn processor), not one speech segment
        self._turns_seen = False
        self._voiced = False
        self._rule: str | None = None  # what the current speech is counted for: "floor", "overlap" or None
        self._speech_secs = 0.0  # caller speech counted for the rule
        self._since = 0.0  # call seconds where the counted speech (or the bot's overlap) began
        self._unjudged = 0.0  # seconds of the last audio frame, whose verdict follows it
        self.stats = {"interruptions": 0, "overlaps": 0, "backchannels": 0, "muted_at_start": 0, "half_duplex_secs": 0.0}

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            frame = await self._caller_audio(frame)
        elif isinstance(frame, CallerVoiceFrame):
            self._voiced = frame.voiced
            await self._count_speech()
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            await self._speech_started(frame.start_secs)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            if not self._turns_seen:  # no turn processor in front: a segment is all we know of a turn
                self._turn_ended()
        elif isinstance(frame, UserStartedSpeakingFrame):
            self._in_turn = self._turns_seen = True
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._in_turn = False
            self._turn_ended()
        elif isinstance(frame, BotStartedSpeakingFrame):  # from the pacer, downstream of us: it comes upstream
            self._bot_started()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_audible = False
            self._rule = None  # the bot went quiet by itself: nothing left to take
        elif isinstance(frame, StartFrame):
            self._call_secs = 0.0
        await self.push_frame(frame, direction)

    def _turn_ended(self):
        if self._rule == "floor":
            self.stats["backchannels"] += 1
        self._rule = None

    async def _speech_started(self, start_secs: float):
        """A speech segment: over the audible bot, and not inside an overlap, it may be taking the floor."""
        if not self._bot_audible or self._rule == "overlap" or self._params.half_duplex:
            return
        if self._rule == "floor":  # the turn's next segment: its voiced windows are being counted already
            return
        if self._call_secs < self._params.start_mute_secs:
            self.stats["muted_at_start"] += 1
            return
        # VAD's start_secs is the speech up to and including the frame that confirmed it
        self._rule, self._speech_secs, self._since = "floor", start_secs, self._call_secs - start_secs
        self._unjudged = 0.0
        await self._check()

    def _bot_started(self):
        self._bot_audible = True
        if self._in_turn and not self._params.half_duplex:  # the bot chose to start over the caller
            self.stats["overlaps"] += 1
            self._rule, self._speech_secs, self._since = "overlap", 0.0, self._call_secs

    async def _caller_audio(self, frame: InputAudioRawFrame) -> InputAudioRawFrame:
        await self._count_speech()  # no verdict came: the frame before sounded like the one before it
        secs = len(frame.audio) / 2 / frame.num_channels / frame.sample_rate
        self._call_secs += secs
        self._unjudged = secs
        if self._params.half_duplex and self._bot_audible:
            self.stats["half_duplex_secs"] += secs
            return InputAudioRawFrame(audio=bytes(len(frame.audio)), sample_rate=frame.sample_rate, num_channels=frame.num_channels)
        return frame

    async def _count_speech(self):
        """Credit the last audio frame once its verdict is known (VAD judges a frame after passing it on)."""
        secs, self._unjudged = self._unjudged, 0.0
        if not (self._rule and self._voiced and secs):
            return
        self._speech_secs += secs
        await self._check()

    async def _check(self):
        needed = self._params.min_speech_secs if self._rule == "floor" else self._params.overlap_secs
        if self._rule and self._speech_secs >= needed:
            await self._interrupt()

    async def _interrupt(self):
        rule, self._rule = self._rule, None
        self.stats["interruptions"] += 1
        await self.push_frame(BargeInFrame(rule=rule, speech_secs=round(self._speech_secs, 3),
                                           onset_secs_ago=round(self._call_secs - self._since, 3), audio_secs=round(self._call_secs, 3)))
        await self.broadcast_interruption()
