"""Fault scenarios, one test each: what the caller hears, how the call ends, what it leaves behind.

Every call is a real Exotel call over loopback (the simulated caller's phone from pipelines/sim/caller.py,
driven here so a test can decide mid-call when a caller speaks, hangs up or drops), against the
shipped exotel.yaml conversation core (Silero VAD, barge-in, holding clips, pacer) and real
reference engines. The prompt clip is the short one_moment.wav to keep calls short, and the pacer has
more slack (PACER_SLACK); the apology is the shipped configs/clips/apology.wav, and a caller "hears"
it when its exact samples arrive.

Each test checks four things: the affected calls end cleanly (apology where the socket is still
open, then a normal close by the bridge), the other calls are undisturbed (no `clear` they did not
cause, no underrun in bot speech, outcome `completed`), nothing leaks (/stats idle, engine leases
back, the in-process task set or the server process's fds and threads back to their baseline), and
the records are intact. No timing thresholds: counts and orders only; timeouts only stop hangs.
"""

import asyncio
import base64
import json
import os
import re
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from loguru import logger
from websockets.asyncio.client import connect

from pipelines import builder, config
from pipelines.bench.launch import free_port, free_ports, launched, run_command
from pipelines.config import CONFIG_DIR
from pipelines.server import CallServer
from pipelines.sim.caller import CallResult, Exotel, _clock, _listen, _Phone, dial_url
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.audio import read_wav
from tests.pipelines.served import fetch, idle_stats, metric, rms, until
from tests.pipelines.served import stats as server_stats
from tests.pipelines.test_operations import events_of, names
from tests.speech import speech

RATE = 8000
CHUNK = RATE // 10  # the caller's 100 ms media messages
HANG = 60.0  # only against hangs
APOLOGY = read_wav(CONFIG_DIR / "clips" / "apology.wav", RATE).tobytes()
WORD = speech(RATE)  # a real recording, 0.73 s: shorter than the echo's 1 s delay, so the caller never talks over it
AUDIBLE = 300  # RMS of a 100 ms chunk that a caller hears as sound
SAY_AT = 2.0  # bystanders speak after the prompt clip (1.5 s) has played out: nothing of theirs is interrupted
BYSTANDER_SECS = 4.5
# The echo engine is input-clocked, so a caller, engine or bridge process that the scheduler holds back
# for ~0.1 s (three processes, and other work, share this 2-core box) delays bot speech by as much: with
# the shipped 0.2 s lead and 0.12 s jitter slack that is sometimes an underrun. With this slack an
# underrun means a stall of over 0.3 s, which is what a fault disturbing another call would cause.
PACER_SLACK = {"lead_secs": 0.4, "jitter_secs": 0.3}


# --- the caller ----------------------------------------------------------------------------------


@dataclass
class Script:
    """What one caller does. A test may change it while the call runs (`say`, `hang_up_at`)."""

    hang_up_at: float = 25.0  # seconds of call audio, then `stop` (unless the bot hangs up first)
    drop_at: float | None = None  # abort the TCP connection here: no `stop`, no close frame
    junk: dict[int, list[str | bytes]] = field(default_factory=dict)  # after media message k: these raw messages
    says: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start sample, pcm)
    phone: _Phone | None = None

    def say(self, pcm: np.ndarray, at: float) -> "Script":
        self.says.append((round(at * RATE), pcm))
        return self

    def now(self) -> float:
        return self.phone.now() if self.phone else 0.0

    def pcm(self, start: int) -> bytes:
        out = np.zeros(CHUNK, np.int16)
        for at, pcm in self.says:
            lo, hi = max(start, at), min(start + CHUNK, at + len(pcm))
            if lo < hi:
                out[lo - start : hi - start] += pcm[lo - at : hi - at]
        return out.astype("<i2").tobytes()


def bystander() -> Script:
    return Script(hang_up_at=BYSTANDER_SECS).say(WORD, SAY_AT)


@dataclass
class Call:
    sid: str
    result: CallResult
    stopped: bool  # the caller sent `stop` (else the bot hung up first, or the caller dropped)
    dropped: bool

    def media(self) -> list[tuple[float, bytes]]:
        return [(t, base64.b64decode(m["media"]["payload"])) for t, m in self.result.messages if m["event"] == "media"]

    def stream(self) -> bytes:
        """Every sample the bot sent, in order, timing aside."""
        return b"".join(pcm for _, pcm in self.media())

    def heard_apology(self) -> bool:
        stream = self.stream()
        at = stream.find(APOLOGY)
        return at >= 0 and at % 2 == 0

    def first_audio(self) -> float | None:
        return next((t for t, pcm in self.media() if rms(np.frombuffer(pcm, np.int16)) > AUDIBLE), None)

    def audible_after(self, t0: float) -> int:
        return sum(rms(np.frombuffer(pcm, np.int16)) > AUDIBLE for t, pcm in self.media() if t > t0)


async def dial(url: str, sid: str, script: Script, linger: float = 30.0) -> Call:
    """An Exotel call as pipelines.sim.caller.place_call makes it, driven by `script`."""
    dialect = Exotel()
    stopped = dropped = False
    async with connect(dial_url(url, RATE, {}), max_size=16 * 2**20, open_timeout=20) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        phone = script.phone = _Phone(ws, RATE, f"MZ-{sid}", dialect)
        await phone.send(dialect.start(phone, sid, {}))
        listener = asyncio.create_task(_listen(phone), name=f"caller-listen-{sid}")
        clock = asyncio.create_task(_clock(phone, None), name=f"caller-clock-{sid}")
        try:
            k = 0
            while not phone.server_closed.is_set():
                at = k * CHUNK / RATE
                if script.drop_at is not None and at >= script.drop_at:
                    ws.transport.abort()
                    dropped = True
                    break
                if at >= script.hang_up_at:
                    stopped = await phone.send(dialect.stop(sid))
                    break
                await asyncio.sleep(max(0.0, phone.t0 + (k + 1) * CHUNK / RATE - phone.loop.time()))
                if phone.server_closed.is_set():
                    break
                if not await phone.send({"event": "media", "media": dialect.media(k, 100, script.pcm(k * CHUNK))}):
                    break
                phone.result.sent_seconds = (k + 1) * CHUNK / RATE
                for raw in script.junk.get(k, ()):
                    async with phone.send_lock:
                        await ws.send(raw)
                k += 1
            if not dropped:
                try:
                    await asyncio.wait_for(phone.server_closed.wait(), linger)
                    phone.result.close_code = ws.close_code
                except TimeoutError:
                    pass
            end = phone.now_sample()
        finally:
            clock.cancel()
            if not dropped:
                await ws.close()
            listener.cancel()
            await asyncio.gather(listener, clock, return_exceptions=True)
    phone.result.heard = phone.render(end)
    return Call(sid, phone.result, stopped, dropped)


# --- deployments, servers, records ---------------------------------------------------------------


def deployment_file(tmp_path: Path, records: Path, urls: list[str], *, wait_secs: float = 20.0, **personaplex) -> Path:
    """configs/exotel.yaml with these engines, records under `records`, the short prompt clip, and
    a 5 s handshake timeout (or the PersonaPlex parameters given)."""
    cfg = yaml.safe_load((CONFIG_DIR / "exotel.yaml").read_text())
    cfg["server"] = {"host": "127.0.0.1", "port": 0, "drain_secs": 5}
    cfg["engine"] = {"urls": ",".join(urls), "wait_secs": wait_secs, "retry_secs": 60}
    cfg["records"] = {"dir": str(records), "audio": False}
    for p in cfg["processors"]:
        if p["type"] == "personaplex":
            p["params"].update({"handshake_timeout_secs": 5.0, **personaplex})
        elif p["type"] == "holding":
            p["params"]["clips"]["greeting"] = "clips/one_moment.wav"
        elif p["type"] == "pacer":
            p["params"].update(PACER_SLACK)
    records.mkdir(exist_ok=True)
    path = tmp_path / f"faults-{len(list(tmp_path.glob('faults-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def record(records: Path, sid: str) -> list[dict]:
    """The call's events; every line parses (events_of), it starts and ends as a call must."""
    [path] = [p for p in records.iterdir() if p.is_dir() and p.name.endswith(f"-{sid}")]
    events = events_of(path)
    seen = names(events)
    assert seen[0] == "call_started" and events[0]["call_id"] == sid, seen[:3]
    assert seen[-1] == "call_ended" and seen.count("call_ended") == 1, seen[-3:]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    return events


def every_record(records: Path) -> dict[str, list[dict]]:
    """Every call's record, each checked by `record`, by call id."""
    sids = [events_of(p)[0]["call_id"] for p in sorted(records.iterdir()) if p.is_dir()]
    return {sid: record(records, sid) for sid in sids}


def live_events(records: Path, sid: str) -> list[str]:
    """Event names of a call still running (its record is being written)."""
    paths = [p for p in records.iterdir() if p.is_dir() and p.name.endswith(f"-{sid}")] if records.exists() else []
    if not paths or not (paths[0] / "events.jsonl").exists():
        return []
    return [json.loads(line)["event"] for line in (paths[0] / "events.jsonl").read_text().splitlines() if line.endswith("}")]


def in_order(events: list[dict], *wanted: str) -> bool:
    """Each wanted event present, in this order (first occurrences)."""
    seen = names(events)
    return all(w in seen for w in wanted) and [seen.index(w) for w in wanted] == sorted(seen.index(w) for w in wanted)


def outcome(events: list[dict]) -> str:
    return events[-1]["outcome"]


def engine_states(stats: dict) -> dict[str, str]:
    assert all(e["call_id"] is None for e in stats["engines"] if e["state"] != "busy"), stats["engines"]
    return {e["url"]: e["state"] for e in stats["engines"]}


def recent(stats: dict) -> dict[str, dict]:
    return {c["call_id"]: c for c in stats["recent_calls"]}


def call_tasks() -> set[asyncio.Task]:
    """Live tasks but the one asking and the pool's probes of engines out of rotation."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.get_name().startswith("engine-probe-")}


@dataclass
class Bridge:
    """An in-process call server."""

    server: CallServer
    records: Path
    baseline: set[asyncio.Task] = field(default_factory=set)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/exotel"

    def engine(self, i: int):
        return self.server.engines.engines[i]

    def record(self, sid: str) -> list[dict]:
        return record(self.records, sid)

    def live_events(self, sid: str) -> list[str]:
        return live_events(self.records, sid)

    async def leased(self, i: int, sid: str):
        """Engine i has been leased to call `sid`."""
        await until(lambda: self.engine(i).call_id == sid, timeout=HANG)

    async def settled(self, states: dict[str, str]) -> dict:
        """No call, connection or task left over; each engine in the state given (idle, or down)."""
        stats = await idle_stats(self.port, HANG)
        assert stats["calls_active"] == 0 and stats["connections"] == 0 and stats["calls"] == []
        assert engine_states(stats) == states
        try:
            await until(lambda: not call_tasks() - self.baseline, timeout=10)
        except TimeoutError:
            pass
        assert not call_tasks() - self.baseline, sorted(t.get_name() for t in call_tasks() - self.baseline)
        return stats


@pytest.fixture
async def engines():
    """`await engines(**options)`: an in-process reference engine (echo), stopped afterwards."""
    started = []

    async def start(**options):
        engine = ReferenceEngine(EngineOptions(**{"handshake_delay_secs": 0.2, "echo_delay_secs": 1.0, **options}))
        await engine.start("127.0.0.1", 0)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.stop()


@pytest.fixture
async def bridge(tmp_path):
    """`await bridge(urls, **deployment)`: an in-process server on the conversation core, stopped afterwards."""
    servers = []

    async def start(urls, **kwargs):
        records = tmp_path / f"records-{len(servers)}"
        path = deployment_file(tmp_path, records, urls, **kwargs)
        deployment = builder.plan(config.load(path, {}))
        pools = builder.engine_pools(deployment, deployment.loaded.config.engine)
        server = CallServer(deployment, pools, "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return Bridge(server, records)

    yield start
    for server in servers:
        await server.stop()


def baseline(*bridges: Bridge) -> None:
    """The task set with servers and engines up and no call yet."""
    tasks = call_tasks() | {asyncio.current_task()}
    for b in bridges:
        b.baseline = tasks


def undisturbed(call: Call, events: list[dict], stats: dict, said_at: float = SAY_AT) -> None:
    """A call that should not have noticed anything: it spoke, heard its echo, hung up itself."""
    result = call.result
    assert result.violations == [], result.violations
    assert call.stopped and result.close_code == 1000
    assert result.clears == 0 and "barge_in" not in names(events)  # it never talked over the bot
    assert outcome(events) == "completed"
    assert in_order(events, "engine_ready", "user_started", "speech_started", "call_ended"), names(events)
    assert "apology" not in names(events) and not call.heard_apology()
    assert call.audible_after(said_at + 0.5) > 0  # its echo came back
    pacer = recent(stats)[call.sid]["stats"]["pacer"]
    assert pacer["underruns"] == 0, pacer


def apologised(call: Call, events: list[dict], stats: dict, expected_outcome: str, *order: str) -> None:
    """A call the bridge ended: the whole apology, then a normal close before the caller hung up."""
    result = call.result
    assert result.violations == [], result.violations
    assert not call.stopped and not call.dropped and result.close_code == 1000  # the bot hung up, normally
    assert call.heard_apology()
    assert outcome(events) == expected_outcome
    assert in_order(events, "call_started", *order, "apology", "call_ended"), names(events)
    assert [e["clip"] for e in events if e["event"] == "holding"][-1] == "apology"
    pacer = recent(stats)[call.sid]["stats"]["pacer"]
    assert pacer["marks_missed"] == 0, pacer  # the apology's mark came back before the hang-up


# --- 1. engine down at call start ----------------------------------------------------------------


async def test_engine_down_at_call_start_apologises_and_a_second_engine_takes_over(bridge, engines):
    """Nothing listens on the engine's port. Alone in its pool: the apology and a clean hang-up.
    With a healthy engine behind it: the same call fails over and completes (the pool's side of
    failover is in tests/processors/personaplex/test_pool.py; this is the caller's view)."""
    dead = f"ws://127.0.0.1:{free_port()}"
    live = await engines()
    alone = await bridge([dead])
    paired = await bridge([dead, live.url])
    baseline(alone, paired)

    down, over = await asyncio.wait_for(asyncio.gather(
        dial(alone.url, "down", Script()),
        dial(paired.url, "over", bystander()),
    ), HANG)

    events = alone.record("down")
    apologised(down, events, await alone.settled({dead: "down"}), "no_engine", "engine_acquired", "engine_failed", "no_engine")
    assert "engine_ready" not in names(events)
    failed = next(e for e in events if e["event"] == "engine_failed")
    assert failed["url"] == dead and "cannot connect" in failed["reason"]

    events = paired.record("over")
    stats = await paired.settled({dead: "down", live.url: "idle"})
    undisturbed(over, events, stats)
    leases = [(e["event"], e["url"]) for e in events if e["event"].startswith("engine_")]
    assert leases == [("engine_acquired", dead), ("engine_failed", dead), ("engine_acquired", live.url),
                      ("engine_ready", live.url), ("engine_released", live.url)]
    assert live.stats.handshakes == 1 and live.stats.sessions_active == 0


# --- 2. engine dies mid-call ---------------------------------------------------------------------


@contextmanager
def engine_process(ports: list[int], *extra: str):
    """`python -m pipelines engine` on these ports (ws://), its output drained so it never blocks."""
    argv = [sys.executable, "-m", "pipelines", "engine", "--port", ",".join(map(str, ports)), "--no-tls",
            "--handshake-delay-secs", "0.5", *extra]
    with launched(argv, ready="ws://") as proc:
        drain(proc.proc)
        yield proc


def drain(proc) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


async def test_engine_dying_mid_call_apologises_and_leaves_rotation(bridge, engines):
    """One engine drops its connection mid-session (no close frame), another stops dead (SIGSTOP:
    the socket stays open, nothing comes back). Each call hears the apology and is hung up; both
    engines leave the rotation. A third call on a healthy engine goes on as if nothing happened."""
    dying = await engines(fail_after_frames=20)
    healthy = await engines()
    [port] = free_ports(1)
    stalled = f"ws://127.0.0.1:{port}"
    with engine_process([port]) as frozen:
        b = await bridge([dying.url, stalled, healthy.url], silence_timeout_secs=1.5)
        baseline(b)
        try:
            closes = asyncio.create_task(dial(b.url, "closes", Script()))
            await b.leased(0, "closes")
            silent = asyncio.create_task(dial(b.url, "silent", Script()))
            await b.leased(1, "silent")
            other = asyncio.create_task(dial(b.url, "other", bystander()))
            await until(lambda: "engine_ready" in b.live_events("silent"), timeout=HANG)
            await asyncio.sleep(0.5)  # a little of the conversation, then the engine freezes
            frozen.proc.send_signal(signal.SIGSTOP)
            closes, silent, other = await asyncio.wait_for(asyncio.gather(closes, silent, other), HANG)
            stats = await b.settled({dying.url: "down", stalled: "down", healthy.url: "idle"})
        finally:
            frozen.proc.send_signal(signal.SIGCONT)

    events = b.record("closes")
    apologised(closes, events, stats, "engine_failed", "engine_ready", "engine_failed")
    assert "connection lost" in next(e for e in events if e["event"] == "engine_failed")["reason"]
    events = b.record("silent")
    apologised(silent, events, stats, "engine_failed", "engine_ready", "engine_failed")
    assert "no audio" in next(e for e in events if e["event"] == "engine_failed")["reason"]
    undisturbed(other, b.record("other"), stats)
    assert (await asyncio.to_thread(fetch, b.port, "/readyz"))[0] == 200  # one engine is still in rotation
    assert dying.stats.sessions_active == 0 and healthy.stats.sessions_active == 0


# --- 3. the handshake never comes -----------------------------------------------------------------


async def test_handshake_that_never_comes_apologises(bridge, engines):
    """The engine accepts the WebSocket and stays in its prompt phase: after handshake_timeout_secs the
    engine leaves rotation, the only other engine is busy, so the call gets the apology."""
    healthy = await engines()
    mute = await engines(handshake_delay_secs=3600)
    b = await bridge([healthy.url, mute.url], wait_secs=0, handshake_timeout_secs=1.5)
    baseline(b)
    other = asyncio.create_task(dial(b.url, "other", bystander()))
    await b.leased(0, "other")
    waits, other = await asyncio.wait_for(asyncio.gather(dial(b.url, "waits", Script()), other), HANG)

    stats = await b.settled({healthy.url: "idle", mute.url: "down"})
    events = b.record("waits")
    apologised(waits, events, stats, "no_engine", "engine_acquired", "engine_failed", "no_engine")
    assert "engine_ready" not in names(events)
    assert "no handshake within 1.5 s" in next(e for e in events if e["event"] == "engine_failed")["reason"]
    undisturbed(other, b.record("other"), stats)
    await until(lambda: mute.stats.sessions_active == 0, timeout=10)  # it noticed the call leave its prompt phase
    assert mute.stats.handshakes == 0


# --- 4. the caller drops during the holding clip -------------------------------------------------


async def test_caller_dropping_during_the_prompt_clip_releases_its_engine_or_its_place_in_line(bridge, engines):
    """Two callers drop the TCP connection (no `stop`) while the prompt clip plays: one whose engine
    is still in its prompt phase (handshake 3 s), one queued for an engine. Both end as caller_gone;
    the slow engine's lease and the queued acquire are given back; a third call is undisturbed."""
    fast = await engines()
    slow = await engines(handshake_delay_secs=3.0)
    b = await bridge([fast.url, slow.url])
    baseline(b)
    other = asyncio.create_task(dial(b.url, "other", bystander()))
    await b.leased(0, "other")
    holding_script, queued_script = Script(), Script()
    holding = asyncio.create_task(dial(b.url, "holding", holding_script))
    await b.leased(1, "holding")
    queued = asyncio.create_task(dial(b.url, "queued", queued_script))
    await until(lambda: "engine_waiting" in b.live_events("queued"), timeout=HANG)
    queued_script.drop_at = 0.0  # first the one in line ...
    queued = await asyncio.wait_for(queued, HANG)
    holding_script.drop_at = 0.0  # ... then the one whose engine is still in its prompt phase
    holding, other = await asyncio.wait_for(asyncio.gather(holding, other), HANG)

    stats = await b.settled({fast.url: "idle", slow.url: "idle"})  # neither engine is held by a gone call
    pool = b.server.engines.get(None)
    assert pool.stats["waits"] == 1 and pool.stats["no_engine"] == 0 and pool.stats["failures"] == 0
    for call in (holding, queued):
        assert call.dropped and call.first_audio() is not None  # it heard the prompt clip before it went
        events = b.record(call.sid)
        assert outcome(events) == "caller_gone"
        assert in_order(events, "holding", "bot_started", "call_ended") and "apology" not in names(events)
        assert "bot_stopped" not in names(events)  # it went while the prompt clip was playing
        assert "engine_ready" not in names(events)
    assert in_order(b.record("holding"), "engine_acquired", "engine_released", "call_ended")
    assert in_order(b.record("queued"), "engine_waiting", "call_ended") and "engine_acquired" not in names(b.record("queued"))
    undisturbed(other, b.record("other"), stats)
    await until(lambda: slow.stats.sessions_active == 0, timeout=10)
    assert slow.stats.handshakes == 0 and fast.stats.sessions_active == 0


# --- 5. a flood of malformed messages --------------------------------------------------------------


def malformed(sid: str) -> list[tuple[str | bytes, str]]:
    """One of each kind of bad message, with the reason the protocol drops it for."""
    def js(message):
        return json.dumps(message)

    return [
        ("{not json", "invalid_json"),
        (b"\x00\x01 binary", "binary_frame"),
        ("[1, 2, 3]", "not_object"),
        (js({"event": 42, "stream_sid": sid}), "missing_event"),  # wrong type
        (js({"stream_sid": sid, "media": {}}), "missing_event"),  # missing
        (js({"event": "bogus", "stream_sid": sid}), "unknown_event"),
        (js({"event": "media", "stream_sid": sid, "media": {"payload": "%%not*base64%%"}}), "invalid_base64"),
        (js({"event": "media", "stream_sid": sid, "media": {"payload": 12345}}), "missing_payload"),  # wrong type
        (js({"event": "media", "stream_sid": sid}), "missing_payload"),  # missing
        (js({"event": "media", "stream_sid": sid, "media": {"payload": ""}}), "empty_payload"),
        (js({"event": "media", "stream_sid": sid, "media": {"payload": base64.b64encode(b"\1\2\3").decode()}}), "odd_length_pcm"),
        (js({"event": "mark", "stream_sid": sid, "mark": {}}), "missing_mark_name"),
        (js({"event": "dtmf", "stream_sid": sid, "dtmf": {"digit": "Z"}}), "bad_dtmf_digit"),
        (js({"event": "start", "stream_sid": sid, "start": {"stream_sid": sid, "call_sid": "again"}}), "duplicate_start"),
        ("[" * 10_000 + "]" * 10_000, "too_deep"),  # once a RecursionError that left the call a zombie
        ('{"event": "media", "media": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001, "too_deep"),
    ]


async def test_a_thousand_malformed_messages_are_dropped_counted_and_the_call_goes_on(bridge, engines):
    """1,000 bad messages of 16 kinds (13 drop reasons) between a call's media messages: each is
    dropped and counted (call_ended's tally, metrics, /stats), the first 5 of each reason and every
    100th are logged with the call id and recorded, and the call, like the one beside it, goes on and completes."""
    total, spread = 1000, 40  # over the first 4 s of the call, between its media messages
    kinds = malformed("MZ-flood")
    junk = [kinds[i % len(kinds)] for i in range(total)]
    expected = Counter(reason for _, reason in junk)
    script = bystander()
    script.junk = {k: [raw for raw, _ in junk[k::spread]] for k in range(spread)}
    warnings = []
    sink = logger.add(lambda m: warnings.append(m.record), level="WARNING", format="{message}")
    try:
        b = await bridge([(await engines()).url, (await engines()).url])
        baseline(b)
        flood, other = await asyncio.wait_for(asyncio.gather(dial(b.url, "flood", script), dial(b.url, "other", bystander())), HANG)
        stats = await b.settled({e.url: "idle" for e in b.server.engines.engines})
        text = (await asyncio.to_thread(fetch, b.port, "/metrics"))[1]
    finally:
        logger.remove(sink)

    # the call went on as if nothing were wrong
    events = b.record("flood")
    undisturbed(flood, events, stats)
    # each message dropped and counted: the record, the call's end, the metrics, the server totals
    assert events[-1]["dropped"] == dict(expected)
    # the record notes them as the log does (the first 5 of each reason, then every 100th), each with its running count
    bad = [e for e in events if e["event"] == "malformed"]
    noted = {r: [k for k in range(1, n + 1) if k <= 5 or k % 100 == 0] for r, n in expected.items()}
    assert {r: [e["count"] for e in bad if e["reason"] == r] for r in expected} == noted
    for reason, n in expected.items():
        assert metric(text, "bridge_malformed_messages_total", reason=reason) == n, reason
    assert stats["dropped_messages"] == total
    assert metric(text, "bridge_calls_total", outcome="completed") == 2
    other_events = b.record("other")
    undisturbed(other, other_events, stats)
    assert "malformed" not in names(other_events) and other_events[-1]["dropped"] == {}
    # logged with the call id, but not each one: the first 5 of each reason, then every 100th
    dropped_lines = [r for r in warnings if ": dropped " in r["message"]]
    assert all("call flood:" in r["message"] and r["extra"].get("call_id") == "flood" for r in dropped_lines)
    assert len(dropped_lines) == sum(sum(1 for k in range(1, n + 1) if k <= 5 or k % 100 == 0) for n in expected.values())
    print(f"\n{total} malformed messages ({len(expected)} reasons): {len(dropped_lines)} warning lines, "
          f"{len(bad)} record lines, {len(warnings)} warnings in all")


# --- subprocess servers ----------------------------------------------------------------------------


def process_counts(pid: int) -> tuple[int, int]:
    """(open fds, threads) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return len(os.listdir(f"/proc/{pid}/fd")), int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


FD_SLACK, THREAD_SLACK = 2, 1


@contextmanager
def served(tmp_path: Path, urls: list[str], **personaplex):
    """`python -m pipelines run` on the fault deployment with these engines; its output drained."""
    records = tmp_path / "records"
    path = deployment_file(tmp_path, records, urls, **personaplex)
    port = free_port()
    with launched(run_command(path, port), port) as srv:
        srv.output = drain(srv.proc)
        srv.records = records
        yield srv


async def warmed_up(srv, n: int) -> tuple[int, int]:
    """n short calls at once (threads and fds the server keeps once it has seen that many calls),
    then the server's fd and thread counts: the baseline."""
    calls = await asyncio.wait_for(asyncio.gather(*(dial(srv.url(), f"warm-{i}", Script(hang_up_at=1.0)) for i in range(n))), HANG)
    assert all(c.result.close_code == 1000 for c in calls)
    await idle_stats(srv.port, HANG)
    return process_counts(srv.proc.pid)


async def back_to(srv, base: tuple[int, int]) -> tuple[int, int]:
    fds, threads = base
    try:
        await until(lambda: (lambda c: c[0] <= fds + FD_SLACK and c[1] <= threads + THREAD_SLACK)(process_counts(srv.proc.pid)), timeout=10)
    except TimeoutError:
        pass
    now = process_counts(srv.proc.pid)
    assert now[0] <= fds + FD_SLACK and now[1] <= threads + THREAD_SLACK, (base, now)
    return now


# --- 6. fifty calls in the same second ------------------------------------------------------------


async def test_fifty_calls_arriving_together_all_hear_audio_and_end_cleanly(tmp_path):
    """50 calls dialled at once at a bridge process with 50 engines (one engine process): each caller
    hears audio, says a word, hangs up, and gets a normal close; the server is back to its baseline.
    The first-audio times are printed, not judged."""
    n = 50
    ports = free_ports(n)
    urls = [f"ws://127.0.0.1:{p}" for p in ports]
    # Fifty engines, the bridge and fifty callers are more than two cores can run in real time: the engine
    # process falls behind by seconds, and the 2 s silence watchdog would take starved engines for dead.
    with engine_process(ports), served(tmp_path, urls, silence_timeout_secs=15.0) as srv:
        base = await warmed_up(srv, 8)
        calls = await asyncio.wait_for(asyncio.gather(*(
            dial(srv.url(), f"burst-{i:02d}", Script(hang_up_at=3.0).say(WORD, 1.5)) for i in range(n))), 3 * HANG)
        stats = await idle_stats(srv.port, HANG)
        assert stats["calls_active"] == 0 and stats["connections"] == 0
        after = await back_to(srv, base)
        text = (await asyncio.to_thread(fetch, srv.port, "/metrics"))[1]

    records = every_record(srv.records)
    firsts = {c.sid: c.first_audio() for c in calls}
    print(f"\nfirst audio of {n} calls arriving together (bridge: `start` to its first audio sent; caller: "
          "its first audible 100 ms, the prompt clip's lead-in included):")
    for call in calls:
        sent = next((e["ms"] for e in records[call.sid] if e["event"] == "first_audio"), None)
        heard = firsts[call.sid]
        print(f"  {call.sid}: bridge {sent} ms, caller {'none' if heard is None else f'{heard:.2f} s'}")
    print(f"server fds, threads: {base} after warm-up, {after} after the burst")
    assert all(t is not None for t in firsts.values()), firsts  # everyone heard something
    assert len(records) == n + 8
    for call in calls:
        assert call.result.violations == [], (call.sid, call.result.violations)
        assert call.stopped and call.result.close_code == 1000, call.sid
        assert outcome(records[call.sid]) == "completed", call.sid
    assert set(engine_states(stats).values()) == {"idle"}
    assert metric(text, "bridge_calls_total", outcome="completed") == n + 8


# --- 7. SIGKILL of an engine process during ten calls ----------------------------------------------


async def test_sigkill_of_an_engine_process_ends_its_calls_with_the_apology_and_spares_the_rest(tmp_path):
    """10 calls on a bridge process whose 10 engines live in two engine processes; one is SIGKILLed.
    Its 5 calls hear the apology and are hung up (engine_failed), its engines leave the rotation; the
    other 5 talk on, hear their echo and hang up themselves; the server is back to its baseline."""
    ports = free_ports(10)
    killed_ports, kept_ports = ports[:5], ports[5:]
    urls = [f"ws://127.0.0.1:{p}" for p in ports]
    with engine_process(killed_ports) as doomed, engine_process(kept_ports), served(tmp_path, urls) as srv:
        base = await warmed_up(srv, 10)
        scripts = {f"call-{i}": Script() for i in range(10)}
        calls = [asyncio.create_task(dial(srv.url(), sid, s)) for sid, s in scripts.items()]
        await until(lambda: sum(1 for sid in scripts if "engine_ready" in live_events(srv.records, sid)) == 10, timeout=HANG)
        engine_of = {e["call_id"]: int(e["url"].rsplit(":", 1)[1]) for e in (await asyncio.to_thread(server_stats, srv.port))["engines"]}
        victims = {sid for sid in scripts if engine_of[sid] in killed_ports}
        assert len(victims) == 5
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        for sid, script in scripts.items():
            if sid not in victims:  # the others talk on after the kill, then hang up themselves
                script.say(WORD, script.now() + 1.0)
                script.hang_up_at = script.now() + 3.5
        calls = {c.sid: c for c in await asyncio.wait_for(asyncio.gather(*calls), HANG)}
        stats = await idle_stats(srv.port, HANG)
        assert stats["calls_active"] == 0 and stats["connections"] == 0
        after = await back_to(srv, base)
        text = (await asyncio.to_thread(fetch, srv.port, "/metrics"))[1]

    print(f"\nserver fds, threads: {base} after warm-up, {after} after the kill")
    states = engine_states(stats)
    assert {u: s for u, s in states.items() if int(u.rsplit(":", 1)[1]) in killed_ports} == {f"ws://127.0.0.1:{p}": "down" for p in killed_ports}
    assert {u: s for u, s in states.items() if int(u.rsplit(":", 1)[1]) in kept_ports} == {f"ws://127.0.0.1:{p}": "idle" for p in kept_ports}
    records = every_record(srv.records)
    assert len(records) == 10 + 10
    for sid, call in calls.items():
        events = records[sid]
        if sid in victims:
            apologised(call, events, stats, "engine_failed", "engine_ready", "engine_failed")
        else:
            undisturbed(call, events, stats, said_at=scripts[sid].says[-1][0] / RATE)
    assert metric(text, "bridge_calls_total", outcome="engine_failed") == 5
    assert metric(text, "bridge_calls_total", outcome="completed") == 5 + 10
    assert metric(text, "bridge_engines_down") == 5

