"""What a simulated caller received, as figures: pure functions of its `(arrival, message)` list (t on
the call's timeline, s), and of the server's finished calls from GET /stats `recent_calls`. Shared by
`bench conversation`, `load`, `soak` and `stall`.
"""

import math
from dataclasses import dataclass

import numpy as np

RATE = 8000  # an 8 kHz Exotel call
SILENT_RMS = 100.0  # a media payload at or below this RMS (int16) counts as silence
GAP_TOLERANCE = 0.005  # playout gaps up to this long are not underruns (as processors/pacer.py)


@dataclass
class Chunk:
    t: float  # arrival, seconds on the call's timeline
    secs: float  # audio length
    rms: float  # int16 RMS of the payload

    @property
    def loud(self) -> bool:
        return self.rms > SILENT_RMS


def decode_media(msg: dict) -> np.ndarray:
    """The int16 samples of a `media` message (empty if it has no decodable payload)."""
    import base64
    import binascii

    try:
        pcm = base64.b64decode(msg["media"]["payload"], validate=True)
    except (KeyError, TypeError, binascii.Error, ValueError):
        return np.zeros(0, np.int16)
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0


def media_chunks(messages: list[tuple[float, dict]], rate: int) -> list[Chunk]:
    """Every `media` message as (arrival, duration, RMS), in arrival order."""
    out = []
    for t, msg in messages:
        if msg.get("event") == "media":
            samples = decode_media(msg)
            out.append(Chunk(t, len(samples) / rate, rms(samples)))
    return out


def clear_times(messages: list[tuple[float, dict]]) -> list[float]:
    return [t for t, msg in messages if msg.get("event") == "clear"]


def barge_in_latency(messages: list[tuple[float, dict]], onset: float) -> tuple[float | None, int]:
    """(seconds from `onset` to the first `clear` at or after it, None if none came; clears before onset)."""
    clears = clear_times(messages)
    after = [t for t in clears if t >= onset]
    return (after[0] - onset if after else None), len(clears) - len(after)


def stale_chunks(chunks: list[Chunk], cleared: float, until: float) -> list[Chunk]:
    """Non-silent chunks that arrived after the `clear` at `cleared` and before `until`."""
    return [c for c in chunks if cleared < c.t < until and c.loud]


def playout_gaps(messages: list[tuple[float, dict]], rate: int, tolerance: float = GAP_TOLERANCE) -> list[tuple[float, float]]:
    """Underruns inside bot speech: (arrival, gap seconds) for each non-silent chunk that arrived more than
    `tolerance` after the caller's playout of the previous chunk, itself non-silent, had run dry.

    Playout: play_end = max(play_end, arrival) + duration. A `clear` cuts the playout at its arrival and
    ends the speech run (audio after a clear is a new utterance, not a gap)."""
    gaps = []
    play_end: float | None = None
    prev_loud = False
    for t, msg in messages:
        event = msg.get("event")
        if event == "clear":
            play_end = t if play_end is None else min(play_end, t)
            prev_loud = False
        elif event == "media":
            samples = decode_media(msg)
            loud = rms(samples) > SILENT_RMS
            if loud and prev_loud and play_end is not None and t > play_end + tolerance:
                gaps.append((t, t - play_end))
            play_end = max(play_end if play_end is not None else t, t) + len(samples) / rate
            prev_loud = loud
    return gaps


def loud_runs(chunks: list[Chunk]) -> list[tuple[float, float]]:
    """(first arrival, last arrival + its length) of each run of consecutive non-silent chunks."""
    runs: list[tuple[float, float]] = []
    in_run = False
    for c in chunks:
        if c.loud and in_run:
            runs[-1] = (runs[-1][0], c.t + c.secs)
        elif c.loud:
            runs.append((c.t, c.t + c.secs))
        in_run = c.loud
    return runs


def first_audible(chunks: list[Chunk]) -> float | None:
    """Arrival of the first non-silent chunk."""
    return next((c.t for c in chunks if c.loud), None)


def speech_span(chunks: list[Chunk]) -> tuple[float, float] | None:
    """(first non-silent arrival, when the caller finishes playing the last non-silent chunk)."""
    play_end = None
    first = last = None
    for c in chunks:
        play_end = max(play_end if play_end is not None else c.t, c.t) + c.secs
        if c.loud:
            first = c.t if first is None else first
            last = play_end
    return None if first is None else (first, last)



def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p95 of fewer than 20 values is the maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def pacer_onsets(recent_calls: list[dict], call_ids: set[str]) -> tuple[list[float], list[float]]:
    """(first onset of each call = its greeting clip, every later onset) in ms, from /stats `recent_calls`."""
    first, later = [], []
    for call in recent_calls:
        if call.get("call_id") not in call_ids:
            continue
        onsets = _processor_stats(call, "pacer", "onset_ms").get("onset_ms") or []
        first += onsets[:1]
        later += onsets[1:]
    return first, later


def _processor_stats(call: dict, name: str, key: str) -> dict:
    """A processor's stats by its name, else the first processor's stats holding `key`."""
    stats = call.get("stats") or {}
    if isinstance(stats.get(name), dict):
        return stats[name]
    return next((s for s in stats.values() if isinstance(s, dict) and key in s), {})


def sum_stat(recent_calls: list[dict], call_ids: set[str], name: str, key: str) -> float | None:
    """Sum of processor `name`'s `key` over those finished calls; None if no call reported it."""
    values = [_processor_stats(c, name, key).get(key) for c in recent_calls if c.get("call_id") in call_ids]
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) if values else None


def speech_gaps(messages: list[tuple[float, dict]]) -> list[tuple[float, float]]:
    """(inter-arrival gap, previous chunk's length) in s for each non-silent media message that follows a
    non-silent one; a silent chunk or a `clear` ends the run, so pauses and barge-ins are no gaps."""
    gaps, prev = [], None
    for t, msg in messages:
        event = msg.get("event")
        if event == "clear":
            prev = None
        elif event == "media":
            samples = decode_media(msg)
            loud = rms(samples) > SILENT_RMS
            if loud and prev is not None:
                gaps.append((t - prev[0], prev[1]))
            prev = (t, len(samples) / RATE) if loud else None
    return gaps


def gap_figures(gaps: list[tuple[float, float]]) -> dict:
    """Raw gap p50/p99/max, the usual chunk length, and the excess p99 (gap minus that chunk), in ms."""
    raw = [g for g, _ in gaps]
    excess = [g - secs for g, secs in gaps]
    return {"n": len(gaps), "p50_ms": _to_ms(percentile(raw, 50)), "p99_ms": _to_ms(percentile(raw, 99)),
            "max_ms": _to_ms(max(raw, default=None)), "chunk_ms": _to_ms(float(np.median([s for _, s in gaps])) if gaps else None),
            "excess_p99_ms": _to_ms(percentile(excess, 99)), "excess_max_ms": _to_ms(max(excess, default=None))}


def _to_ms(secs: float | None) -> float | None:
    return None if secs is None else round(secs * 1000, 1)


def pcm_messages(messages: list[tuple[float, dict]], provider: str) -> list[tuple[float, dict]]:
    """The caller's messages with Twilio's μ-law payloads turned into PCM16, so one analysis reads both."""
    if provider != "twilio":
        return messages
    import audioop
    import base64

    out = []
    for t, msg in messages:
        if msg.get("event") == "media":
            ulaw = base64.b64decode(msg["media"]["payload"])
            msg = {**msg, "media": {"payload": base64.b64encode(audioop.ulaw2lin(ulaw, 2)).decode()}}
        out.append((t, msg))
    return out


def call_figures(messages: list[tuple[float, dict]], onset: float) -> dict:
    """Underruns, barge-in, stray clears and first audio of one call (times in s on its timeline)."""
    gaps = playout_gaps(messages, RATE)
    latency, early = barge_in_latency(messages, onset)
    clears = len(clear_times(messages))
    return {
        "underruns": len(gaps),
        "underrun_ms": round(sum(g for _, g in gaps) * 1000, 1),
        "underrun_at_s": [round(t, 2) for t, _ in gaps],
        "barge_in_ms": None if latency is None else round(latency * 1000, 1),
        "early_clears": early,
        "stray_clears": clears - (latency is not None),  # every `clear` but the barge-in's own
        "first_audio_ms": _to_ms(first_audible(media_chunks(messages, RATE))),
    }


def audible_secs(messages: list[tuple[float, dict]], after: float) -> float:
    """Seconds of non-silent audio that arrived after `after` (s on the call's timeline)."""
    return sum(c.secs for c in media_chunks(messages, RATE) if c.t > after and c.loud)
