"""The Exotel wire protocol, driven with the literal JSON Exotel documents (docs/protocols.md, Exotel)."""

import base64
import json

import numpy as np
import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame
from pydantic import ValidationError

from transports.exotel import ExotelParams, ExotelProtocol
from transports.frames import CallStartedFrame, CallStoppedFrame, MarkPlayedFrame

SID = "MZ0123456789abcdef"
CALL = "CA9876543210"


def start_msg(media_format=None, camel=False, **start_extra) -> str:
    """The documented `start` event (string values), optionally in camelCase."""
    if media_format is None:
        media_format = {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}
    if camel:
        body = {"streamSid": SID, "callSid": CALL, "accountSid": "ACC", "from": "0987", "to": "0800",
                "customParameters": {"token": "t1"}, "mediaFormat": media_format}
        msg = {"event": "start", "sequenceNumber": 1, "streamSid": SID, "start": body}
    else:
        body = {"stream_sid": SID, "call_sid": CALL, "account_sid": "ACC", "from": "0987", "to": "0800",
                "custom_parameters": {"token": "t1"}, "media_format": media_format}
        msg = {"event": "start", "sequence_number": "1", "stream_sid": SID, "start": body}
    body.update(start_extra)
    return json.dumps(msg)


def media_msg(raw: bytes, seq: int = 2, camel: bool = False) -> str:
    payload = base64.b64encode(raw).decode()
    if camel:
        return json.dumps({"event": "media", "sequenceNumber": seq, "streamSid": SID,
                           "media": {"chunk": 1, "timestamp": 100, "payload": payload}})
    return json.dumps({"event": "media", "sequence_number": str(seq), "stream_sid": SID,
                       "media": {"chunk": "1", "timestamp": "100", "payload": payload}})


def started(params: ExotelParams | None = None, query=None, **kw) -> ExotelProtocol:
    proto = ExotelProtocol(params or ExotelParams(), query)
    frames = proto.receive(start_msg(**kw))
    assert len(frames) == 1 and isinstance(frames[0], CallStartedFrame)
    return proto


def speech(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(-8000, 8000, n, dtype=np.int16).tobytes()


# ---- inbound events ---------------------------------------------------------------------------


def test_connected_yields_nothing():
    proto = ExotelProtocol(ExotelParams())
    assert proto.receive('{"event":"connected"}') == []
    assert proto.receive('{"event":"connected","protocol":"Call","version":"1.0.0"}') == []
    assert not proto.dropped


@pytest.mark.parametrize("camel", [False, True])
def test_start_builds_call_info_in_both_spellings(camel):
    proto = ExotelProtocol(ExotelParams(), {"sample-rate": "8000", "lang": "hi"})
    [frame] = proto.receive(start_msg(camel=camel))
    assert isinstance(frame, CallStartedFrame)
    assert frame.call == proto.call
    assert proto.call.provider == "exotel"
    assert proto.call.stream_id == SID and proto.call.call_id == CALL
    assert proto.call.account_id == "ACC"
    assert proto.call.from_number == "0987" and proto.call.to_number == "0800"
    assert proto.call.sample_rate == 8000 and proto.call.encoding == "pcm16"
    # URL parameters arrive too; the start's own custom_parameters win on conflicts.
    assert proto.call.custom_parameters == {"token": "t1", "lang": "hi"}
    assert not proto.dropped


def test_stream_sid_only_at_top_level_is_accepted():
    proto = ExotelProtocol(ExotelParams())
    msg = json.loads(start_msg())
    del msg["start"]["stream_sid"]
    [frame] = proto.receive(json.dumps(msg))
    assert frame.call.stream_id == SID


@pytest.mark.parametrize(
    "value,rate",
    [("8000", 8000), (16000, 16000), ("24000", 24000), ("8000Hz", 8000), ("8khz", 8000),
     ("16 kHz", 16000), ("24KHZ", 24000)],
)
def test_sample_rate_from_media_format(value, rate):
    mf = {"encoding": "audio/x-raw", "sample_rate": value}
    proto = started(media_format=mf, query={"sample-rate": "16000" if rate != 16000 else "8000"})
    assert proto.call.sample_rate == rate
    [frame] = proto.receive(media_msg(speech(160)))
    assert frame.sample_rate == rate


def test_sample_rate_camel_inside_media_format():
    proto = started(media_format={"encoding": "audio/x-raw", "sampleRate": 24000}, camel=True)
    assert proto.call.sample_rate == 24000


@pytest.mark.parametrize("rate", ["16000", "24000"])
def test_sample_rate_from_url_when_start_has_none(rate):
    proto = started(query={"sample-rate": rate}, media_format={"encoding": "audio/x-raw"})
    assert proto.call.sample_rate == int(rate)


def test_forced_sample_rate_beats_start_and_url():
    proto = started(ExotelParams(sample_rate=24000), query={"sample-rate": "8000"})
    assert proto.call.sample_rate == 24000
    assert proto.chunk_bytes == 3840


def test_default_rate_is_8000_with_warning(warnings):
    proto = started(media_format={})
    assert proto.call.sample_rate == 8000
    assert any("assuming 8000" in w and CALL in w for w in warnings)


@pytest.mark.parametrize("camel", [False, True])
def test_media_decodes_pcm16(camel):
    proto = started()
    raw = speech(1600)
    [frame] = proto.receive(media_msg(raw, camel=camel))
    assert isinstance(frame, InputAudioRawFrame)
    assert frame.audio == raw
    assert frame.sample_rate == 8000 and frame.num_channels == 1


def reference_ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """G.711 mu-law expansion written out, independent of audioop."""
    u = ~codes.astype(np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


@pytest.mark.parametrize("media_format", [
    {"encoding": "audio/x-mulaw", "sample_rate": "8000"},
    {"encoding": "PCMU", "sample_rate": 8000},
    "audio/x-mulaw;rate=8000",
])
def test_mulaw_is_decoded_to_pcm16(media_format):
    proto = started(media_format=media_format)
    assert proto.call.encoding == "mulaw" and proto.call.sample_rate == 8000
    codes = np.arange(256, dtype=np.uint8)
    [frame] = proto.receive(media_msg(codes.tobytes()))
    pcm = np.frombuffer(frame.audio, dtype=np.int16)
    np.testing.assert_array_equal(pcm, reference_ulaw_decode(codes))
    assert pcm[0xFF] == 0 and pcm[0x00] == -32124 and pcm[0x80] == 32124


def test_mulaw_call_sends_mulaw_in_legal_chunks():
    proto = started(media_format={"encoding": "audio/x-mulaw", "sample_rate": "8000"})
    pcm = np.linspace(-20000, 20000, 8000).astype(np.int16)
    out = proto.audio(pcm.tobytes()) + proto.flush()
    payloads = [base64.b64decode(json.loads(m)["media"]["payload"]) for m in out]
    assert all(len(p) == 3200 for p in payloads)  # 3200 mu-law bytes = 400 ms at 8 kHz
    decoded = reference_ulaw_decode(np.frombuffer(b"".join(payloads), dtype=np.uint8))[:8000]
    assert np.max(np.abs(decoded.astype(int) - pcm)) < 700  # mu-law quantisation error at full scale


@pytest.mark.parametrize("digit,key", [("1", KeypadEntry.ONE), ("0", KeypadEntry.ZERO),
                                       ("#", KeypadEntry.POUND), ("*", KeypadEntry.STAR), (9, KeypadEntry.NINE)])
def test_dtmf(digit, key):
    proto = started()
    msg = {"event": "dtmf", "sequence_number": "3", "stream_sid": SID, "dtmf": {"digit": digit, "duration": "200"}}
    [frame] = proto.receive(json.dumps(msg))
    assert isinstance(frame, InputDTMFFrame) and frame.button == key


@pytest.mark.parametrize("camel", [False, True])
def test_mark_echo(camel):
    proto = started()
    key = "streamSid" if camel else "stream_sid"
    [frame] = proto.receive(json.dumps({"event": "mark", key: SID, "mark": {"name": "turn-3-end"}}))
    assert isinstance(frame, MarkPlayedFrame) and frame.mark == "turn-3-end"


@pytest.mark.parametrize("reason", ["callended", "stopped"])
def test_stop(reason):
    proto = started()
    msg = {"event": "stop", "sequence_number": "9", "stream_sid": SID,
           "stop": {"call_sid": CALL, "account_sid": "ACC", "reason": reason}}
    [frame] = proto.receive(json.dumps(msg))
    assert isinstance(frame, CallStoppedFrame) and frame.reason == reason
    assert proto.receive(json.dumps(msg)) == []
    assert proto.dropped["duplicate_stop"] == 1


# ---- malformed inbound ------------------------------------------------------------------------

MALFORMED_AFTER_START = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_object"),
    ('"media"', "not_object"),
    ("42", "not_object"),
    ('{"stream_sid": "x"}', "missing_event"),
    ('{"event": 7}', "missing_event"),
    ('{"event": "bogus"}', "unknown_event"),
    (b"\x00\x01binary", "binary_frame"),
    (json.dumps({"event": "media", "media": {"payload": "!!notbase64!!"}}), "invalid_base64"),
    (json.dumps({"event": "media", "media": {"payload": base64.b64encode(b"abc").decode()}}), "odd_length_pcm"),
    (json.dumps({"event": "media", "media": {}}), "missing_payload"),
    (json.dumps({"event": "media"}), "missing_payload"),
    (json.dumps({"event": "media", "media": {"payload": ""}}), "empty_payload"),
    (start_msg(), "duplicate_start"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "A"}}), "bad_dtmf_digit"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "12"}}), "bad_dtmf_digit"),
    (json.dumps({"event": "dtmf", "dtmf": {}}), "missing_digit"),
    (json.dumps({"event": "mark", "mark": {}}), "missing_mark_name"),
    (json.dumps({"event": "media", "media": {"payload": "A" * 2000}}), "too_large"),
]


@pytest.mark.parametrize("message,reason", MALFORMED_AFTER_START)
def test_malformed_after_start_is_dropped_counted_logged(message, reason, warnings):
    proto = started(ExotelParams(max_message_bytes=1500))
    assert proto.receive(message) == []
    assert proto.dropped == {reason: 1}
    assert any(reason in w and CALL in w for w in warnings), warnings
    [frame] = proto.receive(media_msg(speech(320)))
    assert isinstance(frame, InputAudioRawFrame)


@pytest.mark.parametrize("message", [
    "[" * 10_000 + "]" * 10_000,
    '{"event": "media", "media": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001,
])
def test_nesting_beyond_the_decoder_is_dropped_and_the_call_goes_on(message, warnings):
    proto = started()
    assert proto.receive(message) == []
    assert proto.dropped == {"too_deep": 1}
    [frame] = proto.receive(media_msg(speech(320)))
    assert isinstance(frame, InputAudioRawFrame)


def test_a_handler_that_raises_costs_one_message_not_the_call(warnings):
    class Faulty(ExotelProtocol):
        _handlers = {**ExotelProtocol._handlers, "dtmf": lambda self, data: 1 / 0}

    proto = Faulty(ExotelParams())
    proto.receive(start_msg())
    assert proto.receive(json.dumps({"event": "dtmf", "dtmf": {"digit": "1"}})) == []
    assert proto.dropped == {"handler_error": 1}
    assert any("handler_error" in w and "ZeroDivisionError" in w for w in warnings), warnings
    [frame] = proto.receive(media_msg(speech(320)))
    assert isinstance(frame, InputAudioRawFrame)


def start_without(field: str) -> str:
    msg = json.loads(start_msg())
    msg["start"].pop(field)
    msg.pop(field, None)
    return json.dumps(msg)


MALFORMED_BEFORE_START = [
    (media_msg(speech(160)), "media_before_start"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "1"}}), "dtmf_before_start"),
    (json.dumps({"event": "mark", "mark": {"name": "m"}}), "mark_before_start"),
    (start_without("stream_sid"), "missing_stream_sid"),
    (start_without("call_sid"), "missing_call_sid"),
    (json.dumps({"event": "start", "stream_sid": SID}), "missing_start"),
    (start_msg(media_format={"encoding": "audio/x-raw", "sample_rate": "11025"}), "bad_sample_rate"),
    (start_msg(media_format={"encoding": "audio/x-raw", "sample_rate": "fast"}), "bad_sample_rate"),
]


@pytest.mark.parametrize("message,reason", MALFORMED_BEFORE_START)
def test_malformed_before_start_is_dropped_and_start_still_works(message, reason, warnings):
    proto = ExotelProtocol(ExotelParams())
    assert proto.receive(message) == []
    assert proto.dropped == {reason: 1}
    assert proto.call is None
    assert any(reason in w and "unknown" in w for w in warnings), warnings
    [frame] = proto.receive(start_msg())
    assert isinstance(frame, CallStartedFrame)
    [audio] = proto.receive(media_msg(speech(320)))
    assert isinstance(audio, InputAudioRawFrame)


def test_bad_url_sample_rate_drops_start():
    proto = ExotelProtocol(ExotelParams(), {"sample-rate": "44100"})
    assert proto.receive(start_msg(media_format={"encoding": "audio/x-raw"})) == []
    assert proto.dropped["bad_sample_rate"] == 1


def test_every_drop_is_counted_but_logs_are_rate_limited(warnings):
    proto = started()
    for _ in range(250):
        proto.receive("{oops")
    assert proto.dropped["invalid_json"] == 250
    assert 1 <= sum("invalid_json" in w for w in warnings) < 20


def test_stop_before_start_still_ends_the_call():
    proto = ExotelProtocol(ExotelParams())
    [frame] = proto.receive('{"event":"stop","stop":{"reason":"callended"}}')
    assert isinstance(frame, CallStoppedFrame) and frame.reason == "callended"


# ---- outbound ---------------------------------------------------------------------------------


def parse(messages: list[str]) -> list[dict]:
    return [json.loads(m) for m in messages]


def payload(msg: dict) -> bytes:
    return base64.b64decode(msg["media"]["payload"], validate=True)


@pytest.mark.parametrize("rate,chunk", [(8000, 3200), (16000, 3200), (24000, 3840)])
def test_chunk_sizes_per_rate(rate, chunk):
    proto = started(query={"sample-rate": str(rate)}, media_format={"encoding": "audio/x-raw"})
    assert proto.chunk_bytes == chunk
    raw = speech(rate)  # one second
    out = parse(proto.audio(raw))
    assert len(out) == len(raw) // chunk
    for i, msg in enumerate(out, start=1):
        body = payload(msg)
        assert len(body) == chunk and len(body) % 320 == 0 and len(body) % (rate // 50 * 2) == 0
        assert msg["event"] == "media" and msg["stream_sid"] == SID
        assert msg["sequence_number"] == str(i) and msg["media"]["chunk"] == str(i)
        assert msg["media"]["timestamp"] == str(i * chunk * 1000 // (2 * rate))
    assert b"".join(payload(m) for m in out) == raw[: len(out) * chunk]


def test_audio_in_small_frames_is_buffered_until_a_full_chunk():
    proto = started()  # 8 kHz: 3200 B = 200 ms
    frame = speech(160)  # 20 ms, what pipecat typically hands over
    sent = [proto.audio(frame) for _ in range(10)]
    assert sent[:9] == [[]] * 9
    assert len(sent[9]) == 1 and payload(json.loads(sent[9][0])) == frame * 10


def test_flush_pads_tail_with_silence():
    proto = started()
    raw = speech(4000)  # 8000 B = 2.5 chunks
    out = parse(proto.audio(raw) + proto.flush())
    assert [len(payload(m)) for m in out] == [3200, 3200, 3200]
    tail = payload(out[-1])
    assert tail[:1600] == raw[6400:] and tail[1600:] == bytes(1600)
    assert out[-1]["media"]["timestamp"] == "600"
    assert proto.flush() == []


def test_mark_follows_flushed_audio():
    proto = started()
    proto.audio(speech(800))  # 100 ms, below one chunk
    out = parse(proto.mark("turn-1"))
    assert [m["event"] for m in out] == ["media", "mark"]
    assert len(payload(out[0])) == 3200
    assert out[1] == {"event": "mark", "stream_sid": SID, "sequence_number": "2", "mark": {"name": "turn-1"}}
    assert parse(proto.mark("turn-2")) == [
        {"event": "mark", "stream_sid": SID, "sequence_number": "3", "mark": {"name": "turn-2"}}]


def test_clear_drops_buffered_audio():
    proto = started()
    proto.audio(speech(1000))
    assert parse(proto.clear()) == [{"event": "clear", "stream_sid": SID}]
    assert proto.flush() == []
    out = parse(proto.audio(speech(1600, seed=3)))
    assert len(out) == 1 and payload(out[0]) == speech(1600, seed=3)


def test_huge_input_respects_max_chunk():
    params = ExotelParams(min_chunk_bytes=99840, max_chunk_bytes=100_000)
    proto = started(params, query={"sample-rate": "24000"}, media_format={})
    out = parse(proto.audio(speech(24000 * 20)) + proto.flush())
    sizes = {len(payload(m)) for m in out}
    assert sizes == {99840}
    assert sum(len(payload(m)) for m in out) >= 24000 * 20 * 2


def test_camel_key_style():
    proto = started(ExotelParams(key_style="camel"))
    out = parse(proto.audio(speech(1600)) + proto.mark("m") + proto.clear())
    assert set(out[0]) == {"event", "streamSid", "sequenceNumber", "media"}
    assert out[1] == {"event": "mark", "streamSid": SID, "sequenceNumber": "2", "mark": {"name": "m"}}
    assert out[2] == {"event": "clear", "streamSid": SID}


def test_outbound_before_start():
    proto = ExotelProtocol(ExotelParams())
    assert proto.clear() == [] and proto.flush() == []
    with pytest.raises(RuntimeError):
        proto.audio(speech(160))
    with pytest.raises(RuntimeError):
        proto.mark("m")


def test_odd_pcm_from_the_bot_is_a_bug():
    with pytest.raises(ValueError):
        started().audio(b"\x00\x01\x02")


# ---- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"min_chunk_bytes": 3000},
    {"min_chunk_bytes": 0},
    {"min_chunk_bytes": 6400, "max_chunk_bytes": 3200},
    {"max_chunk_bytes": 200_000},
    {"min_chunk_bytes": 3200, "max_chunk_bytes": 3500},  # 24 kHz would need 3840 B
    {"max_message_bytes": 0},
    {"sample_rate": 11025},
    {"key_style": "kebab"},
    {"unknown": 1},
])
def test_impossible_params_raise(kwargs):
    with pytest.raises((ValueError, ValidationError)):
        ExotelParams(**kwargs)


def test_small_max_is_fine_when_rate_is_forced():
    assert ExotelParams(sample_rate=8000, min_chunk_bytes=3200, max_chunk_bytes=3500).max_chunk_bytes == 3500
