"""Peers that do not behave, against an in-process server over loopback: none may hold a socket, a call
or an engine past its deadline. Deadlines are set short here; every loop is bounded."""

import asyncio
import json
import socket
import textwrap
import time

import pytest
import websockets
from loguru import logger

from pipelines import builder, config
from pipelines.server import CallServer
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.personaplex.pools import EnginePools

DEPLOYMENT = """
server: {header_timeout_secs: 1.0, send_timeout_secs: 1.0, media_timeout_secs: 1.0}
transport: {type: exotel, params: {path: /exotel}}
records: {dir: RECORDS}
processors:
  - type: resample
    params: {audio: input, rate: 24000}
  - type: personaplex
  - type: resample
    params: {audio: output, rate: call}
"""


@pytest.fixture
async def served(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT).replace("RECORDS", str(tmp_path / "records")))
    engine = ReferenceEngine(EngineOptions(handshake_delay_secs=0.1))
    url = await engine.start()
    server = CallServer(builder.plan(config.load(path, {})), EnginePools.of(url), "127.0.0.1", 0)
    await server.start()
    yield server, engine
    await server.stop()
    await engine.stop()


async def gone(server, secs: float) -> bool:
    """True once the server holds no call or connection, waiting at most `secs`."""
    deadline = time.monotonic() + secs
    while (server.calls or server.connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not server.calls and not server.connections


def start(sid: str) -> str:
    return json.dumps({"event": "start", "stream_sid": sid, "start": {"stream_sid": sid, "call_sid": sid}})


def media(sid: str, rate: int = 8000) -> str:
    return json.dumps({"event": "media", "stream_sid": sid, "media": {"payload": "AAAA" * (rate // 20)}})


async def talk_for_a_second(ws, sid: str) -> None:
    """`connected`, `start`, then 1 s of media at Exotel's 100 ms cadence."""
    await ws.send(json.dumps({"event": "connected"}))
    await ws.send(start(sid))
    for _ in range(10):
        await ws.send(media(sid))
        await asyncio.sleep(0.1)


async def closed_by_server(reader: asyncio.StreamReader, secs: float) -> bool:
    """EOF, or a reset (our later writes hit a socket the server had closed), within `secs`."""
    try:
        while await asyncio.wait_for(reader.read(4096), secs):
            pass
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True


async def test_slow_and_silent_http_connections_are_closed_at_the_header_deadline(served):
    server, _ = served
    opened = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
    slow = opened[:3]
    for _, writer in slow:
        writer.write(b"GET /exotel HTTP/1.1\r\nHost: x\r\n")
    for _ in range(4):  # one more header line every 0.5 s: never a whole request
        await asyncio.sleep(0.5)
        for _, writer in slow:
            if not writer.is_closing():
                writer.write(b"X-Slow: 1\r\n")
    results = await asyncio.gather(*(closed_by_server(reader, 3.0) for reader, _ in opened))
    assert results == [True] * 5
    for _, writer in opened:
        writer.close()


async def test_a_start_without_media_leases_no_engine_and_ends_as_caller_silent(served, tmp_path):
    server, engine = served
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel") as ws:
        await ws.send(json.dumps({"event": "connected"}))
        await ws.send(start("squat"))
        await asyncio.wait_for(ws.wait_closed(), 4.0)
    assert await gone(server, 2.0)
    assert engine.stats.connections == 0  # the pool was never touched
    assert [c["outcome"] for c in server.recent] == ["caller_silent"]


async def test_media_that_stops_mid_call_ends_the_call_and_frees_the_engine(served, tmp_path):
    server, engine = served
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel") as ws:
        await talk_for_a_second(ws, "quiet")
        await asyncio.wait_for(ws.wait_closed(), 4.0)
    assert await gone(server, 2.0)
    await asyncio.sleep(0.2)
    assert engine.stats.sessions_started == 1 and engine.stats.sessions_active == 0
    assert [c["outcome"] for c in server.recent] == ["caller_silent"]
    [record] = (tmp_path / "records").iterdir()
    events = [json.loads(line)["event"] for line in (record / "events.jsonl").read_text().splitlines()]
    assert "caller_silent" in events and events[-1] == "call_ended"


async def test_a_caller_that_never_reads_is_cut_and_frees_the_engine(served):
    server, engine = served
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    cut = False
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel?sample-rate=16000", sock=sock, max_queue=1) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        await ws.send(start("deaf"))
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:  # streams like a caller, never reads a byte
            try:
                await ws.send(media("deaf", 16000))
            except websockets.ConnectionClosed:
                cut = True
                break
            if server.totals["calls_total"] and not server.calls:
                cut = True
                break
            await asyncio.sleep(0.1)
    assert cut
    assert await gone(server, 3.0)
    await asyncio.sleep(0.2)
    assert engine.stats.sessions_active == 0
    assert [c["outcome"] for c in server.recent] == ["caller_stalled"]


async def test_stats_are_for_operators_only(served, tmp_path):
    """Without ops_port, the call port shows /stats to loopback peers that came through no proxy; with
    one, only the ops listener has it. /metrics holds no identities and stays on the call port."""
    server, _ = served

    async def get(port: int, path: str, headers: dict | None = None) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
        status = int((await reader.readline()).split()[1])
        writer.close()
        return status

    assert await get(server.port, "/stats") == 200
    assert await get(server.port, "/stats", {"X-Forwarded-For": "203.0.113.9"}) == 403
    assert await get(server.port, "/metrics") == 200

    path = tmp_path / "ops.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT).replace("RECORDS", str(tmp_path / "r2")).replace(
        "media_timeout_secs: 1.0}", "media_timeout_secs: 1.0, ops_port: 0}"))
    ops = CallServer(builder.plan(config.load(path, {})), EnginePools.of("ws://127.0.0.1:9"), "127.0.0.1", 0)
    await ops.start()
    try:
        assert ops.ops_port and ops.ops_port != ops.port
        assert await get(ops.port, "/stats") == 404
        assert await get(ops.ops_port, "/stats") == 200
        assert await get(ops.ops_port, "/metrics") == 200 and await get(ops.port, "/readyz") in (200, 503)
    finally:
        await ops.stop()


async def test_an_unwritable_records_directory_costs_the_record_not_the_call(tmp_path):
    """Records under a path that cannot be a directory (root ignores permission bits, so a file stands
    in the way): the call is served and completes, and one clear log line says why it has no record."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the records directory should be")
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT).replace("RECORDS", str(blocker / "records")))
    engine = ReferenceEngine(EngineOptions(handshake_delay_secs=0.1))
    server = CallServer(builder.plan(config.load(path, {})), EnginePools.of(await engine.start()), "127.0.0.1", 0)
    await server.start()
    lines = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    try:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel") as ws:
            await talk_for_a_second(ws, "unwritable")
            await ws.send(json.dumps({"event": "stop", "stream_sid": "unwritable", "stop": {"call_sid": "unwritable"}}))
            async for _ in ws:  # the server flushes and hangs up
                pass
        assert await gone(server, 3.0)
    finally:
        logger.remove(sink)
        await server.stop()
        await engine.stop()
    assert [c["outcome"] for c in server.recent] == ["completed"]
    assert [line for line in lines if "cannot write its record" in line and "unwritable" in line]


@pytest.fixture
async def patient(tmp_path):
    """The hostile deployment, but a send deadline far beyond the test: whatever ends a stalled call
    here, it is not `send_timeout_secs`."""
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT).replace("RECORDS", str(tmp_path / "records"))
                    .replace("send_timeout_secs: 1.0", "send_timeout_secs: 60.0"))
    engine = ReferenceEngine(EngineOptions(handshake_delay_secs=0.1))
    server = CallServer(builder.plan(config.load(path, {})), EnginePools.of(await engine.start()), "127.0.0.1", 0)
    await server.start()
    yield server, engine
    await server.stop()
    await engine.stop()


async def stalled_call(server, sid: str) -> tuple[socket.socket, object]:
    """A call whose caller streams but never reads, until the server's writes to it are blocked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/exotel?sample-rate=16000", sock=sock, max_queue=1)
    await ws.send(json.dumps({"event": "connected"}))
    await ws.send(start(sid))
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and not any(c.blocked_secs() > 0.5 for c in server.calls):
        await ws.send(media(sid, 16000))
        await asyncio.sleep(0.1)
    assert any(c.blocked_secs() > 0.5 for c in server.calls), "the server's sends never blocked"
    return sock, ws


@pytest.mark.parametrize("how", ["stop", "reset"])
async def test_stop_or_a_reset_ends_a_stalled_call_at_once(patient, how):
    """The server is blocked writing to a caller that does not read; the caller's `stop`, or a TCP
    reset, still ends the call and frees the engine long before any send deadline."""
    server, engine = patient
    sock, ws = await asyncio.wait_for(stalled_call(server, how), 30)
    try:
        if how == "stop":
            await ws.send(json.dumps({"event": "stop", "stream_sid": how, "stop": {"call_sid": how, "reason": "callended"}}))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # on, 0 s: RST
            sock.close()
        assert await gone(server, 5.0)
        await asyncio.sleep(0.2)
        assert engine.stats.sessions_active == 0
        [ended] = server.recent
        assert ended["outcome"] == ("completed" if how == "stop" else "caller_gone")  # unread audio after `stop` is no fault
    finally:
        ws.transport.abort()
