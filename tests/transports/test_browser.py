"""The browser page's wire protocol and routes, driven with the plain JSON the page sends."""

import base64
import json
import re

import numpy as np
import pytest
import yaml
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    StartFrame,
    TranscriptionFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pydantic import ValidationError

from pipelines import builder, config
from pipelines.config import CONFIG_DIR
from pipelines.registry import find_transport
from transports.base import HttpRequest
from transports.browser import PAGE_DIR, BrowserParams, BrowserProtocol
from transports.frames import (
    ActionTakenFrame,
    CallAction,
    CallStartedFrame,
    CallStoppedFrame,
    EngineEvent,
    EngineEventFrame,
    EngineFailedFrame,
    MarkPlayedFrame,
)


def msg(**fields) -> str:
    return json.dumps(fields)


def speech(n: int) -> bytes:
    return np.random.default_rng(0).integers(-8000, 8000, n, dtype=np.int16).tobytes()


def started(params: BrowserParams | None = None, query=None, **init) -> BrowserProtocol:
    proto = BrowserProtocol(params or BrowserParams(), query)
    [frame] = proto.receive(msg(type="init", **init))
    assert isinstance(frame, CallStartedFrame) and frame.call == proto.call
    return proto


def sent(messages: list[str]) -> list[dict]:
    return [json.loads(m) for m in messages]


# ---- inbound ----------------------------------------------------------------------------------


def test_init_starts_a_call_at_the_deployment_rate_with_the_page_chunk():
    proto = started(BrowserParams(sample_rate=24000, chunk_ms=20))
    call = proto.call
    assert (call.provider, call.sample_rate, call.encoding, call.chunk_samples) == ("browser", 24000, "pcm16", 480)
    assert re.fullmatch(r"browser-[0-9a-f]{12}", call.call_id) and call.stream_id == call.call_id
    assert started().call.call_id != call.call_id


def test_init_string_fields_and_query_become_custom_parameters():
    proto = started(query={"persona": "support", "lang": "en"}, persona="sales", session_id="tab-7", volume=3, ok=True)
    assert proto.call.call_id == "tab-7"
    assert proto.call.custom_parameters == {"persona": "sales", "lang": "en"}  # non-strings ignored


@pytest.mark.parametrize("init, reason", [
    ({"sample_rate": 8000}, "unsupported_sample_rate"),
    ({"session_id": ""}, "bad_session_id"),
    ({"session_id": 42}, "bad_session_id"),
    ({"session_id": "x" * 500}, "bad_session_id"),
    ({"session_id": "a b\nc"}, "bad_session_id"),
])
def test_bad_init_is_dropped(init, reason):
    proto = BrowserProtocol(BrowserParams())
    assert proto.receive(msg(type="init", **init)) == []
    assert proto.dropped == {reason: 1} and proto.call is None


def test_init_with_the_right_rate_and_a_second_init():
    proto = started(sample_rate=16000)
    assert proto.receive(msg(type="init")) == [] and proto.dropped == {"duplicate_init": 1}


def test_audio_is_caller_pcm_at_the_call_rate():
    proto = started()
    pcm = speech(640)
    [frame] = proto.receive(msg(type="audio", data=base64.b64encode(pcm).decode()))
    assert isinstance(frame, InputAudioRawFrame)
    assert (frame.audio, frame.sample_rate, frame.num_channels) == (pcm, 16000, 1)


def test_typed_text_is_a_final_caller_transcript():
    proto = started(session_id="s1")
    [frame] = proto.receive(msg(type="text", text="  what time is it? "))
    assert isinstance(frame, TranscriptionFrame)
    assert (frame.text, frame.user_id, frame.finalized) == ("what time is it?", "s1", True) and frame.timestamp


def test_mark_echo_and_end():
    proto = started()
    [played] = proto.receive(msg(type="mark", name="bot-1"))
    assert isinstance(played, MarkPlayedFrame) and played.mark == "bot-1"
    [stop] = proto.receive(msg(type="end"))
    assert isinstance(stop, CallStoppedFrame) and stop.reason == "hang-up"
    assert proto.receive(msg(type="end")) == [] and proto.dropped == {"duplicate_end": 1}
    assert sent(proto.goodbye()) == [{"type": "session_ended", "reason": "hang-up"}]


def test_end_before_init_still_ends_the_call():
    [stop] = BrowserProtocol(BrowserParams()).receive(msg(type="end"))
    assert isinstance(stop, CallStoppedFrame)


@pytest.mark.parametrize("message, reason", [
    (b"\x00\x01", "binary_frame"),
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_object"),
    (msg(name="x"), "missing_type"),
    (msg(type="dial"), "unknown_type"),
    (msg(type="audio"), "missing_payload"),
    (msg(type="audio", data="@@@"), "invalid_base64"),
    (msg(type="audio", data=base64.b64encode(b"abc").decode()), "odd_length_pcm"),
    (msg(type="text", text=""), "empty_text"),
    (msg(type="text", text=5), "empty_text"),
    (msg(type="mark"), "missing_mark_name"),
    (msg(type="mark", name=""), "missing_mark_name"),
    (msg(type="audio", data="A" * 300_000), "too_large"),
])
def test_malformed_input_is_dropped_counted_logged_and_the_call_goes_on(message, reason, warnings):
    proto = started(session_id="call-9")
    assert proto.receive(message) == []
    assert proto.dropped == {reason: 1}
    assert any(reason in w and "call-9" in w for w in warnings), warnings
    assert len(proto.receive(msg(type="audio", data=base64.b64encode(speech(8)).decode()))) == 1


@pytest.mark.parametrize("kind", ["audio", "text", "mark"])
def test_call_messages_before_init_are_dropped(kind):
    proto = BrowserProtocol(BrowserParams())
    assert proto.receive(msg(type=kind, data="AAAA", text="hi", name="m")) == []
    assert proto.dropped == {f"{kind}_before_start": 1}
    assert len(proto.receive(msg(type="init"))) == 1


# ---- outbound ---------------------------------------------------------------------------------


def test_audio_mark_clear_messages():
    proto = started()
    pcm = speech(640)
    [audio] = sent(proto.audio(pcm))
    assert audio == {"type": "audio", "data": base64.b64encode(pcm).decode()}
    assert proto.flush() == []
    assert sent(proto.mark("bot-2")) == [{"type": "mark", "name": "bot-2"}]
    assert sent(proto.clear()) == [{"type": "clear"}]
    with pytest.raises(ValueError):
        proto.audio(b"\x00")


def test_outbound_before_init():
    proto = BrowserProtocol(BrowserParams())
    assert proto.clear() == []
    with pytest.raises(RuntimeError):
        proto.audio(b"\x00\x00")


def test_start_frame_announces_the_session():
    proto = started(session_id="s2")
    assert sent(proto.event(StartFrame())) == [
        {"type": "init_success", "session_id": "s2", "sample_rate": 16000, "chunk_samples": 640},
        {"type": "state", "state": "listening"},
    ]


def test_state_follows_caller_turns_and_played_bot_speech_and_is_sent_on_change_only():
    proto = started()
    proto.event(StartFrame())
    frames = [UserStartedSpeakingFrame(), UserStoppedSpeakingFrame(), BotStartedSpeakingFrame(),
              BotStoppedSpeakingFrame(),
              # the caller talks over the bot: "listening" at once; a turn ending under bot speech needs no wait
              BotStartedSpeakingFrame(), UserStartedSpeakingFrame(), UserStoppedSpeakingFrame(),
              BotStoppedSpeakingFrame(),
              # a barge-in: the bot stops while the caller talks, then the caller waits for an answer
              BotStartedSpeakingFrame(), UserStartedSpeakingFrame(), InterruptionFrame(),
              BotStoppedSpeakingFrame(), UserStoppedSpeakingFrame()]
    states = [m["state"] for f in frames for m in sent(proto.event(f))]
    assert states == ["thinking", "speaking", "listening", "speaking", "listening", "speaking",
                      "listening", "speaking", "listening", "thinking"]


def test_bot_transcript_pieces_and_utterance_end():
    proto = started()
    assert proto.event(TTSStoppedFrame(context_id="holding:greeting")) == []  # a clip has no text
    assert proto.event(TTSStartedFrame(context_id="bot-1")) == []
    pieces = [m for text in (" Hello", ",", " there") for m in sent(proto.event(TTSTextFrame(text=text, text_type="word")))]
    assert pieces == [{"type": "transcript", "text": t, "final": False} for t in (" Hello", ",", " there")]
    assert sent(proto.event(TTSStoppedFrame(context_id="bot-1"))) == [{"type": "transcript", "text": "", "final": True}]
    assert proto.event(TTSStoppedFrame(context_id="bot-1")) == []


def test_the_bot_line_ends_at_its_mark_or_a_clear_not_at_a_clip_mark():
    proto = started()
    final = {"type": "transcript", "text": "", "final": True}
    proto.event(TTSTextFrame(text=" Hi", text_type="word"))
    assert sent(proto.mark("holding:greeting")) == [{"type": "mark", "name": "holding:greeting"}]  # faded under the first word
    assert sent(proto.mark("bot-1")) == [{"type": "mark", "name": "bot-1"}, final]
    assert sent(proto.mark("bot-2")) == [{"type": "mark", "name": "bot-2"}]
    proto.event(TTSTextFrame(text=" Well", text_type="word"))
    assert sent(proto.clear()) == [{"type": "clear"}, final]  # barge-in: the rest of the line never comes


def test_engine_failure_is_an_error_and_the_goodbye_reason():
    proto = started()
    assert sent(proto.event(EngineFailedFrame(reason="engine closed 1006"))) == [
        {"type": "error", "message": "the speech engine failed: engine closed 1006"}]
    assert sent(proto.goodbye()) == [{"type": "session_ended", "reason": "engine failed"}]


def test_goodbye_when_the_bot_ends_the_call():
    assert sent(started().goodbye()) == [{"type": "session_ended", "reason": "ended"}]


# ---- the page ---------------------------------------------------------------------------------


def get(routes, path, method="GET"):
    return routes[path](BrowserParams(), HttpRequest(method=method, scheme="http", host="h", path=path))


def test_routes_serve_the_page_with_its_config_inlined_and_the_scripts():
    params = BrowserParams(page_path="/call", assets_path="/static/call/", sample_rate=8000, prebuffer_ms=60)
    routes = BrowserProtocol.routes(params)
    assert set(routes) == {"/call", "/static/call/main.js", "/static/call/capture.js", "/static/call/playback.js"}
    page = get(routes, "/call")
    assert (page.status, page.content_type) == (200, "text/html")
    assert '<script type="module" src="/static/call/main.js">' in page.body
    config_json = re.search(r'<script id="call-config" type="application/json">(.*?)</script>', page.body).group(1)
    assert json.loads(config_json) == {"ws_path": "/browser/ws", "assets_path": "/static/call", "sample_rate": 8000,
                                       "chunk_ms": 40, "prebuffer_ms": 60, "max_buffer_ms": 2000}
    script = get(routes, "/static/call/playback.js")
    assert script.content_type == "text/javascript" and "registerProcessor" in script.body
    assert get(routes, "/call", "POST").status == 405


@pytest.mark.parametrize("origin, allowed, ok", [
    (None, [], True),  # not a browser
    ("http://bot.example:5050", [], True),  # the page itself, by its listed name
    ("https://evil.example", [], False),
    ("https://evil.example", ["https://evil.example"], True),
    ("https://other.example", ["*"], True),
])
def test_only_the_page_own_origin_may_open_the_socket(origin, allowed, ok):
    headers = {"Origin": origin} if origin else {}
    request = HttpRequest(method="GET", scheme="http", host="bot.example:5050", path="/browser/ws", headers=headers)
    refusal = BrowserProtocol.authorize(BrowserParams(allowed_origins=allowed, allowed_hosts=["bot.example"]), request)
    assert (refusal is None) == ok, refusal


@pytest.mark.parametrize("host, allowed_hosts, ok", [
    ("127.0.0.1:5050", [], True),
    ("[::1]:5050", [], True),
    ("localhost:5050", [], True),
    ("10.1.2.3:5050", [], True),
    ("rebound.evil.example:5050", [], False),  # its page, served from a name resolved to us
    ("bot.example.com", ["bot.example.com"], True),
    ("BOT.example.com", ["bot.example.com"], True),
    ("anything.example", ["*"], True),
])
def test_a_same_origin_page_must_come_by_a_known_host_name(host, allowed_hosts, ok):
    """DNS rebinding: a page on a name the attacker controls, resolved to this server, is 'same origin'."""
    request = HttpRequest(method="GET", scheme="http", host=host, path="/browser/ws", headers={"Origin": f"http://{host}"})
    refusal = BrowserProtocol.authorize(BrowserParams(allowed_hosts=allowed_hosts), request)
    assert (refusal is None) == ok, refusal


def test_the_page_loads_nothing_from_outside():
    for path in PAGE_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), path.name


@pytest.mark.parametrize("bad", [{"path": "ws"}, {"page_path": "/?x=1"}, {"chunk_ms": 25}, {"sample_rate": 44100},
                                 {"page_path": "/browser/ws"}, {"path": "/browser/assets/ws"},
                                 {"page_path": "/browser/assets/main.js"}, {"jitter": 1}])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValidationError):
        BrowserParams(**bad)


def test_registered_and_the_shipped_deployment_runs_the_conversation_core():
    assert find_transport("browser").protocol is BrowserProtocol
    plan = builder.plan(config.load(CONFIG_DIR / "browser.yaml", {}))
    assert isinstance(plan.transport_params, BrowserParams)
    exotel = yaml.safe_load((CONFIG_DIR / "exotel.yaml").read_text())["processors"]
    browser = yaml.safe_load((CONFIG_DIR / "browser.yaml").read_text())["processors"]
    assert [p["type"] for p in browser] == [p["type"] for p in exotel]
    personas = [p["params"]["personas"] for p in (exotel + browser) if p["type"] == "personaplex"]
    assert personas[0] == personas[1]


def test_the_page_is_told_of_a_transfer_and_of_the_calls_events():
    protocol = started()
    assert json.loads(protocol.transfer("agent", "+15551234567")[0]) == {"type": "transfer", "target": "agent", "to": "+15551234567"}
    assert json.loads(protocol.goodbye()[0]) == {"type": "session_ended", "reason": "transferred to agent"}
    taken = ActionTakenFrame(action=CallAction.EVENT, event="lead", reason="dtmf *", data={"queue": "sales"})
    assert json.loads(protocol.event(taken)[0]) == {"type": "call_event", "event": "action", "action": "event", "reason": "dtmf *",
                                                    "data": {"queue": "sales"}, "name": "lead"}
    ready = EngineEventFrame(event=EngineEvent.READY, url="ws://gpu1:8998", handshake_ms=812)
    assert json.loads(protocol.event(ready)[0]) == {"type": "call_event", "event": "engine_ready", "handshake_ms": 812}  # no engine URL
