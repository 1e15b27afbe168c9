"""The PersonaPlex session machine in virtual time: no sockets, no sleeps; `now` is a number we pick."""

import numpy as np
import pytest

from processors.personaplex import wire
from processors.personaplex.ogg_pages import write_page
from processors.personaplex.ogg_reader import FRAME_SAMPLES, DownlinkWriter, UplinkDecoder
from processors.personaplex.protocol import (
    MODEL_RATE,
    Audio,
    Failed,
    HandshakeDone,
    Outcome,
    Phase,
    SessionMachine,
    TextPiece,
)
from processors.personaplex.uplink import OpusUplinkWriter

URL = "ws://engine:8998"
FRAME = MODEL_RATE // 50  # 20 ms of caller audio
HANDSHAKE = bytes([wire.HANDSHAKE])


def machine(**kwargs) -> SessionMachine:
    options = {"handshake_timeout_secs": 5.0, "silence_timeout_secs": 2.0,
               "uplink": lambda: OpusUplinkWriter(MODEL_RATE, serial=7), **kwargs}
    return SessionMachine(URL, **options)


def opened(now: float = 0.0, **kwargs) -> SessionMachine:
    m = machine(**kwargs)
    m.connecting(now)
    assert m.receive(HANDSHAKE, now) == [HandshakeDone()]
    return m


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * MODEL_RATE)) / MODEL_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (samples * 32767).astype(np.int16).tobytes()


def downlink(samples: np.ndarray) -> list[bytes]:
    """The engine's 0x01 messages for `samples`: the two header pages, then one page per 80 ms."""
    writer = DownlinkWriter()
    pages = writer.header_pages()
    pages += [writer.encode(samples[i : i + FRAME_SAMPLES]) for i in range(0, len(samples) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
    return [wire.audio_message(p) for p in pages]


class Pages:
    """An uplink encoder that makes one fake page per call, so what reaches the wire is countable."""

    def __init__(self, empty: bool = False):
        self.empty, self.calls = empty, []

    def append_pcm(self, pcm):
        self.calls.append(pcm)
        return b"" if self.empty else b"page%d" % len(self.calls)


# --- the handshake --------------------------------------------------------------------------------


def test_the_handshake_opens_the_session_and_what_comes_before_it_is_ignored():
    m = machine()
    m.connecting(10.0)
    assert m.phase is Phase.HANDSHAKE and not m.open and m.time_left(11.0) == 4.0
    assert m.receive(wire.audio_message(b"OggS early"), 11.0) == []
    assert m.receive(bytes([wire.TEXT]) + b" hi", 11.0) == []
    assert m.receive("a text message", 11.0) == []
    assert m.tick(14.9) == []
    assert m.receive(HANDSHAKE, 14.9) == [HandshakeDone()]
    assert m.open and m.failure is None
    assert m.tick(100.0) == []  # the deadline is over once the handshake is in; no caller audio, no watchdog
    assert m.counters.ignored == {"before_handshake": 2, "text_message": 1}


def test_no_handshake_by_the_deadline_is_the_engines_fault():
    m = machine(handshake_timeout_secs=0.5)
    assert m.time_left(0.0) == float("inf")  # no deadline before the connect starts
    m.connecting(1.0)
    assert m.tick(1.49) == []
    [failed] = m.tick(1.5)
    assert failed == Failed(f"{URL}: no handshake within 0.5 s", Outcome.ENGINE_FAILED) and failed.engine_fault
    assert m.phase is Phase.ENDED and m.failure == failed
    assert m.receive(HANDSHAKE, 1.6) == [] and m.tick(2.0) == []  # reported once; a late handshake changes nothing


def test_caller_audio_before_the_handshake_is_not_sent():
    encoder = Pages()
    m = machine(uplink=lambda: encoder)
    m.connecting(0.0)
    assert m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 0.0) == (b"", [])
    assert encoder.calls == []  # not even encoded: the stream's first page must follow the handshake


# --- close codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "how"), [(1008, "code 1008"), (None, "abnormal close, no close frame"),
                                           (1006, "abnormal close, no close frame")])
def test_a_close_before_the_handshake_refuses_the_prompts(code, how):
    m = machine()
    m.connecting(0.0)
    [failed] = m.closed(code)
    assert failed.outcome is Outcome.PROMPTS_REFUSED and not failed.engine_fault
    assert failed.reason == f"{URL} closed the connection before its handshake ({how}); check voice_prompt/text_prompt"
    assert m.closed(code) == []


@pytest.mark.parametrize(("code", "reason"), [(1000, "engine closed the session (code 1000)"),
                                              (1011, "engine closed the session (code 1011)"),
                                              (None, "engine connection lost (abnormal close, no close frame)"),
                                              (1006, "engine connection lost (abnormal close, no close frame)")])
def test_a_close_after_the_handshake_is_an_engine_failure(code, reason):
    m = opened()
    assert m.closed(code) == [Failed(reason, Outcome.ENGINE_FAILED)]
    assert m.phase is Phase.ENDED


@pytest.mark.parametrize(("code", "reason"), [(1011, "engine closed the connection (1011)"),
                                              (None, "engine closed the connection (abnormal, no close frame)")])
def test_a_close_found_by_a_send_is_an_engine_failure(code, reason):
    m = opened()
    assert m.closed(code, while_sending=True) == [Failed(reason, Outcome.ENGINE_FAILED)]


# --- caller audio up ------------------------------------------------------------------------------


def test_caller_audio_goes_up_as_one_ogg_opus_stream():
    m = opened()
    sent = []
    said = tone(1.0)
    for i in range(0, len(said), FRAME):
        message, events = m.send_audio(pcm16(said[i : i + FRAME]), MODEL_RATE, i / MODEL_RATE)
        assert events == []
        if message:
            sent.append(message)
    assert all(message[0] == wire.AUDIO for message in sent)
    assert len(sent) == m.counters.pages_sent == 1 + 12  # the header pages with the first 20 ms, then one page per 80 ms
    assert sent[0][1:].startswith(b"OggS") and b"OpusHead" in sent[0] and b"OpusTags" in sent[0]
    decoder = UplinkDecoder()  # the server's strict reader, rebuilt
    heard = np.concatenate([decoder.decode(message[1:]) for message in sent])
    assert len(heard) > 0.8 * MODEL_RATE


def test_the_encoder_is_made_once_with_the_first_audio_and_dropped_at_close():
    made = []

    def uplink():
        made.append(Pages(empty=True))
        return made[-1]

    m = opened(uplink=uplink)
    assert made == []  # a probe that never sends audio never makes one
    for t in (0.0, 0.02, 0.04):
        assert m.send_audio(pcm16(tone(0.02)), MODEL_RATE, t) == (b"", [])  # no page complete yet
    assert len(made) == 1 and len(made[0].calls) == 3 and m.counters.pages_sent == 0
    m.close()
    assert m.phase is Phase.ENDED and m._encoder is None
    assert m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 0.06) == (b"", []) and len(made[0].calls) == 3


def test_caller_audio_at_the_wrong_rate_fails_the_call_not_the_engine():
    m = opened()
    message, [failed] = m.send_audio(pcm16(tone(0.02))[:320], 8000, 0.0)
    assert message == b"" and failed.outcome is Outcome.BAD_CALLER_AUDIO and not failed.engine_fault
    assert failed.reason == "caller audio reaches PersonaPlex at 8000 Hz, not 24000: put a resample processor before it"
    assert m.phase is Phase.ENDED


def test_a_machine_without_an_uplink_cannot_send():
    m = opened(uplink=None)
    with pytest.raises(RuntimeError, match="no uplink"):
        m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 0.0)


# --- engine audio and text down -------------------------------------------------------------------


def test_engine_audio_decodes_to_pcm16_at_24_khz():
    m = opened()
    said = tone(0.8)
    events = [e for message in downlink(said) for e in m.receive(message, 0.1)]
    assert events and all(isinstance(e, Audio) and e.sample_rate == MODEL_RATE for e in events)
    heard = np.frombuffer(b"".join(e.pcm for e in events), np.int16).astype(np.float64) / 32767
    assert len(heard) >= 0.5 * MODEL_RATE
    assert m.counters.pages_received == 2 + 10  # the header pages count, though they hold no audio
    # the same tone comes back (Opus delays it by a few ms: compare the loudness, then the pitch)
    assert 0.15 < np.sqrt(np.mean(heard[MODEL_RATE // 10 :] ** 2)) < 0.3
    spectrum = np.abs(np.fft.rfft(heard))
    assert abs(np.argmax(spectrum) * MODEL_RATE / len(heard) - 440) < 5


def test_text_pieces_keep_their_spaces_and_control_tokens_are_dropped():
    m = opened()
    text = bytes([wire.TEXT])
    assert m.receive(text + b" Hello", 0.1) == [TextPiece(" Hello")]
    assert m.receive(text + "wörld".encode(), 0.1) == [TextPiece("wörld")]
    assert m.receive(text + b"<s>", 0.1) == []
    assert m.receive(text + b"  ", 0.1) == []
    assert m.receive(text + b"\xff\xfebad", 0.1) == [TextPiece("\ufffd\ufffdbad")]  # not UTF-8: replaced, kept
    assert m.counters.text_pieces == 3 and m.counters.ignored == {"control_token": 2}


# --- bad input from the engine --------------------------------------------------------------------


def test_messages_the_protocol_does_not_know_are_ignored():
    m = opened()
    for message in (b"", bytes([0x07]) + b"what", HANDSHAKE, "text frame"):
        assert m.receive(message, 0.1) == []
    assert m.open and m.counters.ignored == {"empty": 1, "unknown_kind": 1, "handshake_again": 1, "text_message": 1}


@pytest.mark.parametrize("payload", [b"not ogg at all" * 2, b"OggS\x01" + bytes(40),
                                     write_page(b"NotOpusHead" + bytes(8), serial=1, sequence=0, granule=0, bos=True)])
def test_audio_that_does_not_decode_is_an_engine_failure(payload):
    m = opened()
    [failed] = m.receive(wire.audio_message(payload), 0.1)
    assert failed.outcome is Outcome.ENGINE_FAILED and failed.reason.startswith("engine sent audio that does not decode")
    assert m.receive(downlink(tone(0.2))[0], 0.2) == []  # the machine has ended: later pages change nothing


# --- the silence watchdog -------------------------------------------------------------------------


def stream(m: SessionMachine, start: float, end: float, *, engine_every: float | None = None) -> list:
    """Caller audio every 20 ms from `start` to `end` (and, if given, one engine page that often),
    ticking every 250 ms as the processor does; the events of the ticks."""
    pages = iter(downlink(tone(30.0))) if engine_every else None
    events, t, next_page, next_tick = [], start, start, start
    while t < end - 1e-9 and not events:
        m.send_audio(pcm16(tone(0.02)), MODEL_RATE, t)
        if pages and t >= next_page:
            events += [e for e in m.receive(next(pages), t) if isinstance(e, Failed)]
            next_page += engine_every
        if t >= next_tick:
            events += m.tick(t)
            next_tick += 0.25
        t = round(t + 0.02, 6)
    return events


def test_an_engine_silent_while_caller_audio_flows_fails_after_the_timeout():
    m = opened(now=0.0, uplink=lambda: Pages(empty=True))
    assert stream(m, 0.0, 2.0) == []
    assert m.tick(2.0) == []  # exactly the timeout is not over it
    [failed] = m.tick(2.01)
    assert failed == Failed("engine sent no audio for 2.0 s while caller audio flowed", Outcome.ENGINE_FAILED)


def test_engine_audio_keeps_the_watchdog_quiet():
    m = opened(now=0.0, uplink=lambda: Pages(empty=True))
    assert stream(m, 0.0, 10.0, engine_every=0.08) == []
    assert m.open


def test_the_watchdog_waits_for_caller_audio_to_flow():
    m = opened(now=0.0, uplink=lambda: Pages(empty=True))
    assert m.tick(60.0) == []  # no caller audio yet: the server is input-clocked, silence is expected
    m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 60.0)
    assert m.tick(60.49) != []  # flowing (sent under 0.5 s ago) and nothing heard since the handshake
    m = opened(now=0.0, uplink=lambda: Pages(empty=True))
    m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 1.0)
    assert m.tick(2.5) == [] and m.tick(60.0) == []  # caller audio stopped 0.5 s ago or more: not flowing


def test_the_watchdog_counts_from_the_last_engine_page():
    m = opened(now=0.0, uplink=lambda: Pages(empty=True))
    pages = downlink(tone(0.2))
    m.receive(pages[0], 5.0)
    m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 6.9)
    assert m.tick(7.0) == []
    m.send_audio(pcm16(tone(0.02)), MODEL_RATE, 7.0)
    [failed] = m.tick(7.25)
    assert failed.reason == "engine sent no audio for 2.2 s while caller audio flowed"
    assert m.tick(7.5) == [] and m.closed(1000) == []  # one failure per session
