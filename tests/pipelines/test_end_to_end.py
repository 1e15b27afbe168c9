"""`python -m pipelines run exotel.yaml` answered by the embedded reference engine, dialled by the
simulated Exotel caller over loopback with a real speech recording."""

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets

from pipelines.bench.launch import free_port, launched, run_command
from pipelines.sim.caller import place_call
from tests.pipelines.served import idle_stats, stats
from tests.speech import speech

RATE = 8000


@pytest.fixture(scope="module")
def server():
    port = free_port()
    try:
        with launched(run_command("exotel.yaml", port), port) as srv:
            yield {"port": port, "url": srv.url(), "proc": srv.proc, "startup": srv.startup}
    except RuntimeError as exc:
        pytest.fail(str(exc))


def echo_score(heard: np.ndarray, said: np.ndarray) -> tuple[float, int]:
    """Best normalised cross-correlation of `said` anywhere in `heard`, and where."""
    h, s = heard.astype(np.float64), said.astype(np.float64)
    c = np.correlate(h, s, "valid")
    energy = np.sqrt(np.convolve(h**2, np.ones(len(s)), "valid"))
    scores = np.abs(c) / (energy * np.linalg.norm(s) + 1e-9)
    return float(scores.max()), int(scores.argmax())


def check_exotel_rules(messages):
    media = [m for _, m in messages if m.get("event") == "media"]
    for m in media:
        size = len(base64.b64decode(m["media"]["payload"]))
        assert size % 320 == 0 and 3200 <= size <= 100_000, size
    return media


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_caller_hears_its_own_speech_echoed(server, rate):
    assert "REFERENCE ENGINE" in server["startup"]
    before = await asyncio.to_thread(stats, server["port"])
    said = speech(rate)
    audio = np.concatenate([np.zeros(rate, np.int16), said])  # the engine's prompt phase eats the first 0.5 s
    result = await place_call(server["url"], audio, rate, seconds=len(audio) / rate + 3.0)
    assert result.violations == [] and result.sample_rate == rate
    media = check_exotel_rules(result.messages)
    assert len(media) >= 10
    score, at = echo_score(result.heard, said)
    assert score > 0.5, score
    assert 1.0 + 0.8 < at / rate < 1.0 + 2.5  # the echo comes back about a second after it was said
    after = await idle_stats(server["port"])
    assert after["calls_active"] == 0 and after["connections"] == 0
    assert after["tasks"] <= before["tasks"], (before, after)
    assert after["calls"] == [] and after["calls_total"] == before["calls_total"] + 1


async def test_two_concurrent_calls_each_hear_their_own_audio(server):
    said = speech(RATE)
    quiet = np.zeros(RATE // 2, np.int16)
    first = np.concatenate([quiet, quiet, said, quiet, quiet])  # after the engine's 0.5 s prompt phase
    second = np.concatenate([quiet, quiet, quiet, quiet, said])  # said a second later than the first caller
    results = await asyncio.gather(*(place_call(server["url"], a, RATE, seconds=len(a) / RATE + 2.5) for a in (first, second)))
    offsets = []
    for result in results:
        assert result.violations == []
        score, at = echo_score(result.heard, said)
        assert score > 0.5
        offsets.append(at)
    assert 0.6 < (offsets[1] - offsets[0]) / RATE < 1.4
    after = await idle_stats(server["port"])
    assert after["calls_active"] == 0


async def test_malformed_messages_are_dropped_and_the_call_goes_on(server):
    port = server["port"]
    before = (await asyncio.to_thread(stats, port))["dropped_messages"]
    garbage = ["{not json", "[1, 2]", '"text"', json.dumps({"event": "media", "media": {"payload": "@@@"}}),
               json.dumps({"event": "media", "media": {"payload": base64.b64encode(b"\x01\x02\x03").decode()}}),
               json.dumps({"event": "teleport"}), b"\x00\x01binary", "x" * 1_100_000]
    silence = base64.b64encode(bytes(1600)).decode()
    async with websockets.connect(server["url"] + "?sample-rate=8000", max_size=None) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        await ws.send(json.dumps({"event": "start", "stream_sid": "S1", "start": {
            "stream_sid": "S1", "call_sid": "C-malformed", "account_sid": "A", "custom_parameters": {},
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"}}}))
        received = 0
        for i in range(30):  # 3 s of media with garbage sprinkled in
            await ws.send(json.dumps({"event": "media", "stream_sid": "S1", "media": {"chunk": str(i), "timestamp": str(i * 100), "payload": silence}}))
            if i < len(garbage):
                await ws.send(garbage[i])
            await asyncio.sleep(0.1)
            while True:
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 0.001))
                except TimeoutError:
                    break
                received += message.get("event") == "media"
        await ws.send(json.dumps({"event": "stop", "stream_sid": "S1", "stop": {"call_sid": "C-malformed", "reason": "callended"}}))
        async for _ in ws:  # the server flushes and hangs up
            pass
    assert received > 0  # the engine kept answering through the garbage
    after = await idle_stats(port)
    assert after["dropped_messages"] - before == len(garbage)
    assert after["calls_active"] == 0


async def test_ids_with_newlines_cannot_forge_log_lines(tmp_path):
    """A caller's ids reach the log escaped: a newline and a line shaped like ours stay inside one line."""
    forged = "x\n2000-01-01 00:00:00.000 | INFO    | call=- | pipelines.server:1 - FORGED-LOG-LINE \u202eevil"
    port = free_port()
    env = {**__import__("os").environ, "CALL_RECORDS": str(tmp_path / "records")}
    with launched(run_command("configs/exotel.yaml", port), port, env=env) as server:
        result = await place_call(server.url(), np.zeros(8000, np.int16), 8000, seconds=1.0,
                                  stream_sid="MZ" + forged, call_sid="CA" + forged)
        await asyncio.sleep(0.5)
    out = server.proc.stdout.read()
    assert result.violations == []
    assert "FORGED-LOG-LINE" in out  # the ids were logged ...
    assert not [line for line in out.splitlines() if line.startswith("2000-01-01")]  # ... never as lines of their own
    assert "\u202e" not in out and "\\u202e" in out
