"""`python -m pipelines bench soak`: TOTAL calls through one bridge in waves of C, to see whether it leaks.

Same processes as `bench load` (the bridge on a copy of CONFIG, C reference engines K per process, the
callers here at the provider's cadence). A wave is C calls started within 0.5 s; the next starts once
every call of the wave has ended and the bridge's /stats shows no call and no connection. Each call has
the bot speaking from the start (the greeting, then apology.wav from the engine's handshake) and the
caller saying pipelines/sim/speech/interrupt_8k.wav from 1.0 s, so Silero VAD and barge-in run on every call.

After each wave: calls done, failed (caller error or a record not `completed`), the bridge's VmRSS and
its change, threads and open file descriptors (/proc). At the end: RSS growth per finished call = the
least-squares slope of RSS against calls done over the waves after warm-up (the first 20 % of the waves,
at least 2), against a target of 0.1 MB per call.
"""

import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.bench.fleet import CallRun, call_audio, fleet, is_failed, proc_status, read_records, run_call, script_options
from pipelines.bench.harness import command_argv, guarded, int_text, machine_lines, table, write_json
from pipelines.bench.received import call_figures, percentile
from pipelines.bench.servers import settle
from pipelines.config import CONFIG_DIR

SAY = ((0.0, str(CONFIG_DIR / "clips" / "apology.wav")),)  # the model talks from its handshake on
SPEECH_AT = 1.0  # caller speech; its VAD confirmation falls after barge_in's 1 s start mute
WAVE_ARRIVAL = 0.5  # a wave's call starts spread over this long
WARMUP = 0.2  # share of the waves left out of the RSS slope...
MIN_WARMUP_WAVES = 2  # ...and at least this many
TARGET_MB_PER_CALL = 0.1


def add_parser(subparsers):
    p = subparsers.add_parser("soak", help=bench_soak.__doc__, description=bench_soak.__doc__)
    p.add_argument("--calls", type=int, default=1000, help="calls in all")
    p.add_argument("--concurrency", type=int, default=50, help="calls per wave, one engine each")
    p.add_argument("--call-secs", type=float, default=4.0, help=f"seconds per call (>= {SPEECH_AT + 2:g})")
    p.add_argument("--config", default="exotel.yaml", help="deployment file, path or name in configs/ (exotel or twilio)")
    p.add_argument("--engines-per-process", type=int, default=25, help="reference engines per engine process")
    p.add_argument("--seed", type=int, default=0, help="seed of the call start times")
    p.add_argument("--json", help="result file (default: bench-results/soak-<UTC stamp>.json)")
    p.add_argument("--log-dir", help="keep the processes' logs, the bridge's YAML and records here")
    return p


# ---- pure analysis -------------------------------------------------------------------------------


def warm_waves(waves: int) -> int:
    """How many first waves are warm-up: 20 %, at least 2."""
    return max(MIN_WARMUP_WAVES, math.ceil(waves * WARMUP))


def rss_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares MB per call of (calls done, RSS MB) after the warm-up waves; None with < 2 left."""
    after = points[warm_waves(len(points)):]
    if len(after) < 2 or len({x for x, _ in after}) < 2:
        return None
    x, y = np.array(after, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def wave_row(wave: int, calls_done: int, rows: list[dict], status: dict, previous_rss: float | None, secs: float,
             settled: bool) -> dict:
    """One wave's figures from its calls' rows and the bridge's /proc status after it."""
    rss = status.get("rss_mb")
    return {"wave": wave, "calls_done": calls_done, "failed": sum(is_failed(r) for r in rows),
            "violations": sum(r["violations"] for r in rows), "underruns": sum(r.get("underruns", 0) for r in rows),
            "barge_in_missed": sum(r.get("barge_in_ms") is None for r in rows), "rss_mb": rss,
            "rss_delta_mb": None if rss is None or previous_rss is None else round(rss - previous_rss, 1),
            "threads": status.get("threads"), "fds": status.get("fds"), "secs": round(secs, 1), "settled": settled}


# ---- running -------------------------------------------------------------------------------------


async def soak(f, args, audio: np.ndarray, onset: float) -> tuple[dict, list[dict], list[dict]]:
    """Run the waves; returns the bridge's status before the first call, the waves, every call's row."""
    rng = np.random.default_rng(args.seed)
    before = proc_status(f.server.pid)
    waves, calls, records = [], [], {}
    previous = before.get("rss_mb")
    for w in range(1, math.ceil(args.calls / args.concurrency) + 1):
        n = min(args.concurrency, args.calls - len(calls))
        runs = [CallRun(f"soak-w{w:04d}-c{i:03d}") for i in range(n)]
        t0 = time.monotonic()

        async def one(run: CallRun, delay: float) -> None:
            await asyncio.sleep(delay)
            await run_call(f, run, audio, args.call_secs)

        await asyncio.gather(*(one(r, d) for r, d in zip(runs, rng.uniform(0, WAVE_ARRIVAL, n))))
        stats = await settle(f.server, timeout=30) or {}
        read_records(f.records, records)
        rows = [call_row(r, onset, records.get(r.sid)) for r in runs]
        calls += rows
        row = wave_row(w, len(calls), rows, proc_status(f.server.pid), previous, time.monotonic() - t0,
                       stats.get("calls_active") == 0 and stats.get("connections") == 0)
        previous = row["rss_mb"] if row["rss_mb"] is not None else previous
        waves.append(row)
        print(f"wave {w:4d}  calls {row['calls_done']:5d}  failed {row['failed']:3d}  RSS {_mb(row['rss_mb'])} MB "
              f"({_delta(row['rss_delta_mb'])})  threads {row['threads']}  fds {row['fds']}"
              + ("" if row["settled"] else "  (calls still active after 30 s)"), flush=True)
    return before, waves, calls


def call_row(run: CallRun, onset: float, record: dict | None) -> dict:
    """A call's figures, small enough to keep for every call of a long soak."""
    row = {"sid": run.sid, "error": run.error, "violations": len(run.violations or []),
           "outcome": (record or {}).get("outcome", "unknown")}
    return row | (call_figures(run.messages, onset) if run.messages is not None else {})


def bench_soak(args) -> int:
    """TOTAL calls in waves of C: RSS, threads and descriptors of the bridge after each wave; leak slope."""
    from loguru import logger

    logger.remove()  # the caller's per-chunk warnings are counted in the figures
    return guarded(lambda: _bench_soak(args))


def _bench_soak(args) -> int:
    argv = command_argv(["bench", "soak", "..."])
    machine = machine_lines(argv)
    print("\n".join(machine))
    if args.calls < 1 or args.concurrency < 1 or args.engines_per_process < 1:
        print("error: --calls, --concurrency and --engines-per-process must be at least 1", file=sys.stderr)
        return 2
    if args.call_secs < SPEECH_AT + 2:
        print(f"error: --call-secs must be at least {SPEECH_AT + 2:g}: the caller barges in at {SPEECH_AT:g} s", file=sys.stderr)
        return 2
    audio, onset = call_audio(SPEECH_AT, args.call_secs)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(args.log_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        with fleet(args.config, args.concurrency, args.engines_per_process, script_options(SAY), work) as f:
            print(f"scenario: {args.calls} {f.provider} calls of {args.call_secs:g} s in waves of {args.concurrency}; "
                  f"caller speech onset at {onset:.2f} s", flush=True)
            before, waves, calls = asyncio.run(soak(f, args, audio, onset))
            provider = f.provider
    result = {"bench": "soak", "machine": machine, "argv": argv,
              "params": {k: v for k, v in vars(args).items() if k not in ("name", "log_dir")} | {
                  "provider": provider, "speech_at_s": SPEECH_AT, "speech_onset_s": round(onset, 3)},
              **soak_figures(before, waves, calls), "secs": round(time.monotonic() - t_start, 1), "waves": waves,
              "per_call": calls}
    report(result)
    print(f"\nwritten: {write_json(args.json, 'soak', result)}")
    return 0


def soak_figures(before: dict, waves: list[dict], calls: list[dict]) -> dict:
    lats = [c["barge_in_ms"] for c in calls if c.get("barge_in_ms") is not None]
    slope = rss_slope([(w["calls_done"], w["rss_mb"]) for w in waves if w["rss_mb"] is not None])
    last = waves[-1] if waves else {}
    return {
        "calls": len(calls), "failed": sum(is_failed(c) for c in calls),
        "failures": [f"{c['sid']}: {c['error'] or c['outcome']}" for c in calls if is_failed(c)],
        "chunk_violations": sum(c["violations"] for c in calls), "underruns": sum(c.get("underruns", 0) for c in calls),
        "barge_in_ms": {"p50": percentile(lats, 50), "p95": percentile(lats, 95), "missed": len(calls) - len(lats)},
        "rss_mb": {"before": before.get("rss_mb"), "after_first_wave": waves[0]["rss_mb"] if waves else None,
                   "end": last.get("rss_mb")},
        "rss_mb_per_call": None if slope is None else round(slope, 4), "target_mb_per_call": TARGET_MB_PER_CALL,
        "warmup_waves": warm_waves(len(waves)),
        "threads": {"before": before.get("threads"), "end": last.get("threads")},
        "fds": {"before": before.get("fds"), "end": last.get("fds")},
    }


def report(r: dict) -> None:
    print("\n```")
    print(table(["wave", "calls", "failed", "violations", "missed barge-in", "RSS MB", "delta", "threads", "fds", "secs"],
                [[w["wave"], w["calls_done"], w["failed"], w["violations"], w["barge_in_missed"], _mb(w["rss_mb"]),
                  _delta(w["rss_delta_mb"]), w["threads"], w["fds"], w["secs"]]
                 for w in r["waves"]], first_width=4))
    print("```")
    slope = r["rss_mb_per_call"]
    verdict = "-" if slope is None else ("yes" if slope <= TARGET_MB_PER_CALL else "no")
    b = r["barge_in_ms"]
    print("\n```")
    print(table(["figure", "value"], [
        ["calls / failed", f"{r['calls']} / {r['failed']}"],
        ["chunk violations / underruns", f"{r['chunk_violations']} / {r['underruns']}"],
        ["barge-in ms p50/p95 (missed)", f"{int_text(b['p50'])}/{int_text(b['p95'])} ({b['missed']})"],
        ["RSS MB before/wave 1/end", "/".join(_mb(r["rss_mb"][k]) for k in ("before", "after_first_wave", "end"))],
        [f"RSS MB/call after {r['warmup_waves']} waves", "-" if slope is None else f"{slope:.4f}"],
        [f"<= {TARGET_MB_PER_CALL} MB/call", verdict],
        ["threads before/end", f"{r['threads']['before']}/{r['threads']['end']}"],
        ["fds before/end", f"{r['fds']['before']}/{r['fds']['end']}"],
        ["wall s", r["secs"]],
    ], first_width=30))
    print("```")
    for line in r["failures"][:10]:
        print(line)


def _delta(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:+.1f}"


def _mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.1f}"
