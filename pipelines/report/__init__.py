"""`python -m pipelines report CALL_DIR`: one call's record as a timeline picture and a short summary.

A call is judged by what the caller heard and when: who spoke (turns, and the speech segments in
them), when the bot went quiet after a barge-in and what the model said that nobody heard (muted
spans), where holding clips covered a slow engine. Those moments are scattered over `events.jsonl`; laid out
on one time axis (with the recording's envelopes above, when there is one) they can be read at a glance.
Records of killed calls are read as far as they go: a torn last line is counted, not fatal, and an
interval still open closes at the last thing the record saw.
"""

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

CUTS_CLIP = ("barge_in", "clear", "speech_started", "holding")  # a `clear`, the model taking over (fade), the next clip
LANES = ("caller turns", "caller speech", "bot audible", "model speech", "holding clips")  # top to bottom
PAIRS = {  # lane or band: (opening event, closing event); an opening event's `onset`, when given, is its start
    "caller turns": ("turn_started", "turn_ended"),
    "caller speech": ("user_started", "user_stopped"),
    "bot audible": ("bot_started", "bot_stopped"),
    "model speech": ("speech_started", "speech_stopped"),
    "model muted": ("mute_started", "mute_ended"),
}
BANDS = {"model muted": "model speech"}  # drawn over a lane's row rather than on their own
LANE_COLORS = {"caller turns": "tab:cyan", "caller speech": "tab:blue", "bot audible": "tab:orange",
               "model speech": "tab:green", "holding clips": "tab:purple", "model muted": "tab:red"}
MUTED_LABEL = "model muted (never heard)"
ENVELOPE_SECS = 0.02
ENVELOPE_FLOOR_DB = -70.0
CUT_OFF = "unknown (no call_ended: the record was cut off)"


def _num(value) -> float | None:
    """A number field, or None when it is missing or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ms(value) -> str | None:
    n = _num(value)
    return None if n is None else f"{n:.0f} ms"


def _barge_in_note(e: dict) -> str | None:
    parts = [p for p in (_ms(e.get("latency_ms")), e.get("rule")) if p]
    return " ".join(str(p) for p in parts) or None


# Vertical markers: event -> (legend label, colour, line style, annotation or None).
MARKERS = {
    "barge_in": ("barge-in", "tab:red", "-", _barge_in_note),
    "clear": ("clear (no barge-in)", "tab:pink", "--", lambda e: None),
    "first_audio": ("first audio", "tab:green", "-", lambda e: _ms(e.get("ms"))),
    "engine_ready": ("engine ready", "tab:blue", "--", lambda e: _ms(e.get("handshake_ms"))),
    "engine_failed": ("engine failed", "black", "-", lambda e: None),
    "error": ("error", "darkred", ":", lambda e: None),
    "malformed": ("malformed", "tab:gray", ":", lambda e: None),
    "draining": ("drain start", "tab:brown", "--", lambda e: None if _num(e.get("deadline_secs")) is None else f"drain {e['deadline_secs']:g} s"),
    "dtmf": ("dtmf", "tab:olive", "-.", lambda e: f"dtmf {e.get('digit', '?')}"),
}


# ---- reading ------------------------------------------------------------------------------------


def load_events(path) -> tuple[list[dict], int]:
    """The events of an events.jsonl in time order, and how many non-blank lines were not events."""
    events, unreadable = [], 0
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:  # torn last line of a killed call, or bytes that are not UTF-8
            unreadable += 1
            continue
        if isinstance(event, dict) and _num(event.get("t")) is not None and isinstance(event.get("event"), str):
            events.append(event)
        else:
            unreadable += 1
    events.sort(key=lambda e: e["t"])  # stable: same-time events keep their written order
    return events, unreadable


# ---- what happened --------------------------------------------------------------------------------


def _first(events: list[dict], name: str) -> dict | None:
    return next((e for e in events if e["event"] == name), None)


def _last(events: list[dict], name: str) -> dict | None:
    return next((e for e in reversed(events) if e["event"] == name), None)


def call_end(events: list[dict]) -> float:
    """When the call ended: call_ended's time, else the last event's (a killed call's record)."""
    ended = _last(events, "call_ended")
    return ended["t"] if ended else max((e["t"] for e in events), default=0.0)


def intervals(events: list[dict]) -> dict[str, list[tuple[float, float, str]]]:
    """Each lane's and band's (start, end, label) intervals; one still open closes at the call's end."""
    end = call_end(events)
    lanes: dict[str, list[tuple[float, float, str]]] = {lane: [] for lane in (*LANES, *BANDS)}
    openers = {opening: lane for lane, (opening, _) in PAIRS.items()}
    closers = {closing: lane for lane, (_, closing) in PAIRS.items()}
    opened: dict[str, float] = {}
    for e in events:
        name, t = e["event"], e["t"]
        if name in openers and openers[name] not in opened:  # a repeated start extends the open interval
            onset = _num(e.get("onset"))
            opened[openers[name]] = t if onset is None else onset
        elif name in closers and closers[name] in opened:  # a stop with nothing open is ignored
            lane = closers[name]
            start = opened.pop(lane)
            lanes[lane].append((start, max(start, t), ""))
        elif name == "holding":
            secs = _num(e.get("secs"))
            stop = end if secs is None else min(t + secs, max(end, t))
            cut = next((c["t"] for c in events if c["t"] > t and c["event"] in CUTS_CLIP), stop)
            lanes["holding clips"].append((t, min(stop, cut), str(e.get("clip", "?"))))
    for lane, start in opened.items():
        lanes[lane].append((start, max(end, start), ""))
    return lanes


def mutes(events: list[dict]) -> list[dict]:
    """Each muted span: start, end, secs (model audio dropped; the span's length if it never ended), words."""
    end = call_end(events)
    spans, opened = [], None
    for e in events:
        if e["event"] == "mute_started" and opened is None:
            opened = e["t"]
        elif e["event"] == "mute_ended" and opened is not None:
            secs = _num(e.get("secs"))
            words = e.get("words") if isinstance(e.get("words"), str) else ""
            spans.append({"start": opened, "end": e["t"], "secs": e["t"] - opened if secs is None else secs, "words": words})
            opened = None
    if opened is not None:
        spans.append({"start": opened, "end": max(end, opened), "secs": max(end, opened) - opened, "words": ""})
    return spans


def _malformed_total(events: list[dict]) -> int:
    """Dropped messages: call_ended's tally, or each reason's highest running `count` seen so far."""
    per_reason: Counter = Counter()
    for e in events:
        if e["event"] == "malformed":
            reason = str(e.get("reason", "?"))
            count = _num(e.get("count"))
            per_reason[reason] = max(per_reason[reason], int(count) if count is not None else per_reason[reason] + 1)
    ended = _last(events, "call_ended")
    dropped = ended.get("dropped") if ended else None
    if isinstance(dropped, dict):
        for reason, count in dropped.items():
            if _num(count) is not None:
                per_reason[str(reason)] = max(per_reason[str(reason)], int(count))
    return sum(per_reason.values())


def summarize(events: list[dict], unreadable: int = 0) -> dict:
    """The figures a person asks about first, from the events alone (`unreadable` is passed through)."""
    started = _first(events, "call_started") or {}
    ended = _last(events, "call_ended")
    lanes = intervals(events)
    barge_ins = [e for e in events if e["event"] == "barge_in"]
    latencies = [n for e in barge_ins if (n := _num(e.get("latency_ms"))) is not None]
    decisions = [n for e in barge_ins if (n := _num(e.get("decision_ms"))) is not None]
    turns_recorded = any(e["event"] in ("turn_started", "turn_ended") for e in events)
    muted = mutes(events)
    acquired, ready = _last(events, "engine_acquired") or {}, _last(events, "engine_ready") or {}
    first_audio = _first(events, "first_audio") or {}
    seconds = _num(ended.get("seconds")) if ended else None
    return {
        "call_id": started.get("call_id"),
        "provider": started.get("provider"),
        "started_at": started.get("started_at"),
        "outcome": str(ended.get("outcome", "unknown")) if ended else CUT_OFF,
        "duration_s": seconds if seconds is not None else call_end(events),
        "caller_turns": len(lanes["caller turns"]) if turns_recorded else None,  # None: a record from before turns
        "caller_segments": len(lanes["caller speech"]),
        "bot_turns": len(lanes["model speech"]),
        "barge_ins": len(barge_ins),
        "barge_in_p50_ms": statistics.median(latencies) if latencies else None,
        "barge_in_max_ms": max(latencies) if latencies else None,
        "barge_in_rules": dict(Counter(str(e.get("rule") or "unknown") for e in barge_ins)),
        "barge_in_decision_p50_ms": statistics.median(decisions) if decisions else None,
        "clears_without_barge_in": sum(e["event"] == "clear" for e in events),
        "muted_spans": len(muted),
        "muted_s": sum(m["secs"] for m in muted),
        "muted_words": sum(len(m["words"].split()) for m in muted),
        "holding": dict(Counter(label for _, _, label in lanes["holding clips"])),
        "first_audio_ms": _num(first_audio.get("ms")),
        "engine_url": ready.get("url") or acquired.get("url"),
        "engine_handshake_ms": _num(ready.get("handshake_ms")),
        "engine_wait_ms": _num(acquired.get("wait_ms")),
        "engine_failures": [f"{e.get('url', '?')}: {e.get('reason', '?')}" for e in events if e["event"] == "engine_failed"],
        "malformed": _malformed_total(events),
        "errors": sum(e["event"] == "error" for e in events),
        "unreadable_lines": unreadable,
    }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def format_summary(summary: dict) -> str:
    """The summary as aligned `key: value` lines."""
    s = summary
    barge = f"{s['barge_ins']}"
    details = []
    if s["barge_in_p50_ms"] is not None:
        details.append(f"p50 {_fmt_ms(s['barge_in_p50_ms'])}, max {_fmt_ms(s['barge_in_max_ms'])} from onset over the bot")
    if s["barge_in_rules"]:
        details.append(", ".join(f"{rule} x{n}" for rule, n in sorted(s["barge_in_rules"].items())))
    if s["barge_in_decision_p50_ms"] is not None:
        details.append(f"decision to clear p50 {_fmt_ms(s['barge_in_decision_p50_ms'])}")
    if details:
        barge += f" ({'; '.join(details)})"
    if s["clears_without_barge_in"]:
        barge += f", {s['clears_without_barge_in']} other clears"
    turns = f"{s['caller_segments']} speech segments"
    turns = f"{s['caller_turns']} ({turns})" if s["caller_turns"] is not None else f"- (not recorded; {turns})"
    muted = "-"
    if s["muted_spans"]:
        muted = f"{s['muted_s']:.1f} s in {s['muted_spans']} spans, {s['muted_words']} words never heard"
    engine = "-"
    if s["engine_url"]:
        engine = f"{s['engine_url']} (handshake {_fmt_ms(s['engine_handshake_ms'])}, waited {_fmt_ms(s['engine_wait_ms'])})"
    failures = str(len(s["engine_failures"])) + "".join(f"\n    {f}" for f in s["engine_failures"])
    rows = [
        ("call", f"{s['call_id'] or '?'} ({s['provider'] or '?'})" + (f", started {s['started_at']}" if s["started_at"] else "")),
        ("outcome", s["outcome"]),
        ("duration", f"{s['duration_s']:.1f} s"),
        ("caller turns", turns),
        ("bot turns", str(s["bot_turns"])),
        ("barge-ins", barge),
        ("model muted", muted),
        ("holding clips", ", ".join(f"{name} x{n}" for name, n in s["holding"].items()) or "-"),
        ("first audio", _fmt_ms(s["first_audio_ms"])),
        ("engine", engine),
        ("engine failures", failures),
        ("malformed", str(s["malformed"])),
        ("errors", str(s["errors"])),
        ("unreadable", f"{s['unreadable_lines']} unreadable lines"),
    ]
    width = max(len(key) for key, _ in rows) + 1
    return "\n".join(f"{key + ':':<{width}} {value}" for key, value in rows)


# ---- drawing --------------------------------------------------------------------------------------


def envelopes(wav_path) -> tuple:
    """(frame centre times, per-channel RMS in dBFS per 20 ms, duration) of a recording."""
    import numpy as np
    import soundfile

    data, rate = soundfile.read(str(wav_path), dtype="float32", always_2d=True)
    hop = max(1, int(rate * ENVELOPE_SECS))
    frames = len(data) // hop
    blocks = data[: frames * hop].reshape(frames, hop, data.shape[1])
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
    db = np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), ENVELOPE_FLOOR_DB)
    times = (np.arange(frames) + 0.5) * hop / rate
    return times, [db[:, c] for c in range(data.shape[1])], len(data) / rate


def _title(summary: dict) -> str:
    outcome = summary["outcome"] if summary["outcome"] != CUT_OFF else "unknown (cut off)"
    return f"call {summary['call_id'] or '?'}  |  {summary['provider'] or '?'}  |  {outcome}  |  {summary['duration_s']:.1f} s"


def _draw_lanes(ax, events: list[dict]) -> list:
    """The lanes, then the bands over their rows; returns legend handles for the bands drawn."""
    from matplotlib.patches import Patch

    spans_of = intervals(events)
    row_y = {lane: len(LANES) - 1 - row for row, lane in enumerate(LANES)}
    for lane in LANES:
        y, spans = row_y[lane], spans_of[lane]
        ax.broken_barh([(start, end - start) for start, end, _ in spans], (y - 0.35, 0.7), color=LANE_COLORS[lane], alpha=0.8)
        for start, end, label in spans:
            if label:
                ax.text((start + end) / 2, y, label, ha="center", va="center", fontsize=7, color="white", clip_on=True)
    handles = []
    for band, lane in BANDS.items():
        if spans_of[band]:
            style = {"facecolor": LANE_COLORS[band], "alpha": 0.35, "hatch": "////", "edgecolor": LANE_COLORS[band]}
            ax.broken_barh([(start, end - start) for start, end, _ in spans_of[band]], (row_y[lane] - 0.45, 0.9), **style)
            handles.append(Patch(label=MUTED_LABEL if band == "model muted" else band, **style))
    ax.set_yticks(range(len(LANES)), list(reversed(LANES)))
    ax.set_ylim(-0.6, len(LANES) + 0.6)  # the top row is room for the markers' annotations
    ax.grid(axis="x", alpha=0.3)
    return handles


def _draw_markers(ax, events: list[dict]) -> list:
    from matplotlib.lines import Line2D

    seen = {}
    for e in events:
        if e["event"] not in MARKERS:
            continue
        label, color, style, annotate = MARKERS[e["event"]]
        ax.axvline(e["t"], color=color, linestyle=style, linewidth=1.2, alpha=0.9)
        seen[e["event"]] = Line2D([], [], color=color, linestyle=style, label=label)
        text = annotate(e)
        if text:
            ax.annotate(text, xy=(e["t"], 1), xycoords=("data", "axes fraction"), xytext=(2, -3), textcoords="offset points",
                        rotation=90, va="top", ha="left", fontsize=7, color=color)
    return [seen[name] for name in MARKERS if name in seen]


def _draw_envelopes(ax, times, levels) -> None:
    names = ("caller", "bot") if len(levels) == 2 else tuple(f"channel {i + 1}" for i in range(len(levels)))
    colors = (LANE_COLORS["caller speech"], LANE_COLORS["bot audible"])
    for i, (name, db) in enumerate(zip(names, levels)):
        color = colors[i] if i < len(colors) else None
        ax.fill_between(times, ENVELOPE_FLOOR_DB, db, color=color, alpha=0.35, linewidth=0)
        ax.plot(times, db, color=color, linewidth=0.8, label=name)
    ax.set_ylim(ENVELOPE_FLOOR_DB, 0)
    ax.set_ylabel("RMS 20 ms\n(dBFS)", fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)


def render(events: list[dict], out_path, wav_path=None):
    """Write the timeline PNG; with `wav_path`, its channels' envelopes go on an axis above. Returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    audio = envelopes(wav_path) if wav_path else None
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if audio:
        top, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 2])
        _draw_envelopes(top, audio[0], audio[1])
    else:
        ax = fig.subplots()
    handles = _draw_lanes(ax, events) + _draw_markers(ax, events)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)
    end = max(call_end(events), audio[2] if audio else 0.0)
    ax.set_xlim(0, max(end, 1.0) * 1.01)
    ax.set_xlabel("seconds since call start")
    fig.suptitle(_title(summarize(events)), fontsize=11)
    fig.savefig(str(out_path), dpi=100)
    return fig


# ---- command line ---------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines report", description=__doc__.split("\n\n")[0])
    p.add_argument("call_dir", metavar="CALL_DIR", type=Path, help="a call record directory (events.jsonl, transcript.txt, audio.wav)")
    p.add_argument("--out", metavar="PNG", type=Path, help="where the timeline goes (default CALL_DIR/timeline.png)")
    args = p.parse_args(argv)
    path = args.call_dir / "events.jsonl"
    try:
        events, unreadable = load_events(path)
    except OSError as exc:
        print(f"error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not events:
        print(f"error: {path}: no readable events ({unreadable} unreadable lines)", file=sys.stderr)
        return 2
    print(format_summary(summarize(events, unreadable)))
    wav = args.call_dir / "audio.wav"
    wav_path = wav if wav.is_file() else None
    if wav_path:
        import soundfile

        try:
            soundfile.info(str(wav))
        except (RuntimeError, OSError) as exc:  # LibsndfileError is a RuntimeError
            print(f"warning: {wav}: unreadable ({exc}); timeline drawn without envelopes", file=sys.stderr)
            wav_path = None
    out = args.out or args.call_dir / "timeline.png"
    from pipelines.extras import require

    require("matplotlib", "report", "the timeline picture")
    try:
        render(events, out, wav_path)
    except OSError as exc:
        print(f"error: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
