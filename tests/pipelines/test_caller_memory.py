"""Caller memory on real files in tmp_path: recall and remember, keys from differently written numbers and
salts, numbers never remembered, retention, corrupted entries, the raw number on no disk byte, the salt
file, and the prompt note's wording."""

import asyncio
import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from loguru import logger

from pipelines.caller_memory import DEFAULT_NOTE, CallerHistory, CallerMemory, CallerMemoryConfig, CallerMemoryError, normalise, prompt_note

NUMBER = "+919876543210"
T0 = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)


def memory(tmp_path, **kw) -> CallerMemory:
    return CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "memory"), **kw))


def entries(mem: CallerMemory) -> list:
    return sorted(p for p in mem.dir.iterdir() if p.suffix == ".json")


@pytest.fixture
def warnings():
    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def test_first_caller_then_returning(tmp_path):
    mem = memory(tmp_path)
    assert mem.recall(NUMBER, now=T0) is None
    mem.remember(NUMBER, T0, "completed", 42.5)
    assert mem.recall(NUMBER, now=T0 + timedelta(hours=1)) == CallerHistory(1, T0, "completed", 42.5)
    mem.remember(NUMBER, T0 + timedelta(days=1), "engine_failed", 3)
    history = mem.recall(NUMBER, now=T0 + timedelta(days=2))
    assert history == CallerHistory(2, T0 + timedelta(days=1), "engine_failed", 3.0)
    assert len(entries(mem)) == 1
    assert json.loads(entries(mem)[0].read_text()).keys() == {"calls", "last_call_at", "last_outcome", "last_seconds"}
    assert mem.recall("+14155550100", now=T0) is None  # someone else


def test_the_last_call_is_the_one_that_started_last(tmp_path):
    mem = memory(tmp_path)
    mem.remember(NUMBER, T0 + timedelta(minutes=5), "transferred", 60)
    mem.remember(NUMBER, T0, "completed", 600)  # started earlier, ended later
    assert mem.recall(NUMBER, now=T0 + timedelta(hours=1)) == CallerHistory(2, T0 + timedelta(minutes=5), "transferred", 60.0)


async def test_concurrent_remembers_from_threads_all_count(tmp_path):
    mem = memory(tmp_path)
    await asyncio.gather(*(asyncio.to_thread(mem.remember, NUMBER, T0 + timedelta(seconds=i), "completed", i) for i in range(40)),
                         *(asyncio.to_thread(mem.recall, NUMBER, T0) for _ in range(40)))
    assert mem.recall(NUMBER, now=T0) == CallerHistory(40, T0 + timedelta(seconds=39), "completed", 39.0)
    assert [p.name for p in mem.dir.iterdir() if p.name.startswith(".tmp")] == []


def test_naive_start_is_utc_and_a_new_instance_reads_the_entry(tmp_path):
    memory(tmp_path).remember(NUMBER, T0.replace(tzinfo=None), "completed", 10)
    assert memory(tmp_path).recall(NUMBER, now=T0).last_call_at == T0


@pytest.mark.parametrize("written", ["+91 98765-43210", "+91 (98765) 43210", " +919876543210 ", "sip:+919876543210@10.0.0.1", "tel:+91-98765-43210"])
def test_formats_of_one_number_share_a_key(tmp_path, written):
    mem = memory(tmp_path)
    assert mem.key(written) == mem.key(NUMBER)
    assert len(mem.key(NUMBER)) == 64 and int(mem.key(NUMBER), 16) >= 0
    mem.remember(written, T0, "completed", 1)
    assert mem.recall(NUMBER, now=T0).calls == 1


def test_the_plus_matters(tmp_path):
    mem = memory(tmp_path)
    assert mem.key("919876543210") != mem.key(NUMBER)
    assert normalise("+91 98765-43210") == NUMBER


def test_different_salts_give_different_keys(tmp_path):
    a = CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "a"), salt="one secret"))
    b = CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "b"), salt="another secret"))
    c = CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "c")))
    assert len({a.key(NUMBER), b.key(NUMBER), c.key(NUMBER)}) == 3
    assert CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "d"), salt="one secret")).key(NUMBER) == a.key(NUMBER)
    assert not (tmp_path / "a" / ".salt").exists()  # a configured salt is not written anywhere


@pytest.mark.parametrize("number", [None, "", "anonymous", "Anonymous", "unknown", "restricted", "RESTRICTED", "private", "1234", "+12 34",
                                    "client:alice", "+266696687", "+8656696", "+7378742833", "+86282452253"])
def test_numbers_never_remembered(tmp_path, number):
    mem = memory(tmp_path)
    assert mem.key(number) is None
    mem.remember(number, T0, "completed", 5)
    assert mem.recall(number, now=T0) is None
    assert entries(mem) == []


def test_old_entries_are_ignored_then_pruned(tmp_path):
    mem = memory(tmp_path, keep_days=30)
    mem.remember(NUMBER, T0, "completed", 5)
    mem.remember("+14155550100", T0 + timedelta(days=20), "completed", 5)
    assert mem.recall(NUMBER, now=T0 + timedelta(days=29)).calls == 1
    later = T0 + timedelta(days=31)
    assert mem.recall(NUMBER, now=later) is None
    assert mem.recall("+14155550100", now=later).calls == 1
    assert len(entries(mem)) == 2
    assert mem.prune(now=later) == 1
    assert len(entries(mem)) == 1
    assert mem.recall("+14155550100", now=later).calls == 1
    assert mem.prune(now=later) == 0
    assert (mem.dir / ".salt").exists()  # prune touches entries only


def test_a_forgotten_caller_counts_afresh(tmp_path):
    mem = memory(tmp_path, keep_days=1)
    mem.remember(NUMBER, datetime.now(UTC) - timedelta(days=3), "completed", 5)
    mem.remember(NUMBER, datetime.now(UTC), "transferred", 5)
    assert mem.recall(NUMBER).calls == 1


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"calls": 2}', b'{"calls": "2", "last_call_at": "2026-11-01T09:30:00+00:00", '
                                     b'"last_outcome": "completed", "last_seconds": 1}', b'{"calls": 2, "last_call_at": "yesterday", '
                                     b'"last_outcome": "completed", "last_seconds": 1}', b"\xff\xfe\x00garbage"])
def test_a_corrupted_entry_is_absent_then_replaced(tmp_path, warnings, content):
    mem = memory(tmp_path)
    path = mem.dir / f"{mem.key(NUMBER)}.json"
    path.write_bytes(content)
    assert mem.recall(NUMBER, now=T0) is None
    assert mem.recall(NUMBER, now=T0) is None
    assert len([w for w in warnings if "corrupted" in w]) == 1  # once, and without the number
    assert not any(NUMBER[1:] in w for w in warnings)
    mem.remember(NUMBER, T0, "completed", 7)
    assert mem.recall(NUMBER, now=T0) == CallerHistory(1, T0, "completed", 7.0)


def test_prune_deletes_an_old_corrupted_entry_and_keeps_a_fresh_one(tmp_path):
    mem = memory(tmp_path, keep_days=1)
    old, fresh = mem.dir / f"{mem.key(NUMBER)}.json", mem.dir / f"{mem.key('+14155550100')}.json"
    old.write_bytes(b"{")
    fresh.write_bytes(b"{")
    past = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(old, (past, past))
    assert mem.prune() == 1
    assert not old.exists() and fresh.exists()


def test_the_raw_number_is_in_no_file(tmp_path):
    mem = memory(tmp_path)
    for written in ("+91 98765-43210", NUMBER, "+14155550100"):
        mem.remember(written, T0, "completed", 12)
    mem.recall(NUMBER, now=T0)
    mem.prune(now=T0)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3  # the salt and two entries
    for path in files:
        data = path.read_bytes()
        for needle in ("919876543210", "9876543210", "4155550100"):  # long enough never to occur in a hex key by chance
            assert needle.encode() not in data, path
            assert needle not in path.name


def test_files_and_directory_are_private(tmp_path):
    mem = memory(tmp_path)
    mem.remember(NUMBER, T0, "completed", 12)
    assert stat.S_IMODE(mem.dir.stat().st_mode) == 0o700
    for path in mem.dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_generated_salt_is_kept_and_reused(tmp_path):
    first = memory(tmp_path)
    salt_file = first.dir / ".salt"
    salt = salt_file.read_text()
    assert len(salt.strip()) == 64
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    first.remember(NUMBER, T0, "completed", 12)
    second = memory(tmp_path)
    assert salt_file.read_text() == salt
    assert second.key(NUMBER) == first.key(NUMBER)
    assert second.recall(NUMBER, now=T0).calls == 1
    assert memory(tmp_path / "elsewhere").key(NUMBER) != first.key(NUMBER)  # a fresh directory, a fresh salt


def test_unusable_configurations(tmp_path):
    with pytest.raises(ValueError, match="not set"):
        CallerMemory(CallerMemoryConfig())
    (tmp_path / "file").write_text("x")
    with pytest.raises(CallerMemoryError, match="not a directory"):
        CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "file")))
    with pytest.raises(CallerMemoryError, match="cannot create"):
        CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "file" / "below")))
    (tmp_path / "empty_salt").mkdir()
    (tmp_path / "empty_salt" / ".salt").write_text("\n")
    with pytest.raises(CallerMemoryError, match="salt file is empty"):
        CallerMemory(CallerMemoryConfig(dir=str(tmp_path / "empty_salt")))
    assert issubclass(CallerMemoryError, OSError)


def test_config_schema():
    assert CallerMemoryConfig().dir is None
    assert CallerMemoryConfig().keep_days == 90
    with pytest.raises(ValueError):
        CallerMemoryConfig(dir="x", unknown=1)
    with pytest.raises(ValueError):
        CallerMemoryConfig(keep_days=0)
    with pytest.raises(ValueError):
        CallerMemoryConfig(salt="")
    assert all(field.description for field in CallerMemoryConfig.model_fields.values())


@pytest.mark.parametrize(("outcome", "words"), [
    ("completed", "ended normally."),
    ("transferred", "ended when the line was transferred."),
    ("engine_failed", "ended with a technical problem."),
    ("error", "ended with a technical problem."),
    ("no_engine", "ended with a technical problem."),
    ("caller_silent", "ended caller silent."),
    ("some_new_outcome", "ended some new outcome."),
])
def test_prompt_note_outcomes(outcome, words):
    note = prompt_note(CallerHistory(3, T0, outcome, 30), T0 + timedelta(days=3))
    assert note.endswith(words)
    assert "3 times" in note and "3 days ago" in note


@pytest.mark.parametrize(("elapsed", "ago"), [
    (timedelta(seconds=20), "less than a minute"),
    (timedelta(minutes=1, seconds=30), "1 minute"),
    (timedelta(minutes=5), "5 minutes"),
    (timedelta(minutes=59, seconds=59), "59 minutes"),
    (timedelta(hours=1), "1 hour"),
    (timedelta(hours=2, minutes=40), "2 hours"),
    (timedelta(hours=23), "23 hours"),
    (timedelta(days=1, hours=5), "1 day"),
    (timedelta(days=3), "3 days"),
    (timedelta(days=-1), "less than a minute"),  # a clock behind the entry
])
def test_prompt_note_ago(elapsed, ago):
    assert f"the last call was {ago} ago" in prompt_note(CallerHistory(1, T0, "completed", 30), T0 + elapsed)


def test_prompt_note_fields():
    history = CallerHistory(1, T0, "completed", 250)
    assert prompt_note(history, T0 + timedelta(hours=2)) == "This caller has called once before; the last call was 2 hours ago and ended normally."
    assert "twice" in prompt_note(CallerHistory(2, T0, "completed", 1), T0)
    template = "{calls} earlier, last on {last_call_at} for {duration}, ended {outcome}, {ago} ago"
    assert prompt_note(history, T0 + timedelta(minutes=5), template) == "1 earlier, last on 2026-11-01 for 4 minutes, ended normally, 5 minutes ago"
    assert "12 seconds" in prompt_note(CallerHistory(1, T0, "completed", 12.7), T0, "{duration}")
    assert DEFAULT_NOTE.format_map({"calls": 1, "times": "once", "ago": "x", "outcome": "y", "last_call_at": "z", "duration": "w"})
    with pytest.raises(KeyError):
        prompt_note(history, T0, "{number}")
