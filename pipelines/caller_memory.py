"""Caller memory: what the bridge remembers about a returning caller, so the model can greet them as one.

Why: a caller who rang an hour ago and was cut off should not be treated like a stranger. When
`caller_memory.dir` is set, the server recalls the caller's history at call start (`recall`, then
`prompt_note` for the model's text prompt) and records the call at call end (`remember`).

Privacy: the raw phone number is never stored. An entry's file name is HMAC-SHA256(salt, normalised
number) in hex; without the salt the name cannot be matched to a number by trying candidates. The salt is
`caller_memory.salt` or, when unset, a random one generated once and kept in DIR/.salt (mode 0600; the
directory is created 0700). An entry holds only: calls (how many), last_call_at (UTC start of the last
call), last_outcome and last_seconds. Retention: an entry whose last call is older than `keep_days` is
ignored by `recall` and deleted by `prune`; each call refreshes it. Deleting DIR/.salt forgets everyone.

Callers with no usable number (anonymous, restricted, fewer than 5 digits) are never remembered.

The operations are quick synchronous file reads and writes (one small JSON file each); the server calls
them at call start and end, outside the audio path. Writes are atomic (temp file + os.replace), so a
reader never sees half an entry, and a lock makes `remember`'s read-modify-write safe from threads too
(one asyncio process, `asyncio.to_thread` included). Two processes sharing DIR may lose a count when the
same caller's calls end at the same instant; an entry is never corrupted by it.
"""

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import string
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_DIGITS = 5
SALT_FILE = ".salt"
_ENTRY = re.compile(r"^[0-9a-f]{64}\.json$")
_TEMP_PREFIX = ".tmp-"
_TEMP_MAX_AGE = 3600.0  # prune deletes temp files a crashed write left behind after this many seconds
# what providers send for a withheld number: the words, and (Twilio) the words spelled on a keypad
_ANONYMOUS_WORDS = {"anonymous", "unknown", "restricted", "private", "unavailable", "blocked", "withheld", "none", "null"}
_ANONYMOUS_DIGITS = {"266696687", "8656696", "7378742833", "86282452253", "7748283", "2562533"}


class CallerMemoryError(OSError):
    """The memory directory or its salt file cannot be used (not creatable, not writable, salt unreadable)."""


DEFAULT_NOTE = "This caller has called {times} before; the last call was {ago} ago and ended {outcome}."
# what a note template may use
NOTE_FIELDS = ("calls", "times", "ago", "outcome", "last_call_at", "duration")


class CallerMemoryConfig(BaseModel):
    """Per-caller memory of earlier calls, keyed by the hashed phone number; off without a directory."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(None, description=(
        "remember callers in DIR/<hash>.json (relative to the working directory); null: off. "
        "Only a salted hash of the number is stored, never the number"))
    keep_days: float = Field(90, gt=0, description="forget a caller whose last call is older than this (ignored at call start, deleted when pruned)")
    salt: str | None = Field(None, min_length=1, description=(
        "secret mixed into the number's hash; null: a random one generated once and kept in DIR/.salt (mode 0600). "
        "Changing or losing it forgets every caller"))
    note: str = Field(DEFAULT_NOTE, min_length=1, description=(
        f"what personaplex adds to its text prompt for a returning caller; fields: {', '.join('{' + f + '}' for f in NOTE_FIELDS)}"))

    @field_validator("note")
    @classmethod
    def _known_fields(cls, note: str) -> str:
        unknown = sorted({f for _, f, _, _ in string.Formatter().parse(note) if f} - set(NOTE_FIELDS))
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}} in the note; use {', '.join('{' + f + '}' for f in NOTE_FIELDS)}")
        return note


@dataclass(frozen=True)
class CallerHistory:
    calls: int  # earlier calls remembered
    last_call_at: datetime  # UTC, start of the last call
    last_outcome: str  # the call's outcome: "completed", "engine_failed", "transferred", ...
    last_seconds: float


def normalise(number: str | None) -> str | None:
    """The number as a leading "+" (if it had one) and its digits; None for a withheld or too-short one.

    A SIP/tel URI is reduced to its user part first ("sip:+4930123456@host" -> "+4930123456"). No country
    code is guessed: "09876543210" and "+919876543210" are different callers.
    """
    if number is None:
        return None
    text = str(number).strip()
    if ":" in text:
        scheme, _, rest = text.partition(":")
        if scheme.lower() in ("sip", "sips", "tel", "client"):
            text = rest
    text = text.split("@", 1)[0].split(";", 1)[0].strip()
    if text.lower().strip("+ ") in _ANONYMOUS_WORDS:
        return None
    digits = "".join(ch for ch in text if "0" <= ch <= "9")
    if len(digits) < MIN_DIGITS or digits in _ANONYMOUS_DIGITS:
        return None
    return ("+" if text.startswith("+") else "") + digits


class CallerMemory:
    """The memory directory of one deployment. Raises ValueError without `dir`, CallerMemoryError (an OSError)
    when the directory cannot be created or written or its salt file cannot be read."""

    def __init__(self, config: CallerMemoryConfig):
        if not config.dir:
            raise ValueError("caller_memory.dir is not set: caller memory is off")
        self.config = config
        self.dir = Path(config.dir)
        self.keep = timedelta(days=config.keep_days)
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        try:
            if not self.dir.exists():
                self.dir.mkdir(parents=True, mode=0o700)
                self.dir.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened; make it exact
        except OSError as exc:
            raise CallerMemoryError(f"caller_memory.dir {str(self.dir)!r}: cannot create it: {exc.strerror or exc}") from exc
        if not self.dir.is_dir():
            raise CallerMemoryError(f"caller_memory.dir {str(self.dir)!r}: not a directory")
        if not os.access(self.dir, os.R_OK | os.W_OK | os.X_OK):
            raise CallerMemoryError(f"caller_memory.dir {str(self.dir)!r}: not readable and writable by this user")
        self._salt = (config.salt if config.salt is not None else self._load_salt()).encode()

    def _load_salt(self) -> str:
        """DIR/.salt, generated on first use. Created by linking a complete temp file into place, so two
        processes starting at once agree on one salt and neither reads a half-written one."""
        path = self.dir / SALT_FILE
        if not path.exists():
            fd, temp = tempfile.mkstemp(dir=self.dir, prefix=_TEMP_PREFIX)  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
                try:
                    os.link(temp, path)
                except FileExistsError:
                    pass  # another process won the race: use its salt
            except OSError as exc:
                raise CallerMemoryError(f"caller_memory.dir {str(self.dir)!r}: cannot write the salt file: {exc.strerror or exc}") from exc
            finally:
                Path(temp).unlink(missing_ok=True)
        try:
            salt = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CallerMemoryError(f"{path}: cannot read the salt file: {exc}") from exc
        if not salt:
            raise CallerMemoryError(f"{path}: the salt file is empty (delete it to generate a new salt, which forgets every caller)")
        return salt

    def key(self, number: str | None) -> str | None:
        """The entry's key: HMAC-SHA256(salt, normalised number) in hex; None for a number not to remember."""
        normal = normalise(number)
        if normal is None:
            return None
        return hmac.new(self._salt, normal.encode(), hashlib.sha256).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _read(self, key: str) -> CallerHistory | None:
        """The stored entry; None when absent, or corrupted (logged once per entry, then left for remember to replace)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn_once(key, f"caller memory entry {path.name} unreadable, treated as absent: {exc}")
            return None
        try:
            return _parse(raw)
        except (ValueError, TypeError, KeyError) as exc:
            self._warn_once(key, f"caller memory entry {path.name} corrupted, treated as absent: {exc}")
            return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _expired(self, history: CallerHistory, now: datetime) -> bool:
        return now - history.last_call_at > self.keep

    def recall(self, number: str | None, now: datetime | None = None) -> CallerHistory | None:
        """What is remembered about this caller's earlier calls; None for a first (or forgotten, or unkeyable) caller."""
        key = self.key(number)
        if key is None:
            return None
        history = self._read(key)
        if history is None or self._expired(history, _utc(now) if now else datetime.now(UTC)):
            return None
        return history

    def remember(self, number: str | None, started_at: datetime, outcome: str, seconds: float) -> None:
        """Count a finished call (started_at: its start; naive means UTC). A no-op for a number not to remember.
        The entry's "last call" is the one that started latest, whatever order calls end in."""
        key = self.key(number)
        if key is None:
            return
        started_at = _utc(started_at)
        with self._lock:
            earlier = self._read(key)
            if earlier is not None and self._expired(earlier, max(started_at, datetime.now(UTC))):
                earlier = None  # forgotten: start counting afresh
            if earlier is not None and earlier.last_call_at > started_at:
                entry = CallerHistory(earlier.calls + 1, earlier.last_call_at, earlier.last_outcome, earlier.last_seconds)
            else:
                seconds = float(seconds) if math.isfinite(seconds) else 0.0
                entry = CallerHistory((earlier.calls if earlier else 0) + 1, started_at, str(outcome), max(seconds, 0.0))
            self._write(key, entry)
            self._warned.discard(key)

    def _write(self, key: str, entry: CallerHistory) -> None:
        data = json.dumps({"calls": entry.calls, "last_call_at": entry.last_call_at.isoformat(), "last_outcome": entry.last_outcome,
                           "last_seconds": round(entry.last_seconds, 3)}).encode()
        fd, temp = tempfile.mkstemp(dir=self.dir, prefix=_TEMP_PREFIX)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, self._path(key))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def prune(self, now: datetime | None = None) -> int:
        """Delete the entries whose last call is older than keep_days (and corrupted ones not written for as long,
        and temp files a crashed write left); returns how many entries were deleted."""
        now = _utc(now) if now else datetime.now(UTC)
        deleted = 0
        for path in self.dir.iterdir():
            try:
                if path.name.startswith(_TEMP_PREFIX):
                    if time.time() - path.stat().st_mtime > _TEMP_MAX_AGE:
                        path.unlink(missing_ok=True)
                    continue
                if not _ENTRY.match(path.name):
                    continue
                with self._lock:
                    try:
                        history = _parse(path.read_bytes())
                        last = history.last_call_at
                    except (ValueError, TypeError, KeyError):
                        last = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    if now - last > self.keep:
                        path.unlink(missing_ok=True)
                        deleted += 1
            except OSError as exc:
                logger.warning(f"caller memory: cannot prune {path.name}: {exc}")
        return deleted


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse(raw: bytes) -> CallerHistory:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    calls, outcome, seconds = data["calls"], data["last_outcome"], data["last_seconds"]
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ValueError(f"calls {calls!r}")
    if not isinstance(outcome, str):
        raise ValueError(f"last_outcome {outcome!r}")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise ValueError(f"last_seconds {seconds!r}")
    last = datetime.fromisoformat(data["last_call_at"])
    if last.tzinfo is None:
        raise ValueError("last_call_at has no time zone")
    return CallerHistory(calls, last.astimezone(UTC), outcome, float(seconds))


OUTCOME_WORDS = {
    "completed": "normally",
    "transferred": "when the line was transferred",
    "engine_failed": "with a technical problem",
    "error": "with a technical problem",
    "no_engine": "with a technical problem",
    "drained": "with a technical problem",
    "caller_gone": "when the line dropped",
    "caller_stalled": "when the line dropped",
}


def outcome_words(outcome: str) -> str:
    return OUTCOME_WORDS.get(outcome, outcome.replace("_", " "))


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "s")


def ago_words(delta: timedelta) -> str:
    """A human span: "less than a minute", "5 minutes", "2 hours", "3 days" (rounded down)."""
    secs = max(delta.total_seconds(), 0.0)
    if secs < 60:
        return "less than a minute"
    if secs < 3600:
        return _count(int(secs // 60), "minute")
    if secs < 86400:
        return _count(int(secs // 3600), "hour")
    return _count(int(secs // 86400), "day")


def prompt_note(history: CallerHistory, now: datetime, template: str = DEFAULT_NOTE) -> str:
    """The sentence for the model's text prompt. Template fields: {calls} (earlier calls, a number), {times}
    ("once", "twice", "3 times"), {ago} ("5 minutes"), {outcome} ("normally", "with a technical problem", ...),
    {last_call_at} (ISO date, UTC), {duration} (the last call's length, "4 minutes"). An unknown field raises KeyError."""
    times = {1: "once", 2: "twice"}.get(history.calls, f"{history.calls} times")
    duration = ago_words(timedelta(seconds=history.last_seconds)) if history.last_seconds >= 60 else _count(int(history.last_seconds), "second")
    return template.format_map({
        "calls": history.calls, "times": times, "ago": ago_words(_utc(now) - history.last_call_at), "outcome": outcome_words(history.last_outcome),
        "last_call_at": history.last_call_at.date().isoformat(), "duration": duration,
    })
