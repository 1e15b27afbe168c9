"""Bounded work per message (issue 14): size limits checked before anything is decoded, and a
per-call rate limit that drops and counts a flood while a real call's cadence never meets it.

Pure: plain strings and a `now` we advance by hand; no clocks, no timing thresholds.
"""

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from transports import base
from transports.base import RateLimit
from transports.browser import BrowserParams, BrowserProtocol
from transports.exotel import MAX_MESSAGE_BYTES, ExotelParams, ExotelProtocol
from transports.twilio import TwilioParams, TwilioProtocol

sys.path.insert(0, str(Path(__file__).parents[2]))
from tests.pipelines.test_faults import malformed  # noqa: E402  the pipeline flood test's 16 kinds

MB = 1_000_000


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def pcm(n_bytes: int) -> bytes:
    return np.random.default_rng(0).integers(-8000, 8000, n_bytes // 2, dtype=np.int16).tobytes()


def padded(message: dict, size: int) -> str:
    """`message` with a filler field that makes it exactly `size` bytes of JSON."""
    text = json.dumps({**message, "pad": ""})
    return json.dumps({**message, "pad": "x" * (size - len(text))})


# ---- one started call per provider, and its messages --------------------------------------------


def exotel(params=None, rate=8000) -> ExotelProtocol:
    proto = ExotelProtocol(params or ExotelParams())
    [_] = proto.receive(json.dumps({"event": "start", "stream_sid": "S", "start": {
        "stream_sid": "S", "call_sid": "C", "media_format": {"encoding": "audio/x-raw", "sample_rate": str(rate)}}}))
    return proto


def exotel_media(raw: bytes, k: int = 1) -> dict:
    return {"event": "media", "stream_sid": "S", "sequence_number": str(k + 1),
            "media": {"chunk": str(k), "timestamp": str(k * 100), "payload": b64(raw)}}


def twilio(params=None) -> TwilioProtocol:
    proto = TwilioProtocol(params or TwilioParams())
    [_] = proto.receive(json.dumps({"event": "start", "streamSid": "MZ", "start": {
        "streamSid": "MZ", "callSid": "CA", "customParameters": {"persona": "sales"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
    return proto


def twilio_media(k: int = 1) -> dict:
    return {"event": "media", "sequenceNumber": str(k + 2), "streamSid": "MZ",
            "media": {"track": "inbound", "chunk": str(k), "timestamp": str(20 * k), "payload": b64(b"\xff" * 160)}}


def browser(params=None) -> BrowserProtocol:
    proto = BrowserProtocol(params or BrowserParams())
    [_] = proto.receive(json.dumps({"type": "init"}))
    return proto


def browser_audio(params: BrowserParams) -> dict:
    return {"type": "audio", "data": b64(pcm(params.sample_rate * params.chunk_ms // 1000 * 2))}


# ---- 1. size limits that fit each protocol, checked before decoding ------------------------------


def test_defaults_fit_each_protocol():
    assert 136_536 < ExotelParams().max_message_bytes == MAX_MESSAGE_BYTES < 145_000  # 100 KB, base64, JSON
    assert TwilioParams().max_message_bytes == 16_384  # its media are ~0.4 kB
    assert BrowserParams().max_message_bytes == 2 * 1708 + 16_384  # two 40 ms chunks at 16 kHz
    assert BrowserParams(sample_rate=24000, chunk_ms=1000).max_message_bytes == 2 * 64_000 + 16_384
    assert BrowserParams(max_message_bytes=1000).max_message_bytes == 1000  # set: kept


@pytest.fixture
def undecoded(monkeypatch):
    """Call it once the call started: from then on, JSON or base64 decoding fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("decoded")

    def forbid():
        monkeypatch.setattr(base.json, "loads", boom)
        monkeypatch.setattr(base.base64, "b64decode", boom)

    return forbid


LARGEST = {  # provider -> (started protocol, the largest legal media message)
    "exotel": lambda: (exotel(), json.dumps(exotel_media(pcm(102_400)))),  # the platform's 100 KB cap
    "twilio": lambda: (twilio(), json.dumps(twilio_media())),
    "browser": lambda: (browser(), json.dumps(browser_audio(BrowserParams()))),
}


@pytest.mark.parametrize("provider", LARGEST)
def test_the_largest_legal_message_passes_and_one_byte_more_does_not(provider):
    proto, largest = LARGEST[provider]()
    limit = proto.max_message_bytes
    assert len(largest) <= limit
    assert proto.receive(largest, now=0.0)
    media = json.loads(largest)
    assert proto.receive(padded(media, limit), now=0.0)
    assert proto.receive(padded(media, limit + 1), now=0.0) == []
    assert proto.dropped == {"too_large": 1}


@pytest.mark.parametrize("provider", LARGEST)
def test_a_long_payload_reaches_the_pipeline_in_frames_of_at_most_200_ms(provider):
    """One 6.4 s Exotel chunk in one frame held the event loop 28 ms (VAD, resampling and Opus over all
    of it at once); in 200 ms frames the loop gets a turn between them (`bench stall`)."""
    proto, largest = LARGEST[provider]()
    frames = proto.receive(largest, now=0.0)
    rate = frames[0].sample_rate
    message = json.loads(largest)
    sent = base64.b64decode(message["media"]["payload"] if "media" in message else message["data"])
    heard = b"".join(f.audio for f in frames)
    assert all(len(f.audio) <= 2 * rate // 5 for f in frames)
    assert len(heard) == len(sent) * (2 if provider == "twilio" else 1)  # μ-law: one byte a sample
    if provider != "twilio":
        assert heard == sent


@pytest.mark.parametrize("provider", LARGEST)
def test_oversize_messages_are_dropped_before_any_decoding(provider, undecoded):
    proto, largest = LARGEST[provider]()
    media = json.loads(largest)
    undecoded()
    one_mb = padded(media, MB)
    assert proto.receive(one_mb, now=0.0) == [] and proto.receive(one_mb) == []
    assert proto.receive(padded(media, proto.max_message_bytes + 1)) == []
    # multi-byte characters count as the bytes they are on the wire
    wide = padded(media, proto.max_message_bytes - 10)[:-2] + "é" * 6 + '"}'
    assert len(wide) <= proto.max_message_bytes < len(wide.encode())
    assert proto.receive(wide) == []
    assert proto.dropped == {"too_large": 4}


# ---- 2. a per-call rate limit ----------------------------------------------------------------


def stream(proto, messages, times):
    """Each message at its time; the frames each produced."""
    return [proto.receive(m, now=t) for m, t in zip(messages, times, strict=True)]


def test_real_cadence_never_meets_the_limit():
    """A minute of each provider at its real cadence (and fastest rate), with a 2 s network stall
    that delivers its backlog at once, plus marks and digits: nothing is dropped."""
    def run(proto, message, per_sec, extra=()):
        times = [k / per_sec for k in range(60 * per_sec)]
        times = [max(t, 12.0) if 10.0 <= t < 12.0 else t for t in times]  # stalled, then all at once
        frames = stream(proto, [message(k) for k in range(len(times))], times)
        for m in extra:
            proto.receive(m, now=30.0)
        assert proto.dropped == {} and all(len(f) == 1 for f in frames)

    run(exotel(rate=24000), lambda k: json.dumps(exotel_media(pcm(4800), k)), 10,
        [json.dumps({"event": "mark", "stream_sid": "S", "mark": {"name": "m1"}}),
         json.dumps({"event": "dtmf", "stream_sid": "S", "dtmf": {"digit": "5"}})])
    # Exotel's largest chunks: 100 KB at 16 kHz is 3.2 s of audio
    big = json.dumps(exotel_media(pcm(102_400)))
    proto = exotel(rate=16000)
    assert all(stream(proto, [big] * 20, [3.2 * k for k in range(20)])) and proto.dropped == {}
    run(twilio(), lambda k: json.dumps(twilio_media(k)), 50,
        [json.dumps({"event": "mark", "streamSid": "MZ", "mark": {"name": "m1"}})])
    fast = BrowserParams(sample_rate=24000, chunk_ms=10)
    run(browser(fast), lambda k: json.dumps(browser_audio(fast)), 100, [json.dumps({"type": "mark", "name": "m"})])


def test_the_pipeline_flood_test_stays_under_the_limit():
    """tests/pipelines/test_faults.py's 1,000 malformed messages (16 kinds, 5.6 MB in 4 s, 26
    messages every 100 ms) are each dropped for what they are, none for the rate."""
    kinds = malformed("S")
    junk = [kinds[i % len(kinds)] for i in range(1000)]
    proto = exotel()
    for k in range(45):
        proto.receive(json.dumps(exotel_media(pcm(1600), k)), now=k / 10)
        for raw, _ in junk[k::40] if k < 40 else ():
            proto.receive(raw, now=k / 10)
    assert "rate_limited" not in proto.dropped and sum(proto.dropped.values()) == 1000


def test_a_message_flood_is_dropped_counted_and_logged_sparingly(warnings, undecoded):
    proto = twilio()
    limits = proto.params.rate_limit
    burst = int(limits.messages_per_sec * limits.burst_secs)
    flood = "x" * 10  # not even JSON: a rate-limited message is never decoded
    for _ in range(burst):
        proto.receive(flood, now=1.0)
    assert proto.dropped == {"invalid_json": burst}
    undecoded()
    for _ in range(10_000):
        assert proto.receive(flood, now=1.0) == []
    lines = [w for w in warnings if "rate_limited" in w]
    assert len(lines) == 5 + 10_000 // 100 and all("call CA" in w for w in lines)
    assert proto.dropped == {"invalid_json": burst, "rate_limited": 10_000}  # and none decoded


def test_the_call_goes_on_once_the_flood_is_over():
    proto = twilio()
    for _ in range(20_000):
        proto.receive(json.dumps(twilio_media()), now=5.0)
    dropped = proto.dropped["rate_limited"]
    assert dropped > 10_000
    assert proto.receive(json.dumps(twilio_media()), now=5.0) == []
    assert len(proto.receive(json.dumps(twilio_media()), now=6.0)) == 1
    assert proto.dropped == {"rate_limited": dropped + 1}


def test_bytes_beyond_the_rate_are_dropped_undecoded():
    proto = exotel(ExotelParams(rate_limit=RateLimit(bytes_per_sec=400_000, burst_secs=1.0, audio_speed=100)))
    big = json.dumps(exotel_media(pcm(102_400)))  # 136.6 kB; the bucket holds 400 kB
    assert [bool(proto.receive(big, now=0.0)) for _ in range(4)] == [True, True, False, False]
    assert proto.dropped == {"rate_limited": 2}
    assert proto.receive(big, now=0.5)  # 200 kB refilled


def test_audio_faster_than_the_limit_is_kept_from_the_pipeline():
    """Valid audio sent far faster than real time would make the pipeline do seconds of work per
    second; beyond audio_speed x real time (after one burst) it is dropped."""
    proto = exotel(ExotelParams(rate_limit=RateLimit(audio_speed=2.0, burst_secs=1.0)))
    second = json.dumps(exotel_media(pcm(16_000)))  # 1 s at 8 kHz
    kept = [bool(proto.receive(second, now=t / 100)) for t in range(100)]  # 100 s of audio in 1 s
    # the bucket's depth is one largest message's audio (13.2 s of base64 μ-law at 8 kHz) + 2 s refill
    assert sum(kept) == 15 and proto.dropped == {"rate_limited": 85}


def test_without_a_clock_or_with_the_limit_off_nothing_is_rate_limited():
    for proto, now in ((twilio(), None), (twilio(TwilioParams(rate_limit=None)), 0.0)):
        for _ in range(2000):
            assert len(proto.receive(json.dumps(twilio_media()), now=now)) == 1
        assert proto.dropped == {}
