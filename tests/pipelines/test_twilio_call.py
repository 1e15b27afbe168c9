"""Twilio end to end: `python -m pipelines run` on the shipped twilio.yaml with signatures on, dialled
over loopback by the simulated Twilio caller (webhook -> TwiML -> signed stream upgrade)."""

import asyncio
import audioop
import base64
import os
import textwrap

import numpy as np
import pytest
import websockets
from aiohttp import web

from pipelines import builder, config
from pipelines.bench.launch import free_port, launched, run_command
from pipelines.server import CallServer
from pipelines.sim.caller import place_call, twilio_signature
from pipelines.sim.speech import energy_onset, fixture_wav
from tests.pipelines.served import finished_call, rms, scripted_config, stats

RATE = 8000
TOKEN = "test-auth-token"
SILENT_RMS = 50


def deployment(tmp_path, **reference) -> str:
    return scripted_config(tmp_path, "twilio.yaml", **reference)


def mulaw_media(result) -> list[tuple[float, np.ndarray]]:
    return [(t, np.frombuffer(audioop.ulaw2lin(base64.b64decode(m["media"]["payload"]), 2), np.int16))
            for t, m in result.messages if m["event"] == "media"]


async def test_a_signed_twilio_call_hears_its_echo_gets_its_persona_and_marks_round_trip(tmp_path):
    said, _ = fixture_wav("question_8k")
    audio = np.concatenate([np.zeros(int(1.5 * RATE), np.int16), said])
    port = free_port()
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN}
    echo_delay_secs = len(said) / RATE + 0.3  # the echo starts once the caller finished: no barge-in
    cfg = deployment(tmp_path, mode="echo", handshake_delay_secs=0.3, echo_delay_secs=echo_delay_secs)
    with launched(run_command(cfg, port), port, env=env):
        result = await place_call(f"http://127.0.0.1:{port}/twilio/twiml?persona=sales", audio, RATE, provider="twilio",
                                  auth_token=TOKEN, seconds=len(audio) / RATE + echo_delay_secs + 1.0)
        call = await finished_call(port)
    assert result.violations == []
    assert call["personaplex"]["persona"] == "sales"  # <Parameter name="persona"> from the webhook's query
    assert result.marks_echoed and call["pacer"]["marks_echoed"] >= 1  # (the greeting clip was talked over: one clear)
    # the echo: the caller's words come back echo_delay_secs later, audible
    onset = 1.5 + energy_onset(said, RATE) * 0.02 + echo_delay_secs
    assert rms(result.heard[int(onset * RATE):]) > 300


async def test_talking_over_the_answer_on_twilio_clears_it_then_silence_until_the_new_turn_is_answered(tmp_path):
    """The caller asks over the greeting (it is cut: the first `clear`), the conversing reference engine
    answers once the question ends, the caller talks over the answer: a second `clear`, nothing of the
    interrupted answer after it, and the interruption itself is answered once it ends."""
    cfg = deployment(tmp_path, mode="converse", handshake_delay_secs=0.5)
    question, _ = fixture_wav("question_8k")
    interrupt, _ = fixture_wav("interrupt_8k")
    ask_at, cut_at = 1.5, 6.2  # the answer runs from ~5.4 s for ~3 s
    audio = np.zeros(round(12.0 * RATE), np.int16)
    audio[round(ask_at * RATE) : round(ask_at * RATE) + len(question)] = question
    audio[round(cut_at * RATE) : round(cut_at * RATE) + len(interrupt)] = interrupt
    port = free_port()
    with launched(run_command(cfg, port), port):
        result = await place_call(f"ws://127.0.0.1:{port}/twilio", audio, RATE, provider="twilio", seconds=12.0)
        call = await finished_call(port)
    onset = cut_at + energy_onset(interrupt, RATE) * 0.02
    interrupt_ends = cut_at + len(interrupt) / RATE - 0.2  # the fixture's 0.2 s tail pad
    greeting_cut, clear = [t for t, m in result.messages if m["event"] == "clear"]
    assert ask_at + 0.4 < greeting_cut < ask_at + 1.2 and onset + 0.4 < clear < onset + 1.2
    assert max(rms(p) for t, p in mulaw_media(result) if ask_at + 3.1 < t < onset) > 1000  # the answer was playing
    after = [round(rms(p)) for t, p in mulaw_media(result) if clear < t < interrupt_ends + 0.5]
    assert after and max(after) < SILENT_RMS  # μ-law of digital silence decodes to silence
    assert max(rms(p) for t, p in mulaw_media(result) if t > interrupt_ends + 0.5) > 1000  # the new turn is answered
    assert result.violations == []
    assert call["barge_in"]["interruptions"] == 2 and call["turn"]["turns"] == 2


async def test_an_unsigned_upgrade_is_refused_with_403_before_any_pipeline(tmp_path):
    port = free_port()
    with launched(run_command(deployment(tmp_path, mode="echo"), port), port, env={**os.environ, "TWILIO_AUTH_TOKEN": TOKEN}):
        for headers in ({}, {"X-Twilio-Signature": twilio_signature("wrong-token", f"ws://127.0.0.1:{port}/twilio")}):
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(f"ws://127.0.0.1:{port}/twilio", additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
        with pytest.raises(ConnectionError, match="403"):  # the webhook too
            await place_call(f"http://127.0.0.1:{port}/twilio/twiml", np.zeros(RATE, np.int16), RATE, provider="twilio")
        s = await asyncio.to_thread(stats, port)
    assert s["upgrades_refused"] == 2 and s["calls_total"] == 0 and s["connections"] == 0


DEPLOYMENT = """\
transport:
  type: twilio
  params: {{hang_up: true, account_sid: AC42, auth_token: tok, api_base_url: "{api}"}}
processors:
  - type: pacer
"""


async def test_rest_hang_up_when_we_end_the_call_and_not_after_twilios_stop(tmp_path):
    hits: list[tuple[str, dict, str]] = []

    async def calls(request: web.Request) -> web.Response:
        hits.append((request.path, dict(await request.post()), request.headers.get("Authorization", "")))
        return web.json_response({"status": "completed"})

    api = web.Application()
    api.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", calls)
    runner = web.AppRunner(api)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    path = tmp_path / "d.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT.format(api=f"http://127.0.0.1:{runner.addresses[0][1]}")))
    server = CallServer(builder.plan(config.load(path, {})), None, "127.0.0.1", 0)
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/twilio"
        await place_call(url, np.zeros(RATE, np.int16), RATE, provider="twilio", auth_token="tok", seconds=0.5,
                         call_sid="CAstopped", linger=0.5)
        await place_call(url, np.zeros(RATE, np.int16), RATE, provider="twilio", auth_token="tok", seconds=0.5,
                         call_sid="CAours", hangup=False, linger=0.1)  # the socket just closes: no `stop`
        for _ in range(50):
            if server.totals["rest_hangups"]:
                break
            await asyncio.sleep(0.05)
    finally:
        await server.stop()
        await runner.cleanup()
    assert [(p, f) for p, f, _ in hits] == [("/2010-04-01/Accounts/AC42/Calls/CAours.json", {"Status": "completed"})]
    assert hits[0][2] == "Basic " + base64.b64encode(b"AC42:tok").decode()
