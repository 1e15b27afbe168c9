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
"""

import datetime
import json
import re
import wave
from pathlib import Path

import numpy as np

AUDIO_FLUSH_SECS = 0.5
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def record_dir(root: str | Path, call_id: str, started: datetime.datetime) -> Path:
    """A new directory named by start time and call id (the id comes from the provider: sanitised)."""
    safe = _UNSAFE.sub("_", call_id)[:64].strip("._") or "call"
    base = Path(root) / f"{started.strftime('%Y%m%dT%H%M%S')}-{safe}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


class CallRecord:
    """The files of one call. Events and audio are passed in by `CallLog`."""

    def __init__(self, path: Path, sample_rate: int, audio: bool):
        self.path = path
        self._events = open(path / "events.jsonl", "a", encoding="utf-8", buffering=1)
        self._transcript = open(path / "transcript.txt", "a", encoding="utf-8", buffering=1)
        self.audio = StereoWav(path / "audio.wav", sample_rate) if audio else None

    def event(self, line: dict) -> None:
        self._events.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")

    def transcript(self, t: float, text: str, muted: bool = False) -> None:
        """`muted`: words the model said that were silenced, never heard; marked so nobody reads them as said."""
        self._transcript.write(f"[{t:7.2f} s] bot{' [muted]' if muted else ''}: {text}\n")

    def close(self) -> None:
        if self.audio:
            self.audio.close()
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
        self._caller += pcm
        if len(self._caller) >= 2 * self._rate * AUDIO_FLUSH_SECS:
            self.flush()

    def bot(self, pcm: bytes, at: float) -> None:
        start = max(self._bot_end, round(at * self._rate), self._written)
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
