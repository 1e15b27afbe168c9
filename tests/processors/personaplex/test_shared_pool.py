"""The shared engine pool against a real redis-server, with several pools in one process standing for bridge replicas.

No mocks and no timing thresholds: the tests compare orders, counts and holders; timeouts only keep a broken pool from hanging.
"""

import asyncio
import random
import shutil

import pytest
import redis.asyncio as aioredis

from processors.personaplex.pool import NoEngine, PoolParams, State
from processors.personaplex.shared_pool import SharedEnginePool

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH: the shared pool's tests need a real Redis")

HANG = 20.0  # only against hangs; nothing here should come near it


def urls(n: int) -> list[str]:
    return [f"ws://engine-{i}.test:8998" for i in range(n)]


async def never_probed(url, timeout):
    raise AssertionError(f"{url} probed")


@pytest.fixture
async def replicas(redis_server):
    """`replicas(n, engine_urls, **kwargs)`: n SharedEnginePools on one Redis, started, closed afterwards."""
    made = []

    async def make(n, engine_urls, *, probe=never_probed, wait_secs=HANG, retry_secs=5.0, **kwargs):
        params = PoolParams(urls=engine_urls, wait_secs=wait_secs, retry_secs=retry_secs)
        out = [SharedEnginePool(params, redis_server.url, replica=f"r{len(made) + i}", probe=probe, **kwargs) for i in range(n)]
        for pool in out:
            await pool.start()
        made.extend(out)
        return out

    yield make
    for pool in made:
        if pool._tasks or pool._pending:
            await pool.close()


@pytest.fixture
async def store(redis_server):
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def until(condition, what: str):
    async with asyncio.timeout(HANG):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def until_async(condition, what: str):
    async with asyncio.timeout(HANG):
        while not await condition():
            await asyncio.sleep(0.01)


async def test_no_double_booking_across_replicas(replicas):
    pools = await replicas(3, urls(4))
    in_use: set[str] = set()
    served = []
    tokens: dict[str, list[int]] = {}

    async def call(i):
        pool = pools[i % 3]
        engine = await pool.acquire(f"call-{i}")
        assert engine.url not in in_use, f"{engine.url} leased twice"
        assert engine.state is State.BUSY and engine.call_id == f"call-{i}"
        in_use.add(engine.url)
        tokens.setdefault(engine.url, []).append(engine.token)
        await asyncio.sleep(random.uniform(0, 0.01))
        in_use.discard(engine.url)
        pool.release(engine)
        served.append(i)

    async with asyncio.timeout(HANG * 3):
        await asyncio.gather(*(call(i) for i in range(40)))
    assert sorted(served) == list(range(40))
    assert sum(p.stats["leases"] for p in pools) == 40
    assert sum(p.stats["waits"] for p in pools) > 0  # 40 callers on 4 engines: some waited
    for url, seen in tokens.items():
        assert seen == sorted(seen) and len(set(seen)) == len(seen), url


async def test_fifo_across_replicas(replicas, store):
    pools = await replicas(3, urls(1))
    first = await pools[0].acquire("holder")
    order, tasks = [], []
    queue = pools[0]._queue

    async def call(i):
        engine = await pools[i % 3].acquire(f"call-{i}")
        order.append(i)
        pools[i % 3].release(engine)

    for i in range(9):  # each enqueued before the next arrives, on replicas 0, 1, 2, 0, ...
        tasks.append(asyncio.create_task(call(i)))
        await until_async(lambda n=i + 1: _queued(store, queue, n), f"caller {i} queued")
    pools[0].release(first)
    async with asyncio.timeout(HANG):
        await asyncio.gather(*tasks)
    assert order == list(range(9))


async def _queued(store, key, n) -> bool:
    return await store.zcard(key) == n


async def test_a_dead_waiter_is_skipped(replicas, store):
    (pool,) = await replicas(1, urls(1))
    await store.zadd(pool._queue, {"ghost": 1})  # a waiter whose replica died: its heartbeat expires and nobody renews it
    await store.set(f"{pool.prefix}:w:ghost", "1", px=300)
    engine = await pool.acquire("after-the-ghost", timeout=HANG)
    assert pool.stats["waits"] == 1  # it queued behind the ghost, then took the engine
    assert await store.zrange(pool._queue, 0, -1) == []
    pool.release(engine)


async def test_fencing_token_grows_per_engine_across_replicas(replicas):
    pools = await replicas(2, urls(2))
    seen: dict[str, list[int]] = {}
    for i in range(12):
        pool = pools[i % 2]
        engine = await pool.acquire(f"call-{i}")
        seen.setdefault(engine.url, []).append(engine.token)
        pool.release(engine)
        await asyncio.gather(*pool._pending)
    assert set(seen) == set(urls(2))  # least recently released first: both engines in turn
    for url, tokens in seen.items():
        assert all(a < b for a, b in zip(tokens, tokens[1:])), (url, tokens)


async def test_a_dead_holder_loses_the_lease_to_another_replica(replicas):
    dead, alive = await replicas(2, urls(1), lease_ttl_secs=1.0)
    held = await dead.acquire("dies")
    await dead.close(release_held=False)  # no release, no renewal: as if the process died
    engine = await alive.acquire("next", timeout=HANG)
    assert engine.url == held.url and engine.token > held.token
    alive.release(engine)


async def test_a_lease_wiped_from_the_store_is_claimed_back_and_one_taken_over_is_lost(replicas, store):
    a, b = await replicas(2, urls(1), lease_ttl_secs=1.0)
    held = await a.acquire("flushed")
    await store.flushall()  # the store forgets: the holder's next renewal writes its lease back
    async with asyncio.timeout(HANG):
        while not await store.get(held.key):
            await asyncio.sleep(0.05)
    assert (await store.get(held.key)) == held.value and a.stats.get("reclaimed") == 1 and not held.lost.is_set()
    with pytest.raises(NoEngine):
        await b.acquire("meanwhile", timeout=0.3)  # so the store knows the engine is taken again
    await store.set(held.key, "999|someone-else|x")  # another holder in the slot: that one is lost
    async with asyncio.timeout(HANG):
        await held.lost.wait()
    assert a.stats["lost"] == 1
    await store.delete(held.key)  # the other holder gives it up (its guard refused it): the call's lease comes back
    async with asyncio.timeout(HANG):
        while await store.get(held.key) != held.value:
            await asyncio.sleep(0.05)
    assert not held.lost.is_set() and a.stats["lost"] == 1
    await store.set(held.key, "999|someone-else|x")
    async with asyncio.timeout(HANG):
        await held.lost.wait()
    a.release(held)  # the lost lease's release deletes nothing of the other's
    await asyncio.gather(*a._pending)
    assert (await store.get(held.key)) == "999|someone-else|x"
    await store.delete(held.key)
    engine = await b.acquire("next", timeout=HANG)
    assert engine.token > held.token  # the fencing token did not restart with the flush
    b.release(engine)


async def test_release_is_idempotent(replicas, store):
    a, b = await replicas(2, urls(1))
    first = await a.acquire("first")
    a.release(first)
    await asyncio.gather(*a._pending)
    second = await b.acquire("second")
    a.release(first)  # twice: nothing
    first.state = State.BUSY  # and even a stale release reaching the store (say, after the lease expired and moved on)
    a.release(first)
    await asyncio.gather(*a._pending)
    assert (await store.get(second.key)) == second.value
    with pytest.raises(NoEngine, match="stayed busy"):
        await a.acquire("third", timeout=0.2)
    b.release(second)
    b.release(second)
    third = await a.acquire("third", timeout=HANG)
    assert third.token > second.token
    a.release(third)


async def test_a_failed_engine_leaves_the_rotation_fleet_wide_and_one_replica_probes_it(replicas):
    calls = []

    async def probe(url, timeout):
        calls.append(url)
        if len(calls) == 1:
            raise ConnectionRefusedError("still starting")

    pools = await replicas(3, urls(2), probe=probe, retry_secs=0.2)
    engine = await pools[0].acquire("breaks")
    broken = engine.url
    pools[0].failed(engine, "handshake timed out")
    pools[0].failed(engine, "again")  # once
    await until(lambda: all(p.count(State.DOWN) == 1 for p in pools), "every replica sees it down")
    assert all(p.available for p in pools)
    other = await pools[1].acquire("b")
    assert other.url != broken
    with pytest.raises(NoEngine, match="stayed busy"):  # the broken engine is not leased, though it is free
        await pools[2].acquire("c", timeout=0.3)
    await until(lambda: all(p.count(State.DOWN) == 0 for p in pools), "back in rotation for every replica")
    assert calls == [broken, broken]  # one failed probe, one that succeeded: once for the fleet, not per replica
    assert sum(p.stats["recoveries"] for p in pools) == 1
    back = await pools[2].acquire("c", timeout=HANG)
    assert back.url == broken
    assert [row["failures"] for row in pools[2].snapshot() if row["url"] == broken] == [1]
    pools[1].release(other)
    pools[2].release(back)


async def test_no_engine_in_rotation_fails_at_once_on_every_replica(replicas):
    async def down(url, timeout):
        raise ConnectionRefusedError("down")

    a, b = await replicas(2, urls(1), probe=down, retry_secs=60)
    engine = await a.acquire("breaks")
    waiting = asyncio.create_task(b.acquire("waits", timeout=HANG))
    await asyncio.sleep(0.1)
    a.failed(engine, "died mid-call")
    with pytest.raises(NoEngine, match="no engine in rotation"):
        await waiting
    with pytest.raises(NoEngine, match="died mid-call"):
        await b.acquire("next", timeout=HANG)
    await until(lambda: not a.available and not b.available, "readiness reports it")


async def test_redis_unreachable(redis_server):
    from pipelines.bench.launch import free_port

    nowhere = SharedEnginePool(PoolParams(urls=urls(1)), f"redis://127.0.0.1:{free_port()}/0", probe=never_probed)
    try:
        async with asyncio.timeout(HANG):
            with pytest.raises(NoEngine, match="engine pool store redis://127.0.0.1:.* unreachable"):
                await nowhere.acquire("call", timeout=2.0)
        assert not nowhere.available
    finally:
        await nowhere.close()

    pool = SharedEnginePool(PoolParams(urls=urls(1)), redis_server.url, probe=never_probed)
    try:
        engine = await pool.acquire("before")
        assert pool.available
        redis_server.stop()
        async with asyncio.timeout(HANG):
            with pytest.raises(NoEngine, match="unreachable"):
                await pool.acquire("during", timeout=2.0)
        assert not pool.available
        pool.release(engine)  # nowhere to go: logged, not raised
    finally:
        await pool.close()


async def test_a_multi_session_engine_serves_its_capacity(replicas):
    (url,) = urls(1)
    a, b = await replicas(2, [url], capacity={url: 2})
    first, second = await a.acquire("one"), await b.acquire("two")
    assert (first.url, second.url) == (url, url) and {first.slot, second.slot} == {0, 1}
    with pytest.raises(NoEngine, match="stayed busy"):
        await a.acquire("three", timeout=0.2)
    b.release(second)
    third = await a.acquire("three", timeout=HANG)
    assert third.slot == second.slot and third.token > max(first.token, second.token)
    a.release(first)
    a.release(third)


async def test_fifo_and_leases_survive_a_flush(replicas, store):
    """After FLUSHALL the store looks empty; the settle window lets the holder claim its lease back and the
    waiters re-register in their places before any lease is granted, so a newcomer neither takes the held
    engine nor overtakes them."""
    pools = await replicas(3, urls(1), lease_ttl_secs=3.0)
    held = await pools[0].acquire("holder")
    order, tasks = [], []

    async def call(name, pool):
        engine = await pool.acquire(name)
        order.append(name)
        pool.release(engine)

    for i in range(6):
        tasks.append(asyncio.create_task(call(i, pools[i % 3])))
        await until_async(lambda n=i + 1: _queued(store, pools[0]._queue, n), f"caller {i} queued")
    await store.flushall()
    tasks.append(asyncio.create_task(call("newcomer", pools[1])))
    async with asyncio.timeout(HANG):
        while await store.get(held.key) != held.value:  # claimed back well before its ttl/3 renewal
            await asyncio.sleep(0.01)
    await until_async(lambda: _queued(store, pools[0]._queue, 7), "all seven queued again")
    assert order == [] and not held.lost.is_set()
    pools[0].release(held)
    async with asyncio.timeout(HANG):
        await asyncio.gather(*tasks)
    assert order == [*range(6), "newcomer"]


async def test_a_call_refused_by_a_busy_guard_keeps_its_place(replicas, store):
    """A guard said busy (the lease had expired on a bridge cut off from Redis): the call gives the engine back
    and asks again from its old place, so callers who came after it still come after it."""
    pools = await replicas(3, urls(1))
    held = await pools[0].acquire("holder")
    granted, tasks = [], {}

    async def call(name, pool):
        engine = await pool.acquire(name.split()[0])
        granted.append(name)
        return pool, engine

    for i, name in enumerate("ABC"):
        tasks[name] = asyncio.create_task(call(name, pools[i]))
        await until_async(lambda n=i + 1: _queued(store, pools[0]._queue, n), f"{name} queued")
    pools[0].release(held)
    pool, lease = await tasks.pop("A")
    pool.busy(lease)  # the guard answered 503
    tasks["A again"] = asyncio.create_task(call("A again", pool))
    while tasks:
        async with asyncio.timeout(HANG):
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            tasks.pop(next(name for name, t in tasks.items() if t is task))
            owner, engine = task.result()
            owner.release(engine)
    assert granted.index("A again") < granted.index("C"), granted


async def test_capacity_from_the_config_applies_to_every_engine_discovered(replicas):
    (pool,) = await replicas(1, urls(1), capacity=2)
    pool.set_urls(urls(2))  # one more engine joins: it serves two sessions too
    held = [await pool.acquire(f"call-{i}") for i in range(4)]
    assert sorted((e.url, e.slot) for e in held) == [(u, s) for u in urls(2) for s in (0, 1)]
    with pytest.raises(NoEngine, match="stayed busy"):
        await pool.acquire("fifth", timeout=0.2)
    for engine in held:
        pool.release(engine)
