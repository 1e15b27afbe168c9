"""The call report: hand-written call records (a killed call's torn last line included) to summary and PNG."""

import json

import numpy as np
import pytest
import soundfile
from matplotlib.image import imread

from pipelines.report import CUT_OFF, MUTED_LABEL, format_summary, intervals, load_events, main, mutes, render, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Every lane and marker once at least; the caller's last turn and the model's last segment are left open
# and the record ends in a torn line, as a SIGKILLed process leaves it (no call_ended).
KILLED_CALL = [
    {"t": 0.0, "event": "call_started", "call_id": "CA1", "provider": "exotel", "sample_rate": 8000,
     "custom_parameters": {"persona": "clinic"}, "started_at": "2025-01-02T03:04:05Z"},
    {"t": 0.01, "event": "engine_waiting", "busy": 1},
    {"t": 0.05, "event": "engine_acquired", "url": "ws://gpu-a:8998", "wait_ms": 40.0},
    {"t": 0.1, "event": "holding", "clip": "greeting", "secs": 1.5},
    {"t": 0.1, "event": "bot_started"},
    {"t": 0.3, "event": "first_audio", "ms": 300.0},
    {"t": 0.4, "event": "engine_failed", "url": "ws://gpu-b:8998", "reason": "handshake timeout"},
    {"t": 0.9, "event": "engine_ready", "url": "ws://gpu-a:8998", "handshake_ms": 850.0},
    {"t": 1.0, "event": "malformed", "reason": "invalid_json", "count": 1},
    {"t": 1.2, "event": "malformed", "reason": "invalid_json", "count": 2},
    {"t": 1.3, "event": "malformed", "reason": "too_large", "count": 1},
    {"t": 1.6, "event": "bot_stopped"},
    {"t": 2.4, "event": "user_started", "onset": 2.0},
    {"t": 3.0, "event": "user_stopped"},
    {"t": 3.2, "event": "speech_started", "context": "answer"},
    {"t": 3.2, "event": "bot_started"},
    {"t": 3.3, "event": "bot_text", "text": "Hello"},
    {"t": 4.0, "event": "user_started", "onset": 3.9},
    {"t": 4.12, "event": "barge_in", "latency_ms": 220.0},
    {"t": 4.12, "event": "bot_stopped"},
    {"t": 4.12, "event": "speech_stopped"},
    {"t": 4.5, "event": "user_stopped"},
    {"t": 4.6, "event": "dtmf", "digit": "5"},
    {"t": 5.0, "event": "holding", "clip": "one_moment", "secs": 0.8},
    {"t": 5.0, "event": "bot_started"},
    {"t": 5.8, "event": "bot_stopped"},
    {"t": 6.0, "event": "speech_started", "context": "answer"},
    {"t": 6.0, "event": "bot_started"},
    {"t": 6.5, "event": "user_started"},  # no onset: starts at t
    {"t": 6.6, "event": "barge_in", "latency_ms": 100.0},
    {"t": 6.6, "event": "bot_stopped"},
    {"t": 6.6, "event": "speech_stopped"},
    {"t": 7.0, "event": "speech_started", "context": "answer"},  # never stopped
    {"t": 7.1, "event": "error", "message": "engine socket closed"},
    {"t": 7.2, "event": "draining", "deadline_secs": 30},
    {"t": 7.5, "event": "some_future_event", "x": 1},
    {"t": 8.0, "event": "provider_stop", "reason": "kill"},
]
TORN = '{"t": 8.1, "event": "user_sto'

ENDED_CALL = [
    {"t": 0.0, "event": "call_started", "call_id": "CA2", "provider": "twilio", "sample_rate": 8000,
     "custom_parameters": {}, "started_at": "2025-01-02T03:04:05Z"},
    {"t": 0.2, "event": "bot_started"},
    {"t": 0.5, "event": "user_started", "onset": 0.45},
    {"t": 1.5, "event": "holding", "clip": "greeting", "secs": 5.0},  # cut short by the hang-up
    {"t": 2.0, "event": "call_ended", "outcome": "caller_hangup", "seconds": 2.05, "dropped": {"invalid_json": 3}},
]


# The floor-aware core: turns around speech segments, barge-ins with their rule and decision time,
# the model muted after each (the second mute still open at the end), a clear with no barge-in (drain).
FLOOR_CALL = [
    {"t": 0.0, "event": "call_started", "call_id": "CA3", "provider": "exotel", "sample_rate": 8000,
     "custom_parameters": {}, "started_at": "2025-01-02T03:04:05Z"},
    {"t": 1.0, "event": "user_started", "onset": 0.8},
    {"t": 1.05, "event": "turn_started", "onset": 0.8},
    {"t": 1.6, "event": "user_stopped"},
    {"t": 1.9, "event": "user_started", "onset": 1.7},
    {"t": 2.0, "event": "speech_started", "context": "bot-1"},
    {"t": 2.0, "event": "bot_started"},
    {"t": 2.5, "event": "barge_in", "latency_ms": 503, "onset": 2.0, "rule": "overlap", "speech_ms": 450, "decision_ms": 3},
    {"t": 2.5, "event": "speech_stopped", "context": "bot-1"},
    {"t": 2.5, "event": "mute_started"},
    {"t": 2.51, "event": "bot_stopped"},
    {"t": 2.9, "event": "user_stopped"},
    {"t": 3.6, "event": "turn_ended", "segments": 2},
    {"t": 3.7, "event": "mute_ended", "secs": 1.1, "words": "at nine tomorrow"},
    {"t": 3.7, "event": "bot_text", "context": "bot-1", "text": "Sure,", "muted": "at nine tomorrow"},
    {"t": 4.0, "event": "speech_started", "context": "bot-2"},
    {"t": 4.0, "event": "bot_started"},
    {"t": 4.6, "event": "user_started", "onset": 4.4},
    {"t": 4.62, "event": "turn_started", "onset": 4.4},
    {"t": 4.81, "event": "barge_in", "latency_ms": 410, "onset": 4.4, "rule": "floor", "speech_ms": 400, "decision_ms": 10},
    {"t": 4.81, "event": "speech_stopped", "context": "bot-2"},
    {"t": 4.81, "event": "mute_started"},
    {"t": 4.82, "event": "bot_stopped"},
    {"t": 5.5, "event": "draining", "deadline_secs": 1},
    {"t": 6.0, "event": "bot_started"},
    {"t": 6.5, "event": "clear"},
    {"t": 6.5, "event": "bot_stopped"},
    {"t": 7.0, "event": "call_ended", "outcome": "drained", "seconds": 7.0, "dropped": {}},
]


def write_record(directory, events, tail: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(e) + "\n" for e in events)
    (directory / "events.jsonl").write_text(lines + tail)
    (directory / "transcript.txt").write_text("caller: hello\nbot: hello\n")


def assert_png(path, width: int = 1200, height: int = 500) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(str(path))
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # something was drawn


def test_load_events_skips_and_counts_the_torn_line(tmp_path):
    write_record(tmp_path, KILLED_CALL, tail="\n\n" + TORN)
    events, unreadable = load_events(tmp_path / "events.jsonl")
    assert len(events) == len(KILLED_CALL)
    assert unreadable == 1


def test_load_events_counts_lines_that_are_not_events(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'[1, 2]\n{"event": "dtmf"}\n{"t": 1, "event": "dtmf", "digit": "1"}\n{"t": 2, "event": "x\xff"}\n')
    events, unreadable = load_events(path)
    assert [e["t"] for e in events] == [1]
    assert unreadable == 3


def test_intervals_close_open_ones_at_the_last_event():
    lanes = intervals(KILLED_CALL)
    assert lanes["caller speech"] == [(2.0, 3.0, ""), (3.9, 4.5, ""), (6.5, 8.0, "")]
    assert lanes["bot audible"] == [(0.1, 1.6, ""), (3.2, 4.12, ""), (5.0, 5.8, ""), (6.0, 6.6, "")]
    assert lanes["model speech"] == [(3.2, 4.12, ""), (6.0, 6.6, ""), (7.0, 8.0, "")]
    assert lanes["holding clips"] == [(0.1, 1.6, "greeting"), (5.0, 5.8, "one_moment")]


def test_intervals_end_at_call_ended():
    lanes = intervals(ENDED_CALL)
    assert lanes["caller speech"] == [(0.45, 2.0, "")]
    assert lanes["bot audible"] == [(0.2, 2.0, "")]
    assert lanes["holding clips"] == [(1.5, 2.0, "greeting")]


def test_summarize_a_killed_call():
    s = summarize(KILLED_CALL, unreadable=1)
    assert s["call_id"] == "CA1" and s["provider"] == "exotel"
    assert s["outcome"] == CUT_OFF
    assert s["duration_s"] == 8.0
    assert s["caller_turns"] is None and s["caller_segments"] == 3  # a record from before turns were recorded
    assert s["barge_in_rules"] == {"unknown": 2} and s["muted_spans"] == 0
    assert s["bot_turns"] == 3
    assert s["barge_ins"] == 2
    assert s["barge_in_p50_ms"] == 160.0 and s["barge_in_max_ms"] == 220.0
    assert s["holding"] == {"greeting": 1, "one_moment": 1}
    assert s["first_audio_ms"] == 300.0
    assert (s["engine_url"], s["engine_handshake_ms"], s["engine_wait_ms"]) == ("ws://gpu-a:8998", 850.0, 40.0)
    assert s["engine_failures"] == ["ws://gpu-b:8998: handshake timeout"]
    assert s["malformed"] == 3  # running counts: invalid_json reached 2, too_large 1
    assert s["errors"] == 1
    assert s["unreadable_lines"] == 1
    text = format_summary(s)
    assert "cut off" in text and "1 unreadable lines" in text and "p50 160 ms, max 220 ms" in text
    assert "greeting x1, one_moment x1" in text and "ws://gpu-b:8998: handshake timeout" in text
    assert "- (not recorded; 3 speech segments)" in text


def test_summarize_an_ended_call():
    s = summarize(ENDED_CALL)
    assert s["outcome"] == "caller_hangup"
    assert s["duration_s"] == 2.05
    assert s["malformed"] == 3  # from call_ended's tally
    assert s["barge_ins"] == 0 and s["barge_in_p50_ms"] is None
    assert s["engine_url"] is None and s["first_audio_ms"] is None
    assert "barge-ins:" in format_summary(s)


def test_main_writes_the_timeline(tmp_path, capsys):
    write_record(tmp_path, KILLED_CALL, tail=TORN)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CA1 (exotel)" in out and "1 unreadable lines" in out
    assert f"wrote {tmp_path / 'timeline.png'}" in out
    assert_png(tmp_path / "timeline.png")


def test_main_draws_the_recording_envelopes(tmp_path, capsys):
    write_record(tmp_path, ENDED_CALL)
    rate = 8000
    t = np.arange(int(2.05 * rate)) / rate
    rng = np.random.default_rng(0)
    caller = np.where((t > 0.45) & (t < 2.0), 0.3 * np.sin(2 * np.pi * 220 * t), 0.001 * rng.standard_normal(t.size))
    bot = np.where(t > 0.2, 0.2 * rng.standard_normal(t.size), 0.0)
    soundfile.write(str(tmp_path / "audio.wav"), np.stack([caller, bot], axis=1), rate, subtype="PCM_16")
    out = tmp_path / "elsewhere.png"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)
    assert not (tmp_path / "timeline.png").exists()


def test_main_survives_an_unreadable_recording(tmp_path, capsys):
    write_record(tmp_path, ENDED_CALL)
    (tmp_path / "audio.wav").write_bytes(b"RIFF\x00\x00")
    assert main([str(tmp_path)]) == 0
    assert "without envelopes" in capsys.readouterr().err
    assert_png(tmp_path / "timeline.png")


def test_render_a_record_with_only_call_started(tmp_path):
    out = tmp_path / "empty.png"
    render(KILLED_CALL[:1], out)
    assert_png(out)
    assert "0 unreadable lines" in format_summary(summarize(KILLED_CALL[:1]))


def test_main_without_events_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    (tmp_path / "events.jsonl").write_text(TORN)
    assert main([str(tmp_path)]) == 2
    assert "no readable events (1 unreadable lines)" in capsys.readouterr().err
    assert not (tmp_path / "timeline.png").exists()


def test_a_holding_clip_ends_where_something_cut_it():
    events = [{"t": 0.0, "event": "call_started"},
              {"t": 0.1, "event": "holding", "clip": "greeting", "secs": 4.6},
              {"t": 1.9, "event": "barge_in", "latency_ms": 104},
              {"t": 5.0, "event": "holding", "clip": "one_moment", "secs": 1.5},
              {"t": 5.5, "event": "speech_started", "context": "bot-1"},
              {"t": 9.0, "event": "holding", "clip": "apology", "secs": 5.7},
              {"t": 12.0, "event": "call_ended", "outcome": "engine_failed", "seconds": 12.0}]
    assert intervals(events)["holding clips"] == [(0.1, 1.9, "greeting"), (5.0, 5.5, "one_moment"), (9.0, 12.0, "apology")]


def test_turns_and_muted_spans_have_their_intervals():
    lanes = intervals(FLOOR_CALL)
    assert lanes["caller turns"] == [(0.8, 3.6, ""), (4.4, 7.0, "")]  # from their onsets; the second never ended
    assert lanes["caller speech"] == [(0.8, 1.6, ""), (1.7, 2.9, ""), (4.4, 7.0, "")]
    assert lanes["model muted"] == [(2.5, 3.7, ""), (4.81, 7.0, "")]
    assert mutes(FLOOR_CALL) == [{"start": 2.5, "end": 3.7, "secs": 1.1, "words": "at nine tomorrow"},
                                 {"start": 4.81, "end": 7.0, "secs": pytest.approx(2.19), "words": ""}]


def test_summarize_barge_ins_turns_and_muted_speech():
    s = summarize(FLOOR_CALL)
    assert (s["caller_turns"], s["caller_segments"], s["bot_turns"]) == (2, 3, 2)
    assert s["barge_ins"] == 2 and s["clears_without_barge_in"] == 1
    assert (s["barge_in_p50_ms"], s["barge_in_max_ms"], s["barge_in_decision_p50_ms"]) == (456.5, 503, 6.5)
    assert s["barge_in_rules"] == {"overlap": 1, "floor": 1}
    assert s["muted_spans"] == 2 and s["muted_s"] == pytest.approx(3.29) and s["muted_words"] == 3
    text = format_summary(s)
    assert "caller turns:    2 (3 speech segments)" in text
    assert ("barge-ins:       2 (p50 456 ms, max 503 ms from onset over the bot; floor x1, overlap x1; "
            "decision to clear p50 6 ms), 1 other clears") in text
    assert "model muted:     3.3 s in 2 spans, 3 words never heard" in text


def test_the_timeline_shows_turns_and_muted_spans(tmp_path):
    out = tmp_path / "floor.png"
    fig = render(FLOOR_CALL, out)
    assert_png(out)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["holding clips", "model speech", "bot audible", "caller speech", "caller turns"]
    assert MUTED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "410 ms floor" in [t.get_text() for t in ax.texts]
