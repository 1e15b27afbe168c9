"""`bench conversation`'s tables: what its calls received (pipelines/bench/received.py) and what our
server reported of them, printed as Markdown blocks for BENCHMARKS.md."""

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.bench.harness import table
from pipelines.bench.received import (
    GAP_TOLERANCE,
    RATE,
    SILENT_RMS,
    Chunk,
    barge_in_latency,
    clear_times,
    first_audible,
    loud_runs,
    pacer_onsets,
    percentile,
    playout_gaps,
    speech_span,
    stale_chunks,
    sum_stat,
)
from processors.bot_speech import BotSpeechParams

SLOW_HANDSHAKE = 3.0  # the handshake part's engine handshake, s
STALE_MARGIN = 0.5  # the stale window runs this long past the end of bot speech in the silent calls
MUTE_SECS = BotSpeechParams().mute_secs  # ours: what the bridge silences after a barge-in
TARGET_FIRST_AUDIO_MS = 300
PARTS = ("barge-in", "cadence", "handshake")


@dataclass
class Call:
    """One simulated call of the bench and what its caller received."""

    server: str
    part: str
    calls: int
    round: int
    sid: str
    result: object = None  # CallResult
    error: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _p50_p95_max(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" if v is not None else "-" for v in (percentile(values, 50), percentile(values, 95), max(values, default=None)))


def _block(title: str, notes: list[str], body: str) -> None:
    print(f"\n### {title}\n")
    for note in notes:
        print(note)
    if notes:
        print()
    print("```")
    print(body)
    print("```")


def _select(done: list[Call], server: str, part: str, n: int) -> list[Call]:
    return [c for c in done if c.server == server and c.part == part and c.calls == n]


def utterance_end(done: list[Call], server: str, n: int) -> tuple[float, str]:
    """When the bot's utterance ends without barge-in: the silent calls' latest speech end + margin."""
    spans = [speech_span(c.chunks) for c in _select(done, server, "cadence", n) if c.result is not None]
    ends = [span[1] for span in spans if span]
    return (max(ends) + STALE_MARGIN, "silent calls") if ends else (math.inf, "call end")


def report(done: list[Call], recent: dict, onset: float, args) -> None:
    """Every table of the calls run: barge-in and stale audio, cadence, first audio, our server's side."""
    report_errors(done, args.timeline)
    if any(c.part == "barge-in" for c in done):
        report_barge_in(done, onset, args)
    if any(c.part in ("cadence", "handshake") for c in done):
        report_cadence(done, args)
    if any(c.part == "handshake" and c.result is not None for c in done):
        report_first_audio(done, args)
    if any(name in recent for name in ("ours", "ours-handshake")):
        report_server_side(done, recent, args)


def report_errors(done: list[Call], timeline: bool) -> None:
    """The first failed calls; with `timeline`, each call's clears and runs of non-silent chunks."""
    for c in [c for c in done if c.error][:10]:
        print(f"call {c.sid} failed: {c.error}")
    if timeline:
        print("\ntimelines (s on the caller's timeline): clears; runs of non-silent chunks (arrival of the first - "
              "arrival + length of the last)")
        for c in done:
            if c.result is not None:
                runs = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in loud_runs(c.chunks))
                clears = ", ".join(f"{t:.3f}" for t in clear_times(c.result.messages))
                print(f"{c.sid}: clears [{clears}]; audible {runs}")


def barge_in_rows(done: list[Call], name: str, n: int, onset: float, detail: list[str]) -> tuple[list, list] | None:
    """(latency row, stale row) of one server at one concurrency; None when it ran no barge-in call.
    Calls without a clear after onset, and calls with stale audio, are described in `detail`."""
    calls = _select(done, name, "barge-in", n)
    if not calls:
        return None
    lats, early, stale, stale_calls = [], 0, 0, 0
    until, source = utterance_end(done, name, n)
    for c in calls:
        if c.result is None:
            continue
        lat, before = barge_in_latency(c.result.messages, onset)
        early += before
        if lat is None:
            detail.append(f"{c.sid}: no clear after onset ({c.result.clears} clears, {len(c.chunks)} media)")
            continue
        lats.append(lat)
        cleared = onset + lat
        late = stale_chunks(c.chunks, cleared, until if name == "stock" else min(until, cleared + MUTE_SECS))
        stale += len(late)
        stale_calls += bool(late)
        if late:
            detail.append(f"{c.sid}: clear at {onset + lat:.3f} s, stale at "
                          + ", ".join(f"{s.t:.3f} s ({s.secs * 1000:.0f} ms, rms {s.rms:.0f})" for s in late[:6]))
    miss = len(calls) - len(lats)
    lat_row = [name, n, len(calls), miss, early, _ms(percentile(lats, 50)), _ms(percentile(lats, 95)),
               _ms(max(lats) if lats else None)]
    stale_row = [name, n, len(lats), stale, stale_calls, f"{until:.2f}" if until < math.inf else "-", source]
    return lat_row, stale_row


def report_barge_in(done: list[Call], onset: float, args) -> None:
    lat_rows, stale_rows, detail = [], [], []
    for n in args.calls:
        for name in ("ours", "stock"):
            rows = barge_in_rows(done, name, n, onset, detail)
            if rows:
                lat_rows.append(rows[0])
                stale_rows.append(rows[1])
    _block("Barge-in: caller speech onset -> `clear` at the caller",
           [f"Caller chunks {args.chunk_ms} ms; onset at {onset:.2f} s after {args.speech_at:.1f} s of silence; "
            "ms on the caller's timeline (includes uplink chunking); p95 nearest-rank. "
            "miss: no `clear` after onset; early: `clear`s before onset."],
           table(["server", "calls", "n", "miss", "early", "p50 ms", "p95 ms", "max ms"], lat_rows))
    _block("Stale audio after `clear`",
           [f"Media messages with RMS > {SILENT_RMS:.0f} received after the barge-in `clear` and before the "
            "interrupted utterance would have ended: `until s` is the latest end of bot speech in the silent "
            f"(cadence) calls of the same server and concurrency + {STALE_MARGIN} s, or the end of the call "
            f"without them. Ours: at most {MUTE_SECS} s (bot_speech mute_secs) after the `clear`; this script "
            "engine never yields, so after the mute the model is heard again by design."],
           table(["server", "calls", "cleared", "stale chunks", "calls with stale", "until s", "from"], stale_rows))
    for line in detail[:20]:
        print(line)


def cadence_row(calls: list[Call], label: str, n: int, detail: list[str]) -> list:
    """One row of the cadence table: speech heard, its span, chunk sizes, underruns, chunk-rule breaches."""
    gaps = []
    spans, speech, violations, chunk_ms = [], 0.0, 0, set()
    for c in calls:
        g = playout_gaps(c.result.messages, RATE)
        gaps += g
        if g:
            detail.append(f"{c.sid}: gaps at " + ", ".join(f"{t:.3f} s ({s * 1000:.0f} ms)" for t, s in g[:8]))
        span = speech_span(c.chunks)
        if span:
            spans.append(span)
        speech += sum(ch.secs for ch in c.chunks if ch.loud)
        violations += len(c.result.violations)
        chunk_ms |= {round(ch.secs * 1000) for ch in c.chunks}
    sizes = "/".join(str(s) for s in sorted(chunk_ms)[:3]) + ("/..." if len(chunk_ms) > 3 else "")
    return [label, n, len(calls), f"{speech:.1f}",
            f"{np.median([s[0] for s in spans]):.2f}-{np.median([s[1] for s in spans]):.2f}" if spans else "-",
            sizes, len(gaps), f"{sum(s for _, s in gaps) * 1000:.0f}", violations]


def report_cadence(done: list[Call], args) -> None:
    rows, detail = [], []
    for part, names in (("cadence", ("ours", "stock")), ("handshake", ("ours-handshake",))):
        for n in args.calls:
            for name in names:
                calls = [c for c in _select(done, name, part, n) if c.result is not None]
                if calls:
                    label = "ours (3 s handshake, greeting)" if part == "handshake" else name
                    rows.append(cadence_row(calls, label, n, detail))
    _block("Output cadence: underruns in the caller's playout inside bot speech",
           ["Caller silent. Playout end = max(previous end, arrival) + chunk length; an underrun is a non-silent chunk "
            f"arriving > {GAP_TOLERANCE * 1000:.0f} ms after the previous non-silent chunk's playout ended. "
            "speech s: non-silent audio received (all calls); span: median first non-silent arrival - playout end; "
            "violations: Exotel chunk-rule breaches the caller saw (multiple of 320 B, >= 3200 B, <= 100 kB)."],
           table(["server", "calls", "n", "speech s", "span s", "chunk ms", "underruns", "gap ms", "violations"], rows,
                 first_width=30))
    for line in detail[:20]:
        print(line)
    bad = [v for c in done if c.result is not None and c.server.startswith("ours") for v in c.result.violations]
    for v in bad[:5]:
        print(f"ours violation: {v}")


def report_first_audio(done: list[Call], args) -> None:
    hs = [c for c in done if c.part == "handshake" and c.result is not None]
    rows = []
    for n in args.calls:
        calls = [c for c in hs if c.calls == n]
        firsts = [first_audible(c.chunks) for c in calls]
        got = [t for t in firsts if t is not None]
        p95 = percentile(got, 95)
        ok = "yes" if p95 is not None and len(got) == len(calls) and p95 * 1000 <= TARGET_FIRST_AUDIO_MS else "no"
        rows.append(["ours", n, len(calls), len(calls) - len(got), _ms(percentile(got, 50)), _ms(p95),
                     _ms(max(got) if got else None), ok])
    _block(f"First audible audio with a {SLOW_HANDSHAKE:.0f} s engine handshake",
           [f"Reference engine in echo mode with handshake_delay_secs {SLOW_HANDSHAKE}; `start` sent -> first media with "
            f"RMS > {SILENT_RMS:.0f} at the caller (the holding greeting). Stock pipecat has no engine handshake "
            "(its bot is in-process), so there is no stock row."],
           table(["server", "calls", "n", "silent", "p50 ms", "p95 ms", "max ms", f"<= {TARGET_FIRST_AUDIO_MS} ms"], rows))


def server_side_row(calls_stats: list[dict], ids: set[str], part: str, n: int) -> list:
    """Our server's figures for one part at one concurrency, from its finished calls' stats."""
    found = {c.get("call_id") for c in calls_stats} & ids
    greet, later = pacer_onsets(calls_stats, ids)
    underruns = sum_stat(calls_stats, ids, "pacer", "underruns")
    under_secs = sum_stat(calls_stats, ids, "pacer", "underrun_secs")
    refused = sum_stat(calls_stats, ids, "output", "stale_chunks_refused")
    return [part, n, f"{len(found)}/{len(ids)}",
            _p50_p95_max(greet),
            _p50_p95_max(later),
            "-" if underruns is None else f"{underruns:.0f}",
            "-" if under_secs is None else f"{under_secs * 1000:.0f}",
            "-" if refused is None else f"{refused:.0f}"]


def report_server_side(done: list[Call], recent: dict, args) -> None:
    rows, missing = [], []
    for name in [name for name in ("ours", "ours-handshake") if name in recent]:
        calls_stats = recent[name]
        if calls_stats is None:
            missing.append(name)
            continue
        for part in PARTS:
            for n in args.calls:
                ids = {c.sid for c in done if c.server == name and c.part == part and c.calls == n}
                if ids:
                    rows.append(server_side_row(calls_stats, ids, part, n))
    if rows:
        _block("Ours, server side: holding clip onset and pacer/output counters (GET /stats `recent_calls`)",
               ["onset: ms from an utterance's TTSStartedFrame reaching the pacer to its first chunk sent (pacer "
                "`onset_ms`); a call's first onset is its greeting clip, later ones model utterances. "
                "p50/p95/max. underruns: the pacer's own count and ms; refused: chunks older than the last "
                "`clear` that the output refused (`stale_chunks_refused`)."],
               table(["part", "calls", "stats", "greeting onset ms", "later onsets ms", "pacer underruns",
                      "underrun ms", "refused"], rows))
    for name in missing:
        print(f"\n{name}: GET /stats has no `recent_calls` yet: holding onsets and server counters not reported")


def report_load(loads: list[dict], args) -> None:
    rows = []
    for name in ("ours", "stock", "ours-handshake"):
        for part in PARTS:
            for n in args.calls:
                sel = [x for x in loads if x["server"] == name and x["part"] == part and x["calls"] == n]
                if not sel:
                    continue
                wall = sum(x["wall"] for x in sel)
                cpu = [x["server_cpu"] for x in sel]
                server_pct = "-" if None in cpu else f"{sum(cpu) / wall * 100:.0f}"
                engine = [x["engine_cpu"] for x in sel]
                engine_pct = "-" if None in engine else f"{sum(engine) / wall * 100:.0f}"
                rows.append([name, part, n, len(sel), f"{wall:.1f}", server_pct, engine_pct,
                             f"{sum(x['bench_cpu'] for x in sel) / wall * 100:.0f}"])
    if rows:
        _block("CPU while the calls ran",
               ["% of one core over the rounds' wall time (calls plus settling): the server process (one asyncio "
                "loop; ours includes the reference engine unless it ran as its own process, `engine %`), and this "
                "bench process (the simulated callers)."],
               table(["server", "part", "calls", "rounds", "wall s", "server %", "engine %", "callers %"], rows,
                     first_width=14))
