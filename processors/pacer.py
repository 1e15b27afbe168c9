"""Paced output: bot audio leaves at real time, in the provider's chunk sizes, a bounded lead ahead.

Pipecat's output sleeps one chunk at a time with no send-ahead lead (any late wake-up is a gap the
caller hears), sends chunks below Exotel's minimum, and can send a chunk after `clear`
(pipecat 1.14's base output transport). Here the pacer keeps an estimate of the provider's playout
point and sends a chunk once it would start playing within `lead_secs`. When the provider's buffer
has run dry, the first chunk waits `jitter_secs` (unless enough audio is already queued, as for a
holding clip) so the chunks after it have that much slack against the engine's jitter.

Utterances (TTSStarted/TTSStopped from the bot-speech detector or a holding clip) get a provider
`mark` after their last chunk; the bot counts as speaking from the first chunk sent until the mark
comes back (or, with a provider that does not echo, until the audio has played). Between
utterances, model silence beyond `lead_secs` of backlog is dropped so a clip that overlapped the
model stream does not delay the model forever. An InterruptionFrame drops everything queued and
bumps the epoch stamped on every chunk: the output refuses any chunk older than its last `clear`.

The rules live in `processors/playout.py`, a pure class driven by the time `now`; this processor is
its adapter to the pipeline and the loop clock: it feeds the frames in, pushes what is due and sleeps
until the next deadline.
"""

import asyncio

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pydantic import BaseModel, ConfigDict, Field

from processors.playout import GAP_TOLERANCE, Action, Mark, Playout, Send, new_stats
from transports.frames import FadeOutFrame, MarkFrame, MarkPlayedFrame, PacedAudioFrame, call_of

__all__ = ["DEFAULT_CHUNK_MS", "GAP_TOLERANCE", "PacerParams", "PacerProcessor"]

DEFAULT_CHUNK_MS = 20  # for providers without a chunk rule


class PacerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lead_secs: float = Field(0.2, gt=0, le=2.0, description="a chunk is sent at most this long before it plays")
    jitter_secs: float = Field(0.12, ge=0, description="slack built when playout starts from an empty buffer")
    chunk_ms: int | None = Field(None, gt=0, description="chunk length; empty: the provider's rule (Exotel 3200 B)")
    marks: bool = Field(True, description="send a provider mark after each utterance; speaking ends at its echo")
    mark_timeout_secs: float = Field(1.0, gt=0, description="an unechoed mark counts as played this long after its audio")
    drain_timeout_secs: float = Field(10.0, ge=0, description="at call end, wait this long for queued audio to play")


class PacerProcessor(FrameProcessor):
    """Real-time paced bot audio: bounded lead, provider chunk sizes, marks, no stale chunk after clear."""

    Params = PacerParams

    def __init__(self, params: PacerParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or PacerParams()
        self._rate = 0
        self._playout: Playout | None = None  # from the StartFrame on
        self._lock = asyncio.Lock()  # what the playout decided is pushed before anything it decides later
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._wrong_rate = 0
        self._call_id = "?"
        self.stats = new_stats()  # the playout's counters

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        downstream = direction == FrameDirection.DOWNSTREAM
        playout = self._playout
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._start(frame)
        elif playout is None:
            await self.push_frame(frame, direction)
        elif downstream and isinstance(frame, OutputAudioRawFrame) and not isinstance(frame, PacedAudioFrame):
            self._audio(playout, frame)
        elif downstream and isinstance(frame, TTSStartedFrame):
            playout.open(frame.context_id or "bot", self._now())
        elif downstream and isinstance(frame, TTSStoppedFrame):
            await self._act(lambda: playout.close(self._now()))
        elif isinstance(frame, FadeOutFrame):
            playout.fade_out(frame.secs, self._now())
            self._wake.set()
        elif isinstance(frame, MarkPlayedFrame):
            if playout.echoed(frame.mark, self._now()):
                self._wake.set()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame) and downstream:
            await self._act(lambda: playout.interrupt(self._now()))
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._drain(playout)
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _start(self, frame: StartFrame):
        call = call_of(frame)
        samples = self._rate * self._params.chunk_ms // 1000 if self._params.chunk_ms else (call.chunk_samples if call else 0)
        p = self._params
        self._playout = Playout(self._rate, samples or self._rate * DEFAULT_CHUNK_MS // 1000, lead_secs=p.lead_secs,
                                jitter_secs=p.jitter_secs, marks=p.marks, mark_timeout_secs=p.mark_timeout_secs,
                                stats=self.stats)
        self._call_id = call.call_id if call else "?"
        self._task = self.create_task(self._send_loop(), name=f"pacer-{self._call_id}")

    async def _stop(self):
        if self._task:
            await self.cancel_task(self._task)
            self._task = None

    def _audio(self, playout: Playout, frame: OutputAudioRawFrame):
        if frame.sample_rate != self._rate or frame.num_channels != 1:
            self._wrong_rate += 1
            if self._wrong_rate == 1:
                logger.error(f"call {self._call_id}: pacer got {frame.sample_rate} Hz x{frame.num_channels} audio on a {self._rate} Hz "
                             "mono call; put `resample` (audio: output, rate: call) before it")
            return
        if playout.push(frame.audio, self._now()):
            self._wake.set()

    async def _drain(self, playout: Playout):
        """Let the queued audio (an apology, a goodbye) play, and its mark come back, before the hang-up."""
        playout.flush(self._now())
        self._wake.set()
        deadline = self._now() + self._params.drain_timeout_secs
        while not playout.idle(self._now()) and self._now() < deadline and self._task:
            await asyncio.sleep(min(0.02, max(0.0, deadline - self._now())))
        await self._act(lambda: playout.finish(self._now()))

    # ---- carrying out the playout's actions (real time) -------------------------

    async def _act(self, decide):
        """Ask the playout (under the lock, so pushes keep its order) and push what it answers."""
        async with self._lock:
            for action in decide():
                await self._push_action(action)
        self._wake.set()

    async def _push_action(self, action: Action):
        if isinstance(action, Send):
            await self.push_frame(PacedAudioFrame(audio=action.pcm, sample_rate=self._rate, num_channels=1, epoch=action.epoch))
        elif isinstance(action, Mark):
            await self.push_frame(MarkFrame(mark=action.name))
        else:
            frame_cls = BotStartedSpeakingFrame if action.on else BotStoppedSpeakingFrame
            await self.push_frame(frame_cls())
            await self.push_frame(frame_cls(), FrameDirection.UPSTREAM)

    async def _send_loop(self):
        playout = self._playout
        while True:
            async with self._lock:
                for action in playout.due(self._now()):
                    await self._push_action(action)
            self._wake.clear()
            deadline = playout.next_deadline(self._now())
            wait = None if deadline is None else deadline - self._now()
            if wait is not None and wait <= 0:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
