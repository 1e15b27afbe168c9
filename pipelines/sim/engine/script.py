"""The scripted agent: clips played on the session's timeline, their words spread over it as text
pieces. The `script` mode is this alone; `converse` mixes it into its own replies. `EncodedScript` is
the same script encoded once per process, for sessions that run no codec (the `codec_free` option)."""

from collections import deque
from collections.abc import Iterable

import numpy as np

from processors.personaplex.ogg_reader import FRAME_SAMPLES, SAMPLE_RATE, DownlinkWriter


def text_pieces(text: str) -> list[str]:
    """Split text the way SentencePiece pieces arrive: ' word' starts, bare continuations, punctuation."""
    pieces: list[str] = []
    for word in text.split():
        core = word.rstrip(".,!?;:")
        tail = word[len(core) :]
        if core:
            pieces.append(" " + core[:5])
            pieces.extend(core[i : i + 4] for i in range(5, len(core), 4))
        if tail:
            pieces.append(tail if core else " " + tail)
    return pieces


class ScriptAgent:
    """Plays clips at fixed points of the session timeline and spreads each clip's words over it.

    The timeline counts model steps (80 ms each), not wall time, because the real model only advances
    when input arrives. Lines are `(at seconds, clip, text)` in any order. Overlapping clips are mixed
    (summed, clipped to [-1, 1]): a line starts when its time comes whatever is still playing, and
    pieces due in the same step queue and go out one per step, earlier lines first.
    """

    def __init__(self, lines: Iterable[tuple[float, np.ndarray, str]]) -> None:
        self._clips: list[tuple[int, np.ndarray]] = []
        self._schedule: dict[int, list[str]] = {}
        for at, clip, text in sorted(lines, key=lambda line: line[0]):
            start = round(at * SAMPLE_RATE)
            self._clips.append((start, clip))
            first_step = start // FRAME_SAMPLES
            clip_steps = max(1, -(-len(clip) // FRAME_SAMPLES))
            pieces = text_pieces(text)
            for i, piece in enumerate(pieces):
                self._schedule.setdefault(first_step + i * clip_steps // len(pieces), []).append(piece)
        self._end = max((start + len(clip) for start, clip in self._clips), default=0)
        self._pending: deque[str] = deque()
        self._step = 0

    @property
    def finished(self) -> bool:
        """Every clip played and every piece said: from here on each step is silence and no text."""
        return self._step * FRAME_SAMPLES >= self._end and not self._schedule and not self._pending

    def step(self, frame: np.ndarray) -> tuple[np.ndarray, str | None]:
        pos = self._step * FRAME_SAMPLES
        out = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        for start, clip in self._clips:
            lo, hi = max(pos, start), min(pos + FRAME_SAMPLES, start + len(clip))
            if lo < hi:
                out[lo - pos : hi - pos] += clip[lo - start : hi - start]
        self._pending.extend(self._schedule.pop(self._step, []))
        self._step += 1
        return np.clip(out, -1.0, 1.0), self._pending.popleft() if self._pending else None


class EncodedScript:
    """A script's steps as 80 ms Opus packets, encoded once per process, with their text pieces.

    What a `ScriptAgent` says never depends on the caller, so every session of a process can send the
    same packets, each framed into its own stream by a `DownlinkWriter` (`page`): a session then costs
    Ogg framing, not an Opus encoder. Silent steps share one packet; each run of sounding steps is
    encoded by a fresh encoder that first hears a silent step, as the session's decoder just did.
    """

    def __init__(self, lines: Iterable[tuple[float, np.ndarray, str]]) -> None:
        quiet = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        warm = DownlinkWriter()
        self.silence = [warm.encode_packet(quiet) for _ in range(3)][-1]  # past the encoder's start-up
        self.steps: list[tuple[bytes, str | None]] = []
        agent = ScriptAgent(lines)
        writer: DownlinkWriter | None = None
        while not agent.finished:
            audio, text = agent.step(quiet)
            if audio.any():
                if writer is None:
                    writer = DownlinkWriter()
                    writer.encode_packet(quiet)
                self.steps.append((writer.encode_packet(audio), text))
            else:
                writer = None
                self.steps.append((self.silence, text))

    def step(self, index: int) -> tuple[bytes, str | None]:
        """Step `index` of a session's timeline: its packet and its text piece, if any."""
        return self.steps[index] if index < len(self.steps) else (self.silence, None)
