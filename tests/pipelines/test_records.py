"""Call record files: directory names from hostile call ids, whole JSON lines, the stereo WAV's clock."""

import datetime
import json

import numpy as np
import soundfile as sf

from pipelines.records import CallRecord, StereoWav, record_dir

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
