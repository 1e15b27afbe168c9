"""Call actions end to end: configs/call_actions.yaml served in-process, a reference engine on loopback,
simulated Exotel and Twilio callers pressing keys or saying nothing, Twilio's REST API and a call-events
receiver as local servers. What is checked is what the caller heard, what the provider was asked to do,
what the record says and what the webhook got."""

import asyncio
import json
from contextlib import asynccontextmanager

import numpy as np
import pytest
import yaml
from aiohttp import web

from pipelines.config import CONFIG_DIR
from pipelines.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from pipelines.sim.caller import Dtmf, place_call
from pipelines.sim.engine.reference import EngineOptions
from tests.pipelines.served import rms, until
from tests.pipelines.test_hostile_identity import serving_file

RATE = 8000
SECRET = "webhook-secret"
AGENT = "+15551234567"
SALES_PROMPT = "You are an upbeat sales assistant."


class LocalApi:
    """A local HTTP server: Twilio's Calls resource (REST shape, Basic auth) and a call-events receiver
    that answers 500 to its first `fail_first` POSTs."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.rest: list[tuple[float, str, dict]] = []  # (loop time, path, form)
        self.events: list[dict] = []
        self.attempts = 0
        self.bad_signatures = 0
        self.url = ""

    async def _calls(self, request: web.Request) -> web.Response:
        self.rest.append((asyncio.get_running_loop().time(), request.path, dict(await request.post())))
        return web.json_response({"sid": request.match_info["call"], "status": "in-progress"})

    async def _events(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if not verify(SECRET, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER), body):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        self.events.append(json.loads(body))
        return web.Response(status=204)

    @asynccontextmanager
    async def running(self):
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._calls)
        app.router.add_post("/events", self._events)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


def deployment(tmp_path, api: LocalApi, provider: str = "exotel", **rules) -> str:
    """configs/call_actions.yaml on `provider`, its rules replaced by `rules`, records and events on."""
    d = yaml.safe_load((CONFIG_DIR / "call_actions.yaml").read_text())
    d.pop("engine")
    d["server"] = {"media_timeout_secs": 5}
    if provider == "twilio":
        d["transport"] = {"type": "twilio", "params": {"account_sid": "AC42", "auth_token": "tok", "api_base_url": api.url}}
    d["records"] = {"dir": str(tmp_path / "records")}
    d["events"] = {"url": f"{api.url}/events", "secret": SECRET, "backoff_secs": 0.01, "max_backoff_secs": 0.05}
    [actions] = [p for p in d["processors"] if p["type"] == "call_actions"]
    actions["params"]["transfer_targets"] = {"agent": AGENT}
    for key in ("dtmf", "idle", "max_duration"):
        actions["params"].pop(key, None)
    actions["params"].update(rules)
    [model] = [p for p in d["processors"] if p["type"] == "personaplex"]
    model["params"]["personas"]["sales"]["text_prompt"] = SALES_PROMPT
    path = tmp_path / f"{provider}-actions.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def serving(path: str):
    return serving_file(path, EngineOptions(mode="converse", handshake_delay_secs=0.3))


def record(tmp_path) -> list[dict]:
    [events] = list((tmp_path / "records").glob("*/events.jsonl"))
    return [json.loads(line) for line in events.read_text().splitlines()]


def loud_after(result, t: float) -> float:
    return rms(result.heard[int(t * RATE):])


SILENCE = np.zeros(8 * RATE, np.int16)


async def test_exotel_press_0_hears_the_clip_then_the_stream_ends_for_the_next_applet(tmp_path):
    async with LocalApi(fail_first=2).running() as api:
        path = deployment(tmp_path, api, dtmf={"0": {"action": "transfer", "target": "agent", "clip": "transferring"},
                                               "*": {"action": "event", "event": "callback_requested", "data": {"queue": "sales"}}})
        async with serving(path) as (server, _):
            result = await place_call(f"ws://127.0.0.1:{server.port}/exotel", SILENCE, RATE, seconds=8.0,
                                      events=[Dtmf(at=1.5, digit="*"), Dtmf(at=2.5, digit="0")], linger=5.0)
            await until(lambda: not server.calls, 10)
            await until(lambda: api.named("call_ended"), 10)
            taken = server.metrics.registry.get_sample_value("bridge_call_actions_total", {"action": "transfer", "result": "taken"})
            outcomes = server.metrics.registry.get_sample_value("bridge_calls_total", {"outcome": "transferred"})
            out = server.stats()["events_out"]
    # the caller heard "please hold while I transfer you", then the bridge closed the stream (Exotel's flow goes on)
    assert result.server_closed_at is not None and result.server_closed_at < 8.0
    assert loud_after(result, 2.6) > 300 and result.violations == []
    events = record(tmp_path)
    [event, action] = [e for e in events if e["event"] == "action"]
    assert (event["action"], event["name"], event["data"]) == ("event", "callback_requested", {"queue": "sales"})
    assert (action["action"], action["reason"], action["target"], action["clip"]) == ("transfer", "dtmf 0", "agent", "transferring")
    [transfer] = [e for e in events if e["event"] == "transfer"]
    assert (transfer["to"], transfer["how"], transfer["ok"]) == (AGENT, "stream_end", True)
    assert events[-1]["event"] == "call_ended" and events[-1]["outcome"] == "transferred"
    # the webhook: signed, retried through two 500s, in order, each event once
    assert api.bad_signatures == 0 and api.attempts == len(api.events) + 2
    assert [e["event"] for e in api.events] == ["call_started", "engine_acquired", "action", "action", "transfer", "call_ended"]
    assert api.named("action")[0]["data"] == {"action": "event", "reason": "dtmf *", "data": {"queue": "sales"}, "name": "callback_requested"}
    assert [e["seq"] for e in api.events] == sorted(e["seq"] for e in api.events)
    assert taken == 1 and outcomes == 1 and out["delivered"] == 6 and out["retries"] == 2 and out["failed"] == 0
    ended = api.named("call_ended")[0]["data"]
    assert ended["outcome"] == "transferred" and ended["record"].startswith(str(tmp_path / "records"))


async def test_twilio_press_0_dials_the_agent_over_rest_after_the_clip_has_played(tmp_path):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api, "twilio", dtmf={"0": {"action": "transfer", "target": "agent", "clip": "transferring"}})
        async with serving(path) as (server, _):
            loop = asyncio.get_running_loop()
            dialled = loop.time()
            result = await place_call(f"ws://127.0.0.1:{server.port}/twilio", SILENCE, RATE, provider="twilio", seconds=8.0,
                                      auth_token="tok", call_sid="CAtransfer", events=[Dtmf(at=2.5, digit="0")], linger=5.0)
            await until(lambda: not server.calls, 10)
    [(at, rest_path, form)] = api.rest  # the transfer only: no hang-up after it, the call is the agent's now
    assert rest_path == "/2010-04-01/Accounts/AC42/Calls/CAtransfer.json"
    assert form == {"Twiml": f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial><Number>{AGENT}</Number></Dial></Response>'}
    last_media = max(t for t, m in result.messages if m["event"] == "media")
    assert at - dialled > last_media  # after the clip's last chunk reached the caller
    assert loud_after(result, 2.6) > 300 and result.violations == []
    assert server.totals["rest_transfers"] == 1 and server.totals["rest_hangups"] == 0
    assert record(tmp_path)[-1]["outcome"] == "transferred"


def dial(server, provider: str, audio: np.ndarray, **kw):
    """One simulated call of `provider` to the in-process server (Twilio signed with the deployment's token)."""
    extra = {"provider": "twilio", "auth_token": "tok"} if provider == "twilio" else {}
    return place_call(f"ws://127.0.0.1:{server.port}/{provider}", audio, RATE, seconds=len(audio) / RATE, linger=5.0, **extra, **kw)


@pytest.mark.parametrize("provider", ["exotel", "twilio"])
async def test_keys_play_a_clip_then_hang_up_with_a_goodbye(tmp_path, provider):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api, provider, dtmf={"#1": {"action": "play", "clip": "still_there"},
                                                         "9": {"action": "hang_up", "clip": "goodbye"}})
        async with serving(path) as (server, _):
            result = await dial(server, provider, np.zeros(12 * RATE, np.int16),
                                events=[Dtmf(at=2.0, digit="#"), Dtmf(at=2.3, digit="1"), Dtmf(at=4.5, digit="9")])
            await until(lambda: not server.calls, 10)
    events = record(tmp_path)
    assert [(e["action"], e["reason"], e.get("clip")) for e in events if e["event"] == "action"] == [
        ("play", "dtmf #1", "still_there"), ("hang_up", "dtmf 9", "goodbye")]
    assert events[-1]["outcome"] == "bot_hung_up"
    assert loud_after(result, 2.4) > 300 and 4.5 < result.server_closed_at < 10.0 and result.violations == []
    if provider == "twilio":  # we ended it: Twilio is asked to hang up
        assert [f for _, _, f in api.rest] == [{"Status": "completed"}]


@pytest.mark.parametrize("provider", ["exotel", "twilio"])
async def test_nobody_speaking_gets_a_prompt_then_a_goodbye(tmp_path, provider):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api, provider, idle={"prompt_after_secs": 1.5, "prompt_clip": "still_there",
                                                         "hang_up_after_secs": 1.5, "goodbye_clip": "goodbye"})
        async with serving(path) as (server, _):
            result = await dial(server, provider, np.zeros(20 * RATE, np.int16))
            await until(lambda: not server.calls, 10)
    events = record(tmp_path)
    assert [(e["action"], e["reason"], e.get("clip")) for e in events if e["event"] == "action"] == [
        ("play", "idle", "still_there"), ("hang_up", "idle", "goodbye")]
    assert events[-1]["outcome"] == "caller_idle"
    assert result.server_closed_at is not None and result.server_closed_at < 15.0  # well before the caller's 20 s


@pytest.mark.parametrize("provider", ["exotel", "twilio"])
async def test_the_time_limit_warns_then_ends_the_call(tmp_path, provider):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api, provider, max_duration={"warn_at_secs": 2.0, "warn_clip": "wrapping_up",
                                                                  "hang_up_at_secs": 4.0, "goodbye_clip": "goodbye"})
        async with serving(path) as (server, _):
            result = await dial(server, provider, np.zeros(15 * RATE, np.int16), call_sid="CAlimit")
            await until(lambda: not server.calls, 10)
    events = record(tmp_path)
    assert [(e["action"], e["reason"]) for e in events if e["event"] == "action"] == [("play", "max_duration"), ("hang_up", "max_duration")]
    assert events[-1]["outcome"] == "max_duration"
    assert 4.0 < result.server_closed_at < 10.0
    if provider == "twilio":  # we ended it, so Twilio is asked to hang up: the REST hang-up, not a transfer
        assert [(p, f) for _, p, f in api.rest] == [("/2010-04-01/Accounts/AC42/Calls/CAlimit.json", {"Status": "completed"})]


async def test_a_key_switches_the_persona_on_the_same_engine(tmp_path):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api, dtmf={"2": {"action": "persona", "persona": "sales"}})
        async with serving(path) as (server, engine):
            await place_call(f"ws://127.0.0.1:{server.port}/exotel", np.zeros(6 * RATE, np.int16), RATE, seconds=6.0,
                             events=[Dtmf(at=2.5, digit="2")])
            await until(lambda: not server.calls, 10)
            [call] = server.recent
    assert [q["text_prompt"] for q in engine.queries][1:] == [SALES_PROMPT]  # a second session, with the new prompt
    assert call["stats"]["personaplex"]["persona"] == "sales" and call["stats"]["personaplex"]["persona_switches"] == 1
    assert call["outcome"] == "completed"


async def test_a_returning_caller_is_remembered_in_the_model_prompt(tmp_path):
    async with LocalApi().running() as api:
        path = deployment(tmp_path, api)
        d = yaml.safe_load(open(path))
        d["caller_memory"] = {"dir": str(tmp_path / "memory"), "salt": "test-salt"}
        open(path, "w").write(yaml.safe_dump(d))
        async with serving(path) as (server, engine):
            for _ in range(2):  # the simulated Exotel caller always calls from the same number
                await place_call(f"ws://127.0.0.1:{server.port}/exotel", np.zeros(2 * RATE, np.int16), RATE, seconds=2.0)
                await until(lambda: not server.calls, 10)
    first, second = [q["text_prompt"] for q in engine.queries]
    assert "called" not in first
    assert second.startswith(first) and "has called once before" in second and "ended normally" in second
    stored = b"".join(p.read_bytes() for p in (tmp_path / "memory").iterdir())
    assert b"09999999999" not in stored and b"9999999999" not in stored  # the number itself is never kept
