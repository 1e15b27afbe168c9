"""`python -m pipelines bench load`: N concurrent calls through the bridge, as deployed, and what they cost.

The bridge (`python -m pipelines run` on a copy of CONFIG) and N reference engines (script mode, K per
process) run as their own processes; the N callers run here at the provider's real uplink cadence
(Exotel 100 ms, Twilio 20 ms), their starts spread uniformly at random over `--arrival-secs`. Each
engine says configs/clips/apology.wav (5.7 s) at 0.8 s and 8.0 s of its step timeline (which starts
after its 0.5 s handshake, so ~1.3 s and ~8.5 s on the caller's); each caller is silent, then says
pipelines/sim/speech/interrupt_8k.wav from 10.0 s, over the second utterance, then is silent to `--duration`.

Figures (caller's timeline: t=0 when `start` is sent; p95/p99 nearest-rank over all calls):
- CPU: % of one core from /proc/PID/stat, sampled every 0.5 s, over the window where every call is up
  (last call start + 2 s -> first call end) and over the whole run (first start -> last end); the
  bridge's per concurrent call, the engine processes', this process's (the callers), and the rest of
  the machine's (busy CPU in /proc/stat minus those: contention from other work).
- RSS: the bridge's VmRSS before the first call, its peak over the samples, and after the calls ended.
- underruns: received.playout_gaps (a non-silent chunk arriving > 5 ms after the caller's
  playout ran dry inside bot speech).
- output gaps: between consecutive non-silent media in one run of them (a `clear` ends a run): the raw
  inter-arrival gap, the chunk length, and the excess = gap - the previous chunk's length (Exotel's
  3200-byte minimum makes 200 ms chunks, so the raw gap is ~200 ms by protocol).
- barge-in: the arrival of the caller's chunk that holds the speech's energy onset (a chunk leaves
  once "recorded": 100 ms chunks on Exotel) -> the first `clear` after it; missed = no such `clear`.
  The bridge waits for `min_speech_secs` (0.4) of the caller's speech before it cuts the bot, so
  that a backchannel does not; "from the floor" counts from the arrival of the chunk on which that
  rule was met (its end, from the record's `audio_ms`), what the bridge adds to its own rule.
  stray clears: every other `clear`. first audio: `start` -> first non-silent media.
- outcome: the `call_ended` outcome in the bridge's records; failed = caller error or not `completed`.
- `--kill-engine-at T`: SIGKILL of engine process 0 T s after the last call started. A call lost its
  engine when its record's engine is one of that process's; it heard the apology when >= 1 s of
  non-silent audio reached it from 0.5 s after the kill (what the pacer had queued is older), and was
  hung up cleanly when the bridge closed it with 1000 before the caller's end.

The bridge alone (`--pin`, `--ramp`; pipelines/bench/ramp.py): `--pin` puts the bridge (or the stock
server) on the first usable core and the engine processes and the callers on the others, and adds that
core's busy % and what else ran on it (`core other %`). The engines are cheap by construction: script
mode plays two preloaded clips (no model, no generation), codec-free (`codec_free`): per call they
check and count the caller's Ogg pages without decoding them and frame 80 ms packets encoded once per
process, so that their shared core does not cap the calls measured. `--ramp 10,20,30` runs the load
at each call count with a fresh fleet and stops after the first step that breaks a target
(`--keep-going`: every step), one table row and one JSON result for the whole ramp.
"""

import asyncio
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.bench import ramp
from pipelines.bench.fleet import (
    UPLINK_MS,
    CallRun,
    call_audio,
    deployment,
    fleet,
    machine_cpu_secs,
    proc_status,
    read_records,
    run_call,
    script_options,
    stock_fleet,
)
from pipelines.bench.harness import command_argv, guarded, int_text, machine_lines, table, write_json
from pipelines.bench.load_figures import call_row, cpu_percent, figures, kill_effects
from pipelines.bench.received import speech_gaps
from pipelines.bench.servers import process_cpu_secs, settle
from pipelines.config import CONFIG_DIR

CLIP = str(CONFIG_DIR / "clips" / "apology.wav")
SAY = ((0.8, CLIP), (8.0, CLIP))  # on the engine's step timeline
SPEECH_AT = 10.0  # caller speech starts here, while the second utterance (~8.5-14.2 s) plays
STOCK_SPEAK_AT = 8.5  # the stock bot says the clip once, over the same barge-in moment
SAMPLE_SECS = 0.5
PROGRESS_SECS = 2.0
NO_RECORD = {"outcome": "unknown", "engine_url": None, "apology": False}  # a call the bridge left no finished record of


def add_parser(subparsers):
    p = subparsers.add_parser("load", help=bench_load.__doc__, description=bench_load.__doc__)
    p.add_argument("--config", default="exotel.yaml", help="deployment file, path or name in configs/ (exotel or twilio)")
    p.add_argument("--calls", type=int, default=10, help="concurrent calls, one engine each")
    p.add_argument("--duration", type=float, default=20.0, help=f"seconds per call (>= {SPEECH_AT + 1:.0f})")
    p.add_argument("--arrival-secs", type=float, default=2.0, help="call starts spread uniformly over this long")
    p.add_argument("--kill-engine-at", type=float, help="SIGKILL engine process 0 this long after the last call started")
    p.add_argument("--engines-per-process", type=int, default=25, help="reference engines per engine process")
    p.add_argument("--server", choices=("ours", "stock"), default="ours", help="stock: pipelines/bench/stock.py (Exotel)")
    p.add_argument("--seed", type=int, default=0, help="seed of the call start times")
    p.add_argument("--json", help="result file (default: bench-results/load-<UTC stamp>.json)")
    p.add_argument("--log-dir", help="keep the processes' logs, the bridge's YAML and records here")
    p.add_argument("--pin", action="store_true", help="the bridge on the first usable core, the engines (script mode: "
                   "preloaded clips, no model) and the callers on the others; reports that core's other load")
    p.add_argument("--ramp", type=_ramp_steps, help="call counts, e.g. 10,20,30: one run per step (fresh fleet), "
                   f"stopping after the first that breaks a target; {ramp.TARGETS_HELP}")
    p.add_argument("--keep-going", action="store_true", help="with --ramp: run every step, even after a target broke")
    return p


def _ramp_steps(text: str) -> list[int]:
    import argparse

    try:
        return ramp.parse_ramp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None



class Sampler:
    """CPU seconds of the bridge, the engine processes and this one, and the bridge's RSS, every 0.5 s
    (a killed engine keeps its last reading); a progress line every 2 s."""

    def __init__(self, fleet, runs: list[CallRun], t0: float, core: int | None = None):
        self.fleet, self.runs, self.t0, self.core = fleet, runs, t0, core
        self.samples: list[dict] = []
        self._engines: dict[int, float] = {}

    def sample(self) -> dict:
        for pid in self.fleet.pids:
            cpu = process_cpu_secs(pid)
            if cpu is not None:
                self._engines[pid] = cpu
        s = {"t": round(time.monotonic() - self.t0, 3), "bridge_cpu": process_cpu_secs(self.fleet.server.pid),
             "engines_cpu": sum(self._engines.values()) if self.fleet.pids else None,
             "callers_cpu": process_cpu_secs(os.getpid()), "machine_cpu": machine_cpu_secs(),
             "rss_mb": proc_status(self.fleet.server.pid).get("rss_mb")}
        if self.core is not None:
            s["core_cpu"] = ramp.core_cpu_secs(self.core)
        self.samples.append(s)
        return s

    async def run(self) -> None:
        every = round(PROGRESS_SECS / SAMPLE_SECS)
        while True:
            await asyncio.sleep(SAMPLE_SECS)
            s = self.sample()
            if len(self.samples) > every and len(self.samples) % every == 1:
                print(self.progress(self.samples[-1 - every], s), flush=True)

    def progress(self, before: dict, now: dict) -> str:
        active = sum(r.start is not None and r.end is None for r in self.runs)
        done = sum(r.end is not None and not r.error for r in self.runs)
        failed = sum(bool(r.error) for r in self.runs)
        cpu = cpu_percent([before, now], "bridge_cpu", (before["t"], now["t"]))
        return (f"{now['t']:6.1f} s  calls {active} active, {done} done, {failed} failed  "
                f"bridge {int_text(cpu)}% of a core, RSS {int_text(now['rss_mb'])} MB")


async def drive(f, args, audio: np.ndarray, core: int | None = None) -> tuple[list[CallRun], list[dict], float, dict | None]:
    """Place the calls (and the kill); returns the runs, the samples, t0 and the kill."""
    offsets = np.sort(np.random.default_rng(args.seed).uniform(0, args.arrival_secs, args.calls))
    runs = [CallRun(f"load-{i:03d}") for i in range(args.calls)]
    t0 = time.monotonic()
    sampler = Sampler(f, runs, t0, core)
    sampler.sample()
    ticker = asyncio.create_task(sampler.run())

    async def one(run: CallRun, delay: float) -> None:
        await asyncio.sleep(delay)
        await run_call(f, run, audio, args.duration)

    killer = None
    if args.kill_engine_at is not None:
        killer = asyncio.create_task(kill_engine(f, t0 + offsets[-1] + args.kill_engine_at))
    await asyncio.gather(*(one(r, d) for r, d in zip(runs, offsets)))
    kill = await killer if killer else None
    await settle(f.server, timeout=30)
    sampler.sample()
    ticker.cancel()
    return runs, sampler.samples, t0, kill


async def kill_engine(f, at: float) -> dict:
    """SIGKILL engine process 0 at `at` (monotonic), as a GPU server that crashes."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    proc, ports = f.engines[0]
    os.kill(proc.pid, signal.SIGKILL)
    t = time.monotonic()
    print(f"killed engine process {proc.pid} (ports {', '.join(map(str, ports))})", flush=True)
    return {"t": t, "pid": proc.pid, "ports": ports}


def bench_load(args) -> int:
    """N concurrent calls through the bridge and its engine fleet: CPU, memory, cadence, barge-in, outcomes."""
    from loguru import logger

    logger.remove()  # the caller's per-chunk warnings are counted in the figures
    return guarded(lambda: _bench_load(args))


def _bench_load(args) -> int:
    argv = command_argv(["bench", "load", "..."])
    machine = machine_lines(argv)
    print("\n".join(machine))
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    core = None
    if args.pin:
        core, rest = ramp.split_cpus(os.sched_getaffinity(0))
        ramp.pin(os.getpid(), rest)  # the engines launched from here inherit it
        print(f"pinned: {'stock server' if args.server == 'stock' else 'bridge'} on CPU {core}, engines and callers on "
              f"CPUs {','.join(map(str, sorted(rest)))}")
    if args.ramp:
        return _ramp(args, machine, argv, core)
    result = measure(args, machine, argv, core)
    report(result)
    print(f"\nwritten: {write_json(args.json, 'load', result)}")
    return 0


def _ramp(args, machine: list[str], argv: list[str], core: int | None) -> int:
    stock = args.server == "stock"
    steps, rows, broke_at = [], [], None
    for calls in args.ramp:
        print(f"\n--- ramp step: {calls} calls", flush=True)
        result = measure(argparse_copy(args, calls=calls), machine, argv, core)
        broke = ramp.broken_targets(result, stock)
        steps.append(result | {"broke": broke})
        rows.append(ramp.ramp_row(result, broke))
        print(table(ramp.HEADER, rows[-1:], first_width=5), flush=True)
        if broke and broke_at is None:
            broke_at = calls
            if not args.keep_going:
                break
    server = "stock pipecat" if stock else "the bridge"
    print(f"\nramp, {server}{', pinned to CPU ' + str(core) if core is not None else ''} ({ramp.TARGETS_HELP}):")
    print("```")
    print(table(ramp.HEADER, rows, first_width=5))
    print("```")
    print(f"first broken at: {broke_at or 'none'} calls")
    result = {"bench": "load-ramp", "machine": machine, "argv": argv, "server": args.server, "pinned_core": core,
              "targets": ramp.TARGETS_HELP, "ramp": args.ramp, "broke_at": broke_at, "header": ramp.HEADER, "rows": rows,
              "steps": steps}
    print(f"\nwritten: {write_json(args.json, 'load-ramp', result)}")
    return 0


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**(vars(args) | changes))


def measure(args, machine: list[str], argv: list[str], core: int | None = None) -> dict:
    """One load run (`args.calls` calls on a fresh fleet): its result, as written to JSON."""
    audio, onset = call_audio(SPEECH_AT, args.duration)
    chunk = UPLINK_MS["exotel" if args.server == "stock" else deployment(args.config)[1]] / 1000
    onset_arrival = math.ceil(round(onset / chunk, 6)) * chunk
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(args.log_dir or tmp) / (f"{args.calls}-calls" if args.ramp else "")
        work.mkdir(parents=True, exist_ok=True)
        stock = args.server == "stock"
        servers = stock_fleet(STOCK_SPEAK_AT, CLIP, work) if stock else fleet(
            args.config, args.calls, args.engines_per_process, script_options(SAY), work)
        with servers as f:
            if core is not None:
                ramp.pin(f.server.pid, {core})
                for pid in f.pids:
                    ramp.pin(pid, os.sched_getaffinity(0))
            print(f"scenario: {args.calls} {f.provider} calls to {'stock pipecat' if stock else 'the bridge'}, starts over "
                  f"{args.arrival_secs:g} s, {args.duration:g} s each; {len(f.engines)} engine processes; caller speech "
                  f"onset at {onset:.2f} s", flush=True)
            runs, samples, t0, kill = asyncio.run(drive(f, args, audio, core))
            records: dict[str, dict] | None = None if stock else {}
            if records is not None:
                read_records(f.records, records)
            setup = {"provider": f.provider, "engine_processes": len(f.engines), "pinned_core": core}
    rows = [call_row(r, t0, onset_arrival, None if records is None else records.get(r.sid, NO_RECORD), args.duration, kill)
            for r in runs]
    gaps = [g for r in runs if r.messages is not None for g in speech_gaps(r.messages)]
    result = {"bench": "load", "machine": machine, "argv": argv,
              "params": {k: v for k, v in vars(args).items() if k not in ("name", "log_dir")} | setup | {"speech_at_s": SPEECH_AT,
                  "speech_onset_s": round(onset, 3),
                  "onset_chunk_arrival_s": round(onset_arrival, 3), "script": [list(s) for s in SAY], "stock_speak_at_s": STOCK_SPEAK_AT if stock else None},
              **figures(rows, gaps, samples, args.calls),
              "kill": None if kill is None else {"pid": kill["pid"], "ports": kill["ports"], "at_s": round(kill["t"] - t0, 2), **kill_effects(rows)},
              "per_call": rows, "samples": samples}
    if core is not None:
        result["cpu_pct"] |= ramp.core_figures(samples, result["cpu_pct"]["all_up_window_s"])
    return result


def _check(args) -> str | None:
    if args.calls < 1 or args.engines_per_process < 1:
        return "--calls and --engines-per-process must be at least 1"
    if args.duration < SPEECH_AT + 1:
        return f"--duration must be at least {SPEECH_AT + 1:g} s: the caller barges in at {SPEECH_AT:g} s"
    if args.ramp and args.kill_engine_at is not None:
        return "--ramp and --kill-engine-at do not go together"
    if args.keep_going and not args.ramp:
        return "--keep-going goes with --ramp"
    if args.server == "stock" and args.kill_engine_at is not None:
        return "the stock server has no engines to kill"
    if args.server == "stock" and deployment(args.config)[1] != "exotel":
        return "the stock server speaks Exotel only"
    return None


# ---- printing ------------------------------------------------------------------------------------


def report(r: dict) -> None:
    cpu, g, b, fa, rss = r["cpu_pct"], r["output_gaps"], r["barge_in_ms"], r["first_audio_ms"], r["rss_mb"]
    window = cpu["all_up_window_s"]
    server = "bridge" if r["params"]["server"] == "ours" else "stock server"
    rows = [
        ["calls / failed", f"{r['calls']} / {r['failed']}"],
        ["outcomes", ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())],
        ["all-up window s", "-" if window is None else f"{window[0]:.1f}-{window[1]:.1f}"],
        [f"{server} CPU % (per call)", f"{int_text(cpu['bridge'])} ({_num(cpu['bridge_per_call'])})"],
        *([[f"its core (CPU {r['params']['pinned_core']}): busy / other %", f"{int_text(cpu['core'])} / {int_text(cpu['core_others'])}"]]
          if "core" in cpu else []),
        ["engines / callers / other CPU %", f"{int_text(cpu['engines'])} / {int_text(cpu['callers'])} / {int_text(cpu['others'])}"],
        [f"whole run: {server} % (per call)", f"{int_text(cpu['bridge_run'])} ({_num(cpu['bridge_run_per_call'])})"],
        ["whole run: engines / callers / other %",
         f"{int_text(cpu['engines_run'])} / {int_text(cpu['callers_run'])} / {int_text(cpu['others_run'])}"],
        [f"{server} RSS MB start/peak/end", "/".join(int_text(rss[k]) for k in ("start", "peak", "end"))],
        ["chunk violations", r["chunk_violations"]],
        ["underruns (ms)", f"{r['underruns']['count']} ({r['underruns']['ms']:.0f})"],
        ["gap ms p50/p99/max", "/".join(int_text(g[k]) for k in ("p50_ms", "p99_ms", "max_ms")) + f" (n {g['n']})"],
        ["chunk ms; excess p99/max", f"{int_text(g['chunk_ms'])}; {int_text(g['excess_p99_ms'])}/{int_text(g['excess_max_ms'])}"],
        ["barge-in ms p50/p95/max", "/".join(int_text(b[k]) for k in ("p50", "p95", "max")) + f" (missed {b['missed']})"],
        ["  from the floor p50/p95/max", "/".join(int_text(r["barge_in_floor_ms"][k]) for k in ("p50", "p95", "max"))],
        ["clears early / stray", f"{b['early_clears']} / {r['stray_clears']}"],
        ["first audio ms p50/p95/max", "/".join(int_text(fa[k]) for k in ("p50", "p95", "max")) + f" (silent {fa['silent']})"],
    ]
    print("\n```")
    print(table(["figure", "value"], rows, first_width=30))
    print("```")
    kill = r["kill"]
    if kill:
        lost, others = kill["lost"], kill["others"]
        print(f"\nkill: engine process {kill['pid']} at {kill['at_s']} s (ports {', '.join(map(str, kill['ports']))})")
        print("```")
        print(table(["calls", "n", "engine_failed", "apology heard", "clean hang-up", "completed", "underruns", "stray clears",
                     "missed barge-in"], [
            ["lost engine", lost["calls"], lost["engine_failed"], lost["apology_heard"], lost["clean_hang_up"], "-", "-", "-", "-"],
            ["others", others["calls"], "-", "-", "-", others["completed"], others["underruns"], others["stray_clears"],
             others["barge_in_missed"]]], 12))
        print("```")
    print("\nper call:\n```")
    header = ["call", "start s", "outcome", "engine", "barge ms", "floor ms", "first ms", "underruns", "stray", "violations"]
    if kill:
        header += ["lost", "after kill s", "hung up"]
    calls = []
    for c in r["per_call"]:
        line = [c["sid"], f"{c['start_s']:.2f}", c.get("outcome", "n/a") if not c["error"] else "error", c.get("engine_port") or "-",
                int_text(c.get("barge_in_ms")), int_text(c.get("barge_in_floor_ms")), int_text(c.get("first_audio_ms")),
                c.get("underruns", "-"), c.get("stray_clears", "-"), c["violations"]]
        if kill:
            line += ["yes" if c.get("lost_engine") else "no", c.get("audible_after_kill_s", "-"), "yes" if c.get("hung_up_by_bridge") else "no"]
        calls.append(line)
    print(table(header, calls))
    print("```")
    for e in r["errors"][:10]:
        print(e)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
