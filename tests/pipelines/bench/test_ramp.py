"""`bench load --pin --ramp`: its pure parts (ramp parsing, which target broke, the row, the core split)."""

import os

import pytest

from pipelines.bench import ramp


def result(violations=0, underruns=0, barge_p50=520.0, floor_p50=120.0, missed=0, first_p95=80.0, failed=0) -> dict:
    return {"calls": 10, "failed": failed, "chunk_violations": violations, "underruns": {"count": underruns, "ms": 130.0 * underruns},
            "barge_in_ms": {"p50": barge_p50, "missed": missed}, "barge_in_floor_ms": {"p50": floor_p50}, "first_audio_ms": {"p95": first_p95},
            "rss_mb": {"peak": 164.2},
            "cpu_pct": {"bridge": 50.4, "bridge_per_call": 5.04, "engines": 24.0, "callers": 6.0, "others": 3.0, "core_others": 1.2}}


def test_parse_ramp_takes_increasing_positive_counts():
    assert ramp.parse_ramp("10,20,30") == [10, 20, 30]
    assert ramp.parse_ramp(" 5, 50 ,") == [5, 50]
    for bad in ("", "10,10", "20,10", "0,10", "ten"):
        with pytest.raises(ValueError):
            ramp.parse_ramp(bad)


def test_a_result_on_every_target_breaks_none():
    assert ramp.broken_targets(result()) == []


def test_each_missed_target_is_named_by_its_figure():
    assert ramp.broken_targets(result(violations=3)) == ["chunk_violations"]
    assert ramp.broken_targets(result(underruns=1)) == ["underruns"]
    assert ramp.broken_targets(result(floor_p50=ramp.MAX_BARGE_IN_P50_MS + 1)) == ["barge_in_floor_ms.p50"]
    assert ramp.broken_targets(result(barge_p50=None, floor_p50=None, missed=10)) == ["barge_in_floor_ms.p50", "barge_in_ms.missed"]
    assert ramp.broken_targets(result(first_p95=ramp.MAX_FIRST_AUDIO_P95_MS + 1)) == ["first_audio_ms.p95"]
    assert ramp.broken_targets(result(failed=1, violations=1)) == ["chunk_violations", "failed"]


def test_barge_in_counts_from_the_floor_rule_for_ours_and_from_the_onset_for_stock():
    # ours waits for min_speech_secs of the caller's speech by design: the target is what it adds after that
    assert ramp.broken_targets(result(barge_p50=520.0, floor_p50=120.0)) == []
    # stock pipecat keeps no record and cuts on the VAD's start: its onset figure is the one
    assert ramp.broken_targets(result(barge_p50=120.0, floor_p50=None), stock=True) == []
    assert ramp.broken_targets(result(barge_p50=405.0, floor_p50=None), stock=True) == ["barge_in_ms.p50"]


def test_stock_pipecat_is_not_held_to_first_audio():
    assert ramp.broken_targets(result(barge_p50=120.0, first_p95=8600.0), stock=True) == []


def test_ramp_row_has_one_cell_per_header_column():
    row = ramp.ramp_row(result(underruns=2, missed=1), ["underruns", "barge_in_ms.missed"])
    assert len(row) == len(ramp.HEADER)
    assert row == [10, "50", "5.0", "1", "24/6/3", 0, "2 (260 ms)", "520/120 (1 missed)", "80", "164", 0, "underruns, barge_in_ms.missed"]
    unpinned = result()
    del unpinned["cpu_pct"]["core_others"]
    assert ramp.ramp_row(unpinned, [])[3] == "-" and ramp.ramp_row(unpinned, [])[-1] == "-"
    assert ramp.markdown(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_split_cpus_gives_the_bridge_the_first_core():
    assert ramp.split_cpus({0, 1}) == (0, {1})
    assert ramp.split_cpus({3, 1, 2}) == (1, {2, 3})
    with pytest.raises(ValueError):
        ramp.split_cpus({0})


def test_core_figures_subtract_the_bridge_from_its_core():
    samples = [{"t": 0.0, "core_cpu": 10.0, "bridge_cpu": 5.0}, {"t": 2.0, "core_cpu": 11.8, "bridge_cpu": 6.6}]
    assert ramp.core_figures(samples, (0.0, 2.0)) == {"core": 90.0, "core_others": 10.0}
    assert ramp.core_figures(samples, None) == {"core": None, "core_others": None}


def test_core_cpu_secs_reads_a_core_of_this_machine():
    assert ramp.core_cpu_secs(min(os.sched_getaffinity(0))) is not None
    assert ramp.core_cpu_secs(10_000) is None
