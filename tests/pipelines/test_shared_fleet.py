"""Two bridge replicas share one engine fleet through a real redis-server; each engine sits behind its guard.

Every call is a real Exotel call over loopback; the guards say how many sessions each engine served
and whether one was ever refused, so a double booking cannot hide."""

import asyncio
import textwrap
from contextlib import AsyncExitStack

import numpy as np

from pipelines import builder, config
from pipelines.bench.launch import free_port, launched, run_command
from pipelines.guard import Guard
from pipelines.server import CallServer
from pipelines.sim.caller import place_call
from pipelines.sim.engine.reference import EngineOptions, ReferenceEngine
from tests.pipelines.served import fetch, rms, until, variant_config

RATE = 8000

DEPLOYMENT = """\
server: {{media_timeout_secs: 5}}
transport: {{type: exotel, params: {{path: /exotel}}}}
engine: {{urls: "{urls}", lease_store: "{store}", lease_ttl_secs: 2, wait_secs: 15}}
processors:
  - type: resample
    params: {{audio: input, rate: 24000}}
  - type: personaplex
  - type: resample
    params: {{audio: output, rate: call}}
  - type: pacer
"""


async def echo_engine(stack: AsyncExitStack) -> str:
    engine = ReferenceEngine(EngineOptions(mode="echo", handshake_delay_secs=0.2))
    url = await engine.start()
    stack.push_async_callback(engine.stop)
    return url


async def guarded_engines(stack: AsyncExitStack, n: int) -> list[tuple[Guard, str]]:
    """`n` reference engines, each behind a guard of capacity 1: (guard, the URL the bridges dial)."""
    guards = []
    for _ in range(n):
        guard = Guard(await echo_engine(stack), capacity=1)
        guards.append((guard, await guard.start()))
        stack.push_async_callback(guard.stop)
    return guards


async def bridges(stack: AsyncExitStack, path, n: int) -> list[CallServer]:
    """`n` replicas of one deployment file, as behind a load balancer, each with its own engine pools."""
    servers = []
    for _ in range(n):
        plan = builder.plan(config.load(path, {}))
        server = CallServer(plan, builder.engine_pools(plan, plan.loaded.config.engine), "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop)
        servers.append(server)
    return servers


async def test_two_replicas_never_double_book_an_engine_and_serve_every_caller(tmp_path, redis_server):
    async with AsyncExitStack() as stack:
        guards = await guarded_engines(stack, 2)
        path = tmp_path / "replica.yaml"
        path.write_text(textwrap.dedent(DEPLOYMENT.format(urls=",".join(u for _, u in guards), store=redis_server.url)))
        servers = await bridges(stack, path, 2)
        # six callers 0.3 s apart, alternating replicas, on two engines: four wait their turn, and each
        # stays on the line long enough for the engine of the call two places ahead to come free
        async def caller(i: int):
            await asyncio.sleep(0.3 * i)
            secs = 2.0 + 2.2 * i
            return await place_call(f"ws://127.0.0.1:{servers[i % 2].port}/exotel", np.zeros(round(secs * RATE), np.int16), RATE,
                                    seconds=secs)

        results = await asyncio.gather(*(caller(i) for i in range(6)))
        await until(lambda: not any(s.calls for s in servers), 20)
        outcomes = [c["outcome"] for s in servers for c in s.recent]
        tokens = [row["token"] for s in servers for row in s.engines.snapshot()]
    assert outcomes == ["completed"] * 6 and all(r.violations == [] for r in results)
    # each guard admitted its engine's sessions one at a time and never had to refuse one
    assert sum(g.stats.admitted for g, _ in guards) == 6
    assert all(g.stats.refused_busy == 0 and g.stats.refused_token == 0 for g, _ in guards)
    assert all(g.stats.highest_token and g.stats.highest_token > 0 for g, _ in guards)  # every session came with its lease's token
    assert all(t is None or t > 0 for t in tokens)


async def test_without_shared_leases_the_guard_still_keeps_an_engine_to_one_call(tmp_path):
    """Two bridges that do not share leases (a misconfiguration) point at one engine: the guard refuses
    the second bridge's sessions before the upgrade (busy, not broken: it tries again), its caller
    hears only the holding clips, and the first call goes on untouched."""
    async with AsyncExitStack() as stack:
        [(guard, url)] = await guarded_engines(stack, 1)
        path = tmp_path / "alone.yaml"
        path.write_text(textwrap.dedent(DEPLOYMENT.format(urls=url, store="")))
        servers = await bridges(stack, path, 2)

        async def second():
            await asyncio.sleep(1.0)
            return await place_call(f"ws://127.0.0.1:{servers[1].port}/exotel", np.zeros(4 * RATE, np.int16), RATE, seconds=4.0)

        first, late = await asyncio.gather(
            place_call(f"ws://127.0.0.1:{servers[0].port}/exotel", np.zeros(6 * RATE, np.int16), RATE, seconds=6.0), second())
        await until(lambda: not any(s.calls for s in servers), 20)
        [one], [two] = servers[0].recent, servers[1].recent
    assert one["outcome"] == "completed" and first.violations == [] and late.violations == []
    assert two["stats"]["personaplex"]["pages_received"] == 0  # the second caller never reached the engine
    assert guard.stats.refused_busy >= 1 and guard.stats.admitted == 1 and guard.stats.active == 0


async def test_redis_unreachable_is_said_by_readyz_and_callers_hear_the_apology(tmp_path):
    """The lease store is down from the start: the bridge still serves (holding clip, then the apology,
    then a clean hang-up), /readyz says why, and nothing waits past engine.wait_secs."""
    async with AsyncExitStack() as stack:
        url = await echo_engine(stack)
        dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        path = variant_config(tmp_path, "exotel.yaml", engine={"urls": url, "lease_store": dead, "wait_secs": 2})
        [server] = await bridges(stack, path, 1)
        status, body = await asyncio.to_thread(fetch, server.port, "/readyz")
        result = await place_call(f"ws://127.0.0.1:{server.port}/exotel", np.zeros(12 * RATE, np.int16), RATE, seconds=12.0)
        await until(lambda: not server.calls, 10)
        [call] = server.recent
    assert status == 503 and "lease store redis://127.0.0.1:" in body and "unreachable" in body
    assert call["outcome"] in ("no_engine", "engine_failed") and result.server_closed_at is not None and result.server_closed_at < 11
    assert rms(result.heard) > 300  # the greeting and the apology were heard


async def test_a_bridge_killed_mid_call_gives_its_engine_back_within_the_lease_ttl(tmp_path, redis_server):
    """Bridge A (its own process) holds the only engine for a call and is SIGKILLed: no release, no
    close frame. Its lease expires (lease_ttl_secs 2) and its socket closes with the process, so
    bridge B's caller, waiting in the same fleet-wide queue, gets the engine within the TTL plus a second."""
    async with AsyncExitStack() as stack:
        [(guard, url)] = await guarded_engines(stack, 1)
        path = tmp_path / "replica.yaml"
        path.write_text(textwrap.dedent(DEPLOYMENT.format(urls=url, store=redis_server.url)))
        [b] = await bridges(stack, path, 1)
        port = free_port()
        with launched(run_command(path, port), port) as a:
            first = asyncio.create_task(place_call(f"ws://127.0.0.1:{port}/exotel", np.zeros(30 * RATE, np.int16), RATE, seconds=30.0))
            await until(lambda: guard.stats.active == 1, 15)  # A's call holds the engine
            waiting = asyncio.create_task(place_call(f"ws://127.0.0.1:{b.port}/exotel", np.zeros(12 * RATE, np.int16), RATE, seconds=12.0))
            await asyncio.sleep(1.0)  # B's caller is queued behind A's
            loop = asyncio.get_running_loop()
            a.proc.kill()
            killed = loop.time()
            await until(lambda: guard.stats.admitted == 2, 10)
            handed_over = loop.time() - killed
        await asyncio.gather(first, return_exceptions=True)  # A's caller lost its bridge
        second = await waiting
        await until(lambda: not b.calls, 10)
    # B's caller got the engine although A never released it: only the TTL could free it (no timing
    # threshold here; `handed_over`, about the TTL, is what bench cluster reports)
    print(f"engine handed over {handed_over:.2f} s after the kill (lease_ttl_secs 2)")
    assert b.recent[-1]["outcome"] == "completed" and second.violations == []
    assert guard.stats.refused_busy == 0


async def test_calls_go_on_through_a_redis_flush_and_restart_and_new_leases_stay_fenced(tmp_path, redis_server):
    """Redis loses everything twice mid-call (FLUSHALL, then a restart without persistence). The calls
    in flight keep their engine sockets and finish; calls placed afterwards lease again. The emptied
    store no longer knows the in-flight call's engine is taken, so a new lease may land on it: its
    guard refuses that session (503), the bridge tries the other engine, and no engine ever serves
    two. New tokens stay above what the guards admitted before (seeded from Redis's clock): no lease
    is refused as stale."""
    import redis.asyncio as aioredis

    async with AsyncExitStack() as stack:
        guards = await guarded_engines(stack, 2)
        path = tmp_path / "replica.yaml"
        path.write_text(textwrap.dedent(DEPLOYMENT.format(urls=",".join(u for _, u in guards), store=redis_server.url)))
        servers = await bridges(stack, path, 2)

        def call(replica: int, secs: float):
            return asyncio.create_task(place_call(f"ws://127.0.0.1:{servers[replica].port}/exotel", np.zeros(round(secs * RATE), np.int16),
                                                  RATE, seconds=secs))

        in_flight = call(0, 8.0)
        await until(lambda: sum(g.stats.active for g, _ in guards) == 1, 10)
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushall()
        await client.aclose()
        after_flush = call(1, 3.0)  # the other engine is free: leased again from an empty store
        await after_flush
        redis_server.restart()
        after_restart = call(1, 3.0)
        results = [await in_flight, await after_flush, await after_restart]
        await until(lambda: not any(s.calls for s in servers), 15)
        outcomes = sorted(c["outcome"] for s in servers for c in s.recent)
    assert outcomes == ["completed"] * 3 and all(r.violations == [] for r in results)
    assert sum(g.stats.admitted for g, _ in guards) == 3 and all(g.stats.refused_token == 0 for g, _ in guards)
