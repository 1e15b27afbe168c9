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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = ("exotel.yaml", "twilio.yaml", "browser.yaml")
UPLINK_MS = {"exotel": 100, "twilio": 20}  # each provider's caller chunk (the browser's is its config's chunk_ms)
LINGER = 5.0  # after the caller hangs up, the server has this long to close the socket
RECORD_WAIT = 5.0  # and this long to finish the call's record
TARGET_STOP_MS = 150.0
TARGETS = ("replies heard", "stale chunks after clear", "stop latency p50", "backchannel cuts")


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


# ---- deployments and servers ----------------------------------------------------------------------


@dataclass
class Target:
    """One deployment under test: how its callers dial and what its holding clips are."""

    config: Path
    provider: str
    rate: int
    uplink_ms: int
    path: str
    twiml_path: str | None
    clips: dict[str, Path]
    reference: dict  # the file's engine.reference

    def url(self, port: int) -> str:
        if self.provider == "twilio" and self.twiml_path:
            return f"http://127.0.0.1:{port}{self.twiml_path}"
        return f"ws://127.0.0.1:{port}{self.path}"


def target(config: str | os.PathLike) -> Target:
    """Read a deployment file (validated as `run` would) into a Target."""
    import yaml

    from pipelines import builder
    from pipelines import config as config_mod

    loaded = config_mod.load(config)
    deployment = builder.plan(loaded)
    provider = loaded.config.transport.type
    tp = deployment.transport_params
    if provider not in ("exotel", "twilio", "browser"):
        raise config_mod.ConfigError(str(loaded.path), None, "transport.type",
                                     f"the simulated caller speaks exotel, twilio and browser, not {provider!r}")
    rate = getattr(tp, "sample_rate", 8000) if provider == "browser" else 8000
    uplink = getattr(tp, "chunk_ms", 40) if provider == "browser" else UPLINK_MS[provider]
    clips: dict[str, Path] = {}
    for proc in deployment.processors:
        if proc.entry.name == "holding":
            for name, given in proc.params.clips.items():
                path = Path(given)
                candidates = [path] if path.is_absolute() else [loaded.path.parent / path, config_mod.CONFIG_DIR / path]
                found = next((c for c in candidates if c.is_file()), None)
                if found:
                    clips[name] = found
    raw = yaml.safe_load(loaded.path.read_text())
    reference = dict(((raw.get("engine") or {}).get("reference")) or {})
    return Target(loaded.path, provider, rate, uplink, getattr(tp, "path", "/"), getattr(tp, "twiml_path", None), clips, reference)


def engine_options(tgt: Target, scenario) -> tuple[dict, str | None]:
    """The reference engine for this scenario on this deployment: converse mode, the scenario's
    overrides and script lines. Where the installed engine has no converse mode, the deployment's own
    mode, and a note saying so."""
    from pydantic import ValidationError

    from pipelines.errors import ConfigError
    from pipelines.sim.engine.reference import EngineOptions

    opts = {**tgt.reference, "mode": "converse", **scenario.model.engine}
    handshake = float(opts.get("handshake_delay", EngineOptions.model_fields["handshake_delay"].default))
    script = scenario.engine_script(handshake)
    if script:
        opts["script"] = script
    try:
        EngineOptions.model_validate(opts)
        return opts, None
    except ValidationError as exc:
        mode_error = any(e["loc"] == ("mode",) for e in exc.errors())
        if not mode_error or "mode" in scenario.model.engine:
            raise ConfigError(str(scenario.path), None, "engine", f"the reference engine refuses {opts}: {exc.errors()[0]['msg']}") from None
    fallback = {**opts, "mode": tgt.reference.get("mode", "echo")}
    if fallback["mode"] not in ("script",):
        fallback.pop("script", None)
    return fallback, (f"the reference engine has no `converse` mode: {scenario.name} ran against {fallback['mode']!r} mode"
                      + (", without its script lines" if script else ""))


@dataclass
class Group:
    """One server process: a deployment with one engine setup, serving the scenarios that need it."""

    name: str
    target: Target
    engine: dict
    scenarios: list[str]
    engines: int
    port: int = 0
    records: Path | None = None
    log: Path | None = None
    error: str | None = None
    handle: object = None  # the `launched` context while it runs
    deployment: int = 0  # index of its deployment in run_suite's `configs`
    pid: int | None = None
    cpu_at_ready: float | None = None  # the server process's CPU seconds once it was serving
    cpu_secs: float | None = None  # ... used from then until just before it was stopped


def _yaml(tgt: Target, group: Group, work: Path) -> Path:
    import yaml

    cfg = yaml.safe_load(tgt.config.read_text())
    cfg.setdefault("engine", {})["reference"] = group.engine
    cfg["engine"]["local_engines"] = group.engines
    cfg["records"] = {"dir": str(group.records), "audio": False}
    path = work / f"{group.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start(group: Group, work: Path) -> None:
    """Launch the group's server (blocking: run in a thread); on failure, group.error says why."""
    from pipelines.bench.conversation import keep_log, process_cpu_secs
    from pipelines.bench.fleet import bench_env
    from pipelines.bench.launch import free_port, launched, run_command

    group.records = work / "records" / group.name
    group.records.mkdir(parents=True, exist_ok=True)
    group.log = work / f"{group.name}.log"
    path = _yaml(group.target, group, work)
    for _ in range(3):  # a port taken between picking and binding: try another
        group.port = free_port()
        context = launched(run_command(path, group.port), group.port, env=bench_env(), timeout=120)
        try:
            server = context.__enter__()
        except RuntimeError as exc:
            group.error = str(exc).strip().splitlines()[-1] if str(exc).strip() else "did not start"
            if "address already in use" in str(exc).lower():
                continue
            group.log.write_text(str(exc))
            return
        keep_log(server.proc, server.startup, str(group.log))
        group.handle, group.error = context, None
        group.pid = server.proc.pid
        group.cpu_at_ready = process_cpu_secs(group.pid)
        return


def _stop(group: Group) -> None:
    from pipelines.bench.conversation import process_cpu_secs

    if group.handle is not None:
        cpu = process_cpu_secs(group.pid)
        if cpu is not None and group.cpu_at_ready is not None:
            group.cpu_secs = round(cpu - group.cpu_at_ready, 3)
        group.handle.__exit__(None, None, None)
        group.handle = None


# ---- runs ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    provider: str
    config: str
    repeat: int
    call_id: str
    checks: list = field(default_factory=list)  # checks.Check
    heard: str = ""
    error: str | None = None
    clears: int = 0
    wall_secs: float = 0.0
    record: str | None = None
    note: str | None = None
    deployment: int = 0  # index of its deployment in run_suite's `configs`
    first_audio_ms: float | None = None  # the first voiced chunk's arrival, from the call's start
    underruns: int | None = None  # the caller's playout ran dry inside an utterance (see `underruns`)
    pacer_underruns: int | None = None  # the server's pacer's own count (its call record)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def values(self, kind: str) -> list[float]:
        return [c.value for c in self.checks if c.kind == kind and c.value is not None]


@dataclass
class SuiteResult:
    runs: list[Run]
    notes: list[str]
    servers: list[dict]
    wall_secs: float

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(r.passed for r in self.runs) and all(t["met"] for t in targets(self.runs))


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


GAP_TOLERANCE = 0.005  # playout gaps up to this long are not underruns (as processors/pacer.py)


def first_audio_ms(result) -> float | None:
    """When the caller first heard voiced audio (a chunk's arrival), ms from the call's start."""
    return next((round(c.t * 1000, 1) for c in result.chunks if c.voiced), None)


def underruns(result, tolerance: float = GAP_TOLERANCE) -> int:
    """Underruns the caller heard: a voiced chunk arriving more than `tolerance` after the playout of the
    previous chunk, itself voiced, had run dry. A mark (the end of an utterance) or a clear ends the run
    of speech, so the pause between two utterances is not one."""
    breaks = sorted([t for t, _ in result.marks] + list(result.clear_times))
    rate = result.sample_rate
    n, b, prev = 0, 0, None
    for c in result.chunks:
        while b < len(breaks) and breaks[b] <= c.t:
            b, prev = b + 1, None
        if c.voiced and prev is not None and prev.voiced and c.t > (prev.start + prev.samples) / rate + tolerance:
            n += 1
        prev = c
    return n


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

    clip_cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def clips_of(tgt: Target) -> dict[str, np.ndarray]:
        key = (str(tgt.config), tgt.rate)
        if key not in clip_cache:
            clip_cache[key] = {name: read_wav(path, tgt.rate) for name, path in tgt.clips.items()}
        return clip_cache[key]

    runs: list[Run] = []
    try:
        progress(f"starting {len(groups)} server(s) for {len(jobs)} calls ({len(suite)} scenarios x {len(tgts)} deployment(s) x {repeat})")
        await asyncio.gather(*(asyncio.to_thread(_start, g, work) for g in groups.values()))
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
        await asyncio.gather(*(asyncio.to_thread(_stop, g) for g in groups.values()))
        counts = Counter((r.deployment, r.scenario) for r in runs)
        servers = [{"name": g.name, "config": g.target.config.name, "deployment": g.deployment, "engine": g.engine,
                    "scenarios": g.scenarios, "error": g.error, "calls": sum(counts[(g.deployment, s)] for s in g.scenarios),
                    "cpu_secs": g.cpu_secs} for g in groups.values()]
        if tmp is not None:
            tmp.cleanup()
    order = {s.name: i for i, s in enumerate(suite)}
    runs.sort(key=lambda r: (order[r.scenario], r.deployment, r.repeat))
    return SuiteResult(runs, notes, servers, round(time.monotonic() - t_start, 1))


# ---- figures --------------------------------------------------------------------------------------------


def p50(values: list[float]) -> float | None:
    return float(np.percentile(values, 50, method="inverted_cdf")) if values else None


def targets(runs: list[Run]) -> list[dict]:
    """The issue's targets over all runs."""
    reply = [c for r in runs for c in r.checks if c.kind == "reply_heard"]
    stale = [c for r in runs for c in r.checks if c.kind == "no_stale_audio"]
    stops = [v for r in runs for v in r.values("bot_stopped_within_ms")]
    from pipelines.sim.scenarios import load_all

    tagged = {s.name for s in load_all() if "backchannel" in s.tags}
    bc = [r for r in runs if r.scenario in tagged]
    cut = [r for r in bc if r.clears > 0 or r.error]
    heard = sum(c.passed for c in reply)
    stale_n = sum(int(c.value) for c in stale if c.value is not None)
    stale_unknown = sum(c.value is None for c in stale)
    stop = p50(stops)
    return [
        {"target": "replies heard", "want": "100% of runs that expect one", "value": f"{heard}/{len(reply)}",
         "met": heard == len(reply)},
        {"target": "stale chunks after clear", "want": "0 voiced",
         "value": f"{stale_n}" + (f" (+{stale_unknown} runs without the clear)" if stale_unknown else ""),
         "met": stale_n == 0 and stale_unknown == 0},
        {"target": "stop latency p50", "want": f"<= {TARGET_STOP_MS:.0f} ms", "value": "-" if stop is None else f"{stop:.0f} ms",
         "met": stop is not None and stop <= TARGET_STOP_MS or (not stops and not any(c.kind == "bot_stopped_within_ms" for r in runs for c in r.checks))},
        {"target": "backchannel cuts", "want": "0 runs", "value": f"{len(cut)}/{len(bc)} runs", "met": not cut},
    ]


def table(result: SuiteResult) -> str:
    from pipelines.bench.conversation import table as render

    rows = []
    seen: dict[tuple[str, str], list[Run]] = {}
    for r in result.runs:
        seen.setdefault((r.scenario, r.provider), []).append(r)
    for (scenario, provider), runs in seen.items():
        failed = Counter(c.kind for r in runs for c in r.checks if not c.passed)
        errors = sum(1 for r in runs if r.error)
        fails = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in failed.items()) + (f" error x{errors}" if errors else "")
        reply = p50([v for r in runs for v in r.values("reply_heard")])
        stop = p50([v for r in runs for v in r.values("bot_stopped_within_ms")])
        shown = next((r for r in runs if not r.passed), runs[0])
        rows.append([scenario, provider, f"{sum(r.passed for r in runs)}/{len(runs)}", fails or "-",
                     "-" if reply is None else f"{reply:+.2f}", "-" if stop is None else f"{stop:.0f}", shown.heard])
    return render(["scenario", "provider", "pass", "failed expectations", "reply s", "stop ms", "heard"], rows, first_width=24)


def report(result: SuiteResult, print_=print) -> None:
    print_("")
    print_(table(result))
    failing = [r for r in result.runs if not r.passed]
    if failing:
        print_("\nfailures:")
        for r in failing[:40]:
            if r.error and not r.checks:
                print_(f"  {r.scenario} / {r.provider} r{r.repeat}: {r.error}")
            for c in r.checks:
                if not c.passed:
                    print_(f"  {r.scenario} / {r.provider} r{r.repeat}: {c.label}: {c.detail}")
    for note in result.notes:
        print_(f"\nnote: {note}")
    n = len(result.runs)
    passed = sum(r.passed for r in result.runs)
    checks = [c for r in result.runs for c in r.checks]
    print_(f"\nruns passed: {passed}/{n} ({100 * passed / n if n else 0:.0f}%); expectations passed: "
           f"{sum(c.passed for c in checks)}/{len(checks)}; {result.wall_secs:.0f} s")
    print_("targets:")
    for t in targets(result.runs):
        print_(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']} (want {t['want']})")


def to_json(result: SuiteResult, argv: list[str]) -> dict:
    from pipelines.bench.conversation import machine_lines

    def run_dict(r: Run) -> dict:
        d = {k: v for k, v in asdict(r).items() if k != "checks"}
        d["passed"] = r.passed
        d["checks"] = [{"kind": c.kind, "expect": c.label, "passed": c.passed, "detail": c.detail, "value": c.value, **c.extra}
                       for c in r.checks]
        return d

    return {"bench": "scenarios", "machine": machine_lines(argv), "wall_secs": result.wall_secs, "notes": result.notes,
            "servers": result.servers, "passed": result.passed,
            "runs_passed": sum(r.passed for r in result.runs), "runs": [run_dict(r) for r in result.runs],
            "targets": targets(result.runs)}


def bench_scenarios(args) -> int:
    """The scenario suite on each deployment: pass/fail per expectation, latencies, the issue's targets."""
    from loguru import logger

    logger.remove()  # the caller's per-violation warnings are in the table
    from pipelines.bench.conversation import machine_lines
    from pipelines.bench.harness import command_argv, guarded, write_json

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
