"""The scenario suite: its files load and reject mistakes by file and key, its checks judge what a
caller heard, and every scenario passes on every provider through real servers (the bench's code)."""

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.bench.scenario_results import report, targets
from pipelines.bench.scenario_servers import target
from pipelines.bench.scenarios import DEFAULT_CONFIGS, run_suite
from pipelines.config import CONFIG_DIR
from pipelines.errors import ConfigError
from pipelines.sim import scenarios
from pipelines.sim.caller import CallResult, Received
from pipelines.sim.scenarios import checks
from pipelines.sim.scenarios.checks import FRAME_S, Context, analyze, evaluate
from processors.audio import read_wav

RATE = 8000
CHUNK = 0.1  # Exotel's uplink and, here, downlink chunk


# ---- the files -------------------------------------------------------------------------------------


def test_shipped_scenarios_load_render_and_cover_the_event_kinds():
    suite = scenarios.load_all()
    assert len(suite) >= 12
    assert [s.name for s in suite] == scenarios.names()
    events = {s.model.event for s in suite}
    assert {"smooth_turn", "pause_handling", "user_interruption", "user_backchannel", "model_backchannel"} <= events
    for s in suite:
        assert s.expectations, s.name
        assert any(e.kind == "call_ok" for e in s.expectations), s.name
        for rate in (8000, 16000):
            r = s.render(rate)
            assert r.audio.dtype == np.int16 and len(r.audio) == round(r.seconds * rate)
            for item in r.placed.values():
                assert item.start <= item.onset < item.end <= r.seconds
    assert {"backchannel"} <= set(scenarios.load("user_backchannel").tags)


def test_render_places_speech_pauses_levels_dtmf_and_the_hang_up():
    pause = scenarios.load("pause_handling").render(RATE)
    first, second = pause.placed["account_first"], pause.placed["account_second"]
    assert second.onset - first.end == pytest.approx(0.45, abs=0.011)  # the comma pause, energy to energy
    assert first.start == 5.0 and first.onset == pytest.approx(5.1, abs=0.011)  # 100 ms of silence leads each WAV

    quiet = scenarios.load("quiet_caller").render(RATE)
    q = quiet.placed["question"]
    speech = quiet.audio[round(q.onset * RATE) : round(q.end * RATE)]
    level = 20 * math.log10(scenarios.active_rms(speech, RATE) / 32768)
    assert level == pytest.approx(-35, abs=0.5)

    dtmf = scenarios.load("dtmf").render(RATE)
    end = dtmf.placed["question"].end
    assert [d for _, d, _ in dtmf.dtmf] == ["1", "2", "#"]
    assert [at for at, _, _ in dtmf.dtmf] == pytest.approx([end + 0.3, end + 0.6, end + 0.9], abs=1e-3)

    hang = scenarios.load("hang_up").render(RATE)
    assert hang.hang_up_at == pytest.approx(hang.placed["question_long"].end + 2.8, abs=1e-3)
    assert hang.seconds == hang.hang_up_at and len(hang.audio) == round(hang.seconds * RATE)

    noise = scenarios.load("noise_burst")
    assert np.array_equal(noise.render(RATE).audio, noise.render(RATE).audio)  # generated, but the same each time

    overlap = scenarios.load("model_overlap")
    [line] = overlap.engine_script(handshake_delay_secs=0.5)
    assert line["at"] == pytest.approx(overlap.render(16000).placed["question"].end - 0.5 - 0.5 - scenarios.ENGINE_LEAD, abs=0.01)
    assert Path(line["wav"]).is_file() and line["text"].startswith("Sure")


GOOD = """\
event: smooth_turn
description: test
seconds: 10
caller:
  - {say: question, at: 5.0}
expect:
  - reply_heard: {after: question, within: 4.0}
"""


@pytest.mark.parametrize("text, line, key, problem", [
    (GOOD + "colour: red\n", 8, "colour", "unknown key"),
    (GOOD.replace("say: question,", "say: telepathy,"), 5, "caller[0].say", "no audio 'telepathy'"),
    (GOOD.replace("at: 5.0}", "at: later.end}"), 5, "caller[0].at", "'later' is not the name of an earlier caller item"),
    (GOOD.replace("at: 5.0}", "at: question.middle}"), 5, "caller[0].at", "is not a time"),
    (GOOD.replace("at: 5.0}", "at: 5.0, dtmf: '1'}"), 5, "caller[0]", "exactly one of say, sound, noise, dtmf, hang_up"),
    (GOOD.replace("within: 4.0", "within: -1"), 7, "expect[0].reply_heard.within", "greater than 0"),
    (GOOD.replace("after: question", "after: answer"), 7, "expect[0].reply_heard", "'answer' is not the name of a caller item"),
    (GOOD.replace("reply_heard:", "telepathy:"), 7, "expect[0].telepathy", "unknown expectation"),
    (GOOD.replace("  - {say: question, at: 5.0}\n", "  - {say: question, at: 5.0}\n  - {dtmf: '12', at: 8}\n"), 6,
     "caller[1].dtmf", "the browser page has no DTMF"),
    (GOOD.replace("seconds: 10", "seconds: 4.5"), 4, "caller", "after the caller hangs up"),
    (GOOD.replace("description: test\n", ""), 1, "description", "required key is missing"),
])
def test_a_bad_scenario_file_names_the_file_line_and_key(tmp_path, text, line, key, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        scenarios.load(path)
    assert str(err.value).startswith(f"{path}:{line}: {key}: "), str(err.value)
    assert problem in str(err.value)


def test_unknown_scenario_names_are_refused_with_the_list():
    with pytest.raises(ConfigError, match="no such scenario: nope; shipped: cough"):
        scenarios.load_all(["nope"])


# ---- the checks, on calls made up here ------------------------------------------------------------------


def clip(name: str) -> np.ndarray:
    return read_wav(CONFIG_DIR / "clips" / f"{name}.wav", RATE)


def speech(name: str) -> np.ndarray:
    """The model's voice in these made-up calls: scenario audio, as a converse engine plays it back."""
    return read_wav(scenarios.audio_path(name, RATE), RATE)


def made_up_call(seconds: float, pieces: list[tuple[float, np.ndarray]], clears: tuple = (), marks: tuple = (),
                 closed: float | None = None, violations: tuple = ()) -> CallResult:
    """A CallResult as the caller would have made it: bot audio in 100 ms chunks arriving as they play
    (each piece in its own chunks), `clear`s cutting the heard track, marks and the close at given times."""
    heard = np.zeros(round(seconds * RATE), np.int16)
    chunks = []
    n = round(CHUNK * RATE)
    for at, audio in pieces:
        start = round(at * RATE)
        for k in range(0, len(audio), n):
            part = audio[k : k + n]
            s = start + k
            if any(at + k / RATE < c <= at + (k + len(part)) / RATE for c in clears):
                cut = min(c for c in clears if c > (s / RATE))
                part = part[: max(0, round(cut * RATE) - s)]
            part = part[: max(0, len(heard) - s)]
            heard[s : s + len(part)] = part
            rms = float(np.sqrt(np.mean(audio[k : k + n].astype(np.float64) ** 2)))
            chunks.append(Received(s / RATE, s, n, rms))
    chunks.sort(key=lambda c: c.t)
    end = seconds - 0.5
    return CallResult(heard=heard, sample_rate=RATE, clears=len(clears), chunks=chunks, clear_times=list(clears),
                      marks=list(marks), hung_up_at=end, server_closed_at=closed if closed is not None else end + 0.3,
                      close_code=1000, violations=list(violations))


def record(*events: dict) -> list[dict]:
    return [{"t": 0.01, "event": "holding", "clip": "greeting", "secs": 4.627}, *events,
            {"t": 20.0, "event": "call_ended", "outcome": "completed"}]


def judge(name: str, result: CallResult, events: list[dict] | None = None) -> dict[str, checks.Check]:
    scenario = scenarios.load(name)
    timeline = scenario.render(RATE)
    clips = {n: clip(n) for n in ("greeting", "one_moment", "apology")}
    ctx = Context(scenario, timeline, result, analyze(result, clips), CHUNK, events if events is not None else record())
    return {c.label: c for c in evaluate(ctx)}


def by_kind(results: dict[str, checks.Check], kind: str) -> list[checks.Check]:
    return [c for c in results.values() if c.kind == kind]


def test_clips_are_told_from_model_speech_by_their_waveform():
    greeting, reply = clip("greeting"), speech("question_long")
    cut = round(2.0 * RATE)
    result = made_up_call(12.0, [(0.5, greeting[:cut]), (5.0, reply)])
    heard = analyze(result, {n: clip(n) for n in ("greeting", "one_moment", "apology")})
    [found] = heard.clips
    assert found.name == "greeting" and not found.complete
    frames = greeting[:cut].astype(float).reshape(-1, 160)
    last_voiced = np.flatnonzero(np.sqrt(np.mean(frames**2, axis=1)) > 100)[-1]
    assert found.start == pytest.approx(0.5, abs=1e-3) and found.end == pytest.approx(0.5 + (last_voiced + 1) * FRAME_S, abs=1e-3)
    assert heard.model_secs(0.0, 4.9) == 0  # a cut greeting is still a clip, not the model
    voiced = np.sqrt(np.mean(reply[: len(reply) // 160 * 160].astype(float).reshape(-1, 160) ** 2, axis=1)) > 100
    assert heard.model_secs(4.9, 12.0) == pytest.approx(voiced.sum() * FRAME_S, abs=2 * FRAME_S)
    [segment] = heard.segments()
    assert segment.start == pytest.approx(5.0 + np.argmax(voiced) * FRAME_S, abs=FRAME_S)


def test_a_clip_is_followed_across_an_underrun_in_its_playout():
    greeting = clip("greeting")
    stalled = np.concatenate([greeting[:4000], np.zeros(480, np.int16), greeting[4000:]])  # 60 ms gap at 0.5 s
    result = made_up_call(7.0, [(0.02, stalled)])
    heard = analyze(result, {"greeting": greeting, "one_moment": clip("one_moment")})
    [found] = heard.clips
    assert found.complete and found.start == pytest.approx(0.02, abs=1e-3)
    assert found.end == pytest.approx(0.02 + (len(greeting) + 480) / RATE, abs=1e-3)
    assert heard.model_secs(0.0, 7.0) == 0


def test_a_smooth_turn_heard_right_passes_every_expectation():
    scenario = scenarios.load("smooth_turn").render(RATE)
    end = scenario.placed["question"].end
    reply = speech("question")
    result = made_up_call(12.0, [(0.02, clip("greeting")), (end + 1.2 - 0.1, reply)])  # 0.1 s of silence leads the WAV
    results = judge("smooth_turn", result)
    assert all(c.passed for c in results.values()), {k: c.detail for k, c in results.items() if not c.passed}
    [heard] = by_kind(results, "reply_heard")
    assert heard.value == pytest.approx(1.2, abs=FRAME_S + 0.011)


def test_no_reply_a_late_reply_and_a_one_moment_clip_fail():
    end = scenarios.load("smooth_turn").render(RATE).placed["question"].end
    silent = judge("smooth_turn", made_up_call(12.0, [(0.02, clip("greeting"))]))
    [reply] = by_kind(silent, "reply_heard")
    assert not reply.passed and "no model speech" in reply.detail

    late = judge("smooth_turn", made_up_call(12.0, [(0.02, clip("greeting")), (end + 3.0, clip("one_moment")),
                                                     (end + 4.5, speech("question"))]))
    [reply] = by_kind(late, "reply_heard")
    assert not reply.passed and reply.value == pytest.approx(4.6, abs=0.05)
    [holding] = by_kind(late, "holding_clips")
    assert not holding.passed and "one_moment heard" in holding.detail


def test_holding_clip_over_model_speech_is_caught_from_the_sound_and_the_record():
    end = scenarios.load("smooth_turn").render(RATE).placed["question"].end
    reply = speech("question")
    over = made_up_call(12.0, [(0.02, clip("greeting")), (end + 1.0, reply[:4000]), (end + 1.5, clip("one_moment"))])
    [check] = by_kind(judge("smooth_turn", over), "no_holding_over_model")
    assert not check.passed and "one_moment heard at" in check.detail

    quiet = made_up_call(12.0, [(0.02, clip("greeting"))])
    events = record({"t": 8.0, "event": "speech_started", "context": "bot-1"},
                    {"t": 8.5, "event": "holding", "clip": "one_moment", "secs": 1.4},
                    {"t": 9.0, "event": "speech_stopped", "context": "bot-1"},
                    {"t": 10.0, "event": "mute_started"}, {"t": 10.2, "event": "holding", "clip": "one_moment", "secs": 1.4},
                    {"t": 10.5, "event": "mute_ended", "secs": 0.5})
    [check] = by_kind(judge("smooth_turn", quiet, events), "no_holding_over_model")
    assert not check.passed
    assert "at 8.50 s while the model spoke" in check.detail and "at 10.20 s while the model was muted" in check.detail


def interruption_call(stale_at: float | None = None, stop_after_floor: float = 0.1, second_clear: float | None = None):
    timeline = scenarios.load("user_interruption").render(RATE)
    q, i = timeline.placed["question_long"], timeline.placed["interruption"]
    reply = speech("question_long")
    reply_at = q.end + 1.1 - 0.1
    floor_sent = (math.floor((i.onset + 0.4) / CHUNK + 1e-9) + 1) * CHUNK
    cleared = round(floor_sent + stop_after_floor, 3)
    pieces = [(0.02, clip("greeting")), (reply_at, reply[: round((cleared - reply_at) * RATE)]),
              (i.end + 1.0, speech("interruption"))]
    clears = [cleared]
    marks = [(cleared + 2.0 + i.end - i.onset, "bot-2")]
    if stale_at is not None:
        pieces.append((stale_at, reply[round(3.0 * RATE) : round(3.4 * RATE)]))
        marks.append((stale_at + 0.45, "bot-1"))
    if second_clear is not None:
        clears.append(second_clear)
    return made_up_call(timeline.seconds, pieces, clears=tuple(sorted(clears)), marks=tuple(sorted(marks))), cleared, floor_sent


def test_an_interruption_heard_right_passes_and_the_stop_is_timed_from_the_floor_chunk():
    result, cleared, floor_sent = interruption_call(stop_after_floor=0.1)
    results = judge("user_interruption", result)
    assert all(c.passed for c in results.values()), {k: c.detail for k, c in results.items() if not c.passed}
    [stop] = by_kind(results, "bot_stopped_within_ms")
    assert stop.value == pytest.approx(100, abs=1000 * FRAME_S)  # the heard track goes quiet at the clear
    [stale] = by_kind(results, "no_stale_audio")
    assert stale.value == 0 and f"clear at {cleared:.2f} s" in stale.detail
    replies = by_kind(results, "reply_heard")
    assert [r.passed for r in replies] == [True, True]


def test_stale_audio_a_late_stop_and_a_second_clear_fail():
    timeline = scenarios.load("user_interruption").render(RATE)
    i = timeline.placed["interruption"]
    result, cleared, _ = interruption_call(stale_at=i.onset + 1.2)
    results = judge("user_interruption", result)
    [stale] = by_kind(results, "no_stale_audio")
    assert not stale.passed and stale.value == 4  # four 100 ms chunks of the interrupted reply after the clear
    assert stale.extra == {"window": 4, "interrupted": 4}
    [stop] = by_kind(results, "bot_stopped_within_ms")
    assert not stop.passed and stop.value > 1000

    late, _, _ = interruption_call(stop_after_floor=0.8, second_clear=i.end + 0.2)
    results = judge("user_interruption", late)
    [stop] = by_kind(results, "bot_stopped_within_ms")
    assert not stop.passed and stop.value == pytest.approx(800, abs=1000 * FRAME_S)
    [count] = by_kind(results, "clears")
    assert not count.passed and count.value == 2


def test_an_interruption_with_nothing_to_interrupt_fails_instead_of_passing_vacuously():
    timeline = scenarios.load("user_interruption").render(RATE)
    q = timeline.placed["question_long"]
    result = made_up_call(timeline.seconds, [(0.02, clip("greeting")), (q.end + 1.0, speech("question")[:8000])])
    [stop] = by_kind(judge("user_interruption", result), "bot_stopped_within_ms")
    assert not stop.passed and "nothing to interrupt" in stop.detail


def test_the_pause_rule_and_the_count_of_replies():
    timeline = scenarios.load("pause_handling").render(RATE)
    first, second = timeline.placed["account_first"], timeline.placed["account_second"]
    taken = made_up_call(timeline.seconds, [(0.02, clip("greeting")), (first.end + 0.7, speech("account_first")),
                                            (second.end + 1.0, speech("account_second"))])
    results = judge("pause_handling", taken)
    [pause] = by_kind(results, "model_speech")
    assert not pause.passed and "no turn taken in the pause" in pause.detail
    [count] = by_kind(results, "replies")
    assert not count.passed and count.value == 2


def test_call_ok_wants_no_violations_a_clean_close_after_the_caller_and_a_completed_record():
    end = scenarios.load("smooth_turn").render(RATE).placed["question"].end
    good = [(0.02, clip("greeting")), (end + 1.0, speech("question"))]
    [ok] = by_kind(judge("smooth_turn", made_up_call(12.0, good)), "call_ok")
    assert ok.passed

    def broken(**changes) -> CallResult:
        result = made_up_call(12.0, good)
        for key, value in changes.items():
            setattr(result, key, value)
        return result

    cases = [
        (broken(violations=["1.000s media #3: 100 bytes is not a multiple of 320"]), record(), "1 protocol violation(s)"),
        (broken(server_closed_at=6.0), record(), "the server hung up at 6.00 s"),
        (broken(server_closed_at=None), record(), "did not close the socket"),
        (broken(close_code=1011), record(), "closed with code 1011"),
        (broken(), record({"t": 3.0, "event": "error", "message": "boom"}), "server error at 3.00 s: boom"),
        (broken(), [{"t": 11.0, "event": "call_ended", "outcome": "error"}], "outcome 'error'"),
        (broken(), [], "the call record has no call_ended"),
    ]
    for result, events, problem in cases:
        [check] = by_kind(judge("smooth_turn", result, events), "call_ok")
        assert not check.passed and problem in check.detail, (problem, check.detail)


def test_the_targets_count_cuts_of_backchannel_scenarios():
    scenario = scenarios.load("user_backchannel")
    timeline = scenario.render(RATE)
    result = made_up_call(timeline.seconds, [(0.02, clip("greeting"))], clears=(12.5,))
    ctx = Context(scenario, timeline, result, analyze(result, {"greeting": clip("greeting")}), CHUNK, record())
    from pipelines.bench.scenario_results import Run

    run = Run("user_backchannel", "exotel", "exotel.yaml", 1, "c1", evaluate(ctx), clears=1)
    cuts = next(t for t in targets([run]) if t["target"] == "backchannel cuts")
    assert not cuts["met"] and cuts["value"] == "1/1 runs"


def test_each_shipped_deployment_is_a_target_the_caller_can_dial():
    got = {t.provider: t for t in map(target, DEFAULT_CONFIGS)}
    assert got["exotel"].rate == 8000 and got["exotel"].uplink_ms == 100 and got["exotel"].url(1).endswith(":1/exotel")
    assert got["twilio"].url(1) == "http://127.0.0.1:1/twilio/twiml" and got["twilio"].uplink_ms == 20
    assert got["browser"].rate == 16000 and got["browser"].uplink_ms == 40 and got["browser"].url(1).endswith("/browser/ws")
    assert all({"greeting", "one_moment", "apology"} <= set(t.clips) for t in got.values())


# ---- the whole suite, end to end --------------------------------------------------------------------------


def test_every_scenario_passes_on_every_provider(tmp_path):
    """The bench's own code: one server per deployment and engine setup, six calls at once (~2.5 min)."""
    lines: list[str] = []
    result = asyncio.run(run_suite(list(DEFAULT_CONFIGS), None, repeat=1, concurrency=6, work_dir=tmp_path,
                                   progress=lines.append))
    report(result, lines.append)
    assert {r.provider for r in result.runs} == {"exotel", "twilio", "browser"}
    assert len(result.runs) == sum(len(s.providers) for s in scenarios.load_all())
    assert result.passed, "\n".join(lines)
