"""Call records on disk: what happened on a call, readable without the logs.

A record is one directory per call, `DIR/<UTC start>-<call id>/`:

- `events.jsonl`: one JSON object per line, `{"t": seconds since call start, "event": name, ...}`.
  The events are listed in `pipelines/call_log.py`. `python -m pipelines report` draws them.
- `transcript.txt`: the bot's words, one line per model utterance. Words of a cut utterance the
  caller never heard (said after the barge-in, silenced) get their own `bot [muted]:` line.
- `audio.wav` (optional): stereo, caller left, bot right, at the call's rate.

Every file is written as the call goes. A process killed with SIGKILL leaves every line written
before the kill intact. An event line is a single write(2) straight into the page cache: no
Python buffer holds it back, and no fsync is needed, since the kill does not touch the kernel.
The WAV header is patched at each flush, about every half second, so the file stays playable up
to its last flush.

A hostile peer cannot grow a record without bound. Every event field is capped (`bounded`): a
string at 256 characters (4000 for model text, 1000 for messages and reasons), a dict or list at 64
items, nesting at 4 levels, a whole line at 64 KB, each cut marked. A transcript line cannot start
another: control, line-separator and bidi characters are escaped. Events and transcript together
stop at `max_bytes`: one `record_truncated` event, then nothing more but the `call_ended` line, for
which room is kept. `audio.wav` grows with the call at 4 bytes per frame (caller and bot, 16-bit),
what the call's length allows, and stops short of the WAV format's 4 GiB. `Retention` deletes the
oldest records beyond an age and/or a total size.
"""

import asyncio
import datetime
import json
import os
import re
import shutil
import wave
from pathlib import Path

import numpy as np
from loguru import logger

AUDIO_FLUSH_SECS = 0.5
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_RECORD_NAME = re.compile(r"^(\d{8}T\d{6})-[A-Za-z0-9_.-]+$")  # what `record_dir` makes, and nothing else

MAX_CALL_BYTES = 5 * 1024 * 1024  # events and transcript of one call (records.max_call_bytes)
MAX_STRING = 256  # ids, marks, digits, custom parameters: what a peer names things with
MAX_FIELD = {"text": 4000, "muted": 4000, "words": 4000, "message": 1000, "reason": 1000}  # top-level fields
MAX_ITEMS = 64  # per dict or list
MAX_DEPTH = 4
MAX_LINE = 64 * 1024  # bytes of one event line
MAX_TRANSCRIPT = 4000  # characters of one transcript line's text
FINAL_EVENT = "call_ended"
_RESERVE = MAX_LINE + 1024  # kept for call_ended, record_truncated and the transcript's note
WAV_MAX_BYTES = 2**32 - 2**20  # RIFF sizes are 32-bit: stop a little short
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...[+{len(text) - limit} chars]"


def bounded(value, limit: int = MAX_STRING, depth: int = 0):
    """A JSON-able copy of `value` whose strings, containers and nesting are capped, cuts marked."""
    if isinstance(value, str):
        return _cut(value, limit)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= MAX_DEPTH:
        return "...[nested too deep]"
    if isinstance(value, dict):
        out = {_cut(str(k), MAX_STRING): bounded(v, MAX_STRING, depth + 1)
               for k, v in list(value.items())[:MAX_ITEMS]}
        if len(value) > MAX_ITEMS:
            out["..."] = f"+{len(value) - MAX_ITEMS} items"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        out = [bounded(v, MAX_STRING, depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out.append(f"...[+{len(items) - MAX_ITEMS} items]")
        return out
    return _cut(str(value), limit)


def event_line(event: dict) -> str:
    """One capped JSON line (ASCII: json escapes newlines and every non-ASCII character)."""
    fields = {k: bounded(v, MAX_FIELD.get(k, MAX_STRING)) for k, v in event.items()}
    line = json.dumps(fields, separators=(",", ":"), default=str)
    if len(line) > MAX_LINE:  # many capped fields still add up: cut the largest until it fits
        sizes = {k: len(json.dumps(v, default=str)) for k, v in fields.items() if k not in ("t", "event")}
        for k in sorted(sizes, key=sizes.get, reverse=True):
            fields[k] = f"...[cut: {sizes[k]} bytes]"
            line = json.dumps(fields, separators=(",", ":"), default=str)
            if len(line) <= MAX_LINE:
                break
    return line + "\n"


def escape_controls(text: str) -> str:
    """Text a peer sent, safe on one plain-text line (a record's or a log's): control, separator and
    bidi characters escaped as \\uXXXX."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def one_line(text: str) -> str:
    return escape_controls(_cut(text, MAX_TRANSCRIPT))


def record_dir(root: str | Path, call_id: str, started: datetime.datetime) -> Path:
    """A new directory named by start time and call id (the id comes from the provider: sanitised)."""
    safe = _UNSAFE.sub("_", call_id)[:64].strip("._") or "call"
    base = Path(root) / f"{started.strftime('%Y%m%dT%H%M%S')}-{safe}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


_open_records: set[Path] = set()  # records of live calls: retention leaves them alone
RETENTION_EVERY_SECS = 3600.0


def _record_dirs(root: Path) -> list[tuple[datetime.datetime, str, Path]]:
    """(UTC start, name, path) of the call records directly under `root`, oldest first; nothing else."""
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _RECORD_NAME.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or not os.path.isfile(os.path.join(entry.path, "events.jsonl")):
            continue
        try:
            start = datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
        except ValueError:
            continue
        found.append((start, entry.name, Path(entry.path)))
    return sorted(found)


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):  # does not follow links
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def prune(root: str | Path, keep_days: float | None = None, max_total_bytes: int | None = None,
          now: datetime.datetime | None = None, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete the call records under `root` older than `keep_days` (by the start in their name), then
    the oldest until the rest fit in `max_total_bytes`; `keep` (live calls) stays. Returns what went.

    Only directories named as `record_dir` names them are considered or counted: other files and
    directories under `root`, and anything outside it, are never touched."""
    now, root = now or datetime.datetime.now(datetime.UTC), Path(root)
    live = {p.name for p in keep if p.parent.resolve() == root.resolve()}
    records = _record_dirs(root)
    sizes = {path: _size(path) for _, _, path in records} if max_total_bytes is not None else {}
    records = [r for r in records if r[1] not in live]
    doomed = []
    if keep_days is not None:
        cutoff = now - datetime.timedelta(days=keep_days)
        doomed = [r for r in records if r[0] < cutoff]
        records = records[len(doomed):]  # sorted oldest first: the old ones are a prefix
    if max_total_bytes is not None:
        total = sum(sizes.values()) - sum(sizes[path] for _, _, path in doomed)
        for record in records:
            if total <= max_total_bytes:
                break
            doomed.append(record)
            total -= sizes[record[2]]
    gone = []
    for _, _, path in doomed:
        try:
            shutil.rmtree(path)
            gone.append(path)
        except OSError as exc:
            logger.warning(f"records: cannot delete {path}: {exc}")
    return gone


class Retention:
    """Old call records deleted at start and then every `every` seconds, off the event loop.

    Off (start does nothing) without a directory or without either limit."""

    def __init__(self, root: str | None, keep_days: float | None = None, max_total_mb: float | None = None,
                 every: float = RETENTION_EVERY_SECS):
        self.root, self.keep_days, self.every = root, keep_days, every
        self.max_total_bytes = None if max_total_mb is None else int(max_total_mb * 1024 * 1024)
        self.passes = 0
        self._task: asyncio.Task | None = None

    @classmethod
    def of(cls, records) -> "Retention":
        """From the deployment's `records:` block (RecordsConfig)."""
        return cls(records.dir, records.keep_days, records.max_total_mb)

    @property
    def enabled(self) -> bool:
        return bool(self.root) and (self.keep_days is not None or self.max_total_bytes is not None)

    async def run_once(self) -> list[Path]:
        keep = set(_open_records)  # taken on the loop, where calls open and close their records
        try:
            gone = await asyncio.to_thread(prune, self.root, self.keep_days, self.max_total_bytes, keep=keep)
        except Exception:
            logger.exception(f"records: retention pass over {self.root} failed")
            gone = []
        self.passes += 1
        if gone:
            logger.info(f"records: deleted {len(gone)} old call records under {self.root}")
        return gone

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="records-retention")

    async def _loop(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class CallRecord:
    """The files of one call. Events and audio are passed in by `CallLog`.

    `max_bytes`: events and transcript together (None: no cap); past it, one `record_truncated`
    event and then only `call_ended`, which carries `lines_dropped`.
    """

    def __init__(self, path: Path, sample_rate: int, audio: bool, max_bytes: int | None = None):
        self.path = path
        self._events = open(path / "events.jsonl", "a", encoding="utf-8", buffering=1)
        self._transcript = open(path / "transcript.txt", "a", encoding="utf-8", buffering=1)
        self.audio = StereoWav(path / "audio.wav", sample_rate) if audio else None
        self.max_bytes = max_bytes
        self.written = 0  # bytes of events and transcript
        self.truncated = False
        self.dropped = 0  # events and transcript lines not written past the cap
        _open_records.add(path)

    def _room(self, n: int, t: float) -> bool:
        """Whether `n` more bytes fit; the first that do not truncate the record."""
        if self.truncated:
            self.dropped += 1
            return False
        if self.max_bytes is None or self.written + n <= max(0, self.max_bytes - _RESERVE):
            return True
        self.truncated, self.dropped = True, 1
        self._write(self._events, event_line({"t": t, "event": "record_truncated", "max_bytes": self.max_bytes,
                                              "written_bytes": self.written}))
        self._write(self._transcript, f"[{t:7.2f} s] (record truncated at {self.max_bytes} bytes)\n")
        return False

    def _write(self, file, text: str, size: int | None = None) -> None:
        file.write(text)
        self.written += len(text.encode("utf-8")) if size is None else size

    def event(self, event: dict) -> None:
        final = event.get("event") == FINAL_EVENT
        if final and self.truncated:
            event = {**event, "lines_dropped": self.dropped}
        line = event_line(event)  # ASCII: its length is its size
        if final or self._room(len(line), event.get("t", 0.0)):
            self._write(self._events, line, len(line))

    def transcript(self, t: float, text: str, muted: bool = False) -> None:
        """`muted`: words the model said that were silenced, never heard; marked so nobody reads them as said."""
        line = f"[{t:7.2f} s] bot{' [muted]' if muted else ''}: {one_line(text)}\n"
        size = len(line.encode("utf-8"))
        if self._room(size, t):
            self._write(self._transcript, line, size)

    def close(self) -> None:
        _open_records.discard(self.path)
        try:
            if self.audio:
                self.audio.close()
        finally:
            self._events.close()
            self._transcript.close()


class StereoWav:
    """Caller left, bot right, aligned on one clock.

    The caller's audio is continuous, so its samples are the clock. Bot audio starts playing at
    whichever comes later: the moment it was sent, or the end of the bot audio before it. This is
    the playout model the pacer uses. A `clear` discards the bot audio that has not played yet,
    as the provider does.
    """

    def __init__(self, path: Path, rate: int):
        self._rate = rate
        self._wav = wave.open(str(path), "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(rate)
        self._written = 0  # frames on disk
        self._caller = bytearray()  # int16 from frame `_written` on
        self._bot = bytearray()
        self._bot_end = 0  # frame where the bot's queued audio ends

    def caller(self, pcm: bytes) -> None:
        if 4 * self._written + 2 * len(self._caller) >= WAV_MAX_BYTES:
            return  # the WAV format ends here; the call goes on
        self._caller += pcm
        if len(self._caller) >= 2 * self._rate * AUDIO_FLUSH_SECS:
            self.flush()

    def bot(self, pcm: bytes, at: float) -> None:
        start = max(self._bot_end, round(at * self._rate), self._written)
        if 4 * (start + len(pcm) // 2) >= WAV_MAX_BYTES:
            return
        offset = 2 * (start - self._written)
        if len(self._bot) < offset:
            self._bot += bytes(offset - len(self._bot))
        self._bot[offset:offset + len(pcm)] = pcm
        self._bot_end = start + len(pcm) // 2

    def cut(self, at: float) -> None:
        end = max(round(at * self._rate), self._written)
        del self._bot[2 * (end - self._written):]
        self._bot_end = min(self._bot_end, end)

    def flush(self, final: bool = False) -> None:
        frames = len(self._caller) // 2
        if final:
            frames = max(frames, len(self._bot) // 2)
        if frames == 0:
            return
        stereo = np.zeros((frames, 2), np.int16)
        for channel, buf in enumerate((self._caller, self._bot)):
            n = min(frames, len(buf) // 2)
            stereo[:n, channel] = np.frombuffer(bytes(buf[:2 * n]), np.int16)
            del buf[:2 * n]
        self._wav.writeframes(stereo.tobytes())  # patches the header's sizes
        self._written += frames

    def close(self) -> None:
        self.flush(final=True)
        self._wav.close()
