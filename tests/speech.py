"""Real speech for tests: the recording shipped inside pipecat's wheel (16 kHz, 0.73 s, a spoken word)."""

from functools import cache
from importlib.resources import files

import numpy as np
import soundfile
import soxr

SPEECH_WAV = files("pipecat") / "services/aws/nova_sonic/ready.wav"


@cache
def _raw() -> tuple[np.ndarray, int]:
    data, rate = soundfile.read(str(SPEECH_WAV), dtype="float32")
    return (data if data.ndim == 1 else data.mean(axis=1)), rate


def speech(rate: int, repeat: int = 1, gap: float = 0.3) -> np.ndarray:
    """The recording at `rate` as int16, `repeat` times with `gap` seconds of silence between."""
    data, source_rate = _raw()
    audio = soxr.resample(data, source_rate, rate, quality="VHQ") if rate != source_rate else data
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    if repeat == 1:
        return pcm
    silence = np.zeros(int(gap * rate), np.int16)
    return np.concatenate([part for _ in range(repeat) for part in (pcm, silence)][:-1])
