"""Judging a scenario's call from what the caller heard: pure functions of a CallResult.

What was heard is split into 20 ms frames labelled silent, holding clip or model speech. A clip is
found by cross-correlating the heard track with the deployment's clip WAVs at the call rate (its
first 0.4 s anywhere, normalised correlation > 0.8), then followed frame by frame for as long as the
heard audio keeps matching the clip (a `clear` or a fade-out ends it). Every other voiced frame (RMS
above ~-50 dBFS) is the model. The caller's own timeline is the clock: t = 0 when `start` (Twilio,
Exotel) or `init` (browser) was sent; the heard track places each chunk where the caller's playout
put it, and chunks, marks and `clear`s keep their arrival times.

The server's call record (`events.jsonl`, when records are on) adds what cannot be heard: holding
clips the server started, model speech that was muted, DTMF it received and how the call ended.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.sim.caller import VOICED_RMS, CallResult
from pipelines.sim.scenarios import (
    BotStopped,
    CallOk,
    Clears,
    DtmfReceived,
    HoldingClips,
    ModelSpeech,
    NoStale,
    Rendered,
    Replies,
    ReplyHeard,
    Scenario,
)

FRAME_S = 0.02
TEMPLATE_S = 0.4  # a clip is recognised by its first 0.4 s...
CLIP_MATCH = 0.8  # ...correlating this well
FRAME_MATCH = 0.6  # and followed while each 20 ms frame correlates this well with the clip's
RESUME_S = 0.5  # a clip whose playout stalled (an underrun) is followed if it goes on within this...
RESUME_LEN_S = 0.1  # ...judged by its next 100 ms
TURN_GAP_S = 0.5  # model speech with pauses shorter than this is one turn (reply detection)
REPLY_WINDOW_S = 2.0  # a reply must hold min_secs of model speech within this of its start
TALKING_BEFORE_S = 0.3  # bot_stopped: the bot must have been audible from this before the talk-over...
TALKING_MIN_S = 0.15  # ...for at least this long, or there was nothing to interrupt
OVER_MODEL_S = 0.2  # a clip starting within this of model speech starts over it


# ---- what the caller heard -------------------------------------------------------------------------


@dataclass
class ClipHeard:
    name: str
    start: float
    end: float
    complete: bool


@dataclass
class Segment:
    start: float
    end: float
    voiced: float  # seconds of voiced frames in it


@dataclass
class Heard:
    rate: int
    labels: np.ndarray  # per 20 ms frame: 0 silent, 1 model, 2 clip
    clips: list[ClipHeard]

    SILENT, MODEL, CLIP = 0, 1, 2

    def _range(self, t0: float, t1: float) -> slice:
        return slice(max(0, math.ceil(t0 / FRAME_S - 1e-9)), max(0, math.ceil(t1 / FRAME_S - 1e-9)))

    def model_secs(self, t0: float, t1: float) -> float:
        return float(np.count_nonzero(self.labels[self._range(t0, t1)] == self.MODEL)) * FRAME_S

    def last_voiced_end(self, t0: float, t1: float) -> float | None:
        """End of the last voiced frame (model or clip) starting in [t0, t1)."""
        r = self._range(t0, t1)
        voiced = np.flatnonzero(self.labels[r] != self.SILENT)
        return None if len(voiced) == 0 else (r.start + voiced[-1] + 1) * FRAME_S

    def segments(self, merge_gap: float = TURN_GAP_S) -> list[Segment]:
        """Runs of model speech, pauses shorter than merge_gap bridged."""
        frames = np.flatnonzero(self.labels == self.MODEL)
        out: list[Segment] = []
        for f in frames:
            start, end = f * FRAME_S, (f + 1) * FRAME_S
            if out and start - out[-1].end < merge_gap - 1e-9:
                out[-1].end = end
                out[-1].voiced += FRAME_S
            else:
                out.append(Segment(start, end, FRAME_S))
        return out

    @property
    def seconds(self) -> float:
        return len(self.labels) * FRAME_S


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / den) if den > 0 else 0.0


def find_clip(heard: np.ndarray, clip: np.ndarray, rate: int) -> list[tuple[int, int, bool]]:
    """Where `clip` plays in `heard` (float arrays, same rate): (first sample, end sample, played to its end)."""
    n_t = min(len(clip), round(TEMPLATE_S * rate))
    template = clip[:n_t]
    if n_t == 0 or len(heard) < n_t or not np.any(template):
        return []
    size = 1 << (len(heard) + n_t - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(template, size)), size)[: len(heard) - n_t + 1]
    cum = np.concatenate([[0.0], np.cumsum(heard * heard)])
    energy = np.maximum(cum[n_t:] - cum[:-n_t], 0.0)
    score = corr / (np.sqrt(energy) * np.linalg.norm(template) + 1e-9)
    score[energy < (VOICED_RMS**2) * n_t * 0.25] = 0.0  # near-silence matches nothing
    frame = round(FRAME_S * rate)
    found = []
    while len(score):
        at = int(np.argmax(score))
        if score[at] < CLIP_MATCH:
            break
        score[max(0, at - n_t) : at + n_t] = 0.0
        pos = last = shift = 0  # last: end of the last voiced clip frame heard; shift: playout gaps so far
        while pos < len(clip):
            h = heard[at + shift + pos : at + shift + pos + frame]
            c = clip[pos : pos + frame]
            if len(h) < len(c):
                break
            c_rms, h_rms = np.sqrt(np.mean(c * c)), np.sqrt(np.mean(h * h))
            ok = _ncc(h, c) > FRAME_MATCH if c_rms > VOICED_RMS else h_rms <= max(VOICED_RMS, 2 * c_rms)
            if not ok and c_rms > VOICED_RMS:  # an underrun delays the rest of the clip: find where it went on
                gap = _resume(heard, clip, at + shift + pos, pos, rate)
                if gap is not None:
                    shift += gap
                    continue
            if not ok:
                break
            pos += len(c)
            last = pos if c_rms > VOICED_RMS else last
        complete = pos >= len(clip)
        found.append((at, at + shift + (len(clip) if complete else last), complete))
    return sorted(found)


def _resume(heard: np.ndarray, clip: np.ndarray, h_pos: int, c_pos: int, rate: int) -> int | None:
    """Samples (1..RESUME_S) by which the clip's audio from `c_pos` on is delayed in `heard` after `h_pos`, or None."""
    n = min(len(clip) - c_pos, round(RESUME_LEN_S * rate))
    part = clip[c_pos : c_pos + n]
    window = heard[h_pos + 1 : h_pos + 1 + round(RESUME_S * rate) + n]
    if n < round(FRAME_S * rate) or len(window) < n or np.sqrt(np.mean(part * part)) <= VOICED_RMS:
        return None
    corr = np.correlate(window, part, "valid")
    cum = np.concatenate([[0.0], np.cumsum(window * window)])
    energy = np.sqrt(np.maximum(cum[n:] - cum[:-n], 0.0))
    score = corr / (energy * np.linalg.norm(part) + 1e-9)
    best = int(np.argmax(score))
    return best + 1 if score[best] >= CLIP_MATCH else None


def analyze(result: CallResult, clips: dict[str, np.ndarray]) -> Heard:
    """Label what the caller heard; `clips` are the deployment's holding clips at the call's rate."""
    rate = result.sample_rate
    heard = result.heard.astype(np.float64)
    frame = round(FRAME_S * rate)
    n = len(heard) // frame
    level = np.sqrt(np.mean(heard[: n * frame].reshape(n, frame) ** 2, axis=1)) if n else np.zeros(0)
    labels = np.where(level > VOICED_RMS, Heard.MODEL, Heard.SILENT).astype(np.int8)
    found: list[ClipHeard] = []
    for name, clip in clips.items():
        for start, end, complete in find_clip(heard, np.asarray(clip, np.float64), rate):
            found.append(ClipHeard(name, start / rate, end / rate, complete))
            labels[start // frame : -(-end // frame)] = np.where(
                labels[start // frame : -(-end // frame)] == Heard.SILENT, Heard.SILENT, Heard.CLIP)
    return Heard(rate, labels, sorted(found, key=lambda c: c.start))


# ---- the server's call record -----------------------------------------------------------------------


def read_record(path: str | Path | None) -> list[dict] | None:
    """The events of a call record directory (or its events.jsonl); None when there is none."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / "events.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _intervals(events: list[dict], start: str, stop: str, key: str | None) -> list[tuple[float, float]]:
    """(from, to) of each start..stop pair (matched by `key` when given); open ones run to infinity."""
    open_: dict = {}
    out = []
    for e in events:
        k = e.get(key) if key else None
        if e.get("event") == start:
            open_.setdefault(k, e.get("t", 0.0))
        elif e.get("event") == stop and k in open_:
            out.append((open_.pop(k), e.get("t", 0.0)))
    out += [(t, math.inf) for t in open_.values()]
    return out


# ---- checks ------------------------------------------------------------------------------------------


@dataclass
class Context:
    """One call of one scenario, ready to be judged."""

    scenario: Scenario
    timeline: Rendered
    result: CallResult | None
    heard: Heard | None
    uplink_secs: float  # the caller's chunk: its audio leaves this long after the chunk began
    record: list[dict] | None = None
    error: str | None = None  # the call itself failed (connect, exception)
    record_expected: bool = True  # the server writes records where we look (else record-based parts are skipped)


@dataclass
class Check:
    kind: str
    label: str
    passed: bool
    detail: str
    value: float | None = None  # reply delay s, stop latency ms, clears, stale chunks ...
    extra: dict = field(default_factory=dict)


def reply_heard(p: ReplyHeard, ctx: Context) -> tuple[bool, str, float | None]:
    u = ctx.timeline.placed[p.after]
    since = u.end - p.overlap
    segments = ctx.heard.segments()
    through = [s for s in segments if s.start < since <= s.end]
    for seg in segments:
        if seg.start < since:
            continue
        if ctx.heard.model_secs(seg.start, seg.start + REPLY_WINDOW_S) < p.min_secs:
            continue
        delay = seg.start - u.end
        ok = delay <= p.within
        return ok, f"reply {delay:+.2f} s after {p.after} ended ({u.end:.2f} s)" + ("" if ok else f", later than {p.within} s"), delay
    if through:
        return False, (f"no reply began after {p.after} ended ({u.end:.2f} s): model speech from {through[0].start:.2f} s "
                       "runs through the end of the utterance"), None
    return False, f"no model speech of {p.min_secs} s after {p.after} ended ({u.end:.2f} s)", None


def floor_point(p: BotStopped, ctx: Context) -> tuple[float, float]:
    """(when the caller takes the floor, when the uplink chunk carrying that moment leaves the caller)."""
    u = ctx.timeline.placed[p.after]
    floor = u.onset + p.floor_secs
    chunk = ctx.uplink_secs
    return floor, (math.floor(floor / chunk + 1e-9) + 1) * chunk


def bot_stopped(p: BotStopped, ctx: Context) -> tuple[bool, str, float | None]:
    u = ctx.timeline.placed[p.after]
    floor, sent = floor_point(p, ctx)
    talking = ctx.heard.model_secs(u.onset - TALKING_BEFORE_S, floor)
    if talking < TALKING_MIN_S:
        return False, (f"nothing to interrupt: {talking:.2f} s of model speech heard between {u.onset - TALKING_BEFORE_S:.2f} s "
                       f"and the floor at {floor:.2f} s"), None
    last = ctx.heard.last_voiced_end(sent, u.end)
    latency = 0.0 if last is None else max(0.0, last - sent)
    ms = latency * 1000
    ok = ms <= p.ms
    return ok, (f"bot silent {ms:.0f} ms after the floor ({floor:.2f} s, chunk sent {sent:.2f} s)"
                + ("" if ok else f", later than {p.ms:.0f} ms")), ms


def stale_chunks(p: NoStale, ctx: Context) -> tuple[bool, str, float | None, dict]:
    u = ctx.timeline.placed[p.after]
    r = ctx.result
    clears = [t for t in r.clear_times if t >= u.onset]
    if not clears:
        return False, f"no clear after {p.after} began ({u.onset:.2f} s)", None, {}
    cleared = clears[0]
    window = [c for c in r.chunks if cleared < c.t <= u.end and c.voiced]
    # The interrupted utterance: the chunk playing at the clear, closed by the first mark after it.
    playing = [c for c in r.chunks if c.t <= cleared and c.start / r.sample_rate <= cleared]
    tail: list = []
    mark = None
    if playing:
        after = [(t, name) for t, name in r.marks if t > playing[-1].t]
        if after and cleared < after[0][0] <= u.end + 1.0:  # its mark came later: chunks before it are its rest
            mark = after[0]
            tail = [c for c in r.chunks if cleared < c.t < mark[0] and c.voiced]
    stale = {id(c): c for c in window + tail}
    n = len(stale)
    detail = f"clear at {cleared:.2f} s; {len(window)} voiced chunks before {p.after} ended ({u.end:.2f} s)"
    if mark:
        detail += f", {len(tail)} of the interrupted utterance ({mark[1]}) after the clear"
    if n:
        detail += ": at " + ", ".join(f"{c.t:.2f}" for c in sorted(stale.values(), key=lambda c: c.t)[:5]) + " s"
    return n == 0, detail, float(n), {"window": len(window), "interrupted": len(tail)}


def clears(p: Clears, ctx: Context) -> tuple[bool, str, float | None]:
    n = len(ctx.result.clear_times)
    ok = n >= p.min and (p.max is None or n <= p.max)
    want = f"{p.min}" if p.max == p.min else f"{p.min}..{'' if p.max is None else p.max}"
    at = f" at {', '.join(f'{t:.2f}' for t in ctx.result.clear_times[:5])} s" if n else ""
    return ok, f"{n} clear(s){at}, want {want}", float(n)


def holding_over_model(ctx: Context) -> tuple[bool, str, float | None]:
    problems = []
    for clip in ctx.heard.clips:
        before = ctx.heard.model_secs(clip.start - OVER_MODEL_S, clip.start)
        if before > 0:
            problems.append(f"{clip.name} heard at {clip.start:.2f} s right after model speech")
    if ctx.record is not None:
        speech = [iv for iv in _intervals(ctx.record, "speech_started", "speech_stopped", "context")]
        muted = _intervals(ctx.record, "mute_started", "mute_ended", None)
        for e in ctx.record:
            if e.get("event") != "holding":
                continue
            t = e.get("t", 0.0)
            if any(a <= t < b for a, b in speech):
                problems.append(f"server started {e.get('clip')} at {t:.2f} s while the model spoke")
            elif any(a <= t < b for a, b in muted):
                problems.append(f"server started {e.get('clip')} at {t:.2f} s while the model was muted")
    if not problems:
        return True, "no clip over model speech" + ("" if ctx.record is not None else " (heard; no call record)"), 0.0
    return False, "; ".join(problems[:4]), float(len(problems))


def holding_clips(p: HoldingClips, ctx: Context) -> tuple[bool, str, float | None]:
    heard = [c.name for c in ctx.heard.clips]
    played = [e.get("clip") for e in ctx.record or [] if e.get("event") == "holding"]
    problems = [f"{name} {'heard' if name in heard else 'started by the server'}" for name in p.forbid
                if name in heard or name in played]
    problems += [f"{name} not heard" for name in p.require if name not in heard]
    summary = f"heard: {', '.join(heard) or 'none'}" + (f"; server started: {', '.join(played) or 'none'}" if ctx.record is not None else "")
    return not problems, ("; ".join(problems) + " -- " if problems else "") + summary, float(len(problems))


def call_ok(p: CallOk, ctx: Context) -> tuple[bool, str, float | None]:
    r = ctx.result
    problems = []
    if r.violations:
        problems.append(f"{len(r.violations)} protocol violation(s), first: {r.violations[0]}")
    ended = r.hung_up_at if r.hung_up_at is not None else ctx.timeline.seconds
    if r.server_closed_at is not None and r.server_closed_at < ended - 0.05:
        problems.append(f"the server hung up at {r.server_closed_at:.2f} s (code {r.close_code}), before the caller")
    elif r.hung_up_at is not None:
        if r.server_closed_at is None:
            problems.append(f"the server did not close the socket after the hang-up at {r.hung_up_at:.2f} s")
        else:
            took = r.server_closed_at - r.hung_up_at
            if took > p.close_within:
                problems.append(f"the server closed {took:.1f} s after the hang-up (> {p.close_within} s)")
            if r.close_code not in (1000, None):
                problems.append(f"closed with code {r.close_code}")
    if r.provider == "browser" and r.server_closed_at is not None and r.ended is None:
        problems.append("the server closed the page's socket without session_ended")
    for error in r.bot_errors:
        problems.append(f"page error: {error}")
    if ctx.record is None:
        if ctx.record_expected:
            problems.append("no call record on the server")
    else:
        ends = [e for e in ctx.record if e.get("event") == "call_ended"]
        if not ends:
            problems.append("the call record has no call_ended")
        elif ends[-1].get("outcome") != "completed":
            problems.append(f"outcome {ends[-1].get('outcome')!r}")
        problems += [f"server error at {e.get('t', 0):.2f} s: {str(e.get('message'))[:120]}"
                     for e in ctx.record if e.get("event") == "error"][:3]
        problems += [f"apology at {e.get('t', 0):.2f} s ({e.get('reason')})" for e in ctx.record if e.get("event") == "apology"]
    if problems:
        return False, "; ".join(problems), float(len(problems))
    how = f"closed {r.server_closed_at - r.hung_up_at:.2f} s after the hang-up" if r.hung_up_at is not None and r.server_closed_at else "ok"
    if ctx.record is None:
        how += " (no call record read)"
    return True, how, 0.0


def model_speech(p: ModelSpeech, ctx: Context) -> tuple[bool, str, float | None]:
    t0, t1 = ctx.timeline.time(p.from_), ctx.timeline.time(p.to)
    secs = ctx.heard.model_secs(t0, t1)
    ok = (p.min_secs is None or secs >= p.min_secs) and (p.max_secs is None or secs <= p.max_secs)
    bound = " and ".join(b for b in (f">= {p.min_secs}" if p.min_secs is not None else "",
                                     f"<= {p.max_secs}" if p.max_secs is not None else "") if b)
    why = f" ({p.why})" if p.why else ""
    return ok, f"{secs:.2f} s of model speech in {t0:.2f}-{t1:.2f} s, want {bound}{why}", secs


def replies(p: Replies, ctx: Context) -> tuple[bool, str, float | None]:
    u = ctx.timeline.placed[p.after]
    turns = [s for s in ctx.heard.segments(p.merge_gap) if s.start >= u.onset and s.voiced >= p.min_secs]
    spans = ", ".join(f"{s.start:.2f}-{s.end:.2f}" for s in turns[:5])
    return len(turns) == p.count, f"{len(turns)} model turn(s) after {p.after} began{': ' + spans if spans else ''}, want {p.count}", float(len(turns))


def dtmf_received(p: DtmfReceived, ctx: Context) -> tuple[bool, str, float | None]:
    if ctx.record is None:
        if not ctx.record_expected:
            return True, "skipped: no call record to read", None
        return False, "no call record on the server", None
    got = "".join(str(e.get("digit")) for e in ctx.record if e.get("event") == "dtmf")
    sent = "".join(d for _, d in ctx.result.dtmf_sent)
    return got == p.digits, f"server got {got!r}, caller sent {sent!r}, want {p.digits!r}", float(len(got))


def evaluate(ctx: Context) -> list[Check]:
    """Every expectation of the scenario against this call."""
    checks = []
    for exp in ctx.scenario.expectations:
        label = exp.describe()
        if ctx.result is None:
            checks.append(Check(exp.kind, label, False, f"the call failed: {ctx.error}"))
            continue
        extra: dict = {}
        p = exp.params
        if exp.kind == "reply_heard":
            ok, detail, value = reply_heard(p, ctx)
        elif exp.kind == "bot_stopped_within_ms":
            ok, detail, value = bot_stopped(p, ctx)
        elif exp.kind == "no_stale_audio":
            ok, detail, value, extra = stale_chunks(p, ctx)
        elif exp.kind == "clears":
            ok, detail, value = clears(p, ctx)
        elif exp.kind == "no_holding_over_model":
            ok, detail, value = holding_over_model(ctx)
        elif exp.kind == "holding_clips":
            ok, detail, value = holding_clips(p, ctx)
        elif exp.kind == "call_ok":
            ok, detail, value = call_ok(p, ctx)
        elif exp.kind == "model_speech":
            ok, detail, value = model_speech(p, ctx)
        elif exp.kind == "replies":
            ok, detail, value = replies(p, ctx)
        elif exp.kind == "dtmf_received":
            ok, detail, value = dtmf_received(p, ctx)
        else:  # load() admits only known kinds
            raise ValueError(exp.kind)
        checks.append(Check(exp.kind, label, bool(ok), detail, None if value is None else round(float(value), 4), extra))
    return checks


def heard_summary(ctx: Context, checks: list[Check]) -> str:
    """What the caller heard, in a few words: clips, replies and their delays, stop latency, clears."""
    if ctx.result is None:
        return f"call failed: {ctx.error}"
    parts = []
    for clip in ctx.heard.clips:
        parts.append(clip.name if clip.complete else f"{clip.name} (cut at {clip.end:.1f} s)")
    replies_ = [c.value for c in checks if c.kind == "reply_heard" and c.value is not None]
    parts += [f"reply {v:+.1f} s" for v in replies_]
    stops = [c.value for c in checks if c.kind == "bot_stopped_within_ms" and c.value is not None]
    parts += [f"stop {v:.0f} ms" for v in stops]
    segments = ctx.heard.segments()
    if segments and not replies_:
        parts.append(f"model {sum(s.voiced for s in segments):.1f} s")
    n = len(ctx.result.clear_times)
    parts.append(f"{n} clear" + ("s" if n != 1 else ""))
    if ctx.result.violations:
        parts.append(f"{len(ctx.result.violations)} violations")
    return ", ".join(parts)
