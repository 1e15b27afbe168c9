"""`bench load` and `bench soak`: their pure analysis on hand-built caller messages, and one small real
run of each as a subprocess. No timing is asserted."""

import audioop
import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines.bench.fleet import CallRun, deployment, is_failed, proc_status, read_records
from pipelines.bench.launch import ROOT
from pipelines.bench.load_figures import all_up_window, call_row, cpu_percent, kill_effects, others_percent
from pipelines.bench.received import call_figures, gap_figures, pcm_messages, speech_gaps
from pipelines.bench.soak import rss_slope, warm_waves, wave_row
from pipelines.errors import ConfigError

RATE = 8000
LOUD, QUIET = 1000, 0
CLEAR = {"event": "clear"}


def media(level: int, ms: int = 200) -> dict:
    pcm = np.full(RATE * ms // 1000, level, dtype="<i2").tobytes()
    return {"event": "media", "media": {"payload": base64.b64encode(pcm).decode()}}


# ---- output gaps inside speech -------------------------------------------------------------------


def test_gaps_are_between_loud_chunks_of_one_run():
    messages = [(0.0, media(LOUD)), (0.2, media(LOUD)), (0.5, media(LOUD)),  # 200 then 300 ms
                (0.7, media(QUIET)), (2.0, media(LOUD)),  # a silent chunk ends the run: 1.3 s is a pause
                (2.1, CLEAR), (2.9, media(LOUD)), (3.0, media(LOUD, 40))]  # a clear ends it too
    gaps = speech_gaps(messages)
    assert np.allclose(gaps, [(0.2, 0.2), (0.3, 0.2), (0.1, 0.2)])


def test_gap_figures_report_raw_chunk_and_excess():
    gaps = [(0.2, 0.2)] * 98 + [(0.3, 0.2), (0.45, 0.2)]
    f = gap_figures(gaps)
    assert (f["n"], f["p50_ms"], f["p99_ms"], f["max_ms"], f["chunk_ms"]) == (100, 200.0, 300.0, 450.0, 200.0)
    assert (f["excess_p99_ms"], f["excess_max_ms"]) == (100.0, 250.0)
    assert gap_figures([])["p99_ms"] is None


# ---- CPU arithmetic ------------------------------------------------------------------------------


def test_all_up_window_is_last_start_plus_margin_to_first_end():
    assert all_up_window([0.1, 1.9, 0.5], [20.3, 21.0, 20.1]) == pytest.approx((3.9, 20.1))
    assert all_up_window([0.0, 5.0], [6.5, 20.0]) is None  # shorter than a second
    assert all_up_window([], []) is None


def test_cpu_percent_uses_the_samples_inside_the_window():
    samples = [{"t": 0.0, "cpu": 0.0}, {"t": 1.0, "cpu": 0.2}, {"t": 2.0, "cpu": 0.7}, {"t": 3.0, "cpu": 1.2},
               {"t": 4.0, "cpu": None}, {"t": 5.0, "cpu": 3.0}]
    assert cpu_percent(samples, "cpu", (1.0, 3.0)) == 50.0  # (1.2 - 0.2) / 2 s
    assert cpu_percent(samples, "cpu", (0.5, 4.5)) == 50.0  # a missing reading is skipped
    assert cpu_percent(samples, "cpu", (1.5, 2.5)) is None  # one sample is no interval
    assert cpu_percent(samples, "cpu", None) is None


def test_others_percent_is_the_machine_minus_the_bench_processes():
    samples = [{"t": 0.0, "machine_cpu": 10.0, "bridge_cpu": 1.0, "engines_cpu": 2.0, "callers_cpu": 0.5},
               {"t": 2.0, "machine_cpu": 13.0, "bridge_cpu": 2.0, "engines_cpu": 2.5, "callers_cpu": 0.6}]
    assert others_percent(samples, (0.0, 2.0)) == pytest.approx(70.0)  # 150 - 50 - 25 - 5
    stock = [{k: v for k, v in s.items() if k != "engines_cpu"} for s in samples]
    assert others_percent(stock, (0.0, 2.0)) == pytest.approx(95.0)


# ---- per call and the kill -----------------------------------------------------------------------


def test_call_figures_count_barge_in_stray_clears_and_first_audio():
    messages = [(0.0, media(QUIET)), (0.5, media(LOUD)), (1.0, CLEAR), (4.0, media(LOUD)), (4.45, CLEAR), (6.0, CLEAR)]
    f = call_figures(messages, onset=4.2)
    assert f["barge_in_ms"] == pytest.approx(250.0) and f["early_clears"] == 1 and f["stray_clears"] == 2
    assert f["first_audio_ms"] == 500.0 and f["underruns"] == 0
    assert call_figures([(0.5, media(LOUD))], onset=4.2)["stray_clears"] == 0


def run_with(messages, sent: float, close_code: int | None = 1000) -> CallRun:
    return CallRun("c", start=100.0, end=112.0, messages=messages, violations=[], close_code=close_code, sent_secs=sent)


def test_call_row_classifies_a_lost_engine_and_the_apology_after_the_kill():
    kill = {"t": 105.0, "ports": [9001, 9002]}  # 5 s into the call
    # queued audio (5.2 s) is not the apology; 2 s of audio from 6 s on is; the bridge hung up at 9 s
    lost = run_with([(5.2, media(LOUD))] + [(6.0 + 0.2 * k, media(LOUD)) for k in range(10)], sent=9.0)
    record = {"outcome": "engine_failed", "engine_url": "ws://127.0.0.1:9002", "apology": True}
    row = call_row(lost, 100.0, 10.2, record, 20.0, kill)
    assert row["lost_engine"] and row["hung_up_by_bridge"] and row["audible_after_kill_s"] == pytest.approx(2.0)
    other = call_row(run_with([(6.0, media(LOUD))], sent=20.0), 100.0, 10.2,
                     {"outcome": "completed", "engine_url": "ws://127.0.0.1:9003", "apology": False}, 20.0, kill)
    assert not other["lost_engine"] and not other["hung_up_by_bridge"] and other["engine_port"] == 9003


def test_barge_in_from_the_floor_counts_from_the_chunk_that_met_the_rule():
    # onset chunk arrives at 10.3 s, the clear at 10.81 s; the bridge met its rule on caller audio
    # that ended at 9.7 s of what it received, and the caller's first 1.0 s was never sent (not yet
    # accepted): that chunk arrived at 10.7 s
    run = run_with([(10.81, CLEAR)], sent=12.0)
    run.unsent_secs = 1.0
    row = call_row(run, 100.0, 10.3, {"outcome": "completed", "engine_url": None, "apology": False, "barge_in_audio_ms": 9700}, 12.0, None)
    assert row["barge_in_ms"] == pytest.approx(510.0) and row["barge_in_floor_ms"] == pytest.approx(110.0)
    no_decision = call_row(run, 100.0, 10.3, {"outcome": "completed", "engine_url": None, "apology": False}, 12.0, None)
    assert "barge_in_floor_ms" not in no_decision


def test_kill_effects_split_lost_calls_from_the_others():
    rows = [
        {"lost_engine": True, "outcome": "engine_failed", "audible_after_kill_s": 5.0, "hung_up_by_bridge": True, "close_code": 1000},
        {"lost_engine": True, "outcome": "engine_failed", "audible_after_kill_s": 0.4, "hung_up_by_bridge": True, "close_code": 1006},
        {"lost_engine": False, "outcome": "completed", "underruns": 1, "stray_clears": 0, "barge_in_ms": 210.0},
        {"lost_engine": False, "outcome": "caller_gone", "underruns": 0, "stray_clears": 2, "barge_in_ms": None},
    ]
    k = kill_effects(rows)
    assert k["lost"] == {"calls": 2, "engine_failed": 2, "apology_heard": 1, "clean_hang_up": 1}
    assert k["others"] == {"calls": 2, "completed": 1, "underruns": 1, "stray_clears": 2, "barge_in_missed": 1}


def test_failed_means_a_caller_error_or_an_outcome_other_than_completed():
    assert not is_failed({"error": None, "outcome": "completed"})
    assert not is_failed({"error": None})  # the stock server keeps no records
    assert is_failed({"error": "ConnectionRefusedError", "outcome": "completed"})
    assert is_failed({"error": None, "outcome": "unknown"})


# ---- soak ----------------------------------------------------------------------------------------


def test_rss_slope_leaves_out_the_warm_up_waves():
    assert warm_waves(10) == 2 and warm_waves(20) == 4 and warm_waves(3) == 2
    points = [(10, 130.0), (20, 150.0)] + [(10 * w, 160.0 + 0.05 * 10 * w) for w in range(3, 11)]
    assert rss_slope(points) == pytest.approx(0.05)
    assert rss_slope(points[:3]) is None  # one wave after warm-up is no slope


def test_wave_row_sums_its_calls_and_the_rss_change():
    rows = [{"error": None, "outcome": "completed", "violations": 0, "underruns": 1, "barge_in_ms": 200.0},
            {"error": "TimeoutError", "outcome": "unknown", "violations": 2}]
    row = wave_row(3, 30, rows, {"rss_mb": 150.5, "threads": 6, "fds": 10}, 148.0, 4.9, True)
    assert (row["failed"], row["violations"], row["underruns"], row["barge_in_missed"]) == (1, 2, 1, 1)
    assert row["rss_delta_mb"] == 2.5 and (row["threads"], row["fds"]) == (6, 10)
    assert wave_row(1, 10, [], {}, None, 1.0, False)["rss_delta_mb"] is None


# ---- plumbing ------------------------------------------------------------------------------------


def test_twilio_mulaw_is_read_as_pcm():
    pcm = np.full(320, 1000, dtype="<i2").tobytes()
    msg = {"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode()}}
    out = pcm_messages([(0.1, msg), (0.2, CLEAR)], "twilio")
    assert call_figures(out, onset=0.0)["first_audio_ms"] == 100.0
    assert out[1] == (0.2, CLEAR) and pcm_messages([(0.1, msg)], "exotel")[0][1] is msg


def test_deployment_names_provider_and_path():
    assert deployment("exotel.yaml")[1:] == ("exotel", "/exotel")
    assert deployment("twilio.yaml")[1:] == ("twilio", "/twilio")
    with pytest.raises(ConfigError):
        deployment("browser.yaml")


def test_read_records_takes_finished_calls_once(tmp_path):
    call = tmp_path / "20260101T000000-c1"
    call.mkdir()
    lines = [{"t": 0.0, "event": "call_started", "call_id": "c1", "provider": "exotel"},
             {"t": 0.1, "event": "engine_acquired", "url": "ws://127.0.0.1:9001", "wait_ms": 0},
             {"t": 3.0, "event": "barge_in", "rule": "floor", "audio_ms": 2900},
             {"t": 4.0, "event": "barge_in", "rule": "floor", "audio_ms": 3900},
             {"t": 5.0, "event": "apology", "reason": "engine failed"},
             {"t": 9.0, "event": "call_ended", "outcome": "engine_failed", "seconds": 9.0}]
    (call / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    live = tmp_path / "20260101T000001-c2"
    live.mkdir()
    (live / "events.jsonl").write_text(json.dumps(lines[0] | {"call_id": "c2"}) + "\n")  # still running
    outcomes: dict = {}
    read_records(tmp_path, outcomes)
    assert outcomes == {"c1": {"outcome": "engine_failed", "engine_url": "ws://127.0.0.1:9001", "apology": True,
                               "barge_in_audio_ms": 2900}}  # the first decision


def test_proc_status_reads_rss_threads_and_fds():
    s = proc_status(os.getpid())
    assert s["rss_mb"] > 0 and s["threads"] >= 1 and s["fds"] >= 3


# ---- real runs -----------------------------------------------------------------------------------


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_load_two_calls_end_to_end(tmp_path):
    out = tmp_path / "load.json"
    done = bench("load", "--calls", "2", "--duration", "12", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads(out.read_text())
    for key in ("machine", "argv", "params", "cpu_pct", "rss_mb", "output_gaps", "underruns", "barge_in_ms",
                "first_audio_ms", "outcomes", "per_call"):
        assert key in r
    assert r["failed"] == 0 and r["chunk_violations"] == 0 and r["outcomes"] == {"completed": 2}
    assert r["barge_in_ms"]["missed"] == 0 and all(c["barge_in_ms"] is not None for c in r["per_call"])
    # the floor rule's chunk comes after the onset's: from the floor is the shorter figure
    assert all(0 < c["barge_in_floor_ms"] < c["barge_in_ms"] for c in r["per_call"])
    assert "written:" in done.stdout


def test_soak_two_waves_end_to_end(tmp_path):
    out = tmp_path / "soak.json"
    done = bench("soak", "--calls", "4", "--concurrency", "2", "--call-secs", "3", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    r = json.loads(out.read_text())
    for key in ("machine", "params", "waves", "rss_mb", "rss_mb_per_call", "target_mb_per_call", "threads", "fds"):
        assert key in r
    assert [w["calls_done"] for w in r["waves"]] == [2, 4]
    assert r["failed"] == 0 and r["chunk_violations"] == 0 and r["barge_in_ms"]["missed"] == 0
    assert all(w["rss_mb"] and w["threads"] and w["fds"] for w in r["waves"])
