"""`experiment A.yaml B.yaml`: the figures and their differences from judged runs, a real A/B run over
loopback (two scenarios, two servers, ~25 s), and the usage errors."""

import json
import struct

import numpy as np
import pytest
import yaml

from pipelines.bench import experiment
from pipelines.bench.scenario_results import Run, underruns
from pipelines.config import CONFIG_DIR
from pipelines.sim.caller import CallResult, Received
from pipelines.sim.scenarios.checks import Check


def _run(deployment: int, passed: bool = True, stop_ms: float | None = None, reply_s: float | None = None,
         stale: float | None = None, first_ms: float = 15.0, under: int = 0) -> Run:
    checks = [Check("call_ok", "call ok", passed, "ok", 0.0)]
    if stop_ms is not None:
        checks.append(Check("bot_stopped_within_ms", "stop", True, "", stop_ms))
    if reply_s is not None:
        checks.append(Check("reply_heard", "reply", True, "", reply_s))
    else:
        checks.append(Check("reply_heard", "reply", False, "no reply", None))
    if stale is not None:
        checks.append(Check("no_stale_audio", "stale", stale == 0, "", stale))
    return Run("s", "exotel", "x.yaml", 1, "c", checks, deployment=deployment, first_audio_ms=first_ms,
               underruns=under, pacer_underruns=under)


def test_the_figures_and_their_differences():
    a = experiment.measure([_run(0, stop_ms=100, reply_s=1.5, stale=0, first_ms=10), _run(0, stop_ms=300, reply_s=1.0, under=2),
                            _run(0, passed=False, stop_ms=200)],
                           [{"deployment": 0, "cpu_secs": 3.0, "calls": 3}])
    b = experiment.measure([_run(1, stop_ms=50, reply_s=1.2, stale=2, first_ms=30), _run(1, reply_s=1.4)],
                           [{"deployment": 1, "cpu_secs": 1.0, "calls": 1}, {"deployment": 1, "cpu_secs": 2.0, "calls": 1}])
    assert a["summary"]["barge_in_ms"] == 200 and b["summary"]["barge_in_ms"] == 50
    assert a["summary"]["passed"] == [2, 3] and b["summary"]["passed"] == [1, 2]  # stale audio fails a run
    assert a["summary"]["replies_heard"] == [2, 3] and b["summary"]["replies_heard"] == [2, 2]
    assert a["summary"]["cpu_per_call_s"] == 1.0 and b["summary"]["cpu_per_call_s"] == 1.5
    assert b["values"]["cpu_per_call_s"] == [1.0, 2.0]
    assert a["summary"]["underruns"] == pytest.approx(2 / 3) and a["summary"]["stale_chunks"] == 0
    assert a["values"]["barge_in_ms"] == [100, 300, 200] and a["n"]["barge_in_ms"] == 3

    assert experiment.difference("barge_in_ms", a, b) == (-150, "-150 ms (-75%)")
    assert experiment.difference("stale_chunks", a, b) == (2, "+2")
    assert experiment.difference("cpu_per_call_s", a, b) == (0.5, "+0.500 s (+50%)")
    pp, text = experiment.difference("passed", a, b)  # 2/3 vs 1/2: percentage points
    assert pp == pytest.approx(-100 / 6) and text == "-17 pp"
    same = experiment.measure([_run(1, reply_s=1.0), _run(1)], [])
    assert experiment.difference("replies_heard", same, b) == (1.0, "+1")
    assert experiment.difference("cpu_per_call_s", same, b) == (None, "-")  # no CPU figure for A

    table = experiment.render_table(a, b, "a.yaml", "b.yaml").splitlines()
    assert "A: a.yaml" in table[0] and "B: b.yaml" in table[0] and "B - A" in table[0]
    row = next(line for line in table if line.startswith("barge-in latency p50"))
    assert "200 ms (n=3)" in row and "50 ms (n=1)" in row and "-150 ms (-75%)" in row
    assert "2/3" in next(line for line in table if line.startswith("runs passed"))
    assert len(table) == 1 + len(experiment.METRICS)

    runs_b = [_run(1, stop_ms=50, reply_s=1.2, stale=2), _run(1, reply_s=1.4)]
    assert experiment.failures({"A": {"runs": []}, "B": {"runs": runs_b}}) == ["failed in B: s 1/2 (no_stale_audio)"]


def test_underruns_are_gaps_inside_an_utterance_not_between_utterances():
    rate = 8000
    n = 800  # 100 ms chunks

    def chunk(t: float, start_s: float, voiced: bool = True) -> Received:
        return Received(t, round(start_s * rate), n, 2000.0 if voiced else 0.0)

    result = CallResult(np.zeros(0, np.int16), rate)
    result.chunks = [chunk(0.0, 0.0), chunk(0.05, 0.1), chunk(0.3, 0.3),  # dry 0.2-0.3: one underrun
                     chunk(2.0, 2.0), chunk(2.1, 2.1)]  # after the mark at 1.0: a new utterance
    result.marks = [(1.0, "u1")]
    assert underruns(result) == 1
    result.clear_times = [0.25]  # a clear ends the utterance as well
    assert underruns(result) == 0


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_an_ab_run_over_loopback_prints_both_columns_and_writes_json_and_png(tmp_path, capsys):
    """configs/exotel.yaml against a copy that stops the bot sooner (barge_in min_speech_secs 0.25)."""
    cfg = yaml.safe_load((CONFIG_DIR / "exotel.yaml").read_text())
    barge = next(p for p in cfg["processors"] if p["type"] == "barge_in")
    barge["params"]["min_speech_secs"] = 0.25
    for p in cfg["processors"]:
        if p["type"] == "holding":
            p["params"]["clips"] = {k: str(CONFIG_DIR / v) for k, v in p["params"]["clips"].items()}
    b = tmp_path / "exotel-barge.yaml"
    b.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "result" / "ab.json"

    code = experiment.main([str(CONFIG_DIR / "exotel.yaml"), str(b), "--only", "smooth_turn", "user_interruption",
                            "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    header = next(line for line in printed.splitlines() if "B - A" in line)
    assert "A: " in header and "exotel.yaml" in header and "B: " in header and "exotel-barge.yaml" in header
    for _key, label, *_ in experiment.METRICS:
        assert any(line.startswith(label) for line in printed.splitlines()), label

    result = json.loads(out.read_text())
    assert result["bench"] == "experiment" and result["scenarios"] == ["smooth_turn", "user_interruption"]
    for side in "AB":
        fig = result[side]
        assert len(fig["runs"]) == 2 and all(r["passed"] for r in fig["runs"]), fig["runs"]
        assert fig["summary"]["passed"] == [2, 2] and fig["summary"]["replies_heard"] == [3, 3]
        assert fig["n"]["barge_in_ms"] == 1 and fig["summary"]["barge_in_ms"] is not None
        assert fig["summary"]["stale_chunks"] == 0 and fig["summary"]["first_audio_ms"] > 0
        assert fig["summary"]["cpu_per_call_s"] > 0 and fig["cpu_secs"] > 0
        assert fig["summary"]["underruns"] is not None
    assert set(result["difference"]) == {key for key, *_ in experiment.METRICS}
    assert {s["deployment"] for s in result["servers"]} == {0, 1}

    png = out.with_suffix(".png")
    width, height = _png_size(png)
    assert width >= 800 and height >= 500


def test_an_unusable_deployment_or_scenario_dir_is_a_usage_error(tmp_path, capsys):
    assert experiment.main([str(tmp_path / "nope.yaml"), "exotel.yaml"]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and err.startswith("error: ")

    bad = tmp_path / "bad.yaml"
    bad.write_text("transport: {type: exotel}\nprocessors: [{type: no_such_processor}]\n")
    assert experiment.main(["exotel.yaml", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err

    assert experiment.main(["exotel.yaml", "exotel.yaml", "--scenarios", str(tmp_path)]) == 2  # bad.yaml as a scenario
    assert "bad.yaml" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert experiment.main(["exotel.yaml", "exotel.yaml", "--scenarios", str(tmp_path / "empty")]) == 2
    assert "no scenario files" in capsys.readouterr().err
    assert experiment.main(["exotel.yaml", "exotel.yaml", "--only", "no_such_scenario"]) == 2
    assert "no_such_scenario" in capsys.readouterr().err
