"""`python -m pipelines bench vad`: onset confirmation of pipecat's VAD defaults vs ours, CPU per window, and
how long backchannels and interruptions are voiced (what barge-in's min_speech_secs must separate).

Latency is counted in audio, not wall time: 20 ms frames fed after the fixture's energy onset until the
analyzer reports SPEAKING; the same analyzer code VADProcessor runs, without the pipeline around it.
"""

import time

import numpy as np

from processors.pipecat_adapter import run_state_machine


def add_parser(subparsers):
    p = subparsers.add_parser("vad", help=bench_vad.__doc__, description=bench_vad.__doc__)
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, -10.0, -20.0], help="dB relative to the fixtures")
    p.add_argument("--silence", type=float, default=1.0, help="seconds of silence before the speech")
    p.add_argument("--windows", type=int, default=2000, help="Silero windows timed for the CPU figure")
    return p


def bench_vad(args) -> int:
    """Onset confirmation (ms of audio after energy onset) for pipecat defaults vs ours; CPU per window."""
    from loguru import logger
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams as PipecatVADParams
    from pipecat.audio.vad.vad_analyzer import VADState

    from pipelines.sim.speech import energy_onset, fixture_wav
    from processors.vad import VADParams

    logger.remove()  # the analyzer logs every set_params
    settings = {"pipecat": PipecatVADParams(), "ours": VADParams().pipecat()}
    print("pipecat:", settings["pipecat"])
    print("ours:   ", settings["ours"])

    def onset_ms(pcm: np.ndarray, rate: int, params) -> float | None:
        analyzer = SileroVADAnalyzer(params=params)
        analyzer.set_sample_rate(rate)
        n = rate // 50
        audio = np.concatenate([np.zeros(int(args.silence * rate), np.int16), pcm])
        onset = energy_onset(audio, rate)
        for i in range(0, len(audio) - n + 1, n):
            if run_state_machine(analyzer, audio[i : i + n].tobytes()) == VADState.SPEAKING:
                return (i // n + 1 - onset) * 20.0
        return None

    names = ["question_8k", "question_16k", "interrupt_8k", "interrupt_16k"]
    print(f"\n{'fixture':<15}{'level dB':>9}{'pipecat ms':>12}{'ours ms':>9}")
    for name in names:
        pcm, rate = fixture_wav(name)
        for db in args.levels:
            scaled = np.clip(pcm.astype(np.float64) * 10 ** (db / 20), -32768, 32767).astype(np.int16)
            cells = [onset_ms(scaled, rate, settings[k]) for k in ("pipecat", "ours")]
            print(f"{name:<15}{db:>9.0f}" + "".join(f"{'never' if c is None else f'{c:.0f}':>{w}}" for c, w in zip(cells, (12, 9))))

    print_voiced(settings["ours"])

    print(f"\n{'rate':>6}{'us/window':>11}{'window ms':>11}{'% of a core':>13}")
    for rate in (8000, 16000):
        analyzer = SileroVADAnalyzer(params=settings["ours"])
        analyzer.set_sample_rate(rate)
        window = analyzer.num_frames_required()
        pcm, _ = fixture_wav(f"question_{rate // 1000}k")
        chunks = [pcm[i : i + window].tobytes() for i in range(0, len(pcm) - window + 1, window)]
        t0 = time.perf_counter()
        for i in range(args.windows):
            run_state_machine(analyzer, chunks[i % len(chunks)])
        us = (time.perf_counter() - t0) / args.windows * 1e6
        window_ms = window / rate * 1000
        print(f"{rate:>6}{us:>11.0f}{window_ms:>11.0f}{us / 10 / window_ms:>13.2f}")
    return 0


def print_voiced(params) -> None:
    """Voiced seconds (Silero windows in STARTING/SPEAKING, as CallerVoiceFrame reports them) per scenario clip."""
    from pathlib import Path

    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADState

    import pipelines.sim.scenarios
    from processors.audio import read_wav

    audio = Path(pipelines.sim.scenarios.__file__).parent / "audio"
    print(f"\n{'clip (8 kHz)':<16}{'length s':>9}{'voiced s':>9}{'longest run s':>14}")
    for name in ("uh_huh", "okay", "mm_hm", "interruption", "question"):
        pcm = read_wav(audio / f"{name}_8k.wav", 8000)
        analyzer = SileroVADAnalyzer(params=params)
        analyzer.set_sample_rate(8000)
        window = analyzer.num_frames_required()
        padded = np.concatenate([np.zeros(4000, np.int16), pcm, np.zeros(8000, np.int16)])
        voiced = [run_state_machine(analyzer, padded[i : i + window].tobytes()) in (VADState.STARTING, VADState.SPEAKING)
                  for i in range(0, len(padded) - window + 1, window)]
        runs = [len(r) for r in "".join("1" if v else "0" for v in voiced).split("0") if r]
        secs = window / 8000
        print(f"{name:<16}{len(pcm) / 8000:>9.2f}{sum(voiced) * secs:>9.2f}{max(runs, default=0) * secs:>14.2f}")


if __name__ == "__main__":
    import argparse

    top = argparse.ArgumentParser(prog="python -m pipelines bench")
    add_parser(top.add_subparsers(dest="name", required=True))
    raise SystemExit(bench_vad(top.parse_args()))
