"""The engine pool against real reference engines over loopback: leases, FIFO waiting, failover, recovery.

No timing thresholds: the tests compare orders and counts; timeouts only keep a broken pool from hanging.
"""

import asyncio
import random

import numpy as np
import pytest
from pipecat.frames.frames import ErrorFrame, InputAudioRawFrame, SpeechOutputAudioRawFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pydantic import ValidationError

from pipelines.bench.launch import free_port, free_ports
from pipelines.sim.engine import EngineOptions, ReferenceEngine
from processors.personaplex.pool import EnginePool, NoEngine, PoolParams, State
from processors.personaplex.pools import EnginePools
from processors.personaplex.processor import PersonaPlexParams, PersonaPlexProcessor
from processors.personaplex.session import EngineUnreachable, open_session
from transports.frames import CallInfo, EngineEventFrame

RATE = 24000
FRAME = RATE // 50  # 20 ms
HANG = 20.0  # only against hangs; nothing here should come near it
LEASE_EVENTS = {"engine_acquired", "engine_failed", "engine_ready", "engine_released"}


@pytest.fixture
async def engines():
    """`await engines(n, port=0, **options)`: that many reference engines, all stopped afterwards."""
    started = []

    async def start(n=1, port=0, **options):
        out = []
        for _ in range(n):
            engine = ReferenceEngine(EngineOptions(**{"handshake_delay_secs": 0.1, "echo_delay_secs": 0.2, **options}))
            await engine.start("127.0.0.1", port)
            started.append(engine)
            out.append(engine)
        return out

    yield start
    for engine in started:
        await engine.stop()


@pytest.fixture
async def pools():
    """`pools(urls, **params)`: an EnginePool closed afterwards, with no probe task left behind."""
    made = []

    def make(urls, probe=None, **params):
        pool = EnginePool(PoolParams(urls=urls, **params), probe=probe)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("engine-probe-") and not t.done()]
    assert not left, left


def paced(seconds):
    """Silence in 20 ms frames with 20 ms sleeps between them, as a provider delivers it."""
    pcm = np.zeros(int(seconds * RATE), np.int16)
    out = []
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        out += [InputAudioRawFrame(audio=pcm[i : i + FRAME].tobytes(), sample_rate=RATE, num_channels=1), SleepFrame(sleep=0.02)]
    return out


def call_params():
    return PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000,
                          start_metadata=CallInfo("test", "pool-call", "pool-call", 8000).start_metadata())


def lease_events(down):
    return [(f.event, f.url) for f in down if isinstance(f, EngineEventFrame) and f.event in LEASE_EVENTS]


async def until(condition, timeout=HANG):
    """Poll `condition` every 10 ms; fail (rather than hang) if it never holds."""
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def handshake(url):
    ws = await open_session(url, "NATF0.pt", "Say nothing.", timeout=HANG)
    await ws.close()


def consistent(pool):
    assert pool.count(State.IDLE) + pool.count(State.BUSY) + pool.count(State.DOWN) == pool.size
    for e in pool.engines:
        assert (e.call_id is not None) == (e.state is State.BUSY), e


# --- 1. allocation --------------------------------------------------------------------------


async def test_each_call_gets_its_own_engine_and_the_least_recently_used_comes_next(engines, pools):
    live = await engines(3)
    pool = pools([e.url for e in live])
    got = [await pool.acquire(f"call-{i}") for i in range(3)]
    assert got == pool.engines  # a fresh pool hands them out in list order (idle_since = construction)
    assert len({id(e) for e in got}) == 3 and [e.call_id for e in got] == ["call-0", "call-1", "call-2"]
    assert pool.count(State.BUSY) == 3 and pool.count(State.IDLE) == 0
    # each lease is a distinct real engine: one handshake on each
    await asyncio.gather(*(handshake(e.url) for e in got))
    await until(lambda: [r.stats.handshakes for r in live] == [1, 1, 1])  # counted just after it is sent

    for e in (got[2], got[0], got[1]):  # not list order
        pool.release(e)
        await asyncio.sleep(0.001)  # distinct idle_since stamps
    assert pool.count(State.IDLE) == 3 and all(e.call_id is None for e in got)
    again = [await pool.acquire(f"again-{i}") for i in range(3)]
    assert again == [got[2], got[0], got[1]]  # longest idle first
    pool.release(again[1])
    assert await pool.acquire("only-idle") is again[1]
    assert pool.stats["leases"] == 7 and pool.stats["waits"] == 0
    consistent(pool)


# --- 2. exhaustion and waiting ----------------------------------------------------------------


async def test_waiters_are_served_first_come_first_served(engines, pools):
    live = await engines(2)
    pool = pools([e.url for e in live], wait_secs=60)
    a, b = await pool.acquire("a"), await pool.acquire("b")
    served = []

    async def wait(name):
        engine = await pool.acquire(name)
        served.append((name, engine))
        return engine

    tasks = []
    for i, name in enumerate(["w1", "w2", "w3"]):
        tasks.append(asyncio.create_task(wait(name)))
        await until(lambda i=i: pool.stats["waits"] == i + 1)  # queued before the next one asks
    assert not served and pool.count(State.BUSY) == 2

    pool.release(b)
    await until(lambda: len(served) == 1)
    pool.release(a)
    await until(lambda: len(served) == 2)
    pool.release(served[0][1])  # w1 hangs up: its engine goes to w3
    await until(lambda: len(served) == 3)
    assert [name for name, _ in served] == ["w1", "w2", "w3"]
    assert [e for _, e in served] == [b, a, b]
    assert [e.call_id for _, e in served[1:]] == ["w2", "w3"]
    await asyncio.gather(*tasks)
    assert pool.stats["waits"] == 3 and pool.stats["leases"] == 5 and pool.stats["no_engine"] == 0
    consistent(pool)


async def test_a_call_that_waits_too_long_gets_no_engine(engines, pools):
    (live,) = await engines(1)
    pool = pools([live.url], wait_secs=0.3)
    held = await pool.acquire("holder")
    with pytest.raises(NoEngine, match="busy"):
        await asyncio.wait_for(pool.acquire("late"), HANG)
    with pytest.raises(NoEngine, match="busy"):
        await asyncio.wait_for(pool.acquire("later", timeout=0), HANG)
    assert pool.stats["no_engine"] == 2 and pool.stats["waits"] == 2
    assert held.state is State.BUSY and held.call_id == "holder"
    pool.release(held)  # the callers who gave up do not get it
    assert held.state is State.IDLE and held.call_id is None
    assert await pool.acquire("next") is held
    consistent(pool)


async def held_with_two_waiters(engines, pools):
    """One engine, held by "holder"; "gone" then "stays" queue for it."""
    (live,) = await engines(1)
    pool = pools([live.url], wait_secs=60)
    held = await pool.acquire("holder")
    gone = asyncio.create_task(pool.acquire("gone"))
    await until(lambda: pool.stats["waits"] == 1)
    stays = asyncio.create_task(pool.acquire("stays"))
    await until(lambda: pool.stats["waits"] == 2)
    return pool, held, gone, stays


async def test_a_cancelled_waiter_does_not_leak_the_engine(engines, pools):
    pool, held, gone, stays = await held_with_two_waiters(engines, pools)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert held.call_id == "holder" and pool.count(State.BUSY) == 1
    pool.release(held)
    assert await asyncio.wait_for(stays, HANG) is held and held.call_id == "stays"
    consistent(pool)
    pool.release(held)
    assert pool.count(State.IDLE) == 1 and pool.count(State.BUSY) == 0
    consistent(pool)


async def test_a_waiter_cancelled_right_after_the_hand_over_passes_the_engine_on(engines, pools):
    """The engine is handed over, and the call hangs up before it runs: the next waiter gets it, and
    the hung-up call really ends cancelled (it must not go on holding the engine unseen)."""
    pool, held, gone, stays = await held_with_two_waiters(engines, pools)

    pool.release(held)  # leased to "gone" ...
    assert held.call_id == "gone"
    gone.cancel()  # ... which hangs up before it runs
    outcome = (await asyncio.gather(gone, return_exceptions=True))[0]
    assert isinstance(outcome, asyncio.CancelledError), outcome
    assert await asyncio.wait_for(stays, HANG) is held and held.call_id == "stays"
    pool.release(held)
    assert pool.count(State.IDLE) == 1
    consistent(pool)

    # the same with no one behind it: back to idle
    held = await pool.acquire("holder")
    gone = asyncio.create_task(pool.acquire("gone"))
    await until(lambda: pool.stats["waits"] == 3)
    pool.release(held)
    gone.cancel()
    assert isinstance((await asyncio.gather(gone, return_exceptions=True))[0], asyncio.CancelledError)
    assert held.state is State.IDLE and held.call_id is None
    consistent(pool)


# --- 3. never two calls on one engine ---------------------------------------------------------


async def test_never_two_calls_on_one_engine(engines, pools):
    live = await engines(3)
    pool = pools([e.url for e in live], wait_secs=60)
    rng = random.Random(1234)
    holds = [rng.uniform(0.0, 0.15) for _ in range(12)]
    holder: dict[str, str | None] = {e.url: None for e in live}
    log = []  # (url, "acquire"|"release", call) in the order it happened

    async def call(i):
        name = f"call-{i}"
        engine = await pool.acquire(name)
        assert holder[engine.url] is None, f"{name} got {engine.url} while {holder[engine.url]} held it"
        holder[engine.url] = name
        log.append((engine.url, "acquire", name))
        await handshake(engine.url)  # a real session on the leased engine
        await asyncio.sleep(holds[i])
        assert engine.call_id == name and holder[engine.url] == name
        holder[engine.url] = None
        log.append((engine.url, "release", name))
        pool.release(engine)
        return engine.url

    urls = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(12))), 60)
    assert len(urls) == 12  # every call got an engine
    for e in live:
        mine = [(what, name) for url, what, name in log if url == e.url]
        assert [what for what, _ in mine] == ["acquire", "release"] * (len(mine) // 2), mine
        assert all(mine[k][1] == mine[k + 1][1] for k in range(0, len(mine), 2)), mine
    await until(lambda: sum(r.stats.handshakes for r in live) == 12)
    assert pool.stats["leases"] == 12 and pool.stats["waits"] == 9  # 3 at once, 9 queued
    assert pool.count(State.IDLE) == 3
    consistent(pool)


# --- 4./5. failover through the processor -----------------------------------------------------


async def test_call_fails_over_from_a_dead_engine_to_a_live_one(engines, pools):
    (live,) = await engines(1)
    dead = f"ws://127.0.0.1:{free_port()}"
    pool = pools([dead, live.url])
    assert pool.engines[0].idle_since <= pool.engines[1].idle_since  # so the dead one is tried first
    processor = PersonaPlexProcessor(PersonaPlexParams(connect_timeout_secs=2.0), engines=pool)
    down, up = await asyncio.wait_for(run_test(processor, frames_to_send=paced(1.5), pipeline_params=call_params()), 60)

    assert not [f for f in up if isinstance(f, ErrorFrame)], up
    assert [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert lease_events(down) == [("engine_acquired", dead), ("engine_failed", dead), ("engine_acquired", live.url),
                                  ("engine_ready", live.url), ("engine_released", live.url)]
    gone, good = pool.engines
    assert gone.state is State.DOWN and gone.failures == 1 and "cannot connect" in gone.last_error
    assert good.state is State.IDLE and good.failures == 0
    assert pool.stats["failures"] == 1 and pool.stats["leases"] == 2 and pool.available
    assert live.stats.handshakes == 1 and processor.stats["engine"] == live.url


async def test_call_fails_over_from_an_engine_whose_handshake_never_comes(engines, pools):
    (slow,) = await engines(1, handshake_delay_secs=60)
    (live,) = await engines(1)
    pool = pools([slow.url, live.url])
    processor = PersonaPlexProcessor(PersonaPlexParams(handshake_timeout_secs=0.5), engines=pool)
    down, up = await asyncio.wait_for(run_test(processor, frames_to_send=paced(1.5), pipeline_params=call_params()), 60)

    assert not [f for f in up if isinstance(f, ErrorFrame)], up
    assert [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert lease_events(down) == [("engine_acquired", slow.url), ("engine_failed", slow.url), ("engine_acquired", live.url),
                                  ("engine_ready", live.url), ("engine_released", live.url)]
    assert pool.engines[0].state is State.DOWN and "handshake" in pool.engines[0].last_error
    assert pool.engines[1].state is State.IDLE
    assert slow.stats.connections == 1 and slow.stats.handshakes == 0 and live.stats.handshakes == 1


# --- 6. recovery --------------------------------------------------------------------------------


async def test_a_failed_engine_is_probed_back_into_rotation(engines, pools):
    port = free_port()
    pool = pools([f"ws://127.0.0.1:{port}"], retry_secs=0.2, probe_timeout_secs=2)
    available = [pool.available]
    engine = await pool.acquire("call")
    with pytest.raises(EngineUnreachable) as unreachable:  # the call's own connect fails ...
        await open_session(engine.url, "NATF0.pt", "Hello.", timeout=2)
    pool.failed(engine, str(unreachable.value))  # ... so it takes the engine out, as the processor does
    available.append(pool.available)
    assert engine.state is State.DOWN and engine.call_id is None
    with pytest.raises(NoEngine, match="no engine in rotation"):
        await asyncio.wait_for(pool.acquire("meanwhile"), HANG)

    await until(lambda: engine.last_error.startswith("probe:"))  # probed while nothing listens: stays out
    assert engine.state is State.DOWN and pool.stats["recoveries"] == 0
    (revived,) = await engines(1, port=port)  # the engine comes back on the same port
    await until(lambda: engine.state is State.IDLE)
    available.append(pool.available)
    assert available == [True, False, True]
    assert pool.stats["recoveries"] == 1 and pool.stats["failures"] == 1 and engine.failures == 1
    await until(lambda: revived.stats.handshakes == 1)  # the probe made a full handshake
    again = await pool.acquire("after")
    assert again is engine
    await handshake(again.url)
    consistent(pool)


async def test_a_recovered_engine_goes_to_the_longest_waiter(engines, pools):
    (b,) = await engines(1)
    port = free_port()
    pool = pools([f"ws://127.0.0.1:{port}", b.url], retry_secs=0.2, probe_timeout_secs=2, wait_secs=60)
    down, busy = pool.engines
    pool.failed(down, "test")
    assert await pool.acquire("holder") is busy
    waiter = asyncio.create_task(pool.acquire("waiter"))
    await until(lambda: pool.stats["waits"] == 1)
    await engines(1, port=port)
    got = await asyncio.wait_for(waiter, HANG)
    assert got is down and down.state is State.BUSY and down.call_id == "waiter"
    assert busy.call_id == "holder" and pool.stats["recoveries"] == 1
    consistent(pool)


async def test_probe_failures_keep_an_engine_out_until_one_succeeds_and_close_stops_probing(pools):
    """An injected probe: fails three times, then answers; a second engine's probe never returns."""
    calls = []
    never = asyncio.Event()

    async def probe(url, timeout):
        calls.append((url, timeout))
        if url.endswith(":2"):
            await never.wait()
        if sum(u == url for u, _ in calls) <= 3:
            raise ConnectionRefusedError("not yet")

    pool = pools(["ws://a:1", "ws://b:2"], probe=probe, retry_secs=0.01, probe_timeout_secs=7)
    first, second = pool.engines
    pool.failed(first, "test")
    pool.failed(first, "again")  # already out: counted once
    pool.failed(second, "test")
    assert not pool.available and pool.stats["failures"] == 2
    await until(lambda: first.state is State.IDLE)
    assert [c for c in calls if c[0] == "ws://a:1"] == [("ws://a:1", 7)] * 4
    assert pool.stats["recoveries"] == 1 and first.failures == 1 and "not yet" in first.last_error
    await until(lambda: ("ws://b:2", 7) in calls)
    await pool.close()  # cancels the probe stuck on the second engine
    assert second.state is State.DOWN and pool.available


# --- 7. all engines down ----------------------------------------------------------------------


async def test_with_every_engine_down_a_call_fails_at_once(pools):
    dead = [f"ws://127.0.0.1:{p}" for p in free_ports(2)]
    pool = pools(dead, wait_secs=3600)
    processor = PersonaPlexProcessor(PersonaPlexParams(connect_timeout_secs=2.0), engines=pool)
    down, up = await asyncio.wait_for(run_test(processor, frames_to_send=paced(0.5), pipeline_params=call_params()), 60)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "no engine in rotation" in errors[0].error, errors
    assert lease_events(down) == [("engine_acquired", dead[0]), ("engine_failed", dead[0]),
                                  ("engine_acquired", dead[1]), ("engine_failed", dead[1])]
    assert [e.state for e in pool.engines] == [State.DOWN, State.DOWN] and not pool.available
    with pytest.raises(NoEngine, match="no engine in rotation"):
        await asyncio.wait_for(pool.acquire("another"), HANG)  # no wait for wait_secs
    assert pool.stats["waits"] == 0 and pool.stats["no_engine"] == 2


async def test_waiters_get_no_engine_when_the_last_healthy_engine_fails(engines, pools):
    live = await engines(2)
    pool = pools([e.url for e in live], wait_secs=3600, retry_secs=60)
    first, second = pool.engines
    pool.failed(first, "test")
    assert pool.available
    held = await pool.acquire("holder")
    assert held is second
    waiters = [asyncio.create_task(pool.acquire(f"w{i}")) for i in range(2)]
    await until(lambda: pool.stats["waits"] == 2)
    pool.failed(held, "died mid-call")
    outcomes = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), HANG)
    assert all(isinstance(o, NoEngine) and "no engine in rotation" in str(o) for o in outcomes), outcomes
    assert not pool.available and pool.count(State.DOWN) == 2
    consistent(pool)


# --- 8. a rejected prompt is the call's fault, not the engine's ------------------------------


async def test_a_rejected_prompt_fails_the_call_but_keeps_the_engine(engines, pools):
    (picky,) = await engines(1, voices=["OTHER.pt"])
    pool = pools([picky.url])
    processor = PersonaPlexProcessor(PersonaPlexParams(), engines=pool)  # asks for NATF0.pt
    down, up = await asyncio.wait_for(run_test(processor, frames_to_send=paced(0.8), pipeline_params=call_params()), 60)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "before its handshake" in errors[0].error, errors
    (engine,) = pool.engines
    assert engine.state is State.IDLE and engine.call_id is None and engine.failures == 0
    assert pool.stats["failures"] == 0 and pool.available
    assert picky.stats.rejected == 1
    assert [e for e, _ in lease_events(down)] == ["engine_acquired", "engine_released"]


# --- 9. pools per URL set, and their parameters ------------------------------------------------


async def test_engine_pools_share_one_pool_per_url_list():
    pools = EnginePools(PoolParams(urls="ws://gpu-1:8998, ws://gpu-2:8998", wait_secs=7))
    try:
        deployment = pools.get(None)
        assert [e.url for e in deployment.engines] == ["ws://gpu-1:8998", "ws://gpu-2:8998"]
        assert pools.get("") is deployment
        own = pools.get("ws://a:1,ws://b:2")
        assert own is not deployment and pools.get("ws://a:1, ws://b:2") is own  # one pool, shared by every call
        assert [e.url for e in own.engines] == ["ws://a:1", "ws://b:2"]
        assert own.params.wait_secs == 7  # the deployment's settings, the processor's engines
        assert len(pools.engines) == 4 and pools.available
    finally:
        await pools.close()

    with pytest.raises(ValueError, match="no engine configured"):
        EnginePools(None).get(None)
    assert EnginePools(None).get("ws://x:1").size == 1


def test_pool_params_split_and_validate_urls():
    assert PoolParams(urls="ws://a:1, wss://b:2 ,,").urls == ["ws://a:1", "wss://b:2"]
    assert PoolParams(urls=None).urls == []
    with pytest.raises(ValidationError, match="listed twice"):
        PoolParams(urls="ws://a:1,ws://a:1")
    with pytest.raises(ValidationError, match="must be ws://, wss://"):
        PoolParams(urls=["http://a:1"])
    assert PoolParams(urls="dns+ws://personaplex.ns.svc:8998").urls == ["dns+ws://personaplex.ns.svc:8998"]
    assert PoolParams(lease_store="").lease_store is None  # ${LEASE_STORE:-} unset: the process's own pool
    with pytest.raises(ValidationError, match="redis://"):
        PoolParams(lease_store="localhost:6379")
    with pytest.raises(ValueError, match="at least one"):
        EnginePool(PoolParams())
    with pytest.raises(ValidationError, match="capacity above 1 is served through lease_store"):
        PoolParams(urls="ws://a:1", capacity=2)
    assert PoolParams(urls="ws://a:1", capacity=2, lease_store="redis://r:6379/0").capacity == 2


def test_an_engine_in_two_pools_is_refused():
    pools = EnginePools(PoolParams(urls="ws://a:1,ws://b:2"))
    with pytest.raises(ValueError, match="ws://b:2 are in two pools"):
        pools.get("ws://b:2")


# --- 4. discovery: engines join and leave -----------------------------------------------------


async def test_an_engine_that_joins_serves_the_longest_waiter_and_one_that_leaves_finishes_its_call(engines, pools):
    first, second = await engines(2)
    pool = pools([first.url], wait_secs=60)
    busy = await pool.acquire("a")
    waiting = asyncio.create_task(pool.acquire("b"))
    await until(lambda: pool.stats["waits"] == 1)
    pool.set_urls([first.url, second.url])  # a pod became ready
    joined = await asyncio.wait_for(waiting, HANG)
    assert joined.url == second.url and joined.call_id == "b"
    pool.set_urls([second.url])  # the first pod goes away while its call lasts
    assert [e.url for e in pool.engines] == [second.url] and busy.call_id == "a"
    third = asyncio.create_task(pool.acquire("c"))
    await until(lambda: pool.stats["waits"] == 2)
    pool.release(busy)  # the dropped engine is not handed over
    await asyncio.sleep(0.05)
    assert not third.done()
    pool.release(joined)
    assert (await asyncio.wait_for(third, HANG)).url == second.url
    consistent(pool)


async def test_engine_pools_resolve_dns_entries_at_start():
    port = free_port()
    pools = EnginePools(PoolParams(urls=f"dns+ws://localhost:{port}", discover_secs=3600))
    try:
        assert pools.engines == [] and not pools.available  # nothing resolved before start
        await pools.start()
        assert pools.engines and all(e.url.startswith("ws://") and e.url.endswith(f":{port}") for e in pools.engines)
        assert pools.available
    finally:
        await pools.close()
