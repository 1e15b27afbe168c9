"""The simulated Exotel caller against small scripted bots on a real loopback WebSocket server."""

import asyncio
import audioop
import base64
import json
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame
from websockets.asyncio.server import serve

from pipelines.sim.caller import place_call
from processors.audio import PIPECAT_SPEECH_WAV, read_wav, write_wav
from transports.exotel import ExotelParams, ExotelProtocol

READY_WAV = PIPECAT_SPEECH_WAV


@pytest.fixture(scope="module")
def ready8k() -> np.ndarray:
    return read_wav(READY_WAV, 8000)


class Bot:
    """A provider-facing bot: records what the caller sends and runs `script` once `start` arrives."""

    def __init__(self, script=None):
        self.script = script
        self.path = ""
        self.received: list[tuple[float, dict]] = []  # (seconds since `start` arrived, message)
        self.t0 = 0.0
        self.ws = None

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def at(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))

    async def send(self, message) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def handler(self, ws) -> None:
        self.ws, self.path = ws, ws.request.path
        tasks = []
        async for raw in ws:
            msg = json.loads(raw)
            if msg["event"] == "start":
                self.t0 = asyncio.get_running_loop().time()
                if self.script:
                    tasks.append(asyncio.create_task(self.script(self)))
            self.received.append((self.now(), msg))
        for task in tasks:
            task.cancel()

    def events(self, name: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.received if m["event"] == name]


async def call(bot: Bot, audio: np.ndarray, rate: int, **kwargs):
    async with serve(bot.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        return await place_call(f"ws://127.0.0.1:{port}/exotel", audio, rate, **kwargs)


def chunks(audio: np.ndarray, size: int = 1600) -> list[np.ndarray]:
    """Legal outbound chunks (3200 B at 8 kHz), the tail zero-padded."""
    padded = np.zeros(-(-len(audio) // size) * size, dtype=np.int16)
    padded[: len(audio)] = audio
    return [padded[i : i + size] for i in range(0, len(padded), size)]


def media(pcm: np.ndarray, sid: str = "MZtest", raw: bytes | None = None) -> dict:
    payload = base64.b64encode(pcm.astype("<i2").tobytes() if raw is None else raw).decode()
    return {"event": "media", "stream_sid": sid, "media": {"payload": payload}}


def onset(audio: np.ndarray) -> int:
    return int(np.flatnonzero(audio)[0])


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_start_fields_and_real_time_pacing(rate):
    audio = read_wav(READY_WAV, rate)
    bot = Bot()
    result = await call(bot, audio, rate, custom_parameters={"persona": "sales"}, stream_sid="MZtest",
                        call_sid="CAtest", linger=0.2)

    query = parse_qs(urlsplit(bot.path).query)
    assert query["sample-rate"] == [str(rate)] and query["persona"] == ["sales"]
    events = [m["event"] for _, m in bot.received]
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    start = bot.received[1][1]
    assert start["stream_sid"] == "MZtest" and start["sequence_number"] == "1"
    assert start["start"]["stream_sid"] == "MZtest" and start["start"]["call_sid"] == "CAtest"
    assert {"account_sid", "from", "to"} <= set(start["start"])
    assert start["start"]["custom_parameters"] == {"persona": "sales"}
    assert start["start"]["media_format"] == {"encoding": "audio/x-raw", "sample_rate": str(rate), "bit_rate": "16"}
    assert bot.received[-1][1]["stop"]["reason"] == "callended"

    sent = bot.events("media")
    n = -(-len(audio) // (rate // 10))
    assert len(sent) == n
    assert [m["media"]["chunk"] for _, m in sent] == [str(i) for i in range(1, n + 1)]
    assert [m["sequence_number"] for _, m in sent] == [str(i) for i in range(2, n + 2)]
    assert [m["media"]["timestamp"] for _, m in sent] == [str(100 * i) for i in range(1, n + 1)]
    pcm = b"".join(base64.b64decode(m["media"]["payload"]) for _, m in sent)
    assert len(pcm) == n * rate // 10 * 2
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2")[: len(audio)], audio)

    # Real time: chunks spread over the audio's duration, not blasted at once.
    span = sent[-1][0] - sent[0][0]
    assert 0.8 < span / ((n - 1) * 0.1) < 1.3
    assert 0.8 < bot.received[-1][0] / (n * 0.1) < 1.3
    assert result.sent_seconds == pytest.approx(n * 0.1)
    assert result.violations == [] and not np.any(result.heard)


async def test_playout_timeline_and_mark_echo(ready8k):
    utterance = np.concatenate(chunks(ready8k))  # 0.8 s

    async def script(bot):
        await bot.at(0.1)
        await bot.send({"event": "mark", "stream_sid": "MZtest", "mark": {"name": "idle"}})
        await bot.at(0.3)
        for c in chunks(ready8k):  # burst: the phone must still play it at real time
            await bot.send(media(c))
        await bot.at(0.4)
        for c in chunks(ready8k):  # queued behind the first utterance
            await bot.send(media(c))
        await bot.send({"event": "mark", "stream_sid": "MZtest", "mark": {"name": "end"}})

    bot = Bot(script)
    result = await call(bot, np.zeros(0, np.int16), 8000, seconds=2.1, stream_sid="MZtest", linger=0.1)

    assert result.violations == []
    assert result.marks_echoed == ["idle", "end"]
    first = onset(result.heard) - onset(utterance)
    assert first / 8000 == pytest.approx(0.3, abs=0.06)
    n = len(utterance)
    np.testing.assert_array_equal(result.heard[first : first + n], utterance)
    np.testing.assert_array_equal(result.heard[first + n : first + 2 * n], utterance)
    assert not np.any(result.heard[first + 2 * n :])
    assert len(result.heard) / 8000 == pytest.approx(2.1, abs=0.2)

    echoes = {m["mark"]["name"]: (t, m) for t, m in bot.events("mark")}
    assert echoes["idle"][0] == pytest.approx(0.1, abs=0.1)
    played = first / 8000 + 2 * n / 8000
    assert played - 0.03 <= echoes["end"][0] < played * 1.15
    assert echoes["end"][1]["stream_sid"] == "MZtest" and echoes["end"][1]["sequence_number"].isdigit()
    assert [m["event"] for _, m in result.messages].count("media") == 8


async def test_clear_truncates_queued_audio(ready8k):
    long = np.concatenate([ready8k] * 3)  # ~2.2 s

    async def script(bot):
        await bot.at(0.2)
        for c in chunks(long):
            await bot.send(media(c))
        await bot.send({"event": "mark", "stream_sid": "MZtest", "mark": {"name": "cut"}})
        await bot.at(0.8)
        await bot.send({"event": "clear", "stream_sid": "MZtest"})
        await bot.at(1.0)
        for c in chunks(ready8k):
            await bot.send(media(c))

    bot = Bot(script)
    result = await call(bot, np.zeros(0, np.int16), 8000, seconds=1.9, stream_sid="MZtest", linger=0.1)

    assert result.clears == 1 and result.violations == []
    assert result.marks_echoed == ["cut"]
    [(echo_t, _)] = bot.events("mark")
    assert echo_t == pytest.approx(0.8, abs=0.1)  # echoed by the clear, not after 2.2 s of playout
    heard = result.heard
    first = onset(heard) - onset(long)
    assert first / 8000 == pytest.approx(0.2, abs=0.06)
    window = heard[first : first + len(long)]
    cut = first + int(np.flatnonzero(window != long[: len(window)])[0])  # where heard leaves the speech
    assert cut / 8000 == pytest.approx(0.8, abs=0.1)
    second = cut + onset(heard[cut:]) - onset(ready8k)
    assert not np.any(heard[cut : second + onset(ready8k)])
    assert second / 8000 == pytest.approx(1.0, abs=0.06)  # plays at once: the queue was emptied
    np.testing.assert_array_equal(heard[second : second + len(ready8k)], ready8k)


async def test_rule_violations_are_reported(ready8k):
    good = chunks(ready8k)[0]

    async def script(bot):
        await bot.send(media(good))
        await bot.send(media(good, raw=bytes(100)))
        await bot.send(media(good, raw=bytes(3000)))
        await bot.send(media(good, raw=bytes(100_160)))
        await bot.send({"event": "media", "stream_sid": "MZtest", "media": {"payload": "%%%"}})
        await bot.send(media(good, sid="MZother"))
        await bot.send({"event": "hangup", "stream_sid": "MZtest"})
        await bot.send("{not json")
        await bot.send(b"\x00\x01")
        await bot.send({"event": "mark", "stream_sid": "MZtest", "mark": {}})

    bot = Bot(script)
    result = await call(bot, np.zeros(0, np.int16), 8000, seconds=0.4, stream_sid="MZtest", linger=0.1)

    text = "\n".join(result.violations)
    assert "media #2: 100 bytes is not a multiple of 320" in text
    assert "media #2: 100 bytes is below the 3200-byte minimum" in text
    assert "media #3: 3000 bytes is not a multiple of 320" in text
    assert "media #4: 100160 bytes is above the 100000-byte maximum" in text
    assert "not base64" in text and "'MZother'" in text and "unknown event 'hangup'" in text
    assert "bad JSON" in text and "binary frame" in text and "mark without mark.name" in text
    assert len(result.violations) == 11
    assert not any("media #1:" in v for v in result.violations)


async def test_server_close_is_reported():
    async def script(bot):
        await bot.at(0.2)
        await bot.ws.close(1011, "bot failed")

    bot = Bot(script)
    result = await call(bot, np.zeros(8000, np.int16), 8000, seconds=3.0, linger=0.5)
    assert result.close_code == 1011
    assert result.sent_seconds < 0.6
    assert len(result.heard) / 8000 < 1.0


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_exotel_protocol_echo_bot_passes_the_caller(rate):
    """End to end: a bot built on our ExotelProtocol obeys every rule the provider side checks."""
    audio = read_wav(READY_WAV, rate)

    async def handler(ws):
        proto = ExotelProtocol(ExotelParams(), dict(parse_qs_single(ws.request.path)))
        async for raw in ws:
            for frame in proto.receive(raw):
                if isinstance(frame, InputAudioRawFrame):
                    for message in proto.audio(frame.audio):
                        await ws.send(message)
            msg = json.loads(raw)
            if msg["event"] == "media" and msg["media"]["chunk"] == "8":
                for message in proto.mark("echo-done"):
                    await ws.send(message)
        assert not proto.dropped

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await place_call(f"ws://127.0.0.1:{port}/exotel", audio, rate, seconds=1.3, linger=0.2)

    assert result.violations == []
    assert result.marks_echoed == ["echo-done"]
    echoed = b"".join(base64.b64decode(m["media"]["payload"]) for _, m in result.messages if m["event"] == "media")
    np.testing.assert_array_equal(np.frombuffer(echoed, "<i2")[: len(audio)], audio)
    lag = onset(result.heard) - onset(audio)
    assert 0.05 < lag / rate < 0.5  # one caller chunk plus at most one outbound chunk of buffering
    # A bot with no lead can underrun by a few samples per chunk (jitter), so compare the span.
    speech = np.flatnonzero(result.heard)
    expected = np.flatnonzero(audio)
    assert (speech[-1] - speech[0]) / rate == pytest.approx((expected[-1] - expected[0]) / rate, abs=0.03)


def parse_qs_single(path: str) -> list[tuple[str, str]]:
    return [(k, v[0]) for k, v in parse_qs(urlsplit(path).query).items()]


def test_wav_round_trip(tmp_path, ready8k):
    write_wav(tmp_path / "a.wav", ready8k, 8000)
    np.testing.assert_array_equal(read_wav(tmp_path / "a.wav", 8000), ready8k)
    stereo = np.stack([ready8k, ready8k], axis=1)
    write_wav(tmp_path / "s.wav", stereo, 8000)
    assert read_wav(tmp_path / "s.wav", 16000).shape == (2 * len(ready8k),)
    assert abs(len(read_wav(READY_WAV, 8000)) / 8000 - 0.73) < 0.01


async def test_as_twilio_it_speaks_mulaw_camelcase_and_reports_extra_fields():
    rate = 8000
    audio = read_wav(READY_WAV, rate)[:4000]

    async def script(bot):
        await bot.at(0.05)
        pcm = audioop.lin2ulaw(np.full(800, 1000, np.int16).tobytes(), 2)
        await bot.send({"event": "media", "streamSid": "MZtw", "media": {"payload": base64.b64encode(pcm).decode()}})
        await bot.send({"event": "mark", "streamSid": "MZtw", "mark": {"name": "m1"}})
        await bot.send({"event": "media", "streamSid": "MZtw", "sequenceNumber": "3",  # Twilio error 31951
                        "media": {"payload": base64.b64encode(pcm).decode(), "chunk": "1"}})

    bot = Bot(script)
    async with serve(bot.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await place_call(f"ws://127.0.0.1:{port}/twilio", audio, rate, provider="twilio",
                                  custom_parameters={"persona": "sales"}, stream_sid="MZtw", call_sid="CAtw", linger=0.2)
    connected, start = bot.received[0][1], bot.received[1][1]
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["streamSid"] == "MZtw" and start["start"]["callSid"] == "CAtw"
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert start["start"]["customParameters"] == {"persona": "sales"}
    sent = bot.events("media")
    assert len(sent) == 4000 // 160 and all(len(base64.b64decode(m["media"]["payload"])) == 160 for _, m in sent)
    assert sent[0][1]["media"]["track"] == "inbound"
    assert bot.received[-1][1] == {"event": "stop", "sequenceNumber": bot.received[-1][1]["sequenceNumber"],
                                   "streamSid": "MZtw", "stop": {"accountSid": "ACsimulated", "callSid": "CAtw"}}
    assert result.marks_echoed == ["m1"]
    assert len(result.violations) == 2 and all("31951" in v for v in result.violations)
    assert abs(result.heard[int(0.06 * rate)] - 1000) < 40  # μ-law decoded on playout


# ---- timed actions and the browser page ----------------------------------------------------------------


async def test_dtmf_digits_go_out_at_their_times_in_each_providers_format():
    from pipelines.sim.caller import Dtmf

    bot = Bot()
    result = await call(bot, np.zeros(8000, np.int16), 8000, seconds=0.8, stream_sid="MZtest", linger=0.1,
                        events=[Dtmf(0.45, "#"), Dtmf(0.25, "5", duration_ms=120)])
    sent = bot.events("dtmf")
    assert [m["dtmf"] for _, m in sent] == [{"digit": "5", "duration": "120"}, {"digit": "#", "duration": "250"}]
    assert all(m["stream_sid"] == "MZtest" and m["sequence_number"].isdigit() for _, m in sent)
    order = [m["event"] if m["event"] != "media" else m["media"]["chunk"] for _, m in bot.received]
    assert order.index("2") < order.index("dtmf") < order.index("4")  # between the media chunks of that moment
    assert [d for _, d in result.dtmf_sent] == ["5", "#"] and result.dtmf_sent[0][0] >= 0.25

    bot = Bot()
    async with serve(bot.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await place_call(f"ws://127.0.0.1:{port}/twilio", np.zeros(4000, np.int16), 8000, provider="twilio",
                         stream_sid="MZtw", linger=0.1, events=[Dtmf(0.1, "1")])
    [(_, message)] = bot.events("dtmf")
    assert message == {"event": "dtmf", "sequenceNumber": message["sequenceNumber"], "streamSid": "MZtw",
                       "dtmf": {"track": "inbound_track", "digit": "1"}}


async def test_a_hang_up_stops_the_audio_sends_stop_and_waits_for_the_server_to_close():
    from pipelines.sim.caller import HangUp

    async def handler(ws):
        async for raw in ws:
            if json.loads(raw)["event"] == "stop":
                await ws.close(1000)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await place_call(f"ws://127.0.0.1:{port}/exotel", np.zeros(16000, np.int16), 8000, seconds=2.0,
                                  events=[HangUp(0.5)], linger=2.0)
    assert result.sent_seconds == pytest.approx(0.5)
    assert result.hung_up_at >= 0.5 and result.server_closed_at >= result.hung_up_at
    assert result.close_code == 1000 and result.violations == []


class PageBot(Bot):
    """A bot on the browser page's protocol: `type` messages, no envelope."""

    async def handler(self, ws) -> None:
        self.ws, self.path = ws, ws.request.path
        tasks = []
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "init":
                self.t0 = asyncio.get_running_loop().time()
                if self.script:
                    tasks.append(asyncio.create_task(self.script(self)))
            self.received.append((self.now(), msg))
            if msg["type"] == "end":
                await self.send({"type": "session_ended", "reason": "hang-up"})
                await ws.close(1000)
        for task in tasks:
            task.cancel()

    def events(self, name: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.received if m["type"] == name]


def page_audio(pcm: np.ndarray) -> dict:
    return {"type": "audio", "data": base64.b64encode(pcm.astype("<i2").tobytes()).decode()}


async def test_as_the_browser_page_it_inits_plays_echoes_marks_and_honours_clear():
    tone = np.full(640, 3000, np.int16)  # 40 ms at 16 kHz

    async def script(bot):
        await bot.send({"type": "init_success", "session_id": "page-1", "sample_rate": 16000, "chunk_samples": 640})
        await bot.send({"type": "state", "state": "listening"})
        await bot.at(0.2)
        for _ in range(25):  # 1 s of bot audio, sent at once
            await bot.send(page_audio(tone))
        await bot.send({"type": "mark", "name": "bot-1"})
        await bot.send({"type": "transcript", "text": " hello", "final": False})
        await bot.at(0.6)
        await bot.send({"type": "clear"})
        await bot.at(0.8)
        await bot.send(page_audio(tone))
        await bot.send({"type": "mark", "name": "bot-2"})

    bot = PageBot(script)
    async with serve(bot.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await place_call(f"ws://127.0.0.1:{port}/browser/ws", np.full(24000, 100, np.int16), 16000,
                                  provider="browser", stream_sid="page-1", custom_parameters={"persona": "sales"},
                                  seconds=1.52, linger=1.0)

    assert result.violations == [] and result.provider == "browser"
    init = bot.received[0][1]
    assert init == {"type": "init", "sample_rate": 16000, "session_id": "page-1", "persona": "sales"}
    sent = bot.events("audio")
    assert len(sent) == 38 and all(len(base64.b64decode(m["data"])) == 1280 for _, m in sent)
    assert bot.received[-1][1] == {"type": "end"} and result.ended == "hang-up" and result.close_code == 1000
    echoes = {m["name"]: t for t, m in bot.events("mark")}
    assert set(echoes) == {"bot-1", "bot-2"}
    assert echoes["bot-1"] == pytest.approx(0.6, abs=0.1)  # echoed by the clear, not after the second of audio
    assert result.clear_times and result.clear_times[0] == pytest.approx(0.6, abs=0.1)
    assert [name for _, name in result.marks] == ["bot-1", "bot-2"]
    assert len(result.chunks) == 26 and all(c.voiced and c.samples == 640 for c in result.chunks)
    heard = np.flatnonzero(result.heard)
    assert heard[0] / 16000 == pytest.approx(0.2, abs=0.06)
    assert (heard[-1] - heard[0]) / 16000 < 0.9  # the clear cut the queued second short


async def test_the_page_dialect_reports_what_the_page_would_trip_over():
    async def script(bot):
        await bot.send(page_audio(np.ones(640, np.int16)))  # before init_success
        await bot.send({"type": "init_success", "session_id": "someone-else", "sample_rate": 8000})
        await bot.send({"type": "teleport"})
        await bot.send({"type": "audio", "data": base64.b64encode(b"\x00\x01\x02").decode()})
        await bot.send({"type": "state", "state": "dreaming"})
        await bot.send({"type": "error", "message": "the speech engine failed"})
        for _ in range(60):  # 2.4 s queued at once: more than the page keeps
            await bot.send(page_audio(np.ones(640, np.int16)))

    bot = PageBot(script)
    async with serve(bot.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await place_call(f"ws://127.0.0.1:{port}/browser/ws", np.zeros(8000, np.int16), 16000,
                                  provider="browser", stream_sid="page-2", seconds=0.5, linger=0.5)
    text = "\n".join(result.violations)
    assert "audio before init_success" in text
    assert "init_success for session 'someone-else'" in text and "init_success at 8000 Hz" in text
    assert "unknown type 'teleport'" in text and "3 bytes is not whole PCM16 samples" in text
    assert "state 'dreaming'" in text and "the page keeps 2000 ms" in text
    assert result.bot_errors and "the speech engine failed" in result.bot_errors[0]
