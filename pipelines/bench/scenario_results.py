"""`bench scenarios`' results: each judged run, the suite's, the figures the caller's own ears give
(first audio, underruns), the issue's targets, and the printed table, report and JSON."""

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.bench.received import GAP_TOLERANCE

TARGET_STOP_MS = 150.0


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
    from pipelines.bench.harness import table as render

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
    from pipelines.bench.harness import machine_lines

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
