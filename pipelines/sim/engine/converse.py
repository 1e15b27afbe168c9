"""Converse mode: turn-taking that behaves like a full-duplex model, with the caller's own words as the reply.

Echo mode talks over the caller a fixed delay behind them, which no model does; a bridge tested against
it never sees a real turn boundary, a yield or a backchannel. This agent listens with Silero (so noise and
coughs are not turns), waits for the end of a caller turn, answers after a model-like delay by playing
the turn back, lets short caller backchannels pass, and fades out when the caller keeps talking over it.
Everything is counted in 80 ms steps, like the model, so behaviour depends only on the input audio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import soxr

from pipelines.sim.engine.script import ScriptAgent
from processors.personaplex.ogg_reader import FRAME_SAMPLES, SAMPLE_RATE
from processors.silero import SileroState, score_now

STEP_S = FRAME_SAMPLES / SAMPLE_RATE  # 0.08
TURN_END_SECS = 0.64
REPLY_DELAY_SECS = 0.24
YIELD_AFTER_SECS = 0.48
REPLY_TEXT = "You said this."
LEAD_IN = round(0.1 * SAMPLE_RATE)  # kept before the detected onset: Silero notices speech a little late
TAIL = round(0.1 * SAMPLE_RATE)  # kept after the last voiced step, for the decay of the last word
MAX_TURN = 30 * SAMPLE_RATE  # a caller who never pauses (or steady noise Silero likes) must not grow memory

VAD_RATE = 16000
WINDOW = 512  # Silero's 32 ms window at 16 kHz
VOICED = 0.5  # Silero's own speech threshold
# As pipecat's analyzer: reset the recurrent state every ~2 s of clear non-speech, or it goes stale.
RESET_WINDOWS = round(2.0 * VAD_RATE / WINDOW)
RESET_QUIET_WINDOWS, RESET_MAX_PROB = 5, 0.1


YIELD_WINDOW_STEPS = 12  # the yield counts voiced steps in the last 0.96 s: a backchannel has at most 4


def steps(seconds: float) -> int:
    return round(seconds / STEP_S)


class SileroListener:
    """Whether each 80 ms engine frame holds speech: 24 kHz resampled to 16 kHz, Silero per 32 ms window.

    Scored synchronously on the process's shared ONNX session (~0.15 ms a window, 2-3 windows a step),
    so the engine's step stays a plain function of its input.
    """

    def __init__(self) -> None:
        self._model = SileroState()
        self._resampler = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32")
        self._pending = np.zeros(0, np.float32)
        self._since_reset = 0
        self._quiet_windows = 0

    def voiced(self, frame: np.ndarray) -> bool:
        """True when any window completed by this frame scores as speech."""
        self._pending = np.concatenate([self._pending, self._resampler.resample_chunk(frame)])
        voiced = False
        while len(self._pending) >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            prob = score_now(self._model, window, VAD_RATE)
            voiced |= prob >= VOICED
            self._since_reset += 1
            self._quiet_windows = self._quiet_windows + 1 if prob < RESET_MAX_PROB else 0
            if self._since_reset >= RESET_WINDOWS and self._quiet_windows >= RESET_QUIET_WINDOWS:
                self._model.reset_states()
                self._since_reset = 0
        return voiced


class ConverseAgent:
    """Answers each caller turn with the turn itself, the way a full-duplex model takes turns.

    - A caller turn opens at the first voiced step (recorded from ``LEAD_IN`` before it, pauses included)
      and ends after ``turn_end_secs`` of non-speech; the reply starts ``reply_delay_secs`` later. Speech
      resuming before the reply starts continues the same turn, so a pause inside a sentence never
      produces two answers.
    - While the reply plays, caller speech voiced for ``yield_after_secs`` within the last
      ``YIELD_WINDOW_STEPS`` takes the floor (commas, and words Silero scores low on a narrowband line,
      do not restart the count):
      the reply fades out within the step and the interrupting turn (from its onset) is answered when it
      ends. Shorter overlaps are backchannels: they neither stop the reply nor get answered.
    - ``script`` lines play at their step times mixed in, never yield and never count as speaking: they are
      deliberate overlaps (an "mm-hm" while the caller talks, an answer started over the caller's last words).
    """

    def __init__(
        self,
        reply_pieces: Sequence[str],
        script: ScriptAgent | None = None,
        *,
        turn_end_secs: float = TURN_END_SECS,
        reply_delay_secs: float = REPLY_DELAY_SECS,
        yield_after_secs: float = YIELD_AFTER_SECS,
    ) -> None:
        self._listener = SileroListener()
        self._script = script
        self._reply_pieces = list(reply_pieces)
        self._answer_after = max(1, steps(turn_end_secs)) + steps(reply_delay_secs)
        self._yield_after = max(1, steps(yield_after_secs))
        self._before = np.zeros(LEAD_IN, np.float32)  # the latest input, for the next turn's lead-in
        # The open caller turn: its audio, how much of it ends with a voiced step, whether it will be answered.
        self._turn: list[np.ndarray] | None = None
        self._turn_len = self._voiced_len = 0
        self._answer = False
        self._voiced_run = self._quiet_run = 0
        self._recent: deque[bool] = deque(maxlen=YIELD_WINDOW_STEPS)  # which of the latest steps were voiced
        # The reply being played, and its pieces by step offset.
        self._reply: np.ndarray | None = None
        self._reply_pos = 0
        self._reply_schedule: dict[int, list[str]] = {}
        self._texts: deque[str] = deque()
        self.turns_heard = self.replies = self.yields = 0  # for tests and logs

    @property
    def speaking(self) -> bool:
        """Whether a reply is playing (scripted lines do not count)."""
        return self._reply is not None

    def step(self, frame: np.ndarray) -> tuple[np.ndarray, str | None]:
        voiced = self._listener.voiced(frame)
        fading = self._listen(frame, voiced)
        out = self._reply_frame(fading)
        if self._script is not None:
            audio, piece = self._script.step(frame)
            out = np.clip(out + audio, -1.0, 1.0)
            if piece:
                self._texts.append(piece)
        return out, self._texts.popleft() if self._texts else None

    def _listen(self, frame: np.ndarray, voiced: bool) -> bool:
        """Follow the caller's turn; True when the reply must fade out in this step."""
        fade = False
        self._recent.append(voiced)
        if voiced and self._turn is None:
            self._turn, self._turn_len = [self._before], LEAD_IN
            self._answer = False
            self.turns_heard += 1
        self._before = np.concatenate([self._before, frame])[-LEAD_IN:]
        if self._turn is None:
            return False
        if self._turn_len < MAX_TURN:
            self._turn.append(frame)
            self._turn_len += len(frame)
        if voiced:
            if self._voiced_run == 0 and not self.speaking:
                self._answer = True  # speech that starts while the engine is silent is a turn
            self._voiced_run += 1
            self._quiet_run = 0
            self._voiced_len = self._turn_len
            if sum(self._recent) >= self._yield_after:
                self._answer = True  # too long for a backchannel: the caller has the floor
                if self.speaking:
                    fade = True
                    self.yields += 1
        else:
            self._voiced_run = 0
            self._quiet_run += 1
            if self._quiet_run >= self._answer_after:
                if self._answer:
                    self._start_reply(np.concatenate(self._turn)[: self._voiced_len + TAIL])
                self._turn = None
        return fade

    def _start_reply(self, audio: np.ndarray) -> None:
        self._reply, self._reply_pos = audio, 0
        n_steps = -(-len(audio) // FRAME_SAMPLES)
        pieces = self._reply_pieces
        self._reply_schedule = {}
        for i, piece in enumerate(pieces):  # spread over the reply; collisions queue in _texts
            self._reply_schedule.setdefault(i * n_steps // len(pieces), []).append(piece)
        self.replies += 1

    def _reply_frame(self, fade: bool) -> np.ndarray:
        out = np.zeros(FRAME_SAMPLES, np.float32)
        if self._reply is None:
            return out
        n = self._reply_pos // FRAME_SAMPLES
        self._texts.extend(self._reply_schedule.pop(n, []))
        chunk = self._reply[self._reply_pos : self._reply_pos + FRAME_SAMPLES]
        out[: len(chunk)] = chunk
        self._reply_pos += FRAME_SAMPLES
        if fade:
            out *= np.linspace(1.0, 0.0, FRAME_SAMPLES, dtype=np.float32)
        if fade or self._reply_pos >= len(self._reply):
            self._reply, self._reply_schedule = None, {}
        return out
