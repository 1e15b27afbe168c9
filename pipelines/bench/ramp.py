"""`bench load --pin` and `--ramp`: the bridge alone on one core, and the load at which a target first breaks.

Pinning (`--pin`): this process (the callers) pins itself to every CPU it may use but the first before
anything is launched, so the engine processes inherit that set; once the bridge (or the stock server)
is up, each of its threads is moved to the first CPU (`os.sched_setaffinity` per /proc/PID/task), and
the engines' threads are pinned to the rest explicitly. That core's own busy time (/proc/stat `cpuN`)
is sampled too, so that what else ran on it (`core other %`) is reported beside the bridge's share.

The ramp (`--ramp 10,20,30`) runs the load at each step in turn, a fresh fleet (one engine per call)
per step, and stops after the first step at which a target breaks (`--keep-going`: runs every step).
The targets (module constants, figure names as in the load result):
chunk_violations <= MAX_CHUNK_VIOLATIONS, underruns.count <= MAX_UNDERRUNS (inside bot speech),
barge-in p50 <= MAX_BARGE_IN_P50_MS counted from the chunk on which the bridge's floor rule was met
(barge_in_floor_ms; stock pipecat, which keeps no record and cuts on the VAD's start, from the onset
chunk: barge_in_ms) and barge_in_ms.missed <= MAX_BARGE_IN_MISSED,
first_audio_ms.p95 <= MAX_FIRST_AUDIO_P95_MS (not for stock pipecat, whose bot first speaks at 8.5 s
by design), failed <= MAX_FAILED.
"""

import os

from pipelines.bench.harness import int_text
from pipelines.bench.load_figures import cpu_percent

MAX_CHUNK_VIOLATIONS = 0
MAX_UNDERRUNS = 0
MAX_BARGE_IN_P50_MS = 150.0
MAX_BARGE_IN_MISSED = 0
MAX_FIRST_AUDIO_P95_MS = 300.0
MAX_FAILED = 0

TARGETS_HELP = (f"targets: chunk_violations <= {MAX_CHUNK_VIOLATIONS}, underruns <= {MAX_UNDERRUNS}, "
                f"barge-in p50 <= {MAX_BARGE_IN_P50_MS:g} from the floor rule's chunk (stock: the onset's; missed <= {MAX_BARGE_IN_MISSED}), "
                f"first_audio_ms.p95 <= {MAX_FIRST_AUDIO_P95_MS:g} (not for --server stock), failed <= {MAX_FAILED}")

HEADER = ["calls", "bridge % of core", "% per call", "core other %", "engines/callers/other %", "violations", "underruns",
          "barge-in p50 ms onset/floor", "first audio p95 ms", "RSS MB peak", "failed", "broke"]


# ---- the ramp ------------------------------------------------------------------------------------


def parse_ramp(text: str) -> list[int]:
    """'10,20,30' -> [10, 20, 30]: positive, strictly increasing call counts; ValueError otherwise."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ramp takes call counts separated by commas, not {text!r}") from None
    if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"--ramp needs positive, increasing call counts, not {text!r}")
    return steps


def broken_targets(result: dict, stock: bool = False) -> list[str]:
    """The names of the targets one load result misses (a figure that could not be taken misses too)."""
    b, fa = result["barge_in_ms"], result["first_audio_ms"]
    barge_in = b["p50"] if stock else result["barge_in_floor_ms"]["p50"]
    broke = []
    if result["chunk_violations"] > MAX_CHUNK_VIOLATIONS:
        broke.append("chunk_violations")
    if result["underruns"]["count"] > MAX_UNDERRUNS:
        broke.append("underruns")
    if barge_in is None or barge_in > MAX_BARGE_IN_P50_MS:
        broke.append("barge_in_ms.p50" if stock else "barge_in_floor_ms.p50")
    if b["missed"] > MAX_BARGE_IN_MISSED:
        broke.append("barge_in_ms.missed")
    if not stock and (fa["p95"] is None or fa["p95"] > MAX_FIRST_AUDIO_P95_MS):
        broke.append("first_audio_ms.p95")
    if result["failed"] > MAX_FAILED:
        broke.append("failed")
    return broke


def ramp_row(result: dict, broke: list[str]) -> list:
    """One table row per step (see HEADER); CPU over the window where every call is up."""
    cpu = result["cpu_pct"]
    others = "/".join(int_text(cpu.get(k)) for k in ("engines", "callers", "others"))
    return [result["calls"], int_text(cpu["bridge"]), _num(cpu["bridge_per_call"]), int_text(cpu.get("core_others")), others,
            result["chunk_violations"], f"{result['underruns']['count']} ({result['underruns']['ms']:.0f} ms)",
            int_text(result["barge_in_ms"]["p50"]) + "/" + int_text((result.get("barge_in_floor_ms") or {}).get("p50"))
            + (f" ({result['barge_in_ms']['missed']} missed)" if result["barge_in_ms"]["missed"] else ""),
            int_text(result["first_audio_ms"]["p95"]), int_text(result["rss_mb"]["peak"]), result["failed"], ", ".join(broke) or "-"]


def markdown(header: list[str], rows: list[list]) -> str:
    """The same rows as a Markdown table, for BENCHMARKS.md."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


# ---- pinning -------------------------------------------------------------------------------------


def split_cpus(cpus: set[int]) -> tuple[int, set[int]]:
    """(the bridge's core, the others') from the CPUs this process may use; ValueError with fewer than two."""
    if len(cpus) < 2:
        raise ValueError(f"--pin needs at least two usable CPUs, this process has {sorted(cpus)}")
    core = min(cpus)
    return core, cpus - {core}


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit it); gone threads are skipped."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def core_cpu_secs(core: int) -> float | None:
    """CPU seconds core `core` has been busy (its /proc/stat line: all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            line = next(line for line in f if line.startswith(f"cpu{core} "))
        ticks = [int(v) for v in line.split()[1:]]
    except (OSError, StopIteration, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def core_figures(samples: list[dict], window: tuple[float, float] | None) -> dict:
    """The bridge's core: % busy over `window`, and the part of it that was not the bridge."""
    busy, bridge = cpu_percent(samples, "core_cpu", window), cpu_percent(samples, "bridge_cpu", window)
    return {"core": busy, "core_others": None if None in (busy, bridge) else round(busy - bridge, 1)}
