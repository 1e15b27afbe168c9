"""The stock pipecat baseline (pipelines/bench/stock.py), dialled by the simulated Exotel caller: the
caller talks over the bot and stock pipecat answers with `clear`. Ordering facts only, no timings."""


import numpy as np
import pytest

from pipelines.bench.launch import free_port, launched
from pipelines.bench.stock import stock_server_command
from pipelines.sim.caller import place_call
from pipelines.sim.speech import energy_onset, fixture_wav

SPEECH_AT = 2.5  # the caller starts talking here; the bot speaks from 1.0 s for about 6 s


@pytest.fixture
def stock_url():
    port = free_port()
    try:
        with launched(stock_server_command(port, 1.0, None), port) as srv:
            yield srv.url()
    except RuntimeError as exc:
        pytest.fail(str(exc))


async def test_caller_talking_over_the_stock_bot_gets_a_clear(stock_url):
    said, rate = fixture_wav("interrupt_8k")
    audio = np.concatenate([np.zeros(round(SPEECH_AT * rate), np.int16), said])
    result = await place_call(stock_url, audio, rate, seconds=len(audio) / rate + 0.5, chunk_ms=20, stream_sid="MZstock")
    speech_began = SPEECH_AT + energy_onset(said, rate) * 0.02

    media = [t for t, m in result.messages if m["event"] == "media"]
    clears = [(t, m) for t, m in result.messages if m["event"] == "clear"]
    assert media and media[0] < speech_began  # the bot was talking when the caller began
    assert np.abs(result.heard[: round(speech_began * rate)]).max() > 1000  # and the caller heard it
    assert result.clears >= 1 and len(clears) == result.clears
    assert clears[0][0] > speech_began  # barge-in, not a clear at call start
    assert clears[0][1] == {"event": "clear", "stream_sid": "MZstock"}
