"""The browser page in a real headless Chromium, calling a real CallServer over loopback.

Chromium is driven over the DevTools protocol with the `websockets` package (no extra dependency).
Its fake microphone plays a WAV file; the reference engine speaks a script with its words as text,
so the page has bot audio to play and a transcript to show. Set PIPELINES_SKIP_BROWSER=1 to skip.
"""

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import websockets
import yaml

from pipelines import builder, config
from pipelines.bench.launch import stop_process
from pipelines.config import CONFIG_DIR
from pipelines.server import CallServer
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from pipelines.sim.speech import FIXTURES
from processors.audio import read_wav, write_wav
from processors.personaplex.pools import EnginePools

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
]
RATE = 16000
LINE = "Hello, I would like to check my order status."


@pytest.fixture
def chromium() -> str:
    if os.environ.get("PIPELINES_SKIP_BROWSER") == "1":
        pytest.skip("PIPELINES_SKIP_BROWSER=1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set CHROMIUM=path, "
                    "or PIPELINES_SKIP_BROWSER=1 to skip the browser tests)", pytrace=False)
    return CHROMIUM


class Page:
    """One tab over the DevTools protocol: evaluate JavaScript, and keep the page's errors."""

    def __init__(self, ws):
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._session: str | None = None
        self.errors: list[str] = []
        self.received: list[dict] = []  # the call's WebSocket messages to the page, audio data as its peak
        self.sent: list[dict] = []  # and from it
        self._reader = asyncio.create_task(self._read())

    async def _read(self):
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                self._pending.pop(msg["id"]).set_result(msg)
            elif msg.get("method") in ("Network.webSocketFrameReceived", "Network.webSocketFrameSent"):
                data = json.loads(msg["params"]["response"]["payloadData"])
                pcm = data.pop("data", None)
                if data.get("type") == "audio" and isinstance(pcm, str):
                    data["peak"] = int(np.abs(np.frombuffer(base64.b64decode(pcm), np.int16)).max(initial=0))
                (self.received if msg["method"].endswith("Received") else self.sent).append(data)
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value")) for a in msg["params"]["args"]))

    async def send(self, method: str, **params) -> dict:
        i = next(self._ids)
        self._pending[i] = asyncio.get_running_loop().create_future()
        message = {"id": i, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        await self._ws.send(json.dumps(message))
        reply = await asyncio.wait_for(self._pending[i], 10)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def open(self, url: str):
        target = (await self.send("Target.createTarget", url="about:blank"))["targetId"]
        self._session = (await self.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        await self.send("Runtime.enable")
        await self.send("Network.enable")
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && !!window.callStatus")

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def status(self) -> dict:
        return await self.js("window.callStatus")

    async def wait_for(self, expression: str, timeout: float = 10.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if value := await self.js(expression):
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {expression}; status {await self.status()}; errors {self.errors}")


@contextlib.asynccontextmanager
async def browser(chromium: str, tmp_path: Path, mic_wav: Path):
    """Chromium with a fresh profile whose microphone plays `mic_wav` once."""
    log = tmp_path / "chromium.log"
    with log.open("w") as err:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                                 f"--use-file-for-fake-audio-capture={mic_wav}%noloop", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        for _ in range(300):
            if found := re.search(r"DevTools listening on (ws://\S+)", log.read_text()):
                break
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            found = None
        if not found:
            raise RuntimeError(f"{chromium} did not start:\n{log.read_text()[-3000:]}")
        async with websockets.connect(found.group(1), max_size=None, ping_interval=None) as ws:
            page = Page(ws)
            try:
                yield page
            finally:
                page._reader.cancel()
    finally:
        stop_process(proc)


@contextlib.asynccontextmanager
async def call_server(tmp_path: Path, **reference):
    """configs/browser.yaml served in-process, with the reference engine scripted for one scenario."""
    deployment = yaml.safe_load((CONFIG_DIR / "browser.yaml").read_text())
    deployment["engine"]["reference"] = reference
    path = tmp_path / "browser.yaml"
    path.write_text(yaml.safe_dump(deployment))
    plan = builder.plan(config.load(path, {}))
    engine = ReferenceEngine(EngineOptions.model_validate(plan.loaded.config.engine.reference))
    await engine.start("127.0.0.1", 0)
    server = CallServer(plan, EnginePools.of(engine.url), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await engine.stop()


def mic(tmp_path: Path, name: str, silence_secs: float) -> Path:
    """A fixture recording after some silence, as the fake microphone's file (16 kHz mono PCM16)."""
    speech = read_wav(FIXTURES / f"{name}.wav", RATE)
    path = tmp_path / f"mic_{name}.wav"
    write_wav(path, np.concatenate([np.zeros(round(silence_secs * RATE), np.int16), speech]), RATE)
    return path


def bot_line(tmp_path: Path, repeat: int = 1) -> str:
    """The bot's scripted utterance: real speech at the model's 24 kHz, `repeat` times without a pause."""
    sentence = read_wav(FIXTURES / "question_16k.wav", 24000)[4800:-4800]  # the 200 ms pads trimmed
    path = tmp_path / "bot.wav"
    write_wav(path, np.tile(sentence, repeat), 24000)
    return str(path)


async def hang_up(page: Page, server: CallServer) -> dict:
    """Click Hang up; the server must end the call, the page must show it. Returns the call's stats."""
    session = (await page.status())["sessionId"]
    await page.js("document.getElementById('hangup').click()")
    await page.wait_for("window.callStatus.sessionEnded && !window.callStatus.connected", 8)
    for _ in range(100):
        if not server.calls and not server.connections:
            break
        await asyncio.sleep(0.05)
    assert not server.calls and not server.connections
    [call] = [c for c in server.recent if c["call_id"] == session]
    assert (await page.status())["endReason"] == "hang-up"
    assert "ended (hang-up)" in await page.js("document.getElementById('status').textContent")
    return call["stats"]


async def test_a_call_from_the_page_plays_the_bot_shows_its_transcript_and_hangs_up(chromium, tmp_path):
    # The caller asks at once (over the greeting); the bot answers 4 s into the engine session.
    async with call_server(tmp_path, mode="script", handshake_delay_secs=0.5,
                           script=[{"at": 4.0, "wav": bot_line(tmp_path), "text": LINE}]) as server:
        async with browser(chromium, tmp_path, mic(tmp_path, "question_16k", 0.0)) as page:
            await page.open(f"http://127.0.0.1:{server.port}/?persona=sales")
            await page.js("document.getElementById('call').click()")
            await page.wait_for("window.callStatus.connected")
            assert server.calls  # the server runs the call
            await page.wait_for("window.callStatus.audioSamplesPlayed > 0")  # the greeting
            await page.wait_for("window.callStatus.transcript.includes('I would like to check')", 12)
            assert "I would like to check" in await page.js("document.getElementById('transcript').textContent")
            await page.wait_for("window.callStatus.state === 'speaking'")
            played = (await page.status())["audioSamplesPlayed"]
            await asyncio.sleep(0.5)
            assert (await page.status())["audioSamplesPlayed"] >= played + 0.3 * RATE  # real-time playback
            await page.wait_for(f"window.callStatus.transcript.includes({json.dumps(LINE)} + '\\n')", 8)  # the utterance ended
            await page.wait_for("window.callStatus.state !== 'speaking' && window.callStatus.marksEchoed >= 1", 5)
            before = await page.status()
            # the call's events, shown on the page: the engine leased and ready
            assert [e["event"] for e in before["events"]][:2] == ["engine_acquired", "engine_ready"]
            assert "engine_ready" in await page.js("document.getElementById('events').textContent")
            stats = await hang_up(page, server)
            assert page.errors == []
    received = [m for m in page.received if m["type"] != "audio"]
    assert received[0]["type"] == "init_success" and received[-1] == {"type": "session_ended", "reason": "hang-up"}
    assert [m["state"] for m in received if m["type"] == "state"][-1] == "listening"
    words = [m for m in received if m["type"] in ("transcript", "mark")]
    assert words[-2:] == [{"type": "mark", "name": "bot-1"}, {"type": "transcript", "text": "", "final": True}]
    kinds = [m["type"] for m in page.sent]
    assert kinds[0] == "init" and kinds[-1] == "end" and kinds.count("audio") > 50 and kinds.count("mark") >= 1
    assert before["audioSamplesPlayed"] > 3 * RATE  # greeting and answer
    assert before["audioSamplesReceived"] >= before["audioSamplesPlayed"]
    assert stats["pacer"]["marks_echoed"] >= 1 and stats["pacer"]["marks_missed"] == 0
    assert stats["personaplex"]["pages_sent"] > 50  # the page's microphone reached the engine
    assert stats["personaplex"]["persona"] == "sales"  # from the page's URL, allow-listed
    assert stats["output"]["sends_after_close"] == 0
    assert server.totals["dropped_messages"] == 0


async def test_talking_over_the_answer_clears_the_page_and_the_interruption_is_answered(chromium, tmp_path):
    # After the greeting the caller asks; the conversing engine answers with the question's words; 0.6 s into
    # the answer the caller says "Wait, stop, ...": the page is cleared, gets nothing of the interrupted answer,
    # and hears the interruption answered once it ends.
    question = read_wav(FIXTURES / "question_16k.wav", RATE)
    interrupt = read_wav(FIXTURES / "interrupt_16k.wav", RATE)
    gap = np.zeros(round(1.5 * RATE), np.int16)
    sound = np.concatenate([np.zeros(5 * RATE, np.int16), question, gap, interrupt, np.zeros(8 * RATE, np.int16)])
    mic_wav = tmp_path / "mic.wav"
    write_wav(mic_wav, sound, RATE)
    async with call_server(tmp_path, mode="converse", handshake_delay_secs=0.5) as server:
        async with browser(chromium, tmp_path, mic_wav) as page:
            await page.open(f"http://127.0.0.1:{server.port}/")
            await page.js("document.getElementById('call').click()")
            await page.wait_for("window.callStatus.clears >= 1", 14)
            cleared_at = len(page.received)
            await page.wait_for("window.callStatus.state === 'thinking'", 6)  # the interruption's turn ended
            before_answer = list(page.received[cleared_at:])
            await page.wait_for("window.callStatus.state === 'speaking'", 4)  # ... and is answered
            await asyncio.sleep(0.5)
            status = await page.status()
            stats = await hang_up(page, server)
            assert page.errors == []
    assert stats["barge_in"]["interruptions"] == 1 and stats["turn"]["turns"] == 2
    assert status["clears"] == 1 and stats["bot_speech"]["mutes"] == 1
    # between the clear and the end of the caller's turn: no bot words and only silent audio
    assert not [m for m in before_answer if m["type"] == "transcript" and m["text"]]
    peaks = [m["peak"] for m in before_answer if m["type"] == "audio"]
    assert peaks and max(peaks) < 300
