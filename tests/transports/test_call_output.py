"""CallOutput alone with run_test, sending to a real WebSocket client over loopback."""

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from aiohttp import web
from pipecat.frames.frames import InterruptionFrame, OutputAudioRawFrame, SpeechOutputAudioRawFrame, TTSStoppedFrame
from pipecat.tests.utils import SleepFrame, run_test

from tests.speech import speech
from transports.call_output import CallOutput
from transports.exotel import ExotelParams, ExotelProtocol
from transports.frames import MarkFrame, PacedAudioFrame
from transports.socket import CallSocket

RATE = 8000


@pytest.fixture
async def link():
    """A server-side CallSocket (aiohttp, as in the call server) and the provider's client end."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        socket = CallSocket(ws)
        accepted.set_result(socket)
        async for _ in socket.messages():
            pass
        await done.wait()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}") as client:
            yield await accepted, client
    finally:
        done.set()
        await runner.cleanup()


def started_protocol() -> ExotelProtocol:
    protocol = ExotelProtocol(ExotelParams())
    protocol.receive(json.dumps({"event": "start", "stream_sid": "S", "start": {"stream_sid": "S", "call_sid": "C", "media_format": {"sample_rate": "8000"}}}))
    return protocol


async def received(client) -> list[dict]:
    out = []
    try:
        async for message in client:
            out.append(json.loads(message))
    except websockets.ConnectionClosed:
        pass
    return out


async def test_audio_marks_clear_and_hang_up(link):
    server_ws, client = link
    pcm = speech(RATE)
    frames = [SpeechOutputAudioRawFrame(audio=pcm[i : i + 640].tobytes(), sample_rate=RATE, num_channels=1) for i in range(0, len(pcm) - 640, 640)]
    half = len(frames) // 2
    # InterruptionFrame is a system frame and overtakes queued audio, so let the first half drain first
    sequence = frames[:half] + [MarkFrame(mark="reply-1"), SleepFrame(sleep=0.2), InterruptionFrame()] + frames[half:] + [TTSStoppedFrame()]
    output = CallOutput(started_protocol(), server_ws, "C")
    down, _ = await run_test(output, frames_to_send=sequence)
    messages = await received(client)
    events = [m["event"] for m in messages]
    assert "mark" in events and "clear" in events
    mark_at, clear_at = events.index("mark"), events.index("clear")
    assert mark_at < clear_at and messages[mark_at]["mark"]["name"] == "reply-1"
    assert all(e == "media" for e in events[:mark_at]) and all(e == "media" for e in events[clear_at + 1 :])
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in messages if m["event"] == "media"]
    assert sizes and all(s == 3200 for s in sizes)  # whole 200 ms chunks at 8 kHz, tails padded
    assert sum(sizes) >= len(frames) * 1280 - 2 * 3200
    assert client.close_code == 1000  # EndFrame hung up the call
    assert not [f for f in down if isinstance(f, OutputAudioRawFrame)]  # consumed, not forwarded
    assert any(isinstance(f, TTSStoppedFrame) for f in down) and any(isinstance(f, MarkFrame) for f in down) is False


async def test_audio_at_the_wrong_rate_is_refused(link):
    server_ws, client = link
    wrong = OutputAudioRawFrame(audio=b"\x00\x01" * 2400, sample_rate=24000, num_channels=1)
    output = CallOutput(started_protocol(), server_ws, "C")
    await run_test(output, frames_to_send=[wrong] * 5)
    assert await received(client) == []
    assert output.messages_sent == 0


def chunk(epoch: int, value: int = 1000) -> PacedAudioFrame:
    return PacedAudioFrame(audio=np.full(1600, value, np.int16).tobytes(), sample_rate=RATE, num_channels=1, epoch=epoch)


async def test_a_chunk_stamped_before_the_clear_never_follows_it(link):
    """The pacer's epoch stamp: a chunk of interrupted audio that arrives late is refused."""
    server_ws, client = link
    output = CallOutput(started_protocol(), server_ws, "C")
    await run_test(output, frames_to_send=[chunk(0), SleepFrame(sleep=0.05), InterruptionFrame(), SleepFrame(sleep=0.05), chunk(0, 7), chunk(1, 9)])
    messages = await received(client)
    events = [m["event"] for m in messages]
    assert events == ["media", "clear", "media"]
    last = np.frombuffer(base64.b64decode(messages[-1]["media"]["payload"]), np.int16)
    assert (last == 9).all()  # the next epoch's audio, not the stale one
    assert output.stats["stale_chunks_refused"] == 1


async def test_a_chunk_from_a_newer_epoch_sends_its_clear_first(link):
    """If new audio overtakes its InterruptionFrame, the `clear` still goes out before it, once."""
    server_ws, client = link
    output = CallOutput(started_protocol(), server_ws, "C")
    await run_test(output, frames_to_send=[chunk(0), chunk(1), SleepFrame(sleep=0.05), InterruptionFrame(), chunk(1)])
    events = [m["event"] for m in await received(client)]
    assert events == ["media", "clear", "media", "media"]


async def test_nothing_is_sent_after_the_provider_socket_closed(link):
    server_ws, client = link
    await client.close()
    while server_ws.is_open:
        await asyncio.sleep(0.01)
    output = CallOutput(started_protocol(), server_ws, "C")
    await run_test(output, frames_to_send=[chunk(0), MarkFrame(mark="m"), InterruptionFrame()])
    assert output.messages_sent == 0 and output.stats["sends_after_close"] >= 2
