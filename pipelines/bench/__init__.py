"""`python -m pipelines bench NAME`: measurements recorded in BENCHMARKS.md.

Figures are ratios and distributions from one run on one machine; unit tests never assert timings.
"""

import argparse
import asyncio
import time

import numpy as np


def bench_resample(args) -> int:
    """Stream 20 ms frames through each soxr quality and report how the output is released."""
    from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler

    pairs = [(8000, 24000), (16000, 24000), (24000, 8000), (24000, 16000)]
    frames = int(args.seconds * 50)
    rng = np.random.default_rng(0)
    print(f"{'quality':<8}{'in->out':>13}{'max gap ms':>12}{'first out ms':>14}{'held ms':>9}{'us/frame':>10}")

    async def one(quality: str, rate_in: int, rate_out: int):
        resampler = SOXRStreamAudioResampler(quality=quality, clear_after_secs=None)
        chunk = rate_in // 50
        produced, last_out, max_gap, first, cost = 0, 0.0, 0.0, None, 0.0
        for i in range(frames):
            pcm = rng.integers(-3000, 3000, chunk, dtype=np.int16).tobytes()
            t0 = time.perf_counter()
            out = await resampler.resample(pcm, rate_in, rate_out)
            cost += time.perf_counter() - t0
            now_ms = (i + 1) * 20.0
            if out:
                first = now_ms if first is None else first
                max_gap = max(max_gap, now_ms - last_out)
                last_out = now_ms
                produced += len(out) // 2
        held_ms = frames * 20.0 - produced / rate_out * 1000
        print(f"{quality:<8}{f'{rate_in}->{rate_out}':>13}{max_gap:>12.0f}{first:>14.0f}{held_ms:>9.1f}{cost / frames * 1e6:>10.1f}")

    async def run():
        for quality in args.quality:
            for rate_in, rate_out in pairs:
                await one(quality, rate_in, rate_out)

    asyncio.run(run())
    return 0


def _bench_vad(args) -> int:
    from pipelines.bench.vad import bench_vad

    return bench_vad(args)


def _bench_conversation(args) -> int:
    from pipelines.bench.conversation import bench_conversation

    return bench_conversation(args)


def _bench_load(args) -> int:
    from pipelines.bench.load import bench_load

    return bench_load(args)


def _bench_soak(args) -> int:
    from pipelines.bench.soak import bench_soak

    return bench_soak(args)


def _bench_scenarios(args) -> int:
    from pipelines.bench.scenarios import bench_scenarios

    return bench_scenarios(args)


def _bench_hops(args) -> int:
    from pipelines.bench.hops import bench_hops

    return bench_hops(args)


def _bench_stall(args) -> int:
    from pipelines.bench.stall import bench_stall

    return bench_stall(args)


def _bench_guard(args) -> int:
    from pipelines.bench.guard import bench_guard

    return bench_guard(args)


def _bench_cluster(args) -> int:
    from pipelines.bench.cluster import bench_cluster

    return bench_cluster(args)


BENCHES = {"resample": bench_resample, "vad": _bench_vad, "conversation": _bench_conversation, "load": _bench_load,
           "soak": _bench_soak, "scenarios": _bench_scenarios, "stall": _bench_stall, "hops": _bench_hops,
           "guard": _bench_guard, "cluster": _bench_cluster}


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "uplink":  # its own parser: encoder settings to compare
        from pipelines.bench.uplink import main as bench_uplink

        return bench_uplink(argv[1:])
    top = argparse.ArgumentParser(prog="python -m pipelines bench", description="Benchmarks; results go to BENCHMARKS.md.")
    sub = top.add_subparsers(dest="name", required=True)
    sub.add_parser("uplink", help="CPU and decoded quality of the caller-audio Opus encoders (see its --help)", add_help=False)
    p = sub.add_parser("resample", help=bench_resample.__doc__, description=bench_resample.__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="audio streamed per pair")
    p.add_argument("--quality", nargs="+", default=["VHQ", "HQ", "MQ", "LQ", "QQ"])
    from pipelines.bench.cluster import add_parser as add_cluster_parser
    from pipelines.bench.conversation import add_parser as add_conversation_parser
    from pipelines.bench.guard import add_parser as add_guard_parser
    from pipelines.bench.hops import add_parser as add_hops_parser
    from pipelines.bench.load import add_parser as add_load_parser
    from pipelines.bench.scenarios import add_parser as add_scenarios_parser
    from pipelines.bench.soak import add_parser as add_soak_parser
    from pipelines.bench.stall import add_parser as add_stall_parser
    from pipelines.bench.vad import add_parser

    add_parser(sub)
    add_conversation_parser(sub)
    add_load_parser(sub)
    add_soak_parser(sub)
    add_scenarios_parser(sub)
    add_stall_parser(sub)
    add_hops_parser(sub)
    add_guard_parser(sub)
    add_cluster_parser(sub)
    args = top.parse_args(argv)
    return BENCHES[args.name](args)
