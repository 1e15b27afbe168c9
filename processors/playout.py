"""The pacer's playout, sans I/O: what to send to the provider and when, given the time `now`.

No asyncio, no frames, no clock: every method takes `now` (seconds on any monotonic clock) and
returns the actions to carry out at that moment. `processors/pacer.py` is the adapter that feeds
it the pipeline's frames, carries out the actions and sleeps until `next_deadline(now)`; the unit
tests drive it in virtual time.

The model: the provider plays what it is sent back to back, so `play_end` (when the provider runs
out of the audio sent so far) is an estimate of its playout point. A chunk is sent once it would
start playing within `lead_secs`. When the provider's buffer has run dry, the first chunk waits
`jitter_secs` after it became complete (unless enough audio is already queued, as for a holding
clip), so the chunks after it have that much slack against the engine's jitter.

Utterances (`open(context)` .. `close()`) are speech: their last chunk is padded to a whole chunk
and followed by a `Mark`; the bot is speaking (`Speaking(True)`) from the first speech chunk sent
until every mark is echoed (or, with a provider that does not echo, `mark_timeout_secs` after its
audio should have played; without marks, once it has played). Audio outside an utterance is
silence: sent, never speech, and dropped once `lead_secs` of backlog is queued. `interrupt()`
drops everything queued and bumps the epoch stamped on every later chunk.
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np

GAP_TOLERANCE = 0.005  # seconds of dry provider buffer that count as an underrun inside speech


@dataclass(frozen=True)
class Send:
    """Send this chunk to the provider now."""

    pcm: bytes
    epoch: int  # interruptions seen before it was sent


@dataclass(frozen=True)
class Mark:
    """Send a provider mark named after the utterance that just ended."""

    name: str


@dataclass(frozen=True)
class Speaking:
    """The bot started (True) or stopped (False) speaking as the caller hears it."""

    on: bool


Action = Send | Mark | Speaking


def new_stats() -> dict:
    """The counters a Playout keeps (the pacer's `stats`, as the call record and /stats show them)."""
    return {
        "chunks_sent": 0, "underruns": 0, "underrun_secs": 0.0, "max_lead_secs": 0.0,
        "silence_dropped_secs": 0.0, "marks_echoed": 0, "marks_missed": 0, "interruptions": 0,
        "onset_ms": [],
    }


@dataclass
class _Chunk:
    pcm: bytes
    speech: bool  # part of an utterance
    opens: str | None  # context of the utterance that starts in this chunk
    ready: float  # time it became complete
    ends: list[str] = field(default_factory=list)  # utterances that end with this chunk


class Playout:
    """Bounded-lead playout of mono 16-bit audio in fixed-size chunks, with marks, epochs and underruns."""

    def __init__(self, rate: int, chunk_samples: int, *, lead_secs: float = 0.2, jitter_secs: float = 0.12,
                 marks: bool = True, mark_timeout_secs: float = 1.0, stats: dict | None = None):
        if rate <= 0 or chunk_samples <= 0:
            raise ValueError(f"playout needs a rate and a chunk size, got {rate} Hz, {chunk_samples} samples")
        self.rate = rate
        self.chunk_bytes = 2 * chunk_samples
        self.lead_secs = lead_secs
        self.jitter_secs = jitter_secs
        self.marks = marks
        self.mark_timeout_secs = mark_timeout_secs
        self.stats = new_stats() if stats is None else stats
        self.epoch = 0  # interruptions so far
        self.speaking = False
        self._buf = bytearray()  # the incomplete chunk
        self._buf_speech = False
        self._buf_opens: str | None = None
        self._chunks: deque[_Chunk] = deque()
        self._utterance: str | None = None  # open utterance, as queued
        self._arrived: dict[str, float] = {}  # utterance -> time it opened
        self._play_end = 0.0  # time the provider runs out of the audio sent
        self._after_speech = False  # the last chunk sent was speech of an utterance still going on
        self._unplayed: dict[str, float] = {}  # utterance end -> time its last chunk plays out

    @property
    def chunk_secs(self) -> float:
        return self.chunk_bytes / 2 / self.rate

    @property
    def play_end(self) -> float:
        """When the provider runs out of the audio sent so far (estimated)."""
        return self._play_end

    def queued_secs(self) -> float:
        """Audio queued and not yet sent."""
        return (len(self._chunks) * self.chunk_bytes + len(self._buf)) / 2 / self.rate

    def idle(self, now: float) -> bool:
        """No chunk queued, every mark settled and everything sent has played (the incomplete chunk aside)."""
        return not self._chunks and not self._unplayed and now >= self._play_end

    # ---- input (frame order) -----------------------------------------------------

    def push(self, pcm: bytes, now: float) -> bool:
        """Queue audio at the playout's rate; False: silence beyond the lead, dropped."""
        if self._utterance is None and self.queued_secs() >= self.lead_secs:
            self.stats["silence_dropped_secs"] += len(pcm) / 2 / self.rate
            return False
        self._buf += pcm
        self._buf_speech |= self._utterance is not None
        while len(self._buf) >= self.chunk_bytes:
            self._cut(bytes(self._buf[: self.chunk_bytes]), now)
            del self._buf[: self.chunk_bytes]
        return True

    def open(self, context: str, now: float) -> None:
        """An utterance starts (TTSStartedFrame)."""
        self._utterance = context
        self._arrived[context] = now
        self._buf_speech = True
        self._buf_opens = self._buf_opens or context

    def close(self, now: float) -> list[Action]:
        """The utterance ends (TTSStoppedFrame): pad to a whole chunk and mark its last chunk."""
        context, self._utterance = self._utterance, None
        if context is None:
            return []  # the utterance was interrupted; nothing of it is queued
        if self._buf:
            self._cut_padded(now, [context])
            return []
        if self._buf_opens == context:  # no audio of it was queued: nothing will open it
            self._arrived.pop(context, None)
        self._buf_speech, self._buf_opens = False, None  # what comes next is not part of it
        if self._chunks:
            self._chunks[-1].ends.append(context)
            return []
        return self._ended(context, max(now, self._play_end))

    def flush(self, now: float) -> None:
        """The call ends: the incomplete chunk goes out zero-padded."""
        if self._buf:
            self._cut_padded(now)

    def fade_out(self, secs: float, now: float) -> None:
        """Ramp the queued rest of the current utterance down over `secs` and drop the remainder."""
        total = max(1, round(secs * self.rate))
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

    def interrupt(self, now: float) -> list[Action]:
        """Drop everything queued, brackets included; later chunks carry the next epoch."""
        self.epoch += 1
        self.stats["interruptions"] += 1
        self._chunks.clear()
        self._buf.clear()
        self._buf_speech, self._buf_opens, self._utterance = False, None, None
        self._unplayed.clear()
        self._arrived.clear()
        self._play_end = now
        self._after_speech = False
        return self._set_speaking(False)

    def echoed(self, mark: str, now: float) -> bool:
        """The provider played up to `mark`; False: not one of ours, or already settled."""
        if self._unplayed.pop(mark, None) is None:
            return False
        self.stats["marks_echoed"] += 1
        return True

    def finish(self, now: float) -> list[Action]:
        """The call is over (drained or not): the bot is no longer speaking."""
        return self._set_speaking(False)

    # ---- output (time) -----------------------------------------------------------

    def due(self, now: float) -> list[Action]:
        """Everything to do at `now`: marks that timed out, then each chunk whose time has come."""
        actions = self._expire_marks(now)
        while (at := self._send_at(now)) is not None and now >= at:
            actions += self._send(self._chunks.popleft(), now)
            actions += self._expire_marks(now)
        return actions

    def next_deadline(self, now: float) -> float | None:
        """When `due` next has something to do (at or before: call it then); None: not until more input."""
        deadlines = [t + self._grace for t in self._unplayed.values()]
        if (at := self._send_at(now)) is not None:
            deadlines.append(at)
        return min(deadlines, default=None)

    # ---- internals ---------------------------------------------------------------

    @property
    def _grace(self) -> float:
        return self.mark_timeout_secs if self.marks else 0.0

    def _cut(self, pcm: bytes, now: float, ends: list[str] | None = None) -> None:
        self._chunks.append(_Chunk(pcm, self._buf_speech, self._buf_opens, now, ends or []))
        self._buf_speech = self._utterance is not None
        self._buf_opens = None

    def _cut_padded(self, now: float, ends: list[str] | None = None) -> None:
        """The partial chunk, zero-padded to the provider's size (an utterance's or the call's end)."""
        self._cut(bytes(self._buf) + bytes(self.chunk_bytes - len(self._buf)), now, ends)
        self._buf.clear()

    def _send_at(self, now: float) -> float | None:
        """When the head chunk may be sent (at or before `now`: send it); None: nothing queued."""
        if not self._chunks:
            return None
        if now >= self._play_end:  # provider buffer dry: build slack unless the audio is already here
            head = self._chunks[0]
            if self.queued_secs() - self.chunk_secs < self.jitter_secs and now < head.ready + self.jitter_secs:
                return head.ready + self.jitter_secs
        return self._play_end - self.lead_secs

    def _send(self, chunk: _Chunk, now: float) -> list[Action]:
        gap = now - self._play_end
        if chunk.speech and self._after_speech and chunk.opens is None and gap > GAP_TOLERANCE:
            self.stats["underruns"] += 1
            self.stats["underrun_secs"] += gap
        self.stats["max_lead_secs"] = max(self.stats["max_lead_secs"], -gap)
        self._play_end = max(self._play_end, now) + self.chunk_secs
        self.stats["chunks_sent"] += 1
        if chunk.opens and chunk.opens in self._arrived:
            onsets = self.stats["onset_ms"]
            onsets.append(round((now - self._arrived.pop(chunk.opens)) * 1000, 1))
            del onsets[:-20]
        actions: list[Action] = [Send(chunk.pcm, self.epoch)]
        self._after_speech = chunk.speech and not chunk.ends
        if chunk.speech:
            actions += self._set_speaking(True)
        for context in chunk.ends:
            actions += self._ended(context, self._play_end)
        return actions

    def _ended(self, context: str, plays_out: float) -> list[Action]:
        self._unplayed[context] = plays_out
        return [Mark(context)] if self.marks else []

    def _expire_marks(self, now: float) -> list[Action]:
        for context, plays_out in list(self._unplayed.items()):
            if now >= plays_out + self._grace:
                del self._unplayed[context]
                self.stats["marks_missed"] += self.marks
        if (self.speaking and not self._unplayed and self._utterance is None
                and not any(c.speech for c in self._chunks) and not self._buf_speech):
            return self._set_speaking(False)
        return []

    def _set_speaking(self, speaking: bool) -> list[Action]:
        if speaking == self.speaking:
            return []
        self.speaking = speaking
        return [Speaking(speaking)]
