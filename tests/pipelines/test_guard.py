"""The guard (pipelines/guard.py) over loopback, with the reference engine as the real upstream."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import aiohttp
import numpy as np
import pytest
from aiohttp import WSMsgType, web

from pipelines.guard import IDLE_CLOSE_CODE, TOKEN_HEADER, Guard
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.audio import PIPECAT_SPEECH_WAV, read_wav
from processors.personaplex import wire
from processors.personaplex.uplink import OpusUplinkWriter

PAGES = 25  # 2 s of caller audio
PROMPT = "You are a patient agent; answer & be brief: 100% sure?"


class RecordingEngine(ReferenceEngine):
    """The reference engine, keeping the raw path and headers of every connection."""

    def __init__(self, options: EngineOptions | None = None):
        super().__init__(options)
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def _chat(self, request):
        self.requests.append((request.raw_path, dict(request.headers)))
        return await super()._chat(request)


def caller_pages() -> list[bytes]:
    """Header pages, then PAGES pages of 80 ms of speech, as the bridge sends them (fixed serial)."""
    pcm = np.tile(read_wav(PIPECAT_SPEECH_WAV, 24000).astype(np.float32) / 32768.0, 3)
    writer = OpusUplinkWriter(24000, serial=1234)
    out, pages = [], writer.header_pages()
    out.append(pages)
    for i in range(PAGES):
        out.append(writer.append_pcm(pcm[i * 1920:(i + 1) * 1920]))
    return out


async def until(condition, secs: float = 5.0) -> bool:
    deadline = time.monotonic() + secs
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return bool(condition())


@asynccontextmanager
async def engine_and_guard(**guard_options):
    engine = RecordingEngine(EngineOptions(mode="echo", handshake_delay_secs=0.1, echo_delay_secs=0.16))
    await engine.start()
    guard = Guard(engine.url, **guard_options)
    await guard.start()
    try:
        yield engine, guard
    finally:
        await guard.stop()
        await engine.stop()


def guard_url(guard: Guard) -> str:
    return f"ws://127.0.0.1:{guard.port}"


async def connect(http: aiohttp.ClientSession, base: str, token: int | str | None = None, prompt: str = PROMPT):
    headers = {TOKEN_HEADER: str(token)} if token is not None else {}
    return await http.ws_connect(wire.chat_url(base, "NATF0.pt", prompt), headers=headers, autoclose=True, max_msg_size=0)


async def handshake(ws) -> None:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == WSMsgType.BINARY and msg.data == b"\x00"


async def converse(ws) -> list[bytes]:
    """Handshake, the caller's pages, then every message until the engine's last step; closes with 1000."""
    await handshake(ws)
    for page in caller_pages():
        await ws.send_bytes(wire.audio_message(page))
    got, audio = [], 0
    while audio < 2 + PAGES:  # the two header pages, then one page per step
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == WSMsgType.BINARY, msg
        got.append(msg.data)
        audio += msg.data[0] == wire.AUDIO
    await ws.close()
    return got


async def test_a_session_through_the_guard_is_the_session_without_it():
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        direct = await converse(await connect(http, engine.url))
        assert await until(lambda: engine.stats.sessions_active == 0)
        guarded = await converse(await connect(http, guard_url(guard), token=7))
        assert await until(lambda: engine.stats.sessions_active == 0 and guard.stats.active == 0)
        assert guarded == direct  # every message, byte for byte and in order
        assert engine.stats.handshakes == 2 and engine.stats.uplink_violations == 0
        (direct_path, _), (guarded_path, headers) = engine.requests
        assert guarded_path == direct_path  # the path and the query, prompts included, unchanged
        assert TOKEN_HEADER.lower() not in {k.lower() for k in headers}
        stats = guard.stats.as_dict()
        assert stats["admitted"] == 1 and stats["highest_token"] == 7 and stats["active"] == 0
        assert stats["bytes_up"] == sum(len(p) + 1 for p in caller_pages())
        assert stats["bytes_down"] >= sum(len(m) for m in guarded)


async def test_a_second_session_is_refused_before_the_upgrade():
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        first = await connect(http, guard_url(guard))
        await handshake(first)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(http, guard_url(guard))
        assert refused.value.status == 503
        assert engine.stats.connections == 1  # the engine never saw the second
        assert guard.stats.refused_busy == 1 and guard.stats.active == 1
        await first.close()
        assert await until(lambda: guard.stats.active == 0)
        second = await connect(http, guard_url(guard))  # the slot is free again
        await handshake(second)
        await second.close()


async def test_fencing_tokens():
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        ws = await connect(http, guard_url(guard), token=5)
        await handshake(ws)
        await ws.close()
        assert await until(lambda: guard.stats.active == 0)
        for stale, status in ((4, 409), ("x5", 400), ("-1", 400)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await connect(http, guard_url(guard), token=stale)
            assert refused.value.status == status
        assert guard.stats.refused_token == 3
        for token in (5, 6, None):  # equal, higher, and none at all (a bridge without shared leases)
            ws = await connect(http, guard_url(guard), token=token)
            await handshake(ws)
            await ws.close()
            assert await until(lambda: guard.stats.active == 0)
        assert guard.stats.admitted == 4 and guard.stats.highest_token == 6
        assert engine.stats.connections == 4
        assert not any(TOKEN_HEADER.lower() in {k.lower() for k in headers} for _, headers in engine.requests)


async def test_require_token():
    async with engine_and_guard(require_token=True) as (engine, guard), aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(http, guard_url(guard))
        assert refused.value.status == 428 and guard.stats.refused_token == 1
        ws = await connect(http, guard_url(guard), token=1)
        await handshake(ws)
        await ws.close()


async def test_an_idle_client_is_closed_both_ways_and_frees_the_slot():
    async with engine_and_guard(idle_secs=0.5) as (engine, guard), aiohttp.ClientSession() as http:
        ws = await connect(http, guard_url(guard))
        await handshake(ws)
        while (msg := await asyncio.wait_for(ws.receive(), 5)).type == WSMsgType.BINARY:
            pass  # the header pages; then nothing, as the client says nothing
        assert msg.type == WSMsgType.CLOSE and msg.data == IDLE_CLOSE_CODE and msg.extra.startswith("idle")
        assert await until(lambda: engine.stats.sessions_active == 0 and guard.stats.active == 0)
        assert guard.stats.idle_closed == 1
        again = await connect(http, guard_url(guard))
        await handshake(again)
        await again.close()


async def test_a_client_leaving_mid_session_ends_the_engines_session():
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        ws = await connect(http, guard_url(guard))
        await handshake(ws)
        await ws.send_bytes(wire.audio_message(caller_pages()[0]))
        assert await until(lambda: engine.stats.sessions_active == 1)
        await ws.close()
        assert await until(lambda: engine.stats.sessions_active == 0 and guard.stats.active == 0)
        # one that vanishes without a close frame too
        ws = await connect(http, guard_url(guard))
        await handshake(ws)
        assert await until(lambda: engine.stats.sessions_active == 1)
        ws._response.connection.transport.abort()
        assert await until(lambda: engine.stats.sessions_active == 0 and guard.stats.active == 0)
        assert guard.stats.admitted == 2 and guard.stats.idle_closed == 0


async def test_bad_prompts_reach_the_client_as_the_engine_says_them():
    """PersonaPlex upgrades, then drops the connection on a bad voice: the client sees the same 1006."""
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(wire.chat_url(guard_url(guard), "NOBODY.pt", PROMPT))
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR, WSMsgType.CLOSE)
        assert ws.close_code in (None, 1006)
        assert engine.stats.rejected == 1
        assert await until(lambda: guard.stats.active == 0)


@asynccontextmanager
async def upstream_app(handler):
    app = web.Application()
    app.router.add_get("/api/chat", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_frames_and_close_codes_are_relayed_both_ways():
    seen: list = []
    paths: list[str] = []

    async def echo(request):
        paths.append(request.raw_path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        while (msg := await ws.receive()).type in (WSMsgType.TEXT, WSMsgType.BINARY):
            if msg.data == "close please":
                await ws.close(code=4100, message=b"done by upstream")
                break
            await (ws.send_str(msg.data) if msg.type == WSMsgType.TEXT else ws.send_bytes(msg.data))
        seen.append((ws.close_code, msg.extra if msg.type == WSMsgType.CLOSE else None))
        return ws

    async with upstream_app(echo) as url, aiohttp.ClientSession() as http:
        guard = Guard(url)
        await guard.start()
        try:
            query = "?a=1&b=%20x&c=%7e+&d=%E2%9C%93&e"
            ws = await http.ws_connect(aiohttp.client.URL(f"{guard_url(guard)}/api/chat{query}", encoded=True))
            frames = [b"\x01one", "two ✓", b"", b"\x00" * 70000, "", "three"]
            for frame in frames:
                await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            for frame in frames:
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type == (WSMsgType.BINARY if isinstance(frame, bytes) else WSMsgType.TEXT)
                assert msg.data == frame
            await ws.close(code=4321, message=b"bye from client")
            assert await until(lambda: seen)
            assert seen[0] == (4321, "bye from client")
            assert paths[0] == f"/api/chat{query}"  # byte for byte

            ws = await http.ws_connect(f"{guard_url(guard)}/api/chat")
            await ws.send_str("close please")
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4100, "done by upstream")
            assert await until(lambda: guard.stats.active == 0)
        finally:
            await guard.stop()


async def test_an_upstream_refusal_reaches_the_client():
    async def refuse(request):
        return web.Response(status=403, text="no")

    async with upstream_app(refuse) as url, aiohttp.ClientSession() as http:
        async with Guard(url) as guard:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{guard_url(guard)}/api/chat")
            assert refused.value.status == 403
            assert guard.stats.refused_upstream == 1 and guard.stats.active == 0
            async with http.get(f"http://127.0.0.1:{guard.port}/healthz") as r:
                assert r.status == 200
    async with Guard(url) as guard, aiohttp.ClientSession() as http:  # the upstream is gone now
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{guard_url(guard)}/api/chat")
        assert refused.value.status == 502
        async with http.get(f"http://127.0.0.1:{guard.port}/healthz") as r:
            assert r.status == 503


async def test_stats_endpoint_and_no_task_left_after_stop():
    before = asyncio.all_tasks()
    async with engine_and_guard() as (engine, guard), aiohttp.ClientSession() as http:
        ws = await connect(http, guard_url(guard), token=3)
        await handshake(ws)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await connect(http, guard_url(guard), token=2)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await connect(http, guard_url(guard), token=4)
        async with http.get(f"http://127.0.0.1:{guard.port}/stats") as r:
            stats = await r.json()
        assert {k: stats[k] for k in ("admitted", "refused_busy", "refused_token", "idle_closed", "active", "highest_token")} == \
            {"admitted": 1, "refused_busy": 1, "refused_token": 1, "idle_closed": 0, "active": 1, "highest_token": 3}
        assert stats["bytes_up"] == 0 and stats["bytes_down"] > 0
        stopping = asyncio.create_task(guard.stop())  # with the session still open: both sides are closed
        while (msg := await asyncio.wait_for(ws.receive(), 5)).type == WSMsgType.BINARY:
            pass  # the header pages
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        await stopping
        assert await until(lambda: engine.stats.sessions_active == 0)
    await asyncio.sleep(0)
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}
    assert not left, left


async def test_a_client_that_stopped_reading_cannot_hold_the_guard():
    """A frozen bridge: upgraded, then reads and sends nothing while the upstream keeps talking."""
    async def flood(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            while not ws.closed:
                await ws.send_bytes(b"\x01" * 65536)
        except ConnectionError:
            pass
        return ws

    async with upstream_app(flood) as url:
        before = asyncio.all_tasks()
        guard = Guard(url, idle_secs=0.5)
        await guard.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", guard.port)
        writer.write(b"GET /api/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 101")
        try:  # and now it reads nothing more
            assert await until(lambda: guard.stats.idle_closed == 1 and guard.stats.active == 0)
            assert await until(lambda: not guard._sessions, 10)  # the close could not be sent: the connection is dropped
        finally:
            writer.close()
            await guard.stop()
        await asyncio.sleep(0)
        left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}
        assert not left, left


# --- the state file: the highest token survives a restart -------------------------------------------


class StateReadingEngine(RecordingEngine):
    """Records what the guard's state file holds when each connection reaches the engine."""

    def __init__(self, state_file, options: EngineOptions | None = None):
        super().__init__(options)
        self.state_file = state_file
        self.states: list[dict | None] = []

    async def _chat(self, request):
        self.states.append(json.loads(self.state_file.read_text()) if self.state_file.exists() else None)
        return await super()._chat(request)


async def admit(http: aiohttp.ClientSession, guard: Guard, token: int) -> None:
    ws = await connect(http, guard_url(guard), token=token)
    await handshake(ws)
    await ws.close()
    assert await until(lambda: guard.stats.active == 0)


async def refused(http: aiohttp.ClientSession, guard: Guard, token: int) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
        await connect(http, guard_url(guard), token=token)
    return refusal.value.status


async def test_a_restarted_guard_remembers_the_highest_token(tmp_path):
    state = tmp_path / "guard-state.json"
    engine = StateReadingEngine(state, EngineOptions(mode="echo", handshake_delay_secs=0.1))
    await engine.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with Guard(engine.url, state_file=state) as guard:  # no file yet: nothing admitted
                assert guard.stats.highest_token is None
                await admit(http, guard, 100)
                await admit(http, guard, 100)  # not higher: not written again
                async with http.get(f"http://127.0.0.1:{guard.port}/stats") as r:
                    stats = await r.json()
                assert stats["highest_token"] == 100 and stats["state_file"] == str(state)
            assert engine.states == [{"highest_token": 100}] * 2  # on disk before the engine saw the session
            assert [p.name for p in tmp_path.iterdir()] == [state.name]  # no temporary file left behind

            async with Guard(engine.url, state_file=state) as guard:  # a new guard on the same file
                assert guard.stats.highest_token == 100
                assert await refused(http, guard, 99) == 409
                assert engine.stats.connections == 2  # the stale holder never reached the engine
                await admit(http, guard, 100)
                await admit(http, guard, 101)
                assert guard.stats.refused_token == 1 and guard.stats.admitted == 2
            assert json.loads(state.read_text()) == {"highest_token": 101}
            assert engine.states[-1] == {"highest_token": 101}
            async with Guard(engine.url) as guard:  # without the file: memory only, as before
                await admit(http, guard, 99)
                assert guard.stats.state_file is None
            assert json.loads(state.read_text()) == {"highest_token": 101}
    finally:
        await engine.stop()


async def test_a_state_file_that_cannot_be_written_refuses_the_session(tmp_path, monkeypatch):
    from pipelines import guard as guard_module

    def fail(path, token):
        raise OSError(28, "No space left on device")

    state = tmp_path / "state.json"
    async with engine_and_guard(state_file=state) as (engine, guard), aiohttp.ClientSession() as http:
        monkeypatch.setattr(guard_module, "save_state", fail)
        assert await refused(http, guard, 7) == 500
        assert guard.stats.refused_state == 1 and guard.stats.active == 0 and engine.stats.connections == 0
        assert guard.stats.highest_token == 7 and await refused(http, guard, 6) == 409  # still fenced in memory
        monkeypatch.undo()
        await admit(http, guard, 7)  # written now
        assert json.loads(state.read_text()) == {"highest_token": 7}


def run_guard_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", "guard", "--listen", "127.0.0.1:0", "--upstream",
                           "ws://127.0.0.1:9", *args], capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("content", [b"", b"100", b'{"highest_token": -1}', b'{"highest_token": "100"}',
                                     b'{"highest": 100}', b'{"highest_token": 10', b"\xff\xfe"])
def test_a_corrupt_state_file_stops_the_cli_with_status_2(tmp_path, content):
    state = tmp_path / "state.json"
    state.write_bytes(content)
    result = run_guard_cli("--state-file", str(state))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(state) in line and "corrupt" in line
    assert state.read_bytes() == content  # left for a person to look at


def test_a_state_file_in_a_missing_directory_stops_the_cli(tmp_path):
    missing = tmp_path / "nowhere" / "state.json"
    result = run_guard_cli("--state-file", str(missing))
    assert result.returncode == 2 and str(missing) in result.stderr and "does not exist" in result.stderr


def test_the_cli_starts_from_its_state_file(tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"highest_token": 42}\n')
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "guard", "--listen", "127.0.0.1:0", "--upstream",
                             "ws://127.0.0.1:9", "--state-file", str(state)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"state file {state}, highest token 42" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stdout.close()


@pytest.mark.parametrize("teardown_secs, overlaps", [(0.3, False), (0.0, True)])
async def test_the_next_session_waits_for_the_engines_handler_to_return(teardown_secs, overlaps):
    """aiohttp (PersonaPlex's server) closes the TCP connection at the closing handshake while the handler
    runs on (a model step to finish, the lock to free); the guard holds the slot through that teardown, so
    the next session is not upgraded beside the old one. Without it (0 s) the two overlap."""
    running, peak = [0], [0]

    async def slow_teardown(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            async for _ in ws:
                pass
            await asyncio.sleep(0.15)  # the handler's teardown, after the handshake
        finally:
            running[0] -= 1
        return ws

    async with upstream_app(slow_teardown) as url, aiohttp.ClientSession() as http:
        guard = Guard(url, teardown_secs=teardown_secs)
        await guard.start()
        try:
            for _ in range(2):  # the bridge closes, gives its lease back, and the next call connects at once
                ws = await http.ws_connect(f"{guard_url(guard)}/api/chat")
                await ws.send_bytes(b"\x01audio")
                await ws.close()
            assert await until(lambda: running[0] == 0)
            assert (peak[0] > 1) is overlaps and guard.stats.refused_busy == 0
        finally:
            await guard.stop()
