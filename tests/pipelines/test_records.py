"""Call record files: directory names from hostile call ids, whole JSON lines, the stereo WAV's clock;
what the record says the caller heard: barge-in latency over audible bot audio, turns, muted words;
and bounds a hostile peer cannot push a record or the disk past: capped fields, one-line transcript,
rate-limited malformed events, the per-call size cap, retention by age and size.

The call's events come from frames fed through the real observer into a real CallLog, on a clock the
test steps, so latencies are checked exactly.
"""

import asyncio
import datetime
import json
import time

import numpy as np
import pytest
import soundfile as sf
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipelines.call_log import CallLog
from pipelines.call_observer import CallObserver
from pipelines.config import RecordsConfig
from pipelines.metrics import Metrics
from pipelines.records import MAX_LINE, MAX_STRING, CallRecord, Retention, StereoWav, prune, record_dir
from processors.pipecat_adapter import InlineObserver
from transports.frames import BargeInFrame, CallInfo, ModelMuteFrame

RATE = 8000
START = datetime.datetime(2026, 11, 21, 8, 0, 0, tzinfo=datetime.UTC)


def tone(seconds: float, value: int) -> bytes:
    return np.full(int(seconds * RATE), value, np.int16).tobytes()


def test_record_dirs_are_unique_and_safe_whatever_the_provider_sends(tmp_path):
    first = record_dir(tmp_path, "../../etc/passwd", START)
    again = record_dir(tmp_path, "../../etc/passwd", START)
    empty = record_dir(tmp_path, "", START)
    assert first.parent == again.parent == empty.parent == tmp_path
    assert first.name == "20261121T080000-etc_passwd" and again.name == f"{first.name}-2"
    assert empty.name == "20261121T080000-call"


def test_events_are_whole_lines_on_disk_before_close(tmp_path):
    record = CallRecord(record_dir(tmp_path, "c1", START), RATE, audio=False)
    record.event({"t": 0.0, "event": "call_started", "note": "ü \n quoted \""})
    record.event({"t": 0.5, "event": "holding", "clip": "greeting"})
    text = (record.path / "events.jsonl").read_text()  # not closed: what a SIGKILL would leave
    assert text.endswith("\n")
    assert [json.loads(line)["event"] for line in text.splitlines()] == ["call_started", "holding"]
    record.transcript(1.25, "Hello there.")
    assert (record.path / "transcript.txt").read_text() == "[   1.25 s] bot: Hello there.\n"
    record.close()


def test_stereo_wav_puts_bot_audio_where_it_played(tmp_path):
    path = tmp_path / "audio.wav"
    wav = StereoWav(path, RATE)
    wav.caller(tone(0.5, 1000))  # the caller's audio arrives as it is spoken
    wav.bot(tone(0.2, 2000), at=0.5)  # sent at 0.5 s
    wav.bot(tone(0.2, 3000), at=0.55)  # sent ahead: plays after the first, at 0.7 s
    wav.caller(tone(1.5, 1000))
    wav.close()
    audio, rate = sf.read(path, dtype="int16")
    assert rate == RATE and audio.shape == (2 * RATE, 2)
    assert (audio[:, 0] == 1000).all()
    bot = audio[:, 1]
    assert (bot[: int(0.5 * RATE)] == 0).all()
    assert (bot[int(0.5 * RATE): int(0.7 * RATE)] == 2000).all()
    assert (bot[int(0.7 * RATE): int(0.9 * RATE)] == 3000).all()
    assert (bot[int(0.9 * RATE):] == 0).all()


def test_a_clear_drops_the_bot_audio_that_had_not_played(tmp_path):
    path = tmp_path / "audio.wav"
    wav = StereoWav(path, RATE)
    wav.caller(tone(0.5, 1))
    wav.bot(tone(1.0, 2000), at=0.5)  # a second queued at 0.5 s
    wav.cut(at=0.8)  # the caller barged in: the provider dropped the rest
    wav.caller(tone(1.5, 1))
    wav.close()
    bot = sf.read(path, dtype="int16")[0][:, 1]
    assert (bot[int(0.5 * RATE): int(0.8 * RATE)] == 2000).all()
    assert (bot[int(0.8 * RATE):] == 0).all()


def test_the_wav_is_playable_up_to_its_last_flush_without_close(tmp_path):
    path = tmp_path / "audio.wav"
    wav = StereoWav(path, RATE)
    wav.caller(tone(1.2, 500))  # two flushes' worth: 0.5 s each
    audio, _ = sf.read(path, dtype="int16")  # header patched: readable as it stands
    assert len(audio) == int(1.2 * RATE) and (audio[:, 0] == 500).all()


# ---- what the caller heard: CallLog fed by the observer -------------------------------------------


class SteppedClock:
    """The call's clock, moved by the test."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Call:
    """A CallLog writing a record under `root`, its observer, and the clock both run on."""

    def __init__(self, root, metrics: Metrics | None = None, info: CallInfo | None = None, **kwargs):
        self.clock = SteppedClock()
        self.metrics = metrics
        info = info or CallInfo(provider="exotel", stream_id="S1", call_id="CA1", sample_rate=RATE)
        self.log = CallLog(info, metrics, str(root), clock=self.clock, **kwargs)
        self.observer = InlineObserver(CallObserver.WATCHED, CallObserver(self.log).record)
        self.model, self.next = FrameProcessor(name="model"), FrameProcessor(name="next")

    def at(self, t: float) -> "Call":
        self.clock.t = 1000.0 + t
        return self

    async def push(self, *frames, direction=FrameDirection.DOWNSTREAM):
        for frame in frames:
            await self.observer.on_push_frame(FramePushed(source=self.model, destination=self.next, frame=frame,
                                                          direction=direction, timestamp=0))

    async def vad_started(self, start_secs: float = 0.2):
        # a VAD verdict stamped in the future: judged at once, no queue wait, so onset = now - start_secs
        await self.push(VADUserStartedSpeakingFrame(start_secs=start_secs, timestamp=time.time() + 3600))

    def events(self, *names: str) -> list[dict]:
        lines = (self.log.path / "events.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        return [e for e in events if not names or e["event"] in names]

    def transcript(self) -> list[str]:
        return (self.log.path / "transcript.txt").read_text().splitlines()

    def sample(self, name: str, **labels) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


async def test_barge_in_latency_counts_from_caller_speech_over_the_audible_bot(tmp_path):
    call = Call(tmp_path, Metrics())
    # the caller is already talking (onset 0.8 s) when the bot starts at 2.0 s; the bot keeps on
    # over them and they take the floor back: latency counts from 2.0, not from their onset
    await call.at(1.0).vad_started()
    await call.at(2.0).push(BotStartedSpeakingFrame())
    await call.at(2.5).push(BargeInFrame(rule="overlap", speech_secs=0.45, onset_secs_ago=0.5, audio_secs=2.48))
    call.at(2.503).log.cleared()
    await call.at(2.51).push(BotStoppedSpeakingFrame(), VADUserStoppedSpeakingFrame())
    # floor: the bot talks from 5.0 s; the caller starts at 6.0 s and has talked 0.4 s at 6.4 s
    await call.at(5.0).push(BotStartedSpeakingFrame())
    await call.at(6.2).vad_started()
    await call.at(6.4).push(BargeInFrame(rule="floor", speech_secs=0.4, onset_secs_ago=0.4))
    call.at(6.41).log.cleared()
    await call.at(6.42).push(BotStoppedSpeakingFrame())
    call.log.end("completed", {}, {})

    [overlap, floor] = call.events("barge_in")
    assert overlap == {"t": 2.503, "event": "barge_in", "latency_ms": 503, "onset": 2.0, "rule": "overlap",
                       "speech_ms": 450, "decision_ms": 3, "audio_ms": 2480}  # from the caller's own onset it would be 1703 ms
    assert (floor["onset"], floor["latency_ms"], floor["decision_ms"], floor["rule"]) == (6.0, 410, 10, "floor")
    assert call.sample("bridge_barge_ins_total", rule="overlap") == 1 and call.sample("bridge_barge_ins_total", rule="floor") == 1
    assert call.sample("bridge_barge_in_seconds_count") == 2
    assert call.sample("bridge_barge_in_seconds_sum") == pytest.approx(0.503 + 0.41)
    assert call.sample("bridge_barge_in_decision_seconds_sum") == pytest.approx(0.003 + 0.01)


async def test_a_clear_without_a_barge_in_decision(tmp_path):
    call = Call(tmp_path, Metrics())
    await call.at(1.0).push(BotStartedSpeakingFrame())
    call.at(3.0).log.cleared()  # the caller is silent: drain, engine failure
    await call.at(3.0).push(BotStoppedSpeakingFrame())
    await call.at(3.5).vad_started()  # onset 3.3
    await call.at(4.0).push(BotStartedSpeakingFrame())  # the bot starts over the caller
    call.at(4.3).log.cleared()  # an interruption decided elsewhere (pipecat's turn strategies) over caller speech
    call.log.end("completed", {}, {})

    assert [e["event"] for e in call.events("clear", "barge_in")] == ["clear", "barge_in"]
    barge_in = call.events("barge_in")[0]
    assert (barge_in["onset"], barge_in["latency_ms"], barge_in["rule"], barge_in["decision_ms"]) == (4.0, 300, None, None)
    assert call.sample("bridge_barge_ins_total", rule="unknown") == 1 and call.sample("bridge_barge_ins_total", rule="floor") == 0
    assert call.sample("bridge_barge_in_seconds_count") == 1


async def test_a_decision_seen_after_its_clear_is_not_paired_with_the_next_one(tmp_path):
    call = Call(tmp_path)
    await call.at(1.0).push(BotStartedSpeakingFrame())
    await call.at(2.0).vad_started()
    call.at(2.3).log.cleared()
    # the observer is late: a decision pushed before that clear only arrives now
    call.at(2.4).log.barge_in_decided(2.29, "floor", 0.4, 0.5)
    await call.at(5.0).push(BotStartedSpeakingFrame())
    call.at(6.0).log.cleared()  # the caller is silent by now (no VAD stop seen, though): no decision carried over
    call.log.end("completed", {}, {})
    assert [e["rule"] for e in call.events("barge_in")] == [None, None]


async def test_turns_and_the_speech_segments_in_them(tmp_path):
    call = Call(tmp_path)
    await call.at(1.0).vad_started()  # onset 0.8
    started = UserStartedSpeakingFrame()
    await call.at(1.05).push(started)
    await call.at(1.05).push(UserStartedSpeakingFrame(), direction=FrameDirection.UPSTREAM)  # the broadcast's other half
    await call.at(1.6).push(VADUserStoppedSpeakingFrame())
    await call.at(1.9).vad_started()  # a comma pause: same turn
    await call.at(1.9).push(started)  # passed on by a later processor: not its first push
    await call.at(2.5).push(VADUserStoppedSpeakingFrame())
    await call.at(3.0).push(UserStoppedSpeakingFrame())
    call.log.end("completed", {}, {})
    assert [(e["event"], e.get("onset"), e.get("segments")) for e in call.events(
        "user_started", "user_stopped", "turn_started", "turn_ended")] == [
        ("user_started", 0.8, None), ("turn_started", 0.8, None), ("user_stopped", None, None),
        ("user_started", 1.7, None), ("user_stopped", None, None), ("turn_ended", None, 2)]


async def say(call: Call, *pieces: str):
    await call.push(*(TTSTextFrame(text=p, text_type="word") for p in pieces))


@pytest.mark.parametrize("mute_first", [False, True], ids=["stopped-then-muted", "muted-then-stopped"])
async def test_muted_words_are_kept_apart_from_heard_ones(tmp_path, mute_first):
    call = Call(tmp_path, Metrics())
    await call.at(1.0).push(TTSStartedFrame(context_id="bot-1"), BotStartedSpeakingFrame())
    await say(call, "Sure,", "the", "clinic", "opens")
    await call.at(2.0).vad_started()
    await call.at(2.4).push(BargeInFrame(rule="floor", speech_secs=0.4, onset_secs_ago=0.6))
    call.at(2.41).log.cleared()
    cut = [TTSStoppedFrame(context_id="bot-1"), ModelMuteFrame(muted=True)]
    await call.at(2.42).push(*(reversed(cut) if mute_first else cut))
    await call.push(BotStoppedSpeakingFrame())
    await call.at(2.6).push(VADUserStoppedSpeakingFrame())
    await say(call, "at", "nine", "tomorrow")  # bot_speech drops these
    await say(call, "Of")  # pushed by the model before bot_speech ended the mute: it passes, heard
    await call.at(3.5).push(ModelMuteFrame(muted=False, secs=1.05, words="at nine tomorrow"))
    await call.push(TTSStartedFrame(context_id="bot-2"))
    await say(call, "course.")
    await call.at(4.0).push(TTSStoppedFrame(context_id="bot-2"))
    call.at(4.5).log.end("completed", {}, {})

    assert [(e["event"], e.get("context"), e.get("text"), e.get("muted")) for e in call.events("bot_text")] == [
        ("bot_text", "bot-1", "Sure, the clinic opens", "at nine tomorrow"),
        ("bot_text", "bot-2", "Of course.", "")]
    [started] = call.events("mute_started")
    [ended] = call.events("mute_ended")
    assert (started["t"], ended["t"], ended["secs"], ended["words"]) == (2.42, 3.5, 1.05, "at nine tomorrow")
    assert call.transcript() == ["[   2.42 s] bot: Sure, the clinic opens",
                                 "[   3.50 s] bot [muted]: at nine tomorrow",
                                 "[   4.00 s] bot: Of course."]
    assert call.sample("bridge_model_muted_seconds_total") == pytest.approx(1.05)


async def test_a_call_ending_mid_mute_still_keeps_heard_and_muted_apart(tmp_path):
    call = Call(tmp_path)
    await call.at(1.0).push(TTSStartedFrame(context_id="bot-1"), BotStartedSpeakingFrame())
    await say(call, "Your", "appointment")
    await call.at(1.5).vad_started()
    await call.push(BargeInFrame(rule="floor", speech_secs=0.4, onset_secs_ago=0.4))
    call.log.cleared()
    await call.at(1.6).push(TTSStoppedFrame(context_id="bot-1"), ModelMuteFrame(muted=True))
    await say(call, "is", "on", "Monday")
    call.at(2.0).log.end("caller_gone", {}, {})  # the caller hung up while the model was muted
    [text] = call.events("bot_text")
    assert (text["text"], text["muted"]) == ("Your appointment", "is on Monday")
    assert call.transcript() == ["[   1.60 s] bot: Your appointment", "[   2.00 s] bot [muted]: is on Monday"]


async def test_an_utterance_heard_whole_is_one_line(tmp_path):
    call = Call(tmp_path)
    await call.at(1.0).push(TTSStartedFrame(context_id="bot-1"))
    await say(call, "Hello,", "how", "can", "I", "help?")
    await call.at(2.0).push(TTSStoppedFrame(context_id="bot-1"))
    await call.at(2.5).push(TTSStartedFrame(context_id="bot-2"))
    await say(call, "Take", "your", "time.")
    call.at(3.0).log.end("completed", {}, {})  # the last utterance is still open at the end
    assert [(e["text"], e["muted"]) for e in call.events("bot_text")] == [("Hello, how can I help?", ""), ("Take your time.", "")]
    assert call.transcript() == ["[   2.00 s] bot: Hello, how can I help?", "[   3.00 s] bot: Take your time."]


# ---- bounds: what a hostile peer can make a record hold --------------------------------------------


def test_what_a_peer_sends_is_capped_and_the_cut_marked(tmp_path):
    params = {f"{i}{'k' * 1000}": "v" * 1000 for i in range(100)}
    info = CallInfo(provider="exotel", stream_id="S1", call_id="C" * 10_000, sample_rate=RATE, custom_parameters=params)
    call = Call(tmp_path, info=info)
    for _ in range(40):  # the attack: mark echoes with 1 MB names made a 41 MB record
        call.log.emit("mark_played", mark="m" * 1_000_000)
    call.log.emit("dtmf", digit="1" * 5000)
    call.log.emit("provider_stop", reason="r" * 50_000)
    call.log.emit("bot_text", context="bot-1", text="w" * 50_000, muted="")
    call.log.emit("holding", clip="c", secs=1.0, extra={"a": {"b": {"c": {"d": {"e": 1}}}}})
    call.log.end("completed", {}, {})

    [started] = call.events("call_started")
    assert started["call_id"] == "C" * MAX_STRING + "...[+9744 chars]"
    custom = started["custom_parameters"]
    assert len(custom) == 65 and custom["..."] == "+36 items"
    key = next(iter(custom))
    assert key == "0" + "k" * (MAX_STRING - 1) + "...[+745 chars]" and custom[key] == "v" * MAX_STRING + "...[+744 chars]"
    marks = call.events("mark_played")
    assert len(marks) == 40 and all(m["mark"] == "m" * MAX_STRING + "...[+999744 chars]" for m in marks)
    assert call.events("dtmf")[0]["digit"].startswith("1" * MAX_STRING + "...[+")
    assert call.events("provider_stop")[0]["reason"] == "r" * 1000 + "...[+49000 chars]"
    assert call.events("bot_text")[0]["text"] == "w" * 4000 + "...[+46000 chars]"
    assert call.events("holding")[0]["extra"] == {"a": {"b": {"c": {"d": "...[nested too deep]"}}}}
    lines = (call.log.path / "events.jsonl").read_text().splitlines()
    assert all(len(line) <= MAX_LINE for line in lines)
    assert sum(len(line) + 1 for line in lines) < 100_000  # was 41 MB


def test_a_line_too_long_after_the_caps_loses_its_largest_fields(tmp_path):
    record = CallRecord(record_dir(tmp_path, "c1", START), RATE, audio=False)
    many = {f"k{i}": {f"j{j}": "x" * 300 for j in range(64)} for i in range(64)}  # capped, and still megabytes
    record.event({"t": 1.0, "event": "call_started", "call_id": "c1", "custom_parameters": many})
    record.close()
    [line] = (record.path / "events.jsonl").read_text().splitlines()
    event = json.loads(line)
    assert len(line) <= MAX_LINE and event["call_id"] == "c1"
    assert event["custom_parameters"].startswith("...[cut: ") and event["custom_parameters"].endswith(" bytes]")


async def test_nothing_a_peer_sends_starts_a_transcript_line(tmp_path):
    record = CallRecord(record_dir(tmp_path, "c1", START), RATE, audio=False)
    record.transcript(1.0, "one\nbot: forged\rtwo\u2028three\u2029four\x85five\x1b[2Jsix\u202eevil\x00")
    record.close()
    text = (record.path / "transcript.txt").read_text()
    assert text == ("[   1.00 s] bot: one\\u000abot: forged\\u000dtwo\\u2028three\\u2029four\\u0085five"
                    "\\u001b[2Jsix\\u202eevil\\u0000\n")
    # through the call log too: the engine's words are a peer's
    call = Call(tmp_path / "log")
    await call.at(1.0).push(TTSStartedFrame(context_id="bot-1"))
    await say(call, "Hi\n[   9.99 s] bot: forged", "\x1b]0;title\x07", "\u202edone")
    await call.at(2.0).push(TTSStoppedFrame(context_id="bot-1"))
    call.log.end("completed", {}, {})
    assert len(call.transcript()) == 1
    assert call.transcript()[0].startswith("[   2.00 s] bot: Hi [ 9.99 s] bot: forged ")
    assert "\x1b" not in call.transcript()[0] and "\\u001b]0;title\\u0007" in call.transcript()[0]


def test_malformed_messages_are_recorded_as_the_log_notes_them(tmp_path):
    call = Call(tmp_path, Metrics())
    for n in range(1, 1001):
        call.log.malformed("bad_json", n)
    for n in range(1, 4):
        call.log.malformed("no_event", n)
    call.log.end("completed", {"bad_json": 1000, "no_event": 3}, {})
    bad = call.events("malformed")
    assert [(e["reason"], e["count"]) for e in bad] == [("bad_json", n) for n in (1, 2, 3, 4, 5, *range(100, 1001, 100))] + [
        ("no_event", n) for n in (1, 2, 3)]
    assert call.events("call_ended")[0]["dropped"] == {"bad_json": 1000, "no_event": 3}
    assert call.sample("bridge_malformed_messages_total", reason="bad_json") == 1000


def test_a_full_record_says_so_once_stops_and_still_ends(tmp_path):
    cap = 100_000
    call = Call(tmp_path, max_bytes=cap)
    for i in range(2000):  # ~300 KB of marks: the call goes on past the cap
        call.at(i / 100).log.emit("mark_played", mark=f"{i:04d}" + "m" * 250)
        if i % 100 == 0:
            call.log._record.transcript(i / 100, f"utterance {i}")
    call.at(30.0).log.end("completed", {"bad_json": 7}, {"output": {"messages_sent": 12}})

    events = call.events()
    assert [e["event"] for e in events].count("record_truncated") == 1
    cut = next(k for k, e in enumerate(events) if e["event"] == "record_truncated")
    assert [e["event"] for e in events[cut + 1:]] == ["call_ended"]
    truncated, ended = events[cut], events[-1]
    assert truncated["max_bytes"] == cap and truncated["written_bytes"] < cap
    written = len(events) - 3  # call_started, record_truncated, call_ended
    assert ended["dropped"] == {"bad_json": 7} and ended["outcome"] == "completed"
    assert ended["lines_dropped"] == 2000 + 20 - written - sum(1 for line in call.transcript() if "utterance" in line)
    assert call.transcript()[-1].endswith(f"(record truncated at {cap} bytes)")
    size = sum((call.log.path / name).stat().st_size for name in ("events.jsonl", "transcript.txt"))
    assert size <= cap


def test_records_config_defaults_change_nothing_for_retention():
    cfg = RecordsConfig(dir="records")
    assert (cfg.max_call_bytes, cfg.keep_days, cfg.max_total_mb) == (5 * 1024 * 1024, None, None)
    assert not Retention.of(cfg).enabled
    assert Retention.of(RecordsConfig(dir="records", keep_days=30)).enabled
    assert not Retention.of(RecordsConfig(keep_days=30)).enabled  # no records at all


def finished_record(root, call_id: str, started: datetime.datetime, size: int = 0):
    record = CallRecord(record_dir(root, call_id, started), RATE, audio=False)
    record.event({"t": 0.0, "event": "call_started"})
    record.close()
    if size:
        (record.path / "audio.wav").write_bytes(bytes(size))
    return record.path


def others(tmp_path):
    """What retention must never touch: files and folders beside the records, and a record-like folder outside."""
    root = tmp_path / "records"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "20200101T000000-not_a_record").mkdir()  # a record's name, but no events.jsonl
    (root / "keep").mkdir()
    (root / "keep" / "events.jsonl").write_text("{}\n")
    outside = finished_record(tmp_path / "elsewhere", "far", START - datetime.timedelta(days=400), size=10_000)
    (root / "20200101T000000-link").symlink_to(outside, target_is_directory=True)
    return root, outside


def untouched(root, outside):
    assert (root / "notes.txt").read_text() == "mine" and (root / "20200101T000000-not_a_record").is_dir()
    assert (root / "keep" / "events.jsonl").exists() and (root / "20200101T000000-link").is_symlink()
    assert (outside / "events.jsonl").exists() and (outside / "audio.wav").stat().st_size == 10_000


def test_retention_by_age_deletes_only_old_call_records(tmp_path):
    root, outside = others(tmp_path)
    old = [finished_record(root, f"old{d}", START - datetime.timedelta(days=d)) for d in (40, 31)]
    recent = [finished_record(root, f"new{d}", START - datetime.timedelta(days=d)) for d in (29, 0)]
    gone = prune(root, keep_days=30, now=START)
    assert sorted(gone) == sorted(old)
    assert not any(p.exists() for p in old) and all(p.exists() for p in recent)
    untouched(root, outside)


def test_retention_by_size_deletes_the_oldest_and_never_a_live_call(tmp_path):
    root, outside = others(tmp_path)
    day = datetime.timedelta(days=1)
    live = CallRecord(record_dir(root, "live", START - 10 * day), RATE, audio=False)  # oldest, but still on
    (live.path / "audio.wav").write_bytes(bytes(300_000))
    paths = [finished_record(root, f"c{i}", START - (5 - i) * day, size=100_000) for i in range(5)]
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in [live.path, *paths]}
    limit = sum(sizes.values()) - sizes[paths[0]] - sizes[paths[1]] // 2  # two must go
    gone = prune(root, max_total_bytes=limit, keep={live.path})
    assert gone == paths[:2] and live.path.exists() and all(p.exists() for p in paths[2:])
    untouched(root, outside)
    live.close()


async def test_retention_runs_at_start_off_the_loop_and_stops(tmp_path):
    root, outside = others(tmp_path)
    old = finished_record(root, "old", datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    new = finished_record(root, "new", datetime.datetime.now(datetime.UTC))
    retention = Retention(str(root), keep_days=1)
    retention.start()

    async def first_pass():
        while retention.passes == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(first_pass(), 30)
    await retention.stop()
    assert not old.exists() and new.exists()
    untouched(root, outside)
