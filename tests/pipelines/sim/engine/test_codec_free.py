"""The reference engine's codec_free script mode over loopback, read by the bridge's own PersonaPlex code.

codec_free is for load benches: the bridge must not be able to tell it apart from script mode, so the
checks are the bridge's (SessionMachine's downlink decoder, the strict Ogg reader) and the engine's
default script mode is the reference for what is said at which step.
"""

import asyncio

import numpy as np
import pytest
import sphn
from pydantic import ValidationError
from websockets.asyncio.client import connect

from pipelines.bench.fleet import script_options
from pipelines.bench.servers import engine_command
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from pipelines.sim.engine.reference import _parser
from pipelines.sim.engine.script import EncodedScript, ScriptAgent
from processors.personaplex import wire
from processors.personaplex.ogg_pages import write_page
from processors.personaplex.ogg_reader import (
    DOWNLINK_SERIAL,
    FRAME_SAMPLES,
    DownlinkWriter,
    OggStreamParser,
    UplinkDecoder,
    is_header_packet,
    packet_duration_us,
    split_pages,
)
from processors.personaplex.protocol import Audio, Failed, HandshakeDone, SessionMachine, TextPiece
from processors.personaplex.uplink import OpusUplinkWriter
from tests.pipelines.sim.engine.test_reference import (
    CHAT,
    HANDSHAKE_DELAY,
    QUIET,
    SILENCE_RMS,
    Caller,
    _corrupt_stream,
    _non_bos_page,
    _restarted_stream,
    expect_normal_close,
    normalised_xcorr,
    silence,
    speech_24k,
)

SCRIPT_AT = 0.24  # step 3; the default clip spans 10 steps
STEPS = 20  # 16 chunks of 100 ms; past the clip's end, so silence steps follow it


@pytest.fixture
async def make_engine():
    engines: list[ReferenceEngine] = []

    async def factory(**options) -> ReferenceEngine:
        engine = ReferenceEngine(EngineOptions(handshake_delay_secs=HANDSHAKE_DELAY, **options))
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop()


class Bridge:
    """The bridge's side of a session: its uplink writer, SessionMachine, and the strict reader on the downlink."""

    def __init__(self, url: str, uplink: str) -> None:
        self.url = url
        self.machine = SessionMachine(url, handshake_timeout_secs=5, uplink=lambda: OpusUplinkWriter(24000))
        self.sphn_writer = sphn.OpusStreamWriter(24000) if uplink == "sphn" else None
        self.strict = OggStreamParser()
        self.pages: list[bytes] = []
        self.pcm: list[bytes] = []
        self.texts: list[tuple[int, str]] = []  # (index of the page that followed it, piece)

    async def __aenter__(self) -> "Bridge":
        self.ws = await connect(self.url + CHAT)
        assert self._events(await asyncio.wait_for(self.ws.recv(), 5)) == [HandshakeDone()]
        for _ in range(2):  # OpusHead, OpusTags: no audio
            assert self._events(await asyncio.wait_for(self.ws.recv(), 2)) == []
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    def _events(self, message: bytes) -> list:
        kind, payload = wire.split(message)
        if kind == wire.AUDIO:
            packets = self.strict.feed(payload)  # raises on anything the server's reader would refuse
            assert len(packets) == 1
            if not is_header_packet(packets[0]):
                assert packet_duration_us(packets[0]) == 80_000
                self.pages.append(payload)
        events = self.machine.receive(message, now=0.0)
        assert not [e for e in events if isinstance(e, Failed)], events
        return events

    async def say(self, pcm: np.ndarray) -> None:
        if self.sphn_writer is not None:
            message = wire.audio_message(self.sphn_writer.append_pcm(pcm))
        else:
            message, events = self.machine.send_audio((pcm * 32767).astype(np.int16).tobytes(), 24000, now=0.0)
            assert events == []
        if message:
            await self.ws.send(message)

    async def pages_until(self, n: int, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while len(self.pages) < n:
                for event in self._events(await self.ws.recv()):
                    if isinstance(event, Audio):
                        assert len(event.pcm) == 2 * FRAME_SAMPLES  # one step decodes to 80 ms
                        self.pcm.append(event.pcm)
                    elif isinstance(event, TextPiece):
                        self.texts.append((len(self.pages), event.text))

    def audio(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.pcm), np.int16).astype(np.float32) / 32768.0


async def converse(engine: ReferenceEngine, uplink: str) -> Bridge:
    """STEPS steps of caller silence in 100 ms chunks, as Exotel sends it; after each chunk exactly one
    page per whole 80 ms sent so far has come back, and none beyond them."""
    async with Bridge(engine.url, uplink) as bridge:
        chunk = silence(0.1)
        for sent in range(1, round(STEPS * 0.08 / 0.1) + 1):
            await bridge.say(chunk)
            await bridge.pages_until(sent * len(chunk) // FRAME_SAMPLES)
        with pytest.raises(TimeoutError):
            await bridge.pages_until(STEPS + 1, QUIET)  # not one page more than the uplink's steps
    assert len(bridge.pages) == STEPS and engine.stats.frames_in == STEPS
    return bridge


@pytest.mark.parametrize("uplink", ["bridge", "sphn"])
async def test_codec_free_script_is_the_script_in_valid_pages_one_per_uplink_step(make_engine, uplink, monkeypatch):
    options = {"mode": "script", "script_at": SCRIPT_AT}
    engine = await make_engine(codec_free=True, **options)  # encodes its script here, once

    def no_codec(*args):
        raise AssertionError("a codec_free session ran the codec")

    with monkeypatch.context() as patched:
        patched.setattr(UplinkDecoder, "decode", no_codec)
        patched.setattr(DownlinkWriter, "encode_packet", no_codec)
        cheap = await converse(engine, uplink)
    full = await converse(await make_engine(**options), uplink)

    pages = split_pages(b"".join(cheap.pages))
    assert {page.serial for page in pages} == {DOWNLINK_SERIAL}
    assert [page.sequence for page in pages] == list(range(2, 2 + STEPS))
    assert [page.granule for page in pages] == [FRAME_SAMPLES * (i + 1) for i in range(STEPS)]
    # The same words at the same steps, and the clip where default script mode plays it.
    assert cheap.texts == full.texts and cheap.texts[0][0] == 3
    lag, peak = normalised_xcorr(speech_24k(), cheap.audio())
    assert peak > 0.5 and abs(lag - SCRIPT_AT * 24000) < 0.02 * 24000
    rms = np.sqrt(np.mean(cheap.audio().reshape(STEPS, FRAME_SAMPLES) ** 2, axis=1))
    full_rms = np.sqrt(np.mean(full.audio().reshape(STEPS, FRAME_SAMPLES) ** 2, axis=1))
    assert list(rms > SILENCE_RMS) == list(full_rms > SILENCE_RMS)
    assert rms[:3].max() < SILENCE_RMS and rms[13:].max() < SILENCE_RMS  # silence around the clip


def _bad_opus_packet() -> bytes:
    """Well-formed Ogg whose audio packet is not Opus (code 3, zero frames): only a packet check sees it."""
    pages = split_pages(sphn.OpusStreamWriter(24000).append_pcm(silence(0.08)))
    bad = write_page(b"\x03\x00", serial=pages[0].serial, sequence=2, granule=1920)
    return pages[0].to_bytes() + pages[1].to_bytes() + bad


@pytest.mark.parametrize(
    "payload",
    [_non_bos_page, _corrupt_stream, _restarted_stream, _bad_opus_packet],
    ids=["non-bos", "crc", "second-bos", "not-opus"],
)
async def test_codec_free_uplink_violation_still_closes_with_1000(make_engine, payload):
    engine = await make_engine(mode="script", codec_free=True)
    caller = Caller(await connect(engine.url + CHAT))
    await caller.handshake()
    await caller.headers()
    await caller.ws.send(b"\x01" + payload())
    await expect_normal_close(caller.ws)
    assert engine.stats.uplink_violations == 1


def test_encoded_script_says_what_the_script_agent_says_in_shared_silence():
    clip = np.full(3 * FRAME_SAMPLES, 0.2, np.float32)
    lines = [(0.0, clip, "one two"), (0.8, clip, "three")]  # steps 0-2 and 10-12
    encoded, agent = EncodedScript(lines), ScriptAgent(lines)
    said = [agent.step(silence(0.08))[1] for _ in range(20)]
    assert [encoded.step(i)[1] for i in range(20)] == said
    silent = [i for i in range(20) if encoded.step(i)[0] is encoded.silence]
    assert silent == [*range(3, 10), *range(13, 20)]


@pytest.mark.parametrize("mode", ["converse", "echo", "tone"])
def test_codec_free_is_refused_outside_script_mode(mode):
    with pytest.raises(ValidationError, match="script mode only"):
        EngineOptions(mode=mode, codec_free=True)


def test_bench_engines_are_codec_free_through_the_cli():
    options = script_options([(0.8, "clip.wav")])
    EngineOptions.model_validate(options)  # as the bridge's YAML carries it
    argv = engine_command([8998], options)
    args = _parser().parse_args(argv[argv.index("engine") + 1 :])
    assert args.codec_free and args.mode == "script"


def test_engines_of_a_process_share_one_encoding_of_each_script():
    first, second = (ReferenceEngine(EngineOptions(mode="script", codec_free=True, script_at=0.4)) for _ in range(2))
    assert first._encoded is second._encoded
    other = ReferenceEngine(EngineOptions(mode="script", codec_free=True, script_at=0.48))
    assert other._encoded is not first._encoded
