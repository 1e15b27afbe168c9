"""A crowd on a small fleet, over loopback: 60 concurrent Exotel calls on 4 reference engines.

4 calls get an engine; the other 56 hear the holding clip while they queue (engine `wait_secs`, short
here), then the apology, and the server closes their sockets cleanly. Once every call is gone, the
process is back where it started: file descriptors, threads and memory. Every loop is bounded."""

import asyncio
import base64
import gc
import json
import os
import textwrap
import threading
import time

import numpy as np
import websockets

from pipelines import builder, config
from pipelines.server import CallServer
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.audio import write_wav

ENGINES = 4
CALLS = 60
RATE = 8000  # Exotel's default call rate
WAIT_SECS = 1.5  # a queued call hears the holding clip this long, then the apology
CHUNK = base64.b64encode(bytes(RATE // 5 * 2)).decode()  # 200 ms of silence: callers stream it, as providers do

# Short tones stand in for the shipped clips (4.6 s and 5.7 s) so the 56 apologies, paced in real
# time, take under a second; distinct pitches so neither clip can pass for the other.
DEPLOYMENT = """
transport: {type: exotel, params: {path: /exotel}}
engine: {wait_secs: WAIT}
records: {dir: RECORDS}
processors:
  - type: resample
    params: {audio: input, rate: 24000}
  - type: personaplex
    params: {silence_timeout_secs: 15}   # a holder's engine keeps its call on a loaded 2-core machine
  - type: resample
    params: {audio: output, rate: call}
  - type: holding
    params:
      clips: {hold: hold.wav, sorry: sorry.wav}
      prompt_clip: hold
      prompt_repeat_secs: 30   # once per queued call, however late a loaded loop runs the 1.5 s wait
      slow_clip: null
      apology_clip: sorry
  - type: pacer
"""


def tone(hz: float, secs: float, rate: int = 24000) -> np.ndarray:
    t = np.arange(int(secs * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def start(sid: str) -> str:
    return json.dumps({"event": "start", "stream_sid": sid, "start": {"stream_sid": sid, "call_sid": sid}})


class Caller:
    """One Exotel caller: streams silence until the server hangs up, or sends `stop` once `release` is set."""

    def __init__(self, port: int, sid: str, release: asyncio.Event):
        self.url, self.sid, self.release = f"ws://127.0.0.1:{port}/exotel", sid, release
        self.heard = bytearray()  # the bot's audio, as the caller would play it
        self.sent_stop = False
        self.closed_by_server = False
        self.close_code: int | None = None

    async def call(self) -> "Caller":
        async with websockets.connect(self.url, open_timeout=20) as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(start(self.sid))
            sender = asyncio.create_task(self._stream(ws))
            try:
                async for message in ws:
                    event = json.loads(message)
                    if event["event"] == "media":
                        self.heard += base64.b64decode(event["media"]["payload"])
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            rcvd = ws.protocol.close_rcvd  # the server's close frame, and whether it came first
            self.closed_by_server = rcvd is not None and bool(ws.protocol.close_rcvd_then_sent)
            self.close_code = rcvd.code if rcvd else None
        return self

    async def _stream(self, ws) -> None:
        media = json.dumps({"event": "media", "stream_sid": self.sid, "media": {"payload": CHUNK}})
        try:
            while not self.release.is_set():
                await ws.send(media)
                try:
                    await asyncio.wait_for(self.release.wait(), 0.2)
                except TimeoutError:
                    pass
            self.sent_stop = True
            await ws.send(json.dumps({"event": "stop", "stream_sid": self.sid, "stop": {"call_sid": self.sid}}))
        except websockets.ConnectionClosed:
            pass


async def settle(server, engines, secs: float) -> None:
    """Until no call, connection or engine session is left, at most `secs`."""
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline and (server.calls or server.connections or any(e.stats.sessions_active for e in engines)):
        await asyncio.sleep(0.05)


async def test_sixty_calls_on_four_engines_queue_hear_the_apology_and_leave_nothing_behind(tmp_path):
    write_wav(tmp_path / "hold.wav", tone(440, 0.4), 24000)
    write_wav(tmp_path / "sorry.wav", tone(660, 0.6), 24000)
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT).replace("RECORDS", str(tmp_path / "records")).replace("WAIT", str(WAIT_SECS)))
    plan = builder.plan(config.load(path, {}))
    [bank] = [p.prepared for p in plan.processors if p.entry.name == "holding"]
    hold, sorry = bank.get("hold", RATE), bank.get("sorry", RATE)

    engines = [ReferenceEngine(EngineOptions(handshake_delay_secs=0.1)) for _ in range(ENGINES)]
    urls = [await e.start("127.0.0.1", 0) for e in engines]
    pools = builder.engine_pools(plan, plan.loaded.config.engine.model_copy(update={"urls": urls}))
    server = CallServer(plan, pools, "127.0.0.1", 0)
    await server.start()
    try:
        # Warm-up: one call served start to finish, so that what loads lazily on a first call (codecs,
        # resamplers, pipecat's modules) is loaded before the baseline.
        release = asyncio.Event()
        warm = asyncio.create_task(Caller(server.port, "warm-up", release).call())
        deadline = time.monotonic() + 15  # until audio has gone through the engine both ways (Opus up and down)
        while not any(e.stats.frames_in and e.stats.frames_out for e in engines) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        release.set()
        warm = await asyncio.wait_for(warm, 15)
        assert warm.closed_by_server
        await settle(server, engines, 10)
        gc.collect()
        base_fds, base_threads, base_rss = fds(), threading.active_count(), rss_mb()

        release = asyncio.Event()
        callers = [Caller(server.port, f"crowd-{i:02d}", release) for i in range(CALLS)]
        tasks = [asyncio.create_task(c.call()) for c in callers]
        deadline = time.monotonic() + 40
        while sum(t.done() for t in tasks) < CALLS - ENGINES and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        release.set()  # the 4 with an engine hang up; all others should be gone by now
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        assert not pending, f"{len(pending)} calls still up at the deadline"
        for t in done:
            t.result()  # a caller that failed raises here
        await settle(server, engines, 10)
        assert not server.calls and not server.connections

        # The records: who got an engine, who queued, what each heard.
        records = {}
        for record in (tmp_path / "records").iterdir():
            events = [json.loads(line) for line in (record / "events.jsonl").read_text().splitlines()]
            records[events[0]["call_id"]] = events
        assert len(records) == CALLS + 1

        served = [c for c in callers if c.sent_stop]
        queued = [c for c in callers if not c.sent_stop]
        assert len(served) == ENGINES and len(queued) == CALLS - ENGINES
        for c in served:
            events = records[c.sid]
            names = [e["event"] for e in events]
            assert "engine_ready" in names and "no_engine" not in names and "apology" not in names, (c.sid, names)
            assert events[-1]["outcome"] == "completed" and c.closed_by_server
        for c in queued:
            events = records[c.sid]
            names = [e["event"] for e in events]
            clips = [e["clip"] for e in events if e["event"] == "holding"]
            assert "engine_acquired" not in names and "engine_waiting" in names, (c.sid, names)
            assert clips == ["hold", "sorry"] and names.index("no_engine") < names.index("apology"), (c.sid, names)
            assert events[-1]["event"] == "call_ended" and events[-1]["outcome"] == "no_engine"
            # What the caller heard: the holding clip whole, then the apology whole, then the server's close.
            heard = bytes(c.heard)
            at_hold, at_sorry = heard.find(hold), heard.find(sorry)
            assert at_hold == 0 and at_sorry >= len(hold), (c.sid, len(heard), at_hold, at_sorry)
            assert not heard[at_sorry + len(sorry):].strip(b"\x00"), "nothing but padding after the apology"
            assert c.closed_by_server and c.close_code == 1000, (c.sid, c.close_code)
        outcomes = [r["outcome"] for r in server.recent]  # the last RECENT_CALLS (50) only
        assert set(outcomes) <= {"completed", "no_engine"} and outcomes.count("completed") <= ENGINES + 1
        assert server.totals["calls_total"] == CALLS + 1
        assert sum(e.stats.sessions_started for e in engines) == ENGINES + 1  # the warm-up's, then one per holder
        assert all(e["state"] == "idle" for e in server.engines.snapshot())

        # Everything the crowd held is released. Sockets close on both ends (the engines' side of a
        # session a moment after ours): poll, bounded, then compare.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (fds() > base_fds or threading.active_count() > base_threads):
            await asyncio.sleep(0.1)
        gc.collect()
        after_fds, after_threads, after_rss = fds(), threading.active_count(), rss_mb()
        print(f"fds {base_fds} -> {after_fds}, threads {base_threads} -> {after_threads}, RSS {base_rss:.0f} -> {after_rss:.0f} MB")
        assert after_fds <= base_fds + 2, f"file descriptors {base_fds} -> {after_fds}"
        assert after_threads <= base_threads + 2, f"threads {base_threads} -> {after_threads}"
        # RSS: CPython's and glibc's allocators keep freed arenas mapped, so the high-water mark of 60
        # live pipelines stays in RSS though nothing holds it. Measured here: +24 MB after the first
        # crowd, then flat (within 4 MB) over 7 more crowds on the same server: retention, not a leak.
        # 64 MB leaves room for a noisy shared machine and for allocator luck; what the check catches
        # is the gross case, e.g. every call's pipeline or audio kept alive.
        assert after_rss <= base_rss + 64, f"RSS {base_rss:.0f} -> {after_rss:.0f} MB"
    finally:
        await server.stop()
        for e in engines:
            await e.stop()
