"""The Twilio Media Streams protocol, driven with the JSON Twilio documents (docs/protocols.md, Twilio)."""

import audioop
import base64
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame
from pydantic import ValidationError

from transports.frames import CallStartedFrame, CallStoppedFrame, MarkPlayedFrame
from transports.twilio import TwilioParams, TwilioProtocol

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA2a6de7eb0dd8e9b8d0a3b0e1d8a2c7f1"


def start_msg(**start_extra) -> str:
    body = {"streamSid": SID, "accountSid": "AC123", "callSid": CALL, "tracks": ["inbound"],
            "customParameters": {"persona": "sales", "from": "+15550001111"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
    body.update(start_extra)
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": SID, "start": body})


def media_msg(mulaw: bytes, sid: str = SID, track: str = "inbound") -> str:
    return json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": sid,
                       "media": {"track": track, "chunk": "1", "timestamp": "5",
                                 "payload": base64.b64encode(mulaw).decode()}})


def started(**params) -> TwilioProtocol:
    proto = TwilioProtocol(TwilioParams(**params))
    assert proto.receive(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})) == []
    [frame] = proto.receive(start_msg())
    assert isinstance(frame, CallStartedFrame)
    return proto


def test_start_gives_the_call_its_identity_format_and_parameters():
    call = started().call
    assert (call.provider, call.stream_id, call.call_id, call.account_id) == ("twilio", SID, CALL, "AC123")
    assert (call.sample_rate, call.encoding, call.chunk_samples) == (8000, "mulaw", 320)
    assert call.custom_parameters == {"persona": "sales", "from": "+15550001111"}
    assert call.from_number == "+15550001111"


def test_inbound_mulaw_becomes_pcm16_at_8k():
    pcm = np.random.default_rng(1).integers(-8000, 8000, 160, dtype=np.int16).tobytes()
    [frame] = started().receive(media_msg(audioop.lin2ulaw(pcm, 2)))
    assert isinstance(frame, InputAudioRawFrame) and frame.sample_rate == 8000
    assert frame.audio == audioop.ulaw2lin(audioop.lin2ulaw(pcm, 2), 2) and len(frame.audio) == 320


def test_dtmf_mark_and_stop():
    proto = started()
    [dtmf] = proto.receive(json.dumps({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                                       "dtmf": {"track": "inbound_track", "digit": "7"}}))
    assert isinstance(dtmf, InputDTMFFrame) and dtmf.button == KeypadEntry.SEVEN
    [mark] = proto.receive(json.dumps({"event": "mark", "streamSid": SID, "sequenceNumber": "6", "mark": {"name": "bot-1"}}))
    assert isinstance(mark, MarkPlayedFrame) and mark.mark == "bot-1"
    [stop] = proto.receive(json.dumps({"event": "stop", "streamSid": SID, "sequenceNumber": "7",
                                       "stop": {"accountSid": "AC123", "callSid": CALL}}))
    assert isinstance(stop, CallStoppedFrame)


@pytest.mark.parametrize("message, reason", [
    (b"\x00\x01", "binary_frame"),
    ("{nope", "invalid_json"),
    ("[1]", "not_object"),
    (json.dumps({"streamSid": SID}), "missing_event"),
    (json.dumps({"event": "bogus"}), "unknown_event"),
    (media_msg(b"\xff" * 160, sid="MZother"), "wrong_stream_sid"),
    (media_msg(b"\xff" * 160, track="outbound"), "not_inbound_track"),
    (json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "!!"}}), "invalid_base64"),
    (json.dumps({"event": "media", "streamSid": SID, "media": {}}), "missing_payload"),
    (json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "x"}}), "bad_dtmf_digit"),
    (json.dumps({"event": "mark", "streamSid": SID, "mark": {}}), "missing_mark_name"),
    (start_msg(), "duplicate_start"),
])
def test_malformed_messages_are_dropped_counted_and_the_call_goes_on(message, reason):
    proto = started()
    assert proto.receive(message) == []
    assert proto.dropped == {reason: 1}
    assert len(proto.receive(media_msg(b"\xff" * 160))) == 1  # still serving the call


def test_media_before_start_and_unsupported_formats_are_refused():
    proto = TwilioProtocol(TwilioParams())
    assert proto.receive(media_msg(b"\xff" * 160)) == []
    assert proto.receive(start_msg(mediaFormat={"encoding": "audio/l16", "sampleRate": 16000})) == []
    assert proto.dropped == {"media_before_start": 1, "unsupported_media_format": 1} and proto.call is None


def test_outbound_messages_carry_exactly_the_documented_fields():
    """Twilio error 31951: an extra or missing field is a protocol error."""
    proto = started()
    pcm = np.random.default_rng(2).integers(-8000, 8000, 320, dtype=np.int16).tobytes()
    [media] = proto.audio(pcm)
    media = json.loads(media)
    assert set(media) == {"event", "streamSid", "media"} and set(media["media"]) == {"payload"}
    assert base64.b64decode(media["media"]["payload"]) == audioop.lin2ulaw(pcm, 2)
    assert json.loads(proto.mark("bot-3")[0]) == {"event": "mark", "streamSid": SID, "mark": {"name": "bot-3"}}
    assert json.loads(proto.clear()[0]) == {"event": "clear", "streamSid": SID}
    assert proto.flush() == []


def test_nothing_can_be_sent_before_start_but_clear_is_harmless():
    proto = TwilioProtocol(TwilioParams())
    assert proto.clear() == []
    with pytest.raises(RuntimeError):
        proto.audio(b"\x00\x00")


def test_rest_hang_up_only_with_credentials_and_consent():
    assert started().hangup_request(TwilioParams()) is None
    assert started().hangup_request(TwilioParams(account_sid="AC123")) is None  # no token, no REST
    params = TwilioParams(account_sid="AC123", auth_token="tok", api_base_url="http://127.0.0.1:9/")
    req = started().hangup_request(params)
    assert req == {"method": "POST", "url": f"http://127.0.0.1:9/2010-04-01/Accounts/AC123/Calls/{CALL}.json",
                   "data": {"Status": "completed"}, "auth": ("AC123", "tok")}
    assert started().hangup_request(params.model_copy(update={"hang_up": False})) is None


def test_a_transfer_updates_the_live_call_with_dial_twiml_and_no_hang_up_follows():
    params = TwilioParams(account_sid="AC123", auth_token="tok", api_base_url="http://127.0.0.1:9")
    assert started().transfer_request(TwilioParams(), "+15551234567") is None  # the REST API needs the account
    protocol = started()
    req = protocol.transfer_request(params, "+15551234567")
    assert req["url"] == f"http://127.0.0.1:9/2010-04-01/Accounts/AC123/Calls/{CALL}.json" and req["auth"] == ("AC123", "tok")
    dial = ET.fromstring(req["data"]["Twiml"]).find("Dial")
    assert dial.find("Number").text == "+15551234567"
    sip = ET.fromstring(protocol.transfer_request(params, "sip:agent@pbx.example.com;transport=tls")["data"]["Twiml"])
    assert sip.find("Dial/Sip").text == "sip:agent@pbx.example.com;transport=tls"
    protocol.handed_over = True  # the call is the agent's now: hanging it up would cut them off
    assert protocol.hangup_request(params) is None and protocol.transfer_by == "provider_rest"


@pytest.mark.parametrize("bad", [{"path": "twilio"}, {"path": "/twilio?x=1"}, {"chunk_ms": 30}, {"nope": 1},
                                 {"public_url": "bot.example.com"}, {"public_url": "https://bot.example.com/voice"}])
def test_params_refuse_what_twilio_would(bad):
    with pytest.raises(ValidationError):
        TwilioParams(**bad)


def test_empty_settings_from_unset_environment_variables_mean_off():
    params = TwilioParams(public_url="", auth_token="", account_sid="")
    assert (params.public_url, params.auth_token, params.account_sid) == (None, None, None)
