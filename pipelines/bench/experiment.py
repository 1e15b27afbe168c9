"""`python -m pipelines experiment A.yaml B.yaml`: the scenario suite through two deployments, side by side.

Both deployments run the same conversation scenarios (pipelines/sim/scenarios/*.yaml, or `--scenarios DIR`)
as `bench scenarios` runs them (pipelines/bench/scenarios.py and its scenario_servers.py, scenario_results.py:
its servers, callers and checks): each deployment has its own server process(es), the calls of both run interleaved, at most
`--concurrency` at once, so both see the same machine. Per deployment:

- runs passed: runs whose every expectation held;
- barge-in latency: `bot_stopped_within_ms`, from the chunk carrying the moment the caller takes the
  floor to the end of the bot's last voiced audio (ms, p50 of every such check);
- replies heard: `reply_heard` checks passed of all, and the reply delay (s after the turn ended, p50);
- stale audio after clear: voiced chunks of the interrupted reply heard after the clear (sum);
- first audio: the first voiced chunk's arrival from the call's start (ms, p50; the greeting);
- underruns: a voiced chunk arriving after the caller's playout of the previous voiced one of the same
  utterance ran dry (per call, as heard; the server's pacer's own count beside it);
- CPU per call: the server processes' CPU seconds (/proc/PID/stat) from serving to stop, divided by
  their calls. The server also runs the embedded reference engines, the same work for A and B.

Printed: a table of each figure as A / B / B - A. Written: a JSON result (bench-results/
experiment-<UTC stamp>.json, or --out) and, next to it, a PNG of the distributions (A vs B per figure).
The exit status is 0 once both were measured, 1 if a server did not start, 2 for an unusable
deployment or scenario file.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CONCURRENCY = 4

# key, label, unit, summary ("p50", "sum", "ratio", "mean"), digits
METRICS = (
    ("passed", "runs passed", "", "ratio", 0),
    ("barge_in_ms", "barge-in latency p50", "ms", "p50", 0),
    ("replies_heard", "replies heard", "", "ratio", 0),
    ("reply_s", "reply delay p50", "s", "p50", 2),
    ("stale_chunks", "stale chunks after clear", "", "sum", 0),
    ("first_audio_ms", "first audio p50", "ms", "p50", 0),
    ("underruns", "underruns per call (heard)", "", "mean", 2),
    ("pacer_underruns", "pacer underruns per call", "", "mean", 2),
    ("cpu_per_call_s", "CPU per call", "s", "cpu", 3),
)
PLOTTED = ("barge_in_ms", "reply_s", "first_audio_ms", "stale_chunks", "underruns", "cpu_per_call_s")


def add_parser(subparsers):
    p = subparsers.add_parser("experiment", help="A/B: the scenario suite through two deployments, side by side",
                              description="Run the same conversation scenarios through two deployments, each its own "
                                          "server, and print barge-in latency, replies heard, stale audio, first audio, "
                                          "underruns and CPU per call as A / B / difference; write a JSON result and a PNG "
                                          "of the distributions.")
    p.add_argument("a", metavar="A.yaml", help="the baseline deployment (YAML path, or a file name in configs/)")
    p.add_argument("b", metavar="B.yaml", help="the deployment compared with it")
    p.add_argument("--scenarios", metavar="DIR", help="scenario files (*.yaml) to run (default: pipelines/sim/scenarios/)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these scenarios only (file names without .yaml)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each scenario on each deployment (default 1)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="calls at once over both deployments (default %(default)s)")
    p.add_argument("--keep", metavar="DIR", help="keep servers' logs, call records and each call's heard audio here")
    p.add_argument("--out", metavar="FILE.json", help="result file; the PNG goes next to it "
                                                      "(default: bench-results/experiment-<UTC stamp>.json)")
    p.set_defaults(func=experiment)
    return p


# ---- the scenarios --------------------------------------------------------------------------------------


def load_suite(directory: str | None, only: list[str] | None) -> list:
    """The scenarios of `directory` (default: the shipped ones), `only` these names; ConfigError naming the
    directory or the unknown names."""
    from pipelines.errors import ConfigError
    from pipelines.sim import scenarios

    if directory is None:
        return scenarios.load_all(only)
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(str(folder), None, "--scenarios", "no such directory")
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ConfigError(str(folder), None, "--scenarios", "no scenario files (*.yaml) in it")
    suite = [scenarios.load(f) for f in files]
    unknown = sorted(set(only or ()) - {s.name for s in suite})
    if unknown:
        raise ConfigError(str(folder), None, "--only", f"no such scenario: {', '.join(unknown)}; "
                                                        f"there: {', '.join(s.name for s in suite)}")
    return [s for s in suite if not only or s.name in only]


# ---- the figures ----------------------------------------------------------------------------------------


def p50(values: list[float]) -> float | None:
    return float(np.percentile(values, 50, method="inverted_cdf")) if values else None


def measure(runs: list, servers: list[dict]) -> dict:
    """One deployment's figures: for each metric its values (the distribution) and its summary."""
    values: dict[str, list[float]] = {key: [] for key, *_ in METRICS}
    passed = sum(1 for r in runs if r.passed)
    heard = [c for r in runs for c in r.checks if c.kind == "reply_heard"]
    for r in runs:
        values["barge_in_ms"] += r.values("bot_stopped_within_ms")
        values["reply_s"] += r.values("reply_heard")
        values["stale_chunks"] += r.values("no_stale_audio")
        if r.first_audio_ms is not None:
            values["first_audio_ms"].append(r.first_audio_ms)
        if r.underruns is not None:
            values["underruns"].append(float(r.underruns))
        if r.pacer_underruns is not None:
            values["pacer_underruns"].append(float(r.pacer_underruns))
    measured = [s for s in servers if s.get("cpu_secs") is not None and s.get("calls")]
    values["cpu_per_call_s"] = [s["cpu_secs"] / s["calls"] for s in measured]
    cpu = sum(s["cpu_secs"] for s in measured)
    calls = sum(s["calls"] for s in measured)
    summary = {
        "passed": [passed, len(runs)],
        "replies_heard": [sum(c.passed for c in heard), len(heard)],
        "cpu_per_call_s": round(cpu / calls, 4) if calls else None,
    }
    for key, _, _, how, _ in METRICS:
        v = values[key]
        if how == "p50":
            summary[key] = p50(v)
        elif how == "sum":
            summary[key] = float(sum(v)) if v else None
        elif how == "mean":
            summary[key] = float(np.mean(v)) if v else None
    values["passed"] = [float(r.passed) for r in runs]
    values["replies_heard"] = [float(c.passed) for c in heard]
    return {"summary": summary, "values": values, "n": {key: len(v) for key, v in values.items()},
            "cpu_secs": round(cpu, 3) if measured else None, "calls": len(runs)}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell(key: str, figures: dict) -> str:
    """One deployment's summary of `key` as printed."""
    _, _, unit, how, digits = next(m for m in METRICS if m[0] == key)
    value = figures["summary"][key]
    if how == "ratio":
        return f"{value[0]}/{value[1]}"
    text = _num(value, digits)
    if value is None:
        return text
    n = figures["n"][key]
    return f"{text} {unit}".rstrip() + (f" (n={n})" if how == "p50" else "")


def difference(key: str, a: dict, b: dict) -> tuple[float | None, str]:
    """B - A of `key`'s summary: (the number, as printed). Ratios of equal size differ by their count, else
    by percentage points; a p50, a mean or CPU also by percent of A."""
    _, _, unit, how, digits = next(m for m in METRICS if m[0] == key)
    va, vb = a["summary"][key], b["summary"][key]
    if how == "ratio":
        (ka, na), (kb, nb) = va, vb
        if not na or not nb:
            return None, "-"
        if na == nb:
            return float(kb - ka), f"{kb - ka:+d}"
        pp = 100 * (kb / nb - ka / na)
        return pp, f"{pp:+.0f} pp"
    if va is None or vb is None:
        return None, "-"
    d = vb - va
    text = f"{d:+.{digits}f} {unit}".rstrip()
    if how != "sum" and va:
        text += f" ({100 * d / abs(va):+.0f}%)"
    return d, text


def rows(a: dict, b: dict) -> list[list[str]]:
    """The table: one row per metric, [label, A, B, B - A]."""
    return [[label, cell(key, a), cell(key, b), difference(key, a, b)[1]] for key, label, *_ in METRICS]


def failures(done: dict) -> list[str]:
    """One line per deployment and scenario with failed runs: how many, and the expectations that failed."""
    from collections import Counter

    lines = []
    for side in "AB":
        by_scenario: dict[str, list] = {}
        for r in done[side]["runs"]:
            if not r.passed:
                by_scenario.setdefault(r.scenario, []).append(r)
        for scenario, runs in by_scenario.items():
            kinds = Counter(c.kind for r in runs for c in r.checks if not c.passed)
            why = ", ".join(kinds) + (", error" if any(r.error for r in runs) else "")
            total = sum(1 for r in done[side]["runs"] if r.scenario == scenario)
            lines.append(f"failed in {side}: {scenario} {len(runs)}/{total} ({why})")
    return lines


def render_table(a: dict, b: dict, name_a: str, name_b: str) -> str:
    from pipelines.bench.harness import table

    return table(["", f"A: {name_a}", f"B: {name_b}", "B - A"], rows(a, b), first_width=26)


# ---- the picture ---------------------------------------------------------------------------------------------


def plot(a: dict, b: dict, name_a: str, name_b: str, path: str | Path) -> Path:
    """A PNG of each plotted metric's distribution: a box and the points of A and of B."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = {key: (label, unit) for key, label, unit, *_ in METRICS}
    fig = Figure(figsize=(13, 7.5), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    colors = ("#1f77b4", "#ff7f0e")
    for i, key in enumerate(PLOTTED):
        ax = fig.add_subplot(2, 3, i + 1)
        label, unit = labels[key]
        title = label.replace(" p50", "").replace(" (heard)", "") + (", per server" if key == "cpu_per_call_s" else "")
        ax.set_title(title + (f" ({unit})" if unit else ""), fontsize=10)
        data = [a["values"][key], b["values"][key]]
        if not any(data):
            ax.text(0.5, 0.5, "no data in these scenarios", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            present = [d if d else [np.nan] for d in data]
            ax.boxplot(present, widths=0.5, showfliers=False, medianprops={"color": "black"})
            for k, (d, color) in enumerate(zip(data, colors)):
                if d:
                    x = k + 1 + rng.uniform(-0.12, 0.12, len(d))
                    ax.scatter(x, d, s=16, color=color, alpha=0.75, zorder=3)
        ax.set_xticks([1, 2], [f"A (n={len(data[0])})", f"B (n={len(data[1])})"])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"A: {name_a}   vs   B: {name_b}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ---- the command -------------------------------------------------------------------------------------------


async def run_experiment(config_a: str, config_b: str, suite: list, repeat: int = 1, concurrency: int = DEFAULT_CONCURRENCY,
                         work_dir: str | None = None, progress=print) -> dict:
    """Both deployments through `suite` (bench_scenarios.run_suite); the figures of each and the runs."""
    from pipelines.bench.scenarios import run_suite

    result = await run_suite([config_a, config_b], None, repeat, concurrency, work_dir, progress=progress, suite=suite)
    out = {"wall_secs": result.wall_secs, "notes": result.notes, "servers": result.servers, "result": result}
    for index, side in enumerate("AB"):
        runs = [r for r in result.runs if r.deployment == index]
        servers = [s for s in result.servers if s["deployment"] == index]
        out[side] = measure(runs, servers)
        out[side]["runs"] = runs
    return out


def to_json(done: dict, names: tuple[str, str], suite: list, repeat: int, argv: list[str]) -> dict:
    from dataclasses import asdict

    from pipelines.bench.harness import machine_lines

    def run_dict(r) -> dict:
        d = {k: v for k, v in asdict(r).items() if k != "checks"}
        d["passed"] = r.passed
        d["checks"] = [{"kind": c.kind, "passed": c.passed, "detail": c.detail, "value": c.value} for c in r.checks]
        return d

    sides = {}
    for side, name in zip("AB", names):
        fig = done[side]
        sides[side] = {"config": name, "summary": fig["summary"], "values": fig["values"], "n": fig["n"],
                       "cpu_secs": fig["cpu_secs"], "calls": fig["calls"], "runs": [run_dict(r) for r in fig["runs"]]}
    diff = {key: difference(key, done["A"], done["B"])[0] for key, *_ in METRICS}
    return {"bench": "experiment", "machine": machine_lines(argv), "wall_secs": done["wall_secs"],
            "scenarios": [s.name for s in suite], "repeat": repeat, "notes": done["notes"], "servers": done["servers"],
            "metrics": {key: {"label": label, "unit": unit, "summary": how} for key, label, unit, how, _ in METRICS},
            "A": sides["A"], "B": sides["B"], "difference": diff, "table": rows(done["A"], done["B"])}


def experiment(args) -> int:
    """`python -m pipelines experiment A.yaml B.yaml`: the table, the JSON and the PNG; exit 0, 1 or 2."""
    from loguru import logger

    from pipelines.bench.harness import command_argv, guarded, machine_lines
    from pipelines.bench.scenario_servers import target
    from pipelines.extras import require

    require("matplotlib", "report", "the experiment's distribution PNG")  # before minutes of calls, not after
    logger.remove()  # the caller's per-violation warnings are in the runs
    given = [f"--{k}={v}" for k, v in (("scenarios", args.scenarios), ("repeat", args.repeat), ("concurrency", args.concurrency))
             if v is not None and v != {"repeat": 1, "concurrency": DEFAULT_CONCURRENCY}.get(k)]
    argv = command_argv(["experiment", args.a, args.b, *given, *(["--only", *args.only] if args.only else [])])
    outcome: dict = {}

    def body() -> int:
        for config in (args.a, args.b):
            target(config)  # a missing or unusable file, or a provider the caller does not speak: exit 2 now
        if args.repeat < 1 or args.concurrency < 1:
            print("error: --repeat and --concurrency must be at least 1", file=sys.stderr)
            return 2
        suite = load_suite(args.scenarios, args.only)
        for line in machine_lines(argv):
            print(line)
        outcome["suite"] = suite
        outcome["done"] = asyncio.run(run_experiment(args.a, args.b, suite, args.repeat, args.concurrency, args.keep,
                                                     progress=lambda line: print(line, flush=True)))
        return 0

    code = guarded(body)
    if code or "done" not in outcome:
        return code or 1
    done, suite = outcome["done"], outcome["suite"]
    names = (args.a, args.b)
    print()
    print(render_table(done["A"], done["B"], *names))
    for line in failures(done):
        print(line)
    for note in done["notes"]:
        print(f"note: {note}")
    failed = [s for s in done["servers"] if s["error"]]
    for s in failed:
        print(f"error: a server for {'AB'[s['deployment']]} ({s['config']}) did not start: {s['error']}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out or f"bench-results/experiment-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(done, names, suite, args.repeat, argv), indent=1, default=str) + "\n")
    png = plot(done["A"], done["B"], *names, out.with_suffix(".png"))
    print(f"\n{len(done['result'].runs)} calls in {done['wall_secs']:.0f} s; written: {out}, {png}")
    if args.keep:
        print(f"logs, records and heard audio: {args.keep}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (the CLI wires `add_parser`): `python -m pipelines.bench.experiment A.yaml B.yaml ...`."""
    import argparse

    top = argparse.ArgumentParser(prog="python -m pipelines")
    add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["experiment", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
