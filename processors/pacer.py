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
"""

import asyncio
from collections import deque
from dataclasses import dataclass, field

import numpy as np
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

from transports.frames import FadeOutFrame, MarkFrame, MarkPlayedFrame, PacedAudioFrame

GAP_TOLERANCE = 0.005  # seconds of dry provider buffer that count as an underrun inside speech
DEFAULT_CHUNK_MS = 20  # for providers without a chunk rule


class PacerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lead_secs: float = Field(0.2, gt=0, le=2.0, description="a chunk is sent at most this long before it plays")
    jitter_secs: float = Field(0.12, ge=0, description="slack built when playout starts from an empty buffer")
    chunk_ms: int | None = Field(None, gt=0, description="chunk length; empty: the provider's rule (Exotel 3200 B)")
    marks: bool = Field(True, description="send a provider mark after each utterance; speaking ends at its echo")
    mark_timeout_secs: float = Field(1.0, gt=0, description="an unechoed mark counts as played this long after its audio")
    drain_timeout_secs: float = Field(10.0, ge=0, description="at call end, wait this long for queued audio to play")


@dataclass
class _Chunk:
    pcm: bytes
    speech: bool  # part of an utterance
    opens: str | None  # context of the utterance that starts in this chunk
    ready: float  # loop time it became complete
    ends: list[str] = field(default_factory=list)  # utterances that end with this chunk


class PacerProcessor(FrameProcessor):
    """Real-time paced bot audio: bounded lead, provider chunk sizes, marks, no stale chunk after clear."""

    Params = PacerParams

    def __init__(self, params: PacerParams | None = None, **kwargs):
        super().__init__(**kwargs)
        self._params = params or PacerParams()
        self._rate = 0
        self._chunk_bytes = 0
        self._buf = bytearray()
        self._buf_speech = False
        self._buf_opens: str | None = None
        self._chunks: deque[_Chunk] = deque()
        self._utterance: str | None = None  # open utterance, as queued
        self._arrived: dict[str, float] = {}  # utterance -> loop time its TTSStartedFrame arrived
        self._epoch = 0
        self._play_end = 0.0  # loop time the provider runs out of audio we sent
        self._after_speech = False  # the last chunk sent was speech of an utterance still going on
        self._speaking = False
        self._unplayed: dict[str, float] = {}  # utterance end -> loop time its last chunk plays out
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._wrong_rate = 0
        self.stats = {
            "chunks_sent": 0, "underruns": 0, "underrun_secs": 0.0, "max_lead_secs": 0.0,
            "silence_dropped_secs": 0.0, "marks_echoed": 0, "marks_missed": 0, "interruptions": 0,
            "onset_ms": [],
        }

    @property
    def _chunk_secs(self) -> float:
        return self._chunk_bytes / 2 / self._rate

    def _queued_secs(self) -> float:
        return (len(self._chunks) * self._chunk_bytes + len(self._buf)) / 2 / self._rate

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        downstream = direction == FrameDirection.DOWNSTREAM
        if downstream and isinstance(frame, OutputAudioRawFrame) and not isinstance(frame, PacedAudioFrame):
            self._audio(frame)
        elif downstream and isinstance(frame, TTSStartedFrame):
            self._open(frame.context_id or "bot")
        elif downstream and isinstance(frame, TTSStoppedFrame):
            await self._close()
        elif isinstance(frame, FadeOutFrame):
            self._fade_out(frame.secs)
        elif isinstance(frame, MarkPlayedFrame):
            self._on_echo(frame.mark)
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame) and downstream:
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._start(frame)
        elif isinstance(frame, EndFrame):
            await self._drain()
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _start(self, frame: StartFrame):
        call = frame.metadata.get("call", {})
        samples = self._rate * self._params.chunk_ms // 1000 if self._params.chunk_ms else call.get("chunk_samples") or 0
        self._chunk_bytes = 2 * (samples or self._rate * DEFAULT_CHUNK_MS // 1000)
        self._call_id = call.get("call_id", "?")
        self._task = self.create_task(self._send_loop(), name=f"pacer-{self._call_id}")

    async def _stop(self):
        if self._task:
            await self.cancel_task(self._task)
            self._task = None

    # ---- queueing (frame order) ------------------------------------------------

    def _audio(self, frame: OutputAudioRawFrame):
        if frame.sample_rate != self._rate or frame.num_channels != 1:
            self._wrong_rate += 1
            if self._wrong_rate == 1:
                logger.error(f"call {self._call_id}: pacer got {frame.sample_rate} Hz x{frame.num_channels} audio on a {self._rate} Hz "
                             "mono call; put `resample` (audio: output, rate: call) before it")
            return
        if self._utterance is None and self._queued_secs() >= self._params.lead_secs:
            self.stats["silence_dropped_secs"] += len(frame.audio) / 2 / self._rate
            return
        self._buf += frame.audio
        self._buf_speech |= self._utterance is not None
        while len(self._buf) >= self._chunk_bytes:
            self._cut(bytes(self._buf[: self._chunk_bytes]))
            del self._buf[: self._chunk_bytes]

    def _cut(self, pcm: bytes, ends: list[str] | None = None):
        self._chunks.append(_Chunk(pcm, self._buf_speech, self._buf_opens, self._now(), ends or []))
        self._buf_speech = self._utterance is not None
        self._buf_opens = None
        self._wake.set()

    def _cut_padded(self, ends: list[str] | None = None):
        """The partial chunk, zero-padded to the provider's size (an utterance's or the call's end)."""
        self._cut(bytes(self._buf) + bytes(self._chunk_bytes - len(self._buf)), ends)
        self._buf.clear()

    def _open(self, context: str):
        self._utterance = context
        self._arrived[context] = self._now()
        self._buf_speech = True
        self._buf_opens = self._buf_opens or context

    async def _close(self):
        """End of utterance: pad to a whole chunk and attach the mark to its last chunk."""
        context, self._utterance = self._utterance, None
        if context is None:
            return  # the utterance was interrupted; nothing of it is queued
        if self._buf:
            self._cut_padded([context])
        elif self._chunks:
            self._chunks[-1].ends.append(context)
        else:
            await self._ended(context, max(self._now(), self._play_end))
        self._wake.set()

    def _fade_out(self, secs: float):
        """Ramp the queued rest of the current utterance down over `secs` and drop the remainder."""
        total = max(1, round(secs * self._rate))
        pos = 0
        kept: deque[_Chunk] = deque()
        ends: list[str] = []
        while self._chunks and not ends:
            chunk = self._chunks.popleft()
            ends = chunk.ends
            if pos < total:
                pcm = np.frombuffer(chunk.pcm, dtype=np.int16)
                gain = np.clip(1.0 - (pos + np.arange(len(pcm))) / total, 0.0, 1.0)
                chunk.pcm = (pcm * gain).astype(np.int16).tobytes()
                pos += len(pcm)
                kept.append(chunk)
            else:
                kept[-1].ends.extend(ends)
        if not ends:  # the utterance is still open: its unqueued rest goes too
            self._buf.clear()
        self._chunks = kept + self._chunks
        self._wake.set()

    async def _interrupt(self):
        self._epoch += 1
        self.stats["interruptions"] += 1
        self._chunks.clear()
        self._buf.clear()
        self._buf_speech, self._buf_opens, self._utterance = False, None, None
        self._unplayed.clear()
        self._arrived.clear()
        self._play_end = self._now()
        self._after_speech = False
        await self._set_speaking(False)
        self._wake.set()

    async def _drain(self):
        """Let the queued audio (an apology, a goodbye) play, and its mark come back, before the hang-up."""
        if self._buf:
            self._cut_padded()
        deadline = self._now() + self._params.drain_timeout_secs
        while (self._chunks or self._unplayed or self._now() < self._play_end) and self._now() < deadline and self._task:
            await asyncio.sleep(min(0.02, max(0.0, deadline - self._now())))
        await self._set_speaking(False)

    # ---- sending (real time) ---------------------------------------------------

    async def _send_loop(self):
        while True:
            now = self._now()
            await self._expire_marks(now)
            wait = self._next_send_wait(now)
            if wait == 0.0:
                await self._send(self._chunks.popleft(), now)
                continue
            deadlines = [t + (self._params.mark_timeout_secs if self._params.marks else 0.0) for t in self._unplayed.values()]
            if deadlines:
                wait = min(wait if wait is not None else 1e9, max(0.001, min(deadlines) - now))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _next_send_wait(self, now: float) -> float | None:
        """0: send the head chunk now; seconds to wait; None: nothing to send."""
        if not self._chunks:
            return None
        ahead = self._play_end - now
        if ahead > self._params.lead_secs:
            return ahead - self._params.lead_secs
        if ahead <= 0:  # provider buffer dry: build slack unless the audio is already here
            head = self._chunks[0]
            if self._queued_secs() - self._chunk_secs < self._params.jitter_secs and now < head.ready + self._params.jitter_secs:
                return head.ready + self._params.jitter_secs - now
        return 0.0

    async def _send(self, chunk: _Chunk, now: float):
        gap = now - self._play_end
        if chunk.speech and self._after_speech and chunk.opens is None and gap > GAP_TOLERANCE:
            self.stats["underruns"] += 1
            self.stats["underrun_secs"] += gap
        self.stats["max_lead_secs"] = max(self.stats["max_lead_secs"], -gap)
        self._play_end = max(self._play_end, now) + self._chunk_secs
        self.stats["chunks_sent"] += 1
        if chunk.opens and chunk.opens in self._arrived:
            onsets = self.stats["onset_ms"]
            onsets.append(round((now - self._arrived.pop(chunk.opens)) * 1000, 1))
            del onsets[:-20]
        await self.push_frame(PacedAudioFrame(audio=chunk.pcm, sample_rate=self._rate, num_channels=1, epoch=self._epoch))
        self._after_speech = chunk.speech and not chunk.ends
        if chunk.speech:
            await self._set_speaking(True)
        for context in chunk.ends:
            await self._ended(context, self._play_end)

    async def _ended(self, context: str, plays_out: float):
        self._unplayed[context] = plays_out
        if self._params.marks:
            await self.push_frame(MarkFrame(mark=context))

    def _on_echo(self, mark: str):
        if self._unplayed.pop(mark, None) is not None:
            self.stats["marks_echoed"] += 1
            self._wake.set()

    async def _expire_marks(self, now: float):
        grace = self._params.mark_timeout_secs if self._params.marks else 0.0
        for context, plays_out in list(self._unplayed.items()):
            if now >= plays_out + grace:
                del self._unplayed[context]
                self.stats["marks_missed"] += self._params.marks
        if self._speaking and not self._unplayed and self._utterance is None and not any(c.speech for c in self._chunks) and not self._buf_speech:
            await self._set_speaking(False)

    async def _set_speaking(self, speaking: bool):
        if speaking == self._speaking:
            return
        self._speaking = speaking
        frame_cls = BotStartedSpeakingFrame if speaking else BotStoppedSpeakingFrame
        await self.push_frame(frame_cls())
        await self.push_frame(frame_cls(), FrameDirection.UPSTREAM)
