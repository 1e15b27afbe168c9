"""WAV files in and out: every place that loads audio (caller, engine, tests) reads it the same way."""

from importlib.resources import files

import numpy as np
import soundfile
import soxr

# A short real speech recording that ships inside pipecat's wheel (16 kHz, 0.73 s).
PIPECAT_SPEECH_WAV = files("pipecat") / "services/aws/nova_sonic/ready.wav"


def read_wav(path, sample_rate: int) -> np.ndarray:
    """Any file soundfile reads, mixed to mono, resampled to `sample_rate`, as int16."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.round(np.clip(mono, -1.0, 1.0) * 32767).astype(np.int16)


def write_wav(path, audio: np.ndarray, sample_rate: int) -> None:
    soundfile.write(str(path), np.asarray(audio, dtype=np.int16), sample_rate, subtype="PCM_16")
