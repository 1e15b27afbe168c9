"""`bench load`'s figures: pure functions of its per-call rows, the speech gaps its callers heard and
the /proc samples taken while they ran (pipelines/bench/load.py drives the calls and prints these)."""

from collections import Counter
from urllib.parse import urlsplit

from pipelines.bench.fleet import CallRun, is_failed
from pipelines.bench.received import audible_secs, call_figures, gap_figures, percentile

ALL_UP_MARGIN = 2.0  # the all-calls-up CPU window opens this long after the last call started
MIN_WINDOW = 1.0  # a shorter all-up window gives no figure
KILL_MARGIN = 0.5  # audio arriving later than this after the kill was not queued before it (lead 0.2 + jitter 0.12)
APOLOGY_SECS = 1.0  # this much audible audio after the kill counts as the apology heard


def all_up_window(starts: list[float], ends: list[float], margin: float = ALL_UP_MARGIN) -> tuple[float, float] | None:
    """(last start + margin, first end): while every call is up; None when shorter than MIN_WINDOW."""
    if not starts or not ends:
        return None
    t0, t1 = max(starts) + margin, min(ends)
    return (t0, t1) if t1 - t0 >= MIN_WINDOW else None


def cpu_percent(samples: list[dict], key: str, window: tuple[float, float] | None) -> float | None:
    """% of one core that `key` used between the first and the last sample inside `window`."""
    if window is None:
        return None
    inside = [s for s in samples if window[0] <= s["t"] <= window[1] and s.get(key) is not None]
    if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
        return None
    return round((inside[-1][key] - inside[0][key]) / (inside[-1]["t"] - inside[0]["t"]) * 100, 1)


def others_percent(samples: list[dict], window: tuple[float, float] | None) -> float | None:
    """% of one core the rest of the machine used meanwhile (all busy CPU minus the bench's processes):
    on a shared machine, this says whether the figures were taken under contention."""
    machine, bridge, callers = (cpu_percent(samples, key, window) for key in ("machine_cpu", "bridge_cpu", "callers_cpu"))
    engines = cpu_percent(samples, "engines_cpu", window) or 0.0  # the stock server has none
    return None if None in (machine, bridge, callers) else round(machine - bridge - callers - engines, 1)


def kill_effects(rows: list[dict]) -> dict:
    """The calls that lost their engine (did the bridge fail them, apologise audibly, hang up cleanly)
    and the others (were they disturbed)."""
    lost = [r for r in rows if r.get("lost_engine")]
    others = [r for r in rows if not r.get("lost_engine")]
    return {
        "lost": {"calls": len(lost), "engine_failed": sum(r.get("outcome") == "engine_failed" for r in lost),
                 "apology_heard": sum((r.get("audible_after_kill_s") or 0) >= APOLOGY_SECS for r in lost),
                 "clean_hang_up": sum(bool(r.get("hung_up_by_bridge")) and r.get("close_code") == 1000 for r in lost)},
        "others": {"calls": len(others), "completed": sum(r.get("outcome") == "completed" for r in others),
                   "underruns": sum(r.get("underruns") or 0 for r in others),
                   "stray_clears": sum(r.get("stray_clears") or 0 for r in others),
                   "barge_in_missed": sum(r.get("barge_in_ms") is None for r in others)},
    }


def engine_port(url: str | None) -> int | None:
    return urlsplit(url).port if url else None


def call_row(run: CallRun, t0: float, onset: float, record: dict | None, duration: float, kill: dict | None) -> dict:
    """One call's figures; `record` is its bridge record (None: the stock server keeps none). `onset`:
    the arrival of the caller's chunk holding the speech onset; barge-in counts from there and,
    `barge_in_floor_ms`, from the arrival of the chunk on which the bridge's rule was met."""
    row = {"sid": run.sid, "start_s": round(run.start - t0, 3), "secs": round(run.end - run.start, 2), "error": run.error,
           "violations": len(run.violations or []), "close_code": run.close_code, "sent_s": round(run.sent_secs, 2)}
    if run.messages is not None:
        row |= call_figures(run.messages, onset)
    if record is not None:
        row |= {"outcome": record["outcome"], "engine_port": engine_port(record["engine_url"]), "apology": record["apology"]}
        decided = record.get("barge_in_audio_ms")
        if decided is not None and row.get("barge_in_ms") is not None:  # the chunk that decided it arrived at its end
            row["barge_in_floor_ms"] = round((onset + row["barge_in_ms"] / 1000 - run.unsent_secs - decided / 1000) * 1000, 1)
    if kill is not None and run.messages is not None:
        row |= {"lost_engine": row.get("engine_port") in kill["ports"],
                "audible_after_kill_s": round(audible_secs(run.messages, kill["t"] - run.start + KILL_MARGIN), 2),
                "hung_up_by_bridge": run.sent_secs < duration - 1e-6}
    return row


def figures(rows: list[dict], gaps: list[tuple[float, float]], samples: list[dict], calls: int) -> dict:
    """The run's figures from its per-call rows, speech gaps and /proc samples."""
    done = [r for r in rows if not r["error"]]
    lats = [r["barge_in_ms"] for r in done if r.get("barge_in_ms") is not None]
    floors = [r["barge_in_floor_ms"] for r in done if r.get("barge_in_floor_ms") is not None]
    firsts = [r["first_audio_ms"] for r in done if r.get("first_audio_ms") is not None]
    starts = [r["start_s"] for r in rows]
    ends = [r["start_s"] + r["secs"] for r in rows]
    window, whole = all_up_window(starts, ends), (min(starts), max(ends))
    bridge = cpu_percent(samples, "bridge_cpu", window)
    bridge_run = cpu_percent(samples, "bridge_cpu", whole)
    rss = [s["rss_mb"] for s in samples if s.get("rss_mb") is not None]
    return {
        "calls": len(rows), "failed": sum(is_failed(r) for r in rows), "errors": [f"{r['sid']}: {r['error']}" for r in rows if r["error"]],
        "outcomes": dict(Counter(r.get("outcome", "n/a") for r in rows)),
        "chunk_violations": sum(r["violations"] for r in rows),
        "underruns": {"count": sum(r.get("underruns", 0) for r in done), "ms": round(sum(r.get("underrun_ms", 0) for r in done), 1)},
        "output_gaps": gap_figures(gaps),
        "barge_in_ms": {"p50": percentile(lats, 50), "p95": percentile(lats, 95), "max": max(lats, default=None),
                        "missed": len(done) - len(lats), "early_clears": sum(r.get("early_clears", 0) for r in done)},
        "barge_in_floor_ms": {"p50": percentile(floors, 50), "p95": percentile(floors, 95), "max": max(floors, default=None)},
        "stray_clears": sum(r.get("stray_clears", 0) for r in done),
        "first_audio_ms": {"p50": percentile(firsts, 50), "p95": percentile(firsts, 95), "max": max(firsts, default=None),
                           "silent": len(done) - len(firsts)},
        "cpu_pct": {"all_up_window_s": window, "bridge": bridge, "bridge_per_call": _per(bridge, calls),
                    "engines": cpu_percent(samples, "engines_cpu", window), "callers": cpu_percent(samples, "callers_cpu", window),
                    "others": others_percent(samples, window),
                    "run_window_s": whole, "bridge_run": bridge_run, "bridge_run_per_call": _per(bridge_run, calls),
                    "engines_run": cpu_percent(samples, "engines_cpu", whole), "callers_run": cpu_percent(samples, "callers_cpu", whole),
                    "others_run": others_percent(samples, whole)},
        "rss_mb": {"start": rss[0] if rss else None, "peak": max(rss, default=None), "end": rss[-1] if rss else None},
    }


def _per(pct: float | None, calls: int) -> float | None:
    return None if pct is None else round(pct / calls, 2)
