"""`python -m pipelines bench uplink`: CPU and decoded quality of the uplink Opus encoders.

Caller speech from pipelines/sim/speech/ (8 kHz telephony and 16 kHz wideband, upsampled to 24 kHz with soxr
as the resample processor does) is fed in 80 ms frames to sphn's ``OpusStreamWriter`` (the old uplink)
and to ``OpusUplinkWriter`` at each complexity/application asked for, all in one process, interleaved
over several rounds (best round kept). CPU is ``time.process_time`` per second of audio, in % of one
core: what one call costs. Quality: the stream is read back by the reference engine's strict
``UplinkDecoder`` and compared with the input: SNR after delay alignment, log-spectral distance (LSD,
dB) over speech frames within the source's band, and, where the ``pesq`` package is installed (it is
not a dependency), PESQ MOS-LQO at the source's rate (ITU-T P.862 narrowband at 8 kHz, P.862.2
wideband at 16 kHz).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import soxr
import sphn

from processors.personaplex.ogg_reader import UplinkDecoder
from processors.personaplex.uplink import OpusUplinkWriter

RATE = 24000
SOURCES = ("question_8k", "interrupt_8k", "question_16k", "interrupt_16k")


def caller_speech(name: str) -> tuple[np.ndarray, int]:
    from pipelines.sim.speech import fixture_wav

    pcm, rate = fixture_wav(name)
    up = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, RATE, quality="LQ")
    return np.clip(up, -1.0, 1.0).astype(np.float32), rate


def encode(make, pcm: np.ndarray, chunk: int) -> tuple[bytes, float]:
    writer = make()
    out = []
    t0 = time.process_time()
    for i in range(0, len(pcm) - chunk + 1, chunk):
        out.append(writer.append_pcm(pcm[i : i + chunk]))
    return b"".join(out), time.process_time() - t0


def decode(stream: bytes) -> np.ndarray:
    return UplinkDecoder().decode(stream)


def align(ref: np.ndarray, out: np.ndarray, max_lag: int = RATE // 4) -> tuple[np.ndarray, np.ndarray, int]:
    """`out` shifted by the lag that best matches `ref` (the codec's delay), both cut to their overlap."""
    n = len(ref) + len(out)
    size = 1 << (n - 1).bit_length()
    c = np.fft.irfft(np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size)), size)
    lags = np.concatenate([c[: max_lag + 1], c[-max_lag:]])
    lag = int(np.argmax(lags))
    lag = lag if lag <= max_lag else lag - len(lags)
    if lag >= 0:
        a, b = ref, out[lag:]
    else:
        a, b = ref[-lag:], out
    m = min(len(a), len(b))
    return a[:m], b[:m], lag


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - out).astype(np.float64) ** 2), 1e-20)))


def lsd_db(ref: np.ndarray, out: np.ndarray, band_hz: float, frame: int = 480) -> float:
    """Mean log-spectral distance over frames within 30 dB of the loudest, bins up to `band_hz`."""
    window = np.hanning(frame)
    n = (min(len(ref), len(out)) - frame) // (frame // 2)
    idx = np.arange(frame)[None, :] + (frame // 2) * np.arange(n)[:, None]
    bins = int(band_hz / (RATE / frame))
    spec = lambda x: np.abs(np.fft.rfft(x[idx] * window, axis=1))[:, 1:bins] ** 2 + 1e-10  # noqa: E731
    pr, po = spec(ref), spec(out)
    energy = pr.sum(axis=1)
    loud = energy > energy.max() * 10 ** (-30 / 10)
    d = 10 * np.log10(pr[loud] / po[loud])
    return float(np.mean(np.sqrt(np.mean(d**2, axis=1))))


def pesq_mos(ref: np.ndarray, out: np.ndarray, rate: int) -> float:
    try:
        from pesq import pesq
    except ImportError:
        return float("nan")
    down = [soxr.resample(x, RATE, rate, quality="VHQ") for x in (ref, out)]
    return float(pesq(rate, down[0], down[1], "nb" if rate == 8000 else "wb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines bench uplink", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="speech per source and round (fixtures repeated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-ms", type=int, default=80)
    parser.add_argument("--complexity", type=int, nargs="+", default=[10, 5, 1])
    parser.add_argument("--application", nargs="+", default=["lowdelay", "audio", "voip"])
    parser.add_argument("--bitrate", type=int, nargs="+", default=[48000])
    args = parser.parse_args(argv)

    chunk = RATE * args.chunk_ms // 1000
    encoders = {"sphn OpusStreamWriter": lambda: sphn.OpusStreamWriter(RATE)}
    for bitrate in args.bitrate:
        for application in args.application:
            for complexity in args.complexity:
                encoders[f"av c{complexity} {application} {bitrate // 1000}k"] = (
                    lambda c=complexity, a=application, b=bitrate: OpusUplinkWriter(RATE, complexity=c, application=a, bitrate=b))

    sources = [caller_speech(name) for name in SOURCES]
    cpu = {name: [] for name in encoders}  # per round: seconds of CPU for all sources
    quality = {name: [] for name in encoders}  # per source: (snr, lsd, kbps)
    audio_s = 0.0
    for r in range(args.rounds):
        for name, make in encoders.items():
            used = 0.0
            for (pcm, rate) in sources:
                long = np.tile(pcm, int(np.ceil(args.seconds * RATE / len(pcm))))[: int(args.seconds * RATE)]
                stream, secs = encode(make, long, chunk)
                used += secs
                if r == 0:
                    ref = pcm
                    stream1, _ = encode(make, np.concatenate([pcm, np.zeros(RATE // 2, np.float32)]), chunk)
                    a, b, _ = align(ref, decode(stream1))
                    quality[name].append((snr_db(a, b), lsd_db(a, b, 0.95 * rate / 2), pesq_mos(a, b, rate),
                                          len(stream) * 8 / args.seconds / 1000))
            cpu[name].append(used)
        audio_s = args.seconds * len(sources)

    print(f"{audio_s:.0f} s of 24 kHz caller speech per encoder and round, {args.chunk_ms} ms frames, best of {args.rounds} rounds")
    print("quality: mean over the 8 kHz sources / over the 16 kHz sources")
    print(f"{'encoder':<24}{'CPU % core':>11}{'SNR dB':>12}{'LSD dB':>12}{'PESQ':>12}{'kbit/s':>8}")
    for name in encoders:
        q = np.array(quality[name])
        narrow = q[[i for i, s in enumerate(SOURCES) if "_8k" in s]].mean(axis=0)
        wide = q[[i for i, s in enumerate(SOURCES) if "_16k" in s]].mean(axis=0)
        cols = "".join(f"{f'{narrow[k]:.{d}f} / {wide[k]:.{d}f}':>12}" for k, d in ((0, 1), (1, 2), (2, 2)))
        print(f"{name:<24}{min(cpu[name]) / audio_s * 100:>11.2f}{cols}{q[:, 3].mean():>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
