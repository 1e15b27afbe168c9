"""Call record files: directory names from hostile call ids, whole JSON lines, the stereo WAV's clock;
and what the record says the caller heard: barge-in latency over audible bot audio, turns, muted words.

The call's events come from frames fed through the real observer into a real CallLog, on a clock the
test steps, so latencies are checked exactly.
"""

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
from pipelines.metrics import Metrics
from pipelines.records import CallRecord, StereoWav, record_dir
from processors.frames import BargeInFrame, ModelMuteFrame
from transports.frames import CallInfo

RATE = 8000
START = datetime.datetime(2026, 11, 21, 8, 0, 0, tzinfo=datetime.timezone.utc)


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

    def __init__(self, root, metrics: Metrics | None = None):
        self.clock = SteppedClock()
        self.metrics = metrics
        self.log = CallLog(CallInfo(provider="exotel", stream_id="S1", call_id="CA1", sample_rate=RATE), metrics, str(root),
                           clock=self.clock)
        self.observer = CallObserver(self.log)
        self.model, self.next = FrameProcessor(name="model"), FrameProcessor(name="next")

    def at(self, t: float) -> "Call":
        self.clock.t = 1000.0 + t
        return self

    async def push(self, *frames, direction=FrameDirection.DOWNSTREAM, first_push=True):
        for frame in frames:
            await self.observer.on_push_frame(FramePushed(source=self.model, destination=self.next, frame=frame,
                                                          direction=direction, timestamp=0, first_push=first_push))

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
    await call.at(2.5).push(BargeInFrame(rule="overlap", speech_secs=0.45, onset_secs_ago=0.5))
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
                       "speech_ms": 450, "decision_ms": 3}  # from the caller's own onset it would be 1703 ms
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
    await call.at(1.05).push(UserStartedSpeakingFrame())
    await call.at(1.05).push(UserStartedSpeakingFrame(), direction=FrameDirection.UPSTREAM)  # the broadcast's other half
    await call.at(1.6).push(VADUserStoppedSpeakingFrame())
    await call.at(1.9).vad_started()  # a comma pause: same turn
    await call.at(1.9).push(UserStartedSpeakingFrame(), first_push=False)  # passed on by a later processor
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
