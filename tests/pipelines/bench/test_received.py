"""The pure analysis of what a caller received (pipelines/bench/received.py) on synthetic caller message lists, and
the bench's child-process helpers (servers.py) that need no server."""

import base64

import numpy as np
import pytest

from pipelines.bench.received import (
    Chunk,
    barge_in_latency,
    first_audible,
    loud_runs,
    media_chunks,
    pacer_onsets,
    percentile,
    playout_gaps,
    speech_span,
    stale_chunks,
    sum_stat,
)
from pipelines.bench.servers import engine_command, process_cpu_secs

RATE = 8000


def media(level: int, ms: int = 200) -> dict:
    pcm = np.full(RATE * ms // 1000, level, dtype="<i2").tobytes()
    return {"event": "media", "media": {"payload": base64.b64encode(pcm).decode()}}


LOUD, QUIET = 1000, 0


def test_media_chunks_decode_length_and_level():
    chunks = media_chunks([(0.1, media(LOUD)), (0.2, {"event": "mark", "mark": {"name": "x"}}), (0.3, media(QUIET, 100))], RATE)
    assert [(c.t, c.secs, round(c.rms)) for c in chunks] == [(0.1, 0.2, 1000), (0.3, 0.1, 0)]
    assert chunks[0].loud and not chunks[1].loud


def test_steady_stream_sent_ahead_has_no_gap():
    # 200 ms chunks sent 200 ms apart, each ahead of the playout: no underrun
    messages = [(0.2 * k, media(LOUD)) for k in range(10)]
    assert playout_gaps(messages, RATE) == []


def test_late_chunk_inside_speech_is_an_underrun():
    messages = [(0.0, media(LOUD)), (0.2, media(LOUD)), (0.5, media(LOUD)), (0.7, media(LOUD))]
    gaps = playout_gaps(messages, RATE)
    assert len(gaps) == 1 and gaps[0][0] == 0.5 and abs(gaps[0][1] - 0.1) < 1e-9


def test_small_lateness_and_gaps_around_silence_are_not_underruns():
    assert playout_gaps([(0.0, media(LOUD)), (0.204, media(LOUD))], RATE) == []  # within 5 ms
    # speech, pause, speech: the late chunk follows a silent one
    messages = [(0.0, media(LOUD)), (0.2, media(QUIET)), (0.9, media(LOUD))]
    assert playout_gaps(messages, RATE) == []


def test_clear_cuts_playout_and_ends_the_speech_run():
    messages = [(0.0, media(LOUD)), (0.1, {"event": "clear"}), (0.6, media(LOUD)), (0.7, media(LOUD))]
    assert playout_gaps(messages, RATE) == []  # audio after a clear is a new utterance
    messages = [(0.0, media(LOUD)), (0.1, {"event": "clear"}), (0.3, media(LOUD)), (0.6, media(LOUD))]
    gaps = playout_gaps(messages, RATE)  # playout cut at 0.1: 0.3-0.5, then 0.6 is 100 ms late
    assert len(gaps) == 1 and abs(gaps[0][1] - 0.1) < 1e-9


def test_barge_in_latency_and_early_clears():
    messages = [(1.0, {"event": "clear"}), (4.0, media(LOUD)), (4.35, {"event": "clear"}), (5.0, {"event": "clear"})]
    latency, early = barge_in_latency(messages, 4.2)
    assert abs(latency - 0.15) < 1e-9 and early == 1
    assert barge_in_latency([(4.0, media(LOUD))], 4.2) == (None, 0)


def test_stale_chunks_are_loud_chunks_after_clear_before_the_end():
    chunks = [Chunk(4.0, 0.2, 900), Chunk(4.4, 0.2, 900), Chunk(4.6, 0.2, 0), Chunk(5.0, 0.2, 150), Chunk(8.0, 0.2, 900)]
    stale = stale_chunks(chunks, cleared=4.3, until=7.5)
    assert [c.t for c in stale] == [4.4, 5.0]


def test_first_audible_span_and_runs():
    chunks = [Chunk(0.0, 0.2, 0), Chunk(0.1, 0.2, 500), Chunk(0.3, 0.2, 500), Chunk(0.9, 0.2, 0), Chunk(1.0, 0.2, 500)]
    assert first_audible(chunks) == 0.1
    assert first_audible([Chunk(0.0, 0.2, 50)]) is None
    assert speech_span(chunks) == pytest.approx((0.1, 1.3))  # played 0.0-0.2, 0.2-0.4, 0.4-0.6, 0.9-1.1, 1.1-1.3
    assert loud_runs(chunks) == [(0.1, 0.5), (1.0, 1.2)]


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0], 95) == 3.0
    assert percentile(list(range(1, 101)), 95) == 95


def test_server_stats_of_our_calls_only():
    recent = [
        {"call_id": "a", "stats": {"pacer": {"onset_ms": [0.3, 210.0], "underruns": 1}, "output": {"stale_chunks_refused": 2}}},
        {"call_id": "b", "stats": {"pacer": {"onset_ms": [0.5], "underruns": 0}, "output": {"stale_chunks_refused": 0}}},
        {"call_id": "other", "stats": {"pacer": {"onset_ms": [99.0, 99.0], "underruns": 5}}},
        {"call_id": "c", "stats": {"Pacer2": {"onset_ms": [1.0]}}},  # found by its key when not named "pacer"
    ]
    ids = {"a", "b", "c"}
    assert pacer_onsets(recent, ids) == ([0.3, 0.5, 1.0], [210.0])
    assert sum_stat(recent, ids, "pacer", "underruns") == 1
    assert sum_stat(recent, ids, "output", "stale_chunks_refused") == 2
    assert sum_stat(recent, {"c"}, "output", "stale_chunks_refused") is None


def test_process_cpu_secs_reads_proc():
    import os

    assert process_cpu_secs(os.getpid()) >= 0.0
    assert process_cpu_secs(None) is None


def test_engine_command_matches_the_yaml_options():
    argv = engine_command([9000, 9001], {"mode": "script", "handshake_delay_secs": 0.5,
                                         "script": [{"at": 0.8, "wav": "/clips/a.wav"}]})
    assert argv[1:4] == ["-m", "pipelines", "engine"]
    joined = " ".join(argv)
    assert "--port 9000,9001 --no-tls --mode script --handshake-delay-secs 0.5 --say 0.8:/clips/a.wav" in joined
