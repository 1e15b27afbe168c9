"""Real speech for tests: the recording shipped inside pipecat's wheel (16 kHz, 0.73 s, a spoken word)."""

from functools import cache

import numpy as np

from processors.audio import PIPECAT_SPEECH_WAV, read_wav


@cache
def _at(rate: int) -> np.ndarray:
    return read_wav(PIPECAT_SPEECH_WAV, rate)


def speech(rate: int, repeat: int = 1, gap: float = 0.3) -> np.ndarray:
    """The recording at `rate` as int16, `repeat` times with `gap` seconds of silence between."""
    pcm = _at(rate)
    if repeat == 1:
        return pcm.copy()
    silence = np.zeros(int(gap * rate), np.int16)
    return np.concatenate([part for _ in range(repeat) for part in (pcm, silence)][:-1])


def speech_float(rate: int) -> np.ndarray:
    """The recording as float32 in [-1, 1], the form the Opus codec takes."""
    return _at(rate).astype(np.float32) / 32768.0
