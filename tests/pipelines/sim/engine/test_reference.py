"""The reference engine over loopback, driven by a real client the way a PersonaPlex bridge drives it."""

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile
import sphn
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pipelines.sim.engine import EngineOptions, ReferenceEngine, reference
from pipelines.sim.engine.reference import (
    SILENCE_RMS,
    ScriptAgent,
    ScriptLine,
    _parser,
    main,
    self_signed_ssl_context,
)
from processors.audio import PIPECAT_SPEECH_WAV
from processors.personaplex.ogg_reader import FRAME_SAMPLES, frame_duration_us, parse_page, split_opus_packet, split_pages
from tests.speech import speech_float

ROOT = Path(__file__).resolve().parents[4]
ONE_MOMENT_WAV = ROOT / "configs/clips/one_moment.wav"  # trimmed: speech from its first sample
CHAT = "/api/chat?voice_prompt=NATF0.pt&text_prompt=You%20enjoy%20having%20a%20good%20conversation."
HANDSHAKE_DELAY = 0.2
QUIET = 0.3  # long enough to be sure nothing else is coming on loopback


def speech_24k() -> np.ndarray:
    return speech_float(24000)


def frames_of(*parts: np.ndarray) -> np.ndarray:
    x = np.concatenate(parts).astype(np.float32)
    return np.concatenate([x, np.zeros(-len(x) % FRAME_SAMPLES, np.float32)])


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 24000), np.float32)


def normalised_xcorr(ref: np.ndarray, out: np.ndarray) -> tuple[int, float]:
    n = len(ref) + len(out)
    c = np.fft.irfft(np.fft.rfft(out, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(out)]
    lag = int(np.argmax(c))
    return lag, float(c[lag] / np.sqrt(np.dot(ref, ref) * np.dot(out, out)))


class Caller:
    """A well-behaved client: waits for 0x00, then one sphn 0.2 writer for the whole session."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.writer = sphn.OpusStreamWriter(24000)

    def ogg(self, pcm: np.ndarray) -> bytes:
        return self.writer.append_pcm(pcm.astype(np.float32))

    async def send_audio(self, pcm: np.ndarray, message_bytes: int | None = None) -> None:
        data = self.ogg(pcm)
        step = message_bytes or len(data) or 1
        for i in range(0, len(data), step):
            await self.ws.send(b"\x01" + data[i : i + step])

    async def handshake(self) -> float:
        start = time.monotonic()
        assert await asyncio.wait_for(self.ws.recv(), 5) == b"\x00"
        return time.monotonic() - start

    async def headers(self) -> list[bytes]:
        return [await asyncio.wait_for(self.ws.recv(), 2) for _ in range(2)]

    async def drain(self, quiet: float = QUIET) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(await asyncio.wait_for(self.ws.recv(), quiet))
            except TimeoutError:
                return out

    async def audio_pages(self, n: int, timeout: float = 5) -> tuple[list[bytes], list[tuple[int, str]]]:
        """Next n audio pages, and the text pieces with the index of the page that followed each."""
        pages, texts = [], []
        async with asyncio.timeout(timeout):
            while len(pages) < n:
                msg = await self.ws.recv()
                if msg[0] == 0x01:
                    pages.append(msg[1:])
                elif msg[0] == 0x02:
                    texts.append((len(pages), msg[1:].decode()))
                else:
                    pytest.fail(f"unexpected message kind {msg[0]}")
        return pages, texts


def decode(pages: list[bytes]) -> np.ndarray:
    """Client-side decode; every 80 ms page must give back exactly 1920 samples."""
    reader = sphn.OpusStreamReader(24000)
    pcm = [reader.append_bytes(p) for p in pages]
    assert all(len(p) == FRAME_SAMPLES for p in pcm)
    return np.concatenate(pcm)


@pytest.fixture
async def make_engine():
    engines: list[ReferenceEngine] = []

    async def factory(ssl_context: ssl.SSLContext | None = None, **options) -> ReferenceEngine:
        options.setdefault("handshake_delay_secs", HANDSHAKE_DELAY)
        engine = ReferenceEngine(EngineOptions(**options))
        await engine.start(ssl_context=ssl_context)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop()


async def session(engine: ReferenceEngine, **connect_kwargs) -> Caller:
    caller = Caller(await connect(engine.url + CHAT, **connect_kwargs))
    await caller.handshake()
    await caller.headers()
    return caller


async def one_page_per_frame(engine: ReferenceEngine, sent: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Say `sent` in one session: exactly one audio page comes back per 80 ms frame, and nothing more.
    Returns the decoded audio and the text pieces with the page index they came before."""
    n = len(sent) // FRAME_SAMPLES
    caller = await session(engine)
    await caller.send_audio(sent)
    pages, texts = await caller.audio_pages(n)
    assert await caller.drain() == []
    await caller.ws.close()
    return decode(pages), texts


async def expect_abnormal_close(ws: ClientConnection) -> None:
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 3)
    assert info.value.rcvd is None  # no close frame at all
    assert ws.close_code == 1006


async def expect_normal_close(ws: ClientConnection) -> None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 3)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1000, "")


# --- handshake -------------------------------------------------------------------------------------


async def test_handshake_comes_after_the_prompt_phase_which_eats_early_messages(make_engine):
    engine = await make_engine(handshake_delay_secs=0.3)
    async with connect(engine.url + CHAT) as ws:
        caller = Caller(ws)
        start = time.monotonic()
        # The classic bridge bug: audio (with the BOS page) sent before 0x00.
        for _ in range(3):
            await caller.send_audio(silence(0.08))
        await caller.handshake()
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 0.6
        assert engine.stats.messages_eaten_before_handshake == 3
        await caller.headers()
        # The BOS page was eaten, so the rest of the stream starts with a non-BOS page: death, 1000.
        await caller.send_audio(silence(0.08))
        await expect_normal_close(ws)
    assert engine.stats.uplink_violations == 1
    assert engine.stats.frames_out == 0


async def test_header_pages_first_with_sphn_0_1_fields_and_nothing_without_input(make_engine):
    engine = await make_engine()
    async with connect(engine.url + CHAT) as ws:
        caller = Caller(ws)
        await caller.handshake()
        head, tags = await caller.headers()
        assert head[0] == tags[0] == 0x01
        assert len(head) == 1 + 47 and len(tags) == 1 + 53
        head_page, _ = parse_page(head[1:])
        assert head_page.bos and head_page.serial == 42 and head_page.sequence == 0
        assert head_page.body[:8] == b"OpusHead"
        version, channels = head_page.body[8], head_page.body[9]
        pre_skip = int.from_bytes(head_page.body[10:12], "little")
        input_rate = int.from_bytes(head_page.body[12:16], "little")
        assert (version, channels, pre_skip, input_rate) == (1, 1, 3840, 24000)
        tags_page, _ = parse_page(tags[1:])
        assert not tags_page.bos and tags_page.serial == 42 and tags_page.sequence == 1
        assert tags_page.body[12:21] == b"sphn-pyo3"
        assert await caller.drain() == []  # input-clocked: no input, no output, no keepalive


async def test_extra_query_params_are_ignored(make_engine):
    engine = await make_engine()
    extra = "&text_temperature=0.7&audio_topk=250&pad_mult=0&worker_auth_id=x&email=a%40b.c"
    async with connect(engine.url + CHAT + extra) as ws:
        await Caller(ws).handshake()


@pytest.mark.parametrize(
    "query",
    [
        "text_prompt=hi",
        "voice_prompt=NATF0.pt",
        "voice_prompt=NATF0.pt&text_prompt=",
        "voice_prompt=NOPE9.pt&text_prompt=hi",
        "voice_prompt=NATF0.pt&text_prompt=hi&seed=42",
    ],
    ids=["no-voice", "no-text", "empty-text", "unknown-voice", "seed"],
)
async def test_bad_params_abort_after_upgrade_with_1006(make_engine, query):
    engine = await make_engine()
    async with connect(f"{engine.url}/api/chat?{query}") as ws:  # the upgrade itself succeeds
        await expect_abnormal_close(ws)
    assert engine.stats.rejected == 1 and engine.stats.sessions_started == 0


# --- audio -----------------------------------------------------------------------------------------


async def test_output_is_clocked_by_input_frames(make_engine):
    engine = await make_engine()
    async with connect(engine.url + CHAT) as ws:
        caller = Caller(ws)
        await caller.handshake()
        await caller.headers()
        speech = frames_of(speech_24k())[: 7 * FRAME_SAMPLES]
        await caller.send_audio(speech, message_bytes=100)  # pages split across messages
        msgs = await caller.drain()
        pages = [m[1:] for m in msgs if m[0] == 0x01]
        assert len(pages) == 7 and engine.stats.frames_in == 7
        for k, raw in enumerate(pages, start=1):
            page, end = parse_page(raw)
            assert end == len(raw) and page.granule == k * FRAME_SAMPLES and page.sequence == k + 1
            (packet, complete), = page.segments()
            toc, frames = split_opus_packet(packet)
            assert complete and packet[0] & 3 == 3
            assert len(frames) * frame_duration_us(toc) == 80_000
        # Half a frame stays buffered; the other half completes exactly one more step.
        await caller.send_audio(silence(0.04))
        assert await caller.drain() == []
        await caller.send_audio(silence(0.04))
        assert [m[0] for m in await caller.drain()] == [0x01]
    assert engine.stats.frames_out == 8


async def test_echo_returns_the_callers_speech_after_echo_delay_with_text(make_engine):
    engine = await make_engine(mode="echo", echo_delay_secs=0.4)
    sent = frames_of(silence(0.2), speech_24k(), silence(0.7))
    n = len(sent) // FRAME_SAMPLES
    received, texts = await one_page_per_frame(engine, sent)
    lag, peak = normalised_xcorr(sent, received)
    assert peak > 0.5
    assert abs(lag - 0.4 * 24000) < 0.03 * 24000
    pieces = [piece for _, piece in texts]
    assert pieces and set(pieces) <= {" echo", "ing"} and pieces[0] == " echo"
    assert engine.stats.text_pieces_out == len(pieces)
    # Text only while the echoed speech plays (0.6 s in at the earliest), never after the last page.
    assert all(6 <= index < n for index, _ in texts)


async def test_tone_mode_sends_the_tone_and_no_text(make_engine):
    engine = await make_engine(mode="tone", tone_hz=600.0)
    caller = await session(engine)
    await caller.send_audio(silence(0.8))
    pages, texts = await caller.audio_pages(10)
    await caller.ws.close()
    pcm = decode(pages)[FRAME_SAMPLES:]
    spectrum = np.abs(np.fft.rfft(pcm))
    peak_hz = np.argmax(spectrum) * 24000 / len(pcm)
    assert abs(peak_hz - 600) < 15 and texts == []


async def test_script_mode_plays_the_clip_at_script_at_with_its_words(make_engine, tmp_path):
    clip_path = tmp_path / "clip.wav"
    clip16k, _ = soundfile.read(str(PIPECAT_SPEECH_WAV))
    soundfile.write(clip_path, clip16k, 16000)
    text = "Ready when you are, friend."
    engine = await make_engine(mode="script", script_wav=str(clip_path), script_text=text, script_at=0.24)
    caller = await session(engine)
    n = 18
    await caller.send_audio(silence(n * 0.08))
    pages, texts = await caller.audio_pages(n)
    await caller.ws.close()
    pieces = [piece for _, piece in texts]
    assert "".join(pieces).strip() == text
    assert pieces[:4] == [" Ready", " when", " you", " are"]
    # The clip starts at step 3 (0.24 s) and spans 10 steps; the words are spread over exactly that
    # span, and each piece precedes the audio page of its own step.
    assert texts[0][0] == 3 and texts[-1][0] <= 12
    assert len({index for index, _ in texts}) == len(texts)
    lag, peak = normalised_xcorr(speech_24k(), decode(pages))
    assert peak > 0.5 and abs(lag - 0.24 * 24000) < 0.02 * 24000


def step_rms(pages: list[bytes]) -> np.ndarray:
    pcm = decode(pages).reshape(len(pages), FRAME_SAMPLES).astype(np.float64)
    return np.sqrt(np.mean(pcm**2, axis=1))


async def test_script_lines_play_in_their_own_step_windows_with_silence_around(make_engine):
    # Given out of order: the default clip (10 steps, voiced in its steps 1-5) from step 3, and the shipped
    # one_moment clip (19 steps) from step 20.
    script = [
        {"at": 1.6, "wav": str(ONE_MOMENT_WAV), "text": "One moment, please."},
        {"at": 0.24, "text": "Ready one."},
    ]
    engine = await make_engine(mode="script", script=script)
    caller = await session(engine)
    n = 44
    await caller.send_audio(silence(n * 0.08))
    pages, texts = await caller.audio_pages(n)
    await caller.ws.close()
    first, second = range(3, 13), range(20, 39)
    rms = step_rms(pages)
    assert rms[list(first)].max() > 5 * SILENCE_RMS
    assert rms[20] > SILENCE_RMS  # a trimmed holding clip sounds in its very first step
    assert np.sqrt(np.mean(rms[list(second)] ** 2)) > 5 * SILENCE_RMS
    quiet = [i for i in range(n) if i not in first and i not in second]
    assert all(rms[i] < SILENCE_RMS for i in quiet), [(i, rms[i]) for i in quiet if rms[i] >= SILENCE_RMS]
    assert [piece for index, piece in texts if index in first] == [" Ready", " one", "."]
    second_pieces = [piece for index, piece in texts if index in second]
    assert second_pieces == [" One", " momen", "t", ",", " pleas", "e", "."]
    assert len(texts) == 10
    lag, peak = normalised_xcorr(speech_24k(), decode(pages)[: 20 * FRAME_SAMPLES])
    assert peak > 0.5 and abs(lag - 0.24 * 24000) < 0.02 * 24000


def test_script_agent_mixes_overlapping_lines_to_the_sample_and_queues_their_pieces():
    a = np.full(3 * FRAME_SAMPLES, 0.6, np.float32)  # steps 0-2
    b = np.full(2 * FRAME_SAMPLES, 0.3, np.float32)  # from 0.2 s: mid-step 2 to mid-step 4
    agent = ScriptAgent([(0.2, b, "x y"), (0.0, a, "a b c")])
    half = FRAME_SAMPLES // 2
    steps = [agent.step(np.zeros(FRAME_SAMPLES, np.float32)) for _ in range(6)]
    audio = np.concatenate([out for out, _ in steps])
    expected = np.zeros(6 * FRAME_SAMPLES, np.float32)
    expected[: len(a)] += a
    expected[4 * FRAME_SAMPLES + half - len(b) : 4 * FRAME_SAMPLES + half] += b
    np.testing.assert_allclose(audio, expected, atol=1e-6)
    # Both lines have a piece due at step 2: the earlier line's goes first, the other waits one step.
    assert [text for _, text in steps] == [" a", " b", " c", " x", " y", None]
    loud = ScriptAgent([(0.0, a, ""), (0.0, a, "")])
    out, text = loud.step(np.zeros(FRAME_SAMPLES, np.float32))
    assert out.max() == 1.0 and text is None


async def test_step_delay_slows_every_step(make_engine):
    engine = await make_engine(step_delay_secs=0.1)
    caller = await session(engine)
    start = time.monotonic()
    await caller.send_audio(silence(0.32))
    await caller.audio_pages(4)
    assert time.monotonic() - start >= 0.4
    await caller.ws.close()


# --- uplink violations and ignored input -----------------------------------------------------------


def _non_bos_page() -> bytes:
    pages = split_pages(sphn.OpusStreamWriter(24000).append_pcm(silence(0.08)))
    return pages[2].to_bytes()


def _corrupt_stream() -> bytes:
    data = bytearray(sphn.OpusStreamWriter(24000).append_pcm(silence(0.08)))
    data[-5] ^= 0xFF
    return bytes(data)


def _restarted_stream() -> bytes:
    first = sphn.OpusStreamWriter(24000).append_pcm(silence(0.08))
    return first + sphn.OpusStreamWriter(24000).append_pcm(silence(0.08))


@pytest.mark.parametrize(
    "payload", [_non_bos_page, _corrupt_stream, _restarted_stream], ids=["non-bos", "crc", "second-bos"]
)
async def test_uplink_violation_closes_with_1000_and_no_message(make_engine, payload):
    engine = await make_engine()
    caller = await session(engine)
    await caller.ws.send(b"\x01" + payload())
    await expect_normal_close(caller.ws)
    assert engine.stats.uplink_violations == 1


async def test_raw_opus_produces_nothing_and_the_reader_keeps_hunting(make_engine):
    engine = await make_engine()
    caller = await session(engine)
    stream = Caller(caller.ws).ogg(silence(0.4))
    raw_packets = b"".join(
        p.body for p in split_pages(stream)[2:]
    )  # Opus without Ogg framing: what some broken bridges send
    for i in range(0, len(raw_packets), 60):
        await caller.ws.send(b"\x01" + raw_packets[i : i + 60])
    assert await caller.drain() == []
    await caller.send_audio(silence(0.16))  # a proper stream, BOS first, is still accepted
    pages, _ = await caller.audio_pages(2)
    assert engine.stats.uplink_violations == 0
    await caller.ws.close()


async def test_text_frames_client_handshake_and_unknown_kinds_are_ignored(make_engine):
    engine = await make_engine()
    caller = await session(engine)
    for msg in ["hello", b"\x00", b"\x05oops", b"\x06", b""]:
        await caller.ws.send(msg)
    assert await caller.drain() == []
    await caller.send_audio(silence(0.08))
    await caller.audio_pages(1)
    await caller.ws.close()


# --- sessions --------------------------------------------------------------------------------------


async def test_second_connection_waits_silently_until_the_first_closes(make_engine):
    engine = await make_engine()
    first = await session(engine)
    async with connect(engine.url + CHAT) as second_ws:  # upgraded, then nothing
        second = Caller(second_ws)
        assert await second.drain(HANDSHAKE_DELAY + 0.3) == []
        assert engine.stats.sessions_active == 1 and engine.stats.connections == 2
        await first.ws.close()
        assert await second.handshake() < HANDSHAKE_DELAY + 0.3
        await second.headers()
        await second.send_audio(silence(0.08))
        await second.audio_pages(1)


async def test_client_close_releases_the_slot_promptly(make_engine):
    engine = await make_engine()
    caller = await session(engine)
    await caller.send_audio(silence(0.16))
    await caller.audio_pages(2)
    await caller.ws.close()
    async with asyncio.timeout(1):
        while engine.stats.sessions_active:
            await asyncio.sleep(0.01)
    again = await session(engine)
    await again.ws.close()
    assert engine.stats.sessions_started == 2


async def test_closing_during_the_prompt_phase_releases_the_slot(make_engine):
    engine = await make_engine(handshake_delay_secs=2.0)
    ws = await connect(engine.url + CHAT)
    await asyncio.sleep(0.1)
    await ws.close()
    async with asyncio.timeout(1):
        while engine.stats.sessions_active:
            await asyncio.sleep(0.01)
    assert engine.stats.handshakes == 0


async def test_sessions_option_allows_concurrent_sessions(make_engine):
    engine = await make_engine(sessions=2)
    a = await session(engine)
    b = await session(engine)
    assert engine.stats.sessions_active == 2
    await a.ws.close()
    await b.ws.close()


async def test_fail_after_frames_drops_the_connection(make_engine):
    engine = await make_engine(fail_after_frames=3)
    caller = await session(engine)
    await caller.send_audio(silence(0.48))
    pages, _ = await caller.audio_pages(3)
    await expect_abnormal_close(caller.ws)
    assert engine.stats.frames_out == 3


# --- TLS and CLI -----------------------------------------------------------------------------------


def _insecure_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_tls_with_a_client_that_skips_verification(make_engine):
    engine = await make_engine(ssl_context=self_signed_ssl_context())
    assert engine.url.startswith("wss://127.0.0.1:")
    caller = await session(engine, ssl=_insecure_client_context())
    await caller.send_audio(silence(0.08))
    await caller.audio_pages(1)
    await caller.ws.close()


def test_options_reject_unknown_fields_and_script_mode_has_a_default_clip():
    with pytest.raises(ValidationError):
        EngineOptions(handshake_dleay=1.0)
    options = EngineOptions(mode="script")
    assert options.script_lines() == [ScriptLine(at=0.5, text=options.script_text)]
    engine = ReferenceEngine(options)
    assert abs(len(engine._script[0][1]) - len(speech_24k())) <= 1


@pytest.mark.parametrize(
    "options",
    [
        {"script": [{"at": -0.1}]},
        {"script": [{"wav": "a.wav"}]},
        {"script": [{"at": "soon"}]},
        {"script": [{"at": 1, "voice": "NATF0.pt"}]},
        {"script": [{"at": 1, "text": None}]},
        {"script": {"at": 1}},
        {"script": [{"at": 1}], "script_at": 2},
        {"script": [{"at": 1}], "script_wav": "a.wav"},
        {"script_at": -1},
    ],
    ids=[
        "negative-at",
        "no-at",
        "text-at",
        "unknown-key",
        "null-text",
        "not-a-list",
        "script-and-at",
        "script-and-wav",
        "old-negative",
    ],
)
def test_bad_script_options_are_rejected(options):
    with pytest.raises(ValidationError):
        EngineOptions(mode="script", **options)


def test_script_clips_are_loaded_once_per_engine(monkeypatch, tmp_path):
    clip_path = tmp_path / "clip.wav"
    soundfile.write(clip_path, speech_float(16000), 16000)
    loads = []
    monkeypatch.setattr(reference, "load_clip", lambda path: loads.append(path) or speech_24k())
    lines = [{"at": 0}, {"at": 1, "wav": str(clip_path)}, {"at": 2}, {"at": 3, "wav": str(clip_path)}]
    engine = ReferenceEngine(EngineOptions(mode="script", script=lines))
    engine._new_agent()
    engine._new_agent()
    assert sorted(loads) == sorted([str(clip_path), str(PIPECAT_SPEECH_WAV)])
    assert engine._script[0][1] is engine._script[2][1]
    monkeypatch.undo()
    with pytest.raises(soundfile.LibsndfileError):  # at start-up, not in the first call's session
        ReferenceEngine(EngineOptions(mode="script", script=[{"at": 0, "wav": str(tmp_path / "none.wav")}]))


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--no-tls" in capsys.readouterr().out


def test_cli_say_lines_parse_and_conflict_with_the_one_line_flags(capsys):
    args = _parser().parse_args(["--say", "0.5:", "--say", "2:clip.wav:Hi: there", "--say", "3::"])
    assert args.say == [
        ScriptLine(at=0.5),
        ScriptLine(at=2, wav="clip.wav", text="Hi: there"),
        ScriptLine(at=3, text=""),
    ]
    for bad in ["soon:", "--say=-1:clip.wav"]:
        with pytest.raises(SystemExit) as info:
            _parser().parse_args(["--say", bad] if not bad.startswith("--") else [bad])
        assert info.value.code == 2
        assert "argument --say" in capsys.readouterr().err
    assert main(["--say", "1:", "--script-at", "2"]) == 2
    assert "not both" in capsys.readouterr().out


@asynccontextmanager
async def cli_engine(*flags: str, port: str = "0"):
    """`main` in a subprocess, as `python -m pipelines engine` runs it; yields the printed base URL
    (the comma-separated URLs, one per engine, with several ports)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pipelines.sim.engine.reference import main; sys.exit(main(sys.argv[1:]))",
            "--port",
            port,
            "--handshake-delay-secs",
            "0.1",
            *flags,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.startswith(("ws://", "wss://")), line
        yield line.strip()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


async def test_cli_serves_wss_by_default_until_ctrl_c():
    async with cli_engine() as base:
        assert base.startswith("wss://127.0.0.1:")
        async with connect(base + CHAT, ssl=_insecure_client_context()) as ws:
            await Caller(ws).handshake()


async def test_cli_starts_one_engine_per_port_like_a_fleet():
    async with cli_engine("--no-tls", port="0,0") as urls:
        bases = urls.split(",")
        assert len(set(bases)) == 2
        async with connect(bases[0] + CHAT) as first, connect(bases[1] + CHAT) as second:
            await asyncio.gather(Caller(first).handshake(), Caller(second).handshake())  # one session each, at once


async def test_cli_say_selects_script_mode_and_speaks_each_line():
    async with cli_engine("--no-tls", "--say", f"0.96:{ONE_MOMENT_WAV}:One moment", "--say", "0::Hi") as base:
        assert base.startswith("ws://")
        async with connect(base + CHAT) as ws:
            caller = Caller(ws)
            await caller.handshake()
            await caller.headers()
            await caller.send_audio(silence(15 * 0.08))
            pages, texts = await caller.audio_pages(15)
    assert texts == [(0, " Hi"), (12, " One")]  # the default clip spans steps 0-9, one_moment starts at 12
    rms = step_rms(pages)
    assert rms[:10].max() > SILENCE_RMS and rms[10:12].max() < SILENCE_RMS < rms[12]
