"""`python -m pipelines bench scenarios`: the scenario suite (pipelines/sim/scenarios/*.yaml) against the
bridge, as each provider's caller, with real speech; what every caller heard, judged.

For each deployment (default configs/exotel.yaml, twilio.yaml and browser.yaml) and each engine setup
the scenarios need, one server runs as its own process: `python -m pipelines run` on a temporary copy
of the deployment whose `engine.reference` is the scenario's (the reference engine in `converse`
mode, plus its script lines and overrides) and whose call records go to a temporary directory. The
callers run here, at most `--concurrency` at once, each dialling exactly as its provider would
(pipelines/sim/caller.py). Each call is judged by pipelines/sim/scenarios/checks.py from what its caller
heard and the server's record of it.

Printed: a table (scenario x provider: runs passed, the expectations that failed, reply and stop
latency p50, what was heard), the overall pass rate and the issue's targets; a JSON result goes to
bench-results/. The exit status is 0 only when every expectation of every run passed and every
target was met.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines.bench.scenario_results import Run, SuiteResult, first_audio_ms, report, to_json, underruns
from pipelines.bench.scenario_servers import Group, Target, engine_options, start_group, stop_group, target

DEFAULT_CONFIGS = ("exotel.yaml", "twilio.yaml", "browser.yaml")
LINGER = 5.0  # after the caller hangs up, the server has this long to close the socket
RECORD_WAIT = 5.0  # and this long to finish the call's record


def add_parser(subparsers):
    p = subparsers.add_parser("scenarios", help="the scenario suite: turn-taking moments, judged by what the caller heard",
                              description="Run the scenario suite (pipelines/sim/scenarios/*.yaml) against real servers, one "
                                          "per deployment and engine setup, as each provider's simulated caller; print what "
                                          "each caller heard, judged, and the issue's targets; exit 0 only if all passed.")
    p.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="deployments to test, one server each per engine setup (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each scenario on each deployment (default 1)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these scenarios only (file names in pipelines/sim/scenarios/)")
    p.add_argument("--concurrency", type=int, default=5, help="calls at once over all servers (default 5)")
    p.add_argument("--keep", metavar="DIR", help="keep servers' logs, call records and each call's heard audio here")
    p.add_argument("--json", help="result file (default: bench-results/scenarios-<UTC stamp>.json)")
    return p


# ---- runs ---------------------------------------------------------------------------------------------


async def _record_of(group: Group, call_id: str) -> Path | None:
    """The call's record directory once its `call_ended` line is written (or the wait is over)."""
    deadline = time.monotonic() + RECORD_WAIT
    found = None
    while time.monotonic() < deadline:
        found = next(iter(sorted(group.records.glob(f"*-{call_id}"))), None) if group.records else None
        if found and '"call_ended"' in (found / "events.jsonl").read_text(errors="replace"):
            return found
        await asyncio.sleep(0.1)
    return found


async def call_scenario(tgt: Target, scenario, url: str, call_id: str, clips: dict[str, np.ndarray],
                        records: Path | None = None, group: Group | None = None, progress=None):
    """Place one scenario call against a running server and judge it: (Run, CallResult or None, Context)."""
    from pipelines.sim.caller import Dtmf, HangUp, place_call
    from pipelines.sim.scenarios.checks import Context, analyze, evaluate, heard_summary, read_record

    timeline = scenario.render(tgt.rate)
    events = [Dtmf(at, digit, ms) for at, digit, ms in timeline.dtmf]
    if timeline.hang_up_at is not None:
        events.append(HangUp(timeline.hang_up_at))
    run = Run(scenario.name, tgt.provider, tgt.config.name, 0, call_id)
    result, error = None, None
    t0 = time.monotonic()
    try:
        result = await place_call(url, timeline.audio, tgt.rate, provider=tgt.provider, seconds=timeline.seconds,
                                  events=events, call_sid=call_id, stream_sid=call_id if tgt.provider == "browser" else f"MZ{call_id}",
                                  chunk_ms=tgt.uplink_ms, linger=LINGER, progress=progress)
    except Exception as exc:  # judged as a failed call, with the reason
        error = f"{type(exc).__name__}: {exc}"
    run.wall_secs = round(time.monotonic() - t0, 2)
    record_dir = await _record_of(group, call_id) if group else None
    if record_dir is None and records is not None:
        record_dir = next(iter(sorted(Path(records).glob(f"*-{call_id}"))), None)
    record = read_record(record_dir)
    heard = analyze(result, clips) if result is not None else None
    ctx = Context(scenario, timeline, result, heard, tgt.uplink_ms / 1000, record, error,
                  record_expected=group is not None or records is not None)
    run.checks = evaluate(ctx)
    run.heard = heard_summary(ctx, run.checks)
    run.error = error
    run.clears = len(result.clear_times) if result else 0
    run.record = str(record_dir) if record_dir else None
    if result is not None:
        run.first_audio_ms = first_audio_ms(result)
        run.underruns = underruns(result)
    ended = [e for e in record or [] if e.get("event") == "call_ended"]
    pacer = ((ended[-1].get("stats") or {}).get("pacer") or {}) if ended else {}
    if "underruns" in pacer:
        run.pacer_underruns = int(pacer["underruns"])
    return run, result, ctx


def plan_jobs(tgts: list[Target], suite: list, repeat: int, concurrency: int) -> tuple[dict[tuple, Group], list[tuple[Group, object, int]], list[str]]:
    """(the server groups: one per deployment and engine setup, the calls to place: (group, scenario,
    repeat index), longest first, and the notes on engines that fell back to another mode)."""
    notes: list[str] = []
    groups: dict[tuple, Group] = {}
    jobs: list[tuple[Group, object, int]] = []
    for index, tgt in enumerate(tgts):
        for scenario in suite:
            if tgt.provider not in scenario.providers:
                continue
            engine, note = engine_options(tgt, scenario)
            if note and note not in notes:
                notes.append(note)
            key = (index, json.dumps(engine, sort_keys=True))
            if key not in groups:
                groups[key] = Group(f"{tgt.provider}-{len(groups) + 1}", tgt, engine, [], 0, deployment=index)
            group = groups[key]
            group.scenarios.append(scenario.name)
            jobs += [(group, scenario, k) for k in range(repeat)]
    for group in groups.values():
        group.engines = max(1, min(concurrency, len(group.scenarios) * repeat))
    # Longest calls first, so the last wave is short; providers interleaved.
    jobs.sort(key=lambda j: (-j[1].render(j[0].target.rate).seconds, j[2], j[1].name, j[0].target.provider))
    return groups, jobs, notes


async def run_suite(configs: list[str] | None = None, only: list[str] | None = None, repeat: int = 1, concurrency: int = 5,
                    work_dir: str | os.PathLike | None = None, progress=print, suite: list | None = None) -> SuiteResult:
    """Every selected scenario `repeat` times on every deployment, through real servers; the judged runs.
    `suite`: these loaded scenarios instead of the shipped ones (`only` picks among them by name). The
    same file given twice is two deployments, each with its own servers (runs and servers carry the
    index of theirs in `configs`)."""
    from pipelines.sim import scenarios as scenario_mod
    from processors.audio import read_wav, write_wav

    t_start = time.monotonic()
    suite = scenario_mod.load_all(only) if suite is None else [s for s in suite if not only or s.name in only]
    tgts = [target(c) for c in (configs or DEFAULT_CONFIGS)]
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-scenarios-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    groups, jobs, notes = plan_jobs(tgts, suite, repeat, concurrency)

    clip_cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def clips_of(tgt: Target) -> dict[str, np.ndarray]:
        key = (str(tgt.config), tgt.rate)
        if key not in clip_cache:
            clip_cache[key] = {name: read_wav(path, tgt.rate) for name, path in tgt.clips.items()}
        return clip_cache[key]

    runs: list[Run] = []
    try:
        progress(f"starting {len(groups)} server(s) for {len(jobs)} calls ({len(suite)} scenarios x {len(tgts)} deployment(s) x {repeat})")
        await asyncio.gather(*(asyncio.to_thread(start_group, g, work) for g in groups.values()))
        for g in groups.values():
            if g.error:
                progress(f"server {g.name} ({g.target.config.name}) did not start: {g.error}")
        semaphore = asyncio.Semaphore(max(1, concurrency))
        audio_dir = work / "heard"
        shared_provider = len({t.provider for t in tgts}) < len(tgts)  # heard files then name the deployment
        audio_dir.mkdir(exist_ok=True)

        async def one(n: int, group: Group, scenario, k: int) -> None:
            call_id = f"scn-{n:03d}-{uuid.uuid4().hex[:8]}"
            if group.error:
                run = Run(scenario.name, group.target.provider, group.target.config.name, k, call_id,
                          error=f"server did not start: {group.error}")
                run.deployment = group.deployment
            else:
                async with semaphore:
                    run, result, _ = await call_scenario(group.target, scenario, group.target.url(group.port), call_id,
                                                         clips_of(group.target), group=group)
                    run.deployment = group.deployment
                    if result is not None:
                        tag = group.target.provider + (f"-d{group.deployment + 1}" if shared_provider else "")
                        write_wav(audio_dir / f"{scenario.name}-{tag}-r{k + 1}.wav", result.heard, result.sample_rate)
            run.repeat = k + 1
            run.note = next((n_ for n_ in notes if f" {scenario.name} ran " in n_), None)
            runs.append(run)
            failed = [c.kind for c in run.checks if not c.passed]
            who = f"{run.provider} #{run.deployment + 1}" if shared_provider else run.provider
            progress(f"[{len(runs)}/{len(jobs)}] {who:<7} {run.scenario:<24} r{run.repeat}: "
                     f"{'PASS' if run.passed else 'FAIL ' + ','.join(failed or ['error'])} -- {run.heard}")

        await asyncio.gather(*(one(n, g, s, k) for n, (g, s, k) in enumerate(jobs)))
    finally:
        await asyncio.gather(*(asyncio.to_thread(stop_group, g) for g in groups.values()))
        counts = Counter((r.deployment, r.scenario) for r in runs)
        servers = [{"name": g.name, "config": g.target.config.name, "deployment": g.deployment, "engine": g.engine,
                    "scenarios": g.scenarios, "error": g.error, "calls": sum(counts[(g.deployment, s)] for s in g.scenarios),
                    "cpu_secs": g.cpu_secs} for g in groups.values()]
        if tmp is not None:
            tmp.cleanup()
    order = {s.name: i for i, s in enumerate(suite)}
    runs.sort(key=lambda r: (order[r.scenario], r.deployment, r.repeat))
    return SuiteResult(runs, notes, servers, round(time.monotonic() - t_start, 1))


def bench_scenarios(args) -> int:
    """The scenario suite on each deployment: pass/fail per expectation, latencies, the issue's targets."""
    from loguru import logger

    logger.remove()  # the caller's per-violation warnings are in the table
    from pipelines.bench.harness import command_argv, guarded, machine_lines, write_json

    argv = command_argv(["bench", "scenarios", "..."])
    for line in machine_lines(argv):
        print(line)
    outcome: dict = {}

    def body() -> int:
        outcome["result"] = asyncio.run(run_suite(args.config, args.only, args.repeat, args.concurrency, args.keep,
                                                  progress=lambda line: print(line, flush=True)))
        return 0

    code = guarded(body)
    if code or "result" not in outcome:
        return code or 1
    result = outcome["result"]
    report(result)
    print(f"\nwritten: {write_json(args.json, 'scenarios', to_json(result, argv))}")
    if args.keep:
        print(f"logs, records and heard audio: {args.keep}")
    return 0 if result.passed else 1

