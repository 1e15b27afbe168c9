"""The call server in-process: engine failures end the call cleanly and release everything."""

import asyncio
import json
import textwrap

import numpy as np
import pytest
import websockets

from pipelines import builder, config
from pipelines.server import CallServer
from pipelines.sim.caller import place_call
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.personaplex.pools import EnginePools
from tests.pipelines.served import until

RATE = 8000

DEPLOYMENT = """\
transport: {type: exotel, params: {path: /exotel}}
processors:
  - type: resample
    params: {audio: input, rate: 24000}
  - type: personaplex
    params: {handshake_timeout_secs: 2, silence_timeout_secs: 1}
  - type: resample
    params: {audio: output, rate: call}
"""


@pytest.fixture
def deployment(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT))
    return builder.plan(config.load(path, {}))


async def serve(deployment, engine_url):
    server = CallServer(deployment, EnginePools.of(engine_url), "127.0.0.1", 0)
    await server.start()
    return server


def call_tasks():
    """Live tasks, less the engine pool's probes (a failed engine is retried in the background)."""
    return [t for t in asyncio.all_tasks() if not t.get_name().startswith("engine-probe")]


@pytest.mark.parametrize("failure", [{"fail_after_frames": 15}, {"handshake_delay_secs": 60}, {"voices": ["OTHER.pt"]}, "unreachable"])
async def test_engine_failure_hangs_up_cleanly_and_releases_the_call(deployment, failure):
    engine = None
    if failure == "unreachable":
        url = "ws://127.0.0.1:9"
    else:
        engine = ReferenceEngine(EngineOptions(**{"handshake_delay_secs": 0.2, **failure}))
        url = await engine.start()
    server = await serve(deployment, url)
    baseline = len(call_tasks())
    try:
        call_seconds = 10.0
        result = await asyncio.wait_for(
            place_call(f"ws://127.0.0.1:{server.port}/exotel", np.zeros(RATE, np.int16), RATE, seconds=call_seconds, linger=0.5),
            timeout=call_seconds + 5,
        )
        assert result.close_code == 1000  # the bot hung up; the caller did not have to
        assert result.sent_seconds < call_seconds - 2  # well before the caller would have hung up
        assert result.violations == []
        await until(lambda: not (server.calls or server.connections), timeout=5)
        assert server.calls == {} and server.connections == 0
        assert len(call_tasks()) <= baseline
        if engine:
            await until(lambda: engine.stats.sessions_active == 0, timeout=5)
    finally:
        await server.stop()
        if engine:
            await engine.stop()


async def test_closed_socket_without_stop_cancels_the_call(deployment):
    engine = ReferenceEngine(EngineOptions(handshake_delay_secs=0.1))
    url = await engine.start()
    server = await serve(deployment, url)
    baseline = len(call_tasks())
    try:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel?sample-rate=16000") as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(json.dumps({"event": "start", "stream_sid": "S", "start": {"stream_sid": "S", "call_sid": "C-vanish"}}))
            for _ in range(10):
                await ws.send(json.dumps({"event": "media", "stream_sid": "S", "media": {"payload": "AAAA" * 800}}))
                await asyncio.sleep(0.05)
            assert len(server.calls) == 1
        await until(lambda: not (server.calls or server.connections), timeout=5)
        assert server.calls == {} and server.connections == 0
        assert len(call_tasks()) <= baseline
        await until(lambda: engine.stats.sessions_active == 0, timeout=5)
    finally:
        await server.stop()
        await engine.stop()


async def test_a_reader_that_fails_ends_its_call_closes_the_socket_and_frees_the_engine(deployment, monkeypatch):
    """Whatever breaks while a provider message is handled (here the record refusing caller audio), the
    call must not live on as a zombie holding its engine: it ends, with outcome `error`."""
    def full_disk(self, pcm):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipelines.call_log.CallLog.caller_audio", full_disk)
    engine = ReferenceEngine(EngineOptions(handshake_delay_secs=0.1))
    url = await engine.start()
    server = await serve(deployment, url)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel?sample-rate=16000") as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(json.dumps({"event": "start", "stream_sid": "S", "start": {"stream_sid": "S", "call_sid": "C-reader"}}))
            await asyncio.sleep(0.5)  # the engine is leased
            await ws.send(json.dumps({"event": "media", "stream_sid": "S", "media": {"payload": "AAAA" * 800}}))
            await asyncio.wait_for(ws.wait_closed(), 5)  # the server closed it; the caller never said stop
        await until(lambda: not (server.calls or server.connections), timeout=5)
        assert server.calls == {} and server.connections == 0
        assert [c["outcome"] for c in server.recent] == ["error"]
        await until(lambda: engine.stats.sessions_active == 0, timeout=5)
    finally:
        await server.stop()
        await engine.stop()


async def test_connection_that_never_starts_is_dropped(deployment, monkeypatch):
    monkeypatch.setattr("pipelines.server.START_TIMEOUT", 0.3)
    server = await serve(deployment, "ws://127.0.0.1:9")
    try:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/exotel") as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.wait_closed()
            assert ws.close_code == 1008
        await until(lambda: not (server.calls or server.connections), timeout=5)
        assert server.totals["connections_without_start"] == 1
    finally:
        await server.stop()


async def test_stats_and_unknown_paths_over_http(deployment):
    server = await serve(deployment, "ws://127.0.0.1:9")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/elsewhere"):
                pass
        assert info.value.response.status_code == 404
    finally:
        await server.stop()


async def test_a_call_whose_pipeline_cannot_be_built_is_closed_and_forgotten(deployment):
    server = await serve(deployment, None)  # personaplex without any engine URL refuses to build
    try:
        result = await asyncio.wait_for(
            place_call(f"ws://127.0.0.1:{server.port}/exotel", np.zeros(RATE, np.int16), RATE, seconds=5, linger=0.5), 10)
        assert result.close_code == 1000 and result.sent_seconds < 3
        await until(lambda: not (server.calls or server.connections), timeout=5)
        assert server.calls == {} and server.connections == 0 and server.totals["calls_total"] == 1
    finally:
        await server.stop()
