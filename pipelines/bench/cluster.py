"""`python -m pipelines bench cluster`: B bridge replicas share E engines through one real Redis.

Processes: a redis-server (`--save '' --appendonly no`, a temporary dir), E reference engines (script
mode, codec-free, `--engines-per-process` to a process), each behind its own guard (`python -m
pipelines guard --capacity 1`), and B bridges (`python -m pipelines run` on configs/exotel.yaml with
engine.urls = the guards, engine.lease_store = that Redis, records on). Calls are silent Exotel calls
from this process, dialled in bursts of `--burst` (20 ms apart, round-robin over the live bridges);
bursts are `ceil(burst / E) * (call_secs + 1) + 1` s apart. The k-th wave of a burst (its calls k*E..)
stays on the line `call_secs + k * (call_secs + 1)` s, so that each call holds its engine about
`call_secs` after waiting its turn. Chaos: bridge 0 is SIGKILLed at a third of the planned run (later
calls skip it, as a load balancer would), redis-server is SIGKILLed and started again on its port at
two thirds (both + call_secs / 2: off the burst starts, while engines are held and callers wait).
Between the two, centred, bridge 1 (bridge 0 with one bridge) is cut off from Redis for 2 x lease TTL
while its engine sockets stay up: it reaches Redis through a TCP relay in this process
(pipelines/bench/relay.py) that drops its connections and refuses new ones; later calls skip it until
the link is back, as a load balancer reading its /readyz would. The cut is left out (and said so) when
the run is too short for it to miss the kill's hand-over (TTL + 1 s) and the restart.

Every 0.2 s each guard's and each engine's GET /stats is sampled (time.time()). Figures:
- double bookings: refused_busy + refused_token summed over the guards (attempts the door stopped;
  split before/after the Redis restart, which wipes the leases of calls still in flight), the largest
  sampled guard `active` (> 1 = two sessions on one engine), and the engines' own `connections_peak`
  (most WebSocket connections open at once on one engine, from its upgrade to the end of its handler,
  counted by the reference engine itself; its GET /stats).
- engine idle while callers waited: sum over samples of min(guards with active 0, callers waiting)
  * 0.2 s, a caller waiting from its asking (as below) to its engine_acquired (or its record's end, or
  the kill of its bridge); absolute times are the record's started_at + t. Split by where it fell: from
  the bridge kill to TTL + 1 s after it (the dead bridge's leases running out), from the Redis kill to
  SETTLE_SECS + 1 s after it is back (no lease is granted while holders claim back), and elsewhere.
- FIFO violations: pairs of calls that both waited (an engine_waiting event, or wait_ms > 500) whose
  order of asking (engine_acquired minus its wait_ms) is the reverse of their engine_acquired order,
  whatever their bridge; both more than 20 ms apart (each replica stamps its own events after Redis answers).
  Also counted: the pairs with a caller of the bridge cut off from Redis that waited through the cut (it
  could not reach the queue, so others were served; on the restore it re-registers in its old place).
- lease set-up: engine_acquired wait_ms of calls that did not wait (no engine_waiting), p50/p99.
- bridge kill: the engines bridge 0's records say it held at the kill; for each, the first sample in
  which its guard's `admitted` grew, minus the kill time (target: lease TTL + 1 s).
- Redis restart: calls in flight at the kill that did not complete, calls that failed from the kill to
  10 s after the restart, and the first engine_acquired after the restart (from the kill and from the restart).
- Redis cut: calls in flight on the cut bridge at the cut (and those holding an engine) and how many of
  them did not complete; calls failed elsewhere from the cut to 10 s after the restore; the cut bridge's
  /readyz (polled every 0.25 s): first 503 naming the lease store, first 200 after the restore; guard
  refusals in the cut's window (the cut to TTL + 2 s after the restore, or to the end of the calls that
  held an engine at the cut, if later; not past the Redis kill): its expired leases leased again and
  refused by the guard; the guards' largest `active` and the engines' peak in that window; leases the cut
  bridge claimed back or logged lost after the restore (its log). `guard_refused_before_redis_restart`
  leaves out the refusals in the cut's window.
- outcomes: each call's call_ended outcome in its bridge's records (`lost with bridge` when the bridge
  was killed under it, `caller error: ...` when the caller's connection failed otherwise).
"""

import asyncio
import contextlib
import datetime
import math
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.bench.fleet import RATE, bench_env, script_options
from pipelines.bench.harness import command_argv, guarded, machine_lines, table, write_json
from pipelines.bench.launch import RedisServer, free_port, free_ports, launched, run_command
from pipelines.bench.relay import ThreadedRelay
from pipelines.bench.servers import engine_command, engine_launched, keep_log, our_yaml
from pipelines.config import CONFIG_DIR
from processors.personaplex.shared_pool import SETTLE_SECS

CLIP = str(CONFIG_DIR / "clips" / "apology.wav")
SAMPLE_SECS = 0.2
WAVE_SLACK = 1.0  # a waiting caller's turn comes after the call before it, its hand-over and handshake
STAGGER = 0.02  # between the calls of one burst: a defined arrival order
FIFO_TOLERANCE = 0.02
WAITED_MS = 500  # a free engine is leased in one Redis round trip; a waiter is woken by a release
REDIS_FAIL_WINDOW = 10.0


def add_parser(subparsers):
    p = subparsers.add_parser("cluster", help="B bridges share E guarded engines through Redis: double bookings, "
                              "idle engines, FIFO, lease set-up, recovery from a bridge kill, a Redis restart and a bridge cut off from Redis",
                              description=__doc__)
    p.add_argument("--bridges", type=int, default=3, help="bridge replicas (default: %(default)s)")
    p.add_argument("--engines", type=int, default=8, help="reference engines, each behind a guard (default: %(default)s)")
    p.add_argument("--engines-per-process", type=int, default=4, help="reference engines per process (default: %(default)s)")
    p.add_argument("--calls", type=int, default=200, help="calls placed in all (default: %(default)s)")
    p.add_argument("--call-secs", type=float, default=6.0, help="seconds each call holds its engine (default: %(default)s)")
    p.add_argument("--burst", type=int, default=20, help="calls dialled together (default: %(default)s)")
    p.add_argument("--lease-ttl", type=float, default=2.0, help="engine.lease_ttl_secs (default: %(default)s)")
    p.add_argument("--no-chaos", action="store_true", help="no bridge kill, no Redis restart, no Redis cut")
    p.add_argument("--json", help="result file (default: bench-results/cluster-<UTC stamp>.json)")
    p.add_argument("--log-dir", help="keep the processes' logs, YAMLs and records here")
    return p


def bench_cluster(args) -> int:
    """B bridges share E guarded engines through one Redis: bookings, idle engines, FIFO, recovery."""
    from loguru import logger

    logger.remove()
    return guarded(lambda: _bench_cluster(args))


# ---- processes -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    redis: RedisServer
    guard_ports: list[int]
    engine_ports: list[int]
    bridges: list  # Launched, one per bridge
    records: list[Path]  # each bridge's records dir
    alive: list[bool] = field(default_factory=list)
    relay: ThreadedRelay | None = None  # in front of Redis for bridge `partitioned`
    partitioned: int | None = None
    logs: list[Path] = field(default_factory=list)  # each bridge's log

    @property
    def guard_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}" for p in self.guard_ports]


def bridge_yaml(path: Path, urls: list[str], store: str, ttl: float, wait_secs: float) -> None:
    """configs/exotel.yaml (records on, under path's dir) with the shared engine block."""
    import yaml

    our_yaml(path, script_options([(0.8, CLIP)]), ",".join(urls))
    cfg = yaml.safe_load(path.read_text())
    cfg["engine"] |= {"lease_store": store, "lease_ttl_secs": ttl, "wait_secs": wait_secs}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@contextlib.contextmanager
def cluster(args, work: Path, wait_secs: float, partitioned: int | None = None):
    """`partitioned`: the bridge that reaches Redis through a relay (Cluster.relay), to be cut off."""
    env = bench_env()
    if not shutil.which("redis-server"):
        raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    redis = RedisServer(free_port(), work)
    redis.start()
    relay = None
    try:
        with contextlib.ExitStack() as stack:
            if partitioned is not None:
                relay = ThreadedRelay(redis.port)
                relay.start()
                stack.callback(relay.stop)
            engine_ports = free_ports(args.engines)
            options = script_options([(0.8, CLIP)])
            per = args.engines_per_process
            for i in range(0, args.engines, per):
                stack.enter_context(engine_launched(engine_command(engine_ports[i:i + per], options), env,
                                                    str(work / f"engine-{i // per}.log")))
            guard_ports = free_ports(args.engines)
            for i, (gp, ep) in enumerate(zip(guard_ports, engine_ports)):
                argv = [sys.executable, "-m", "pipelines", "guard", "--listen", f"127.0.0.1:{gp}", "--upstream",
                        f"ws://127.0.0.1:{ep}", "--capacity", "1"]
                g = stack.enter_context(launched(argv, gp, env=env, ready="serving "))
                keep_log(g.proc, g.startup, str(work / f"guard-{i}.log"))
            bridges, records = [], []
            for i in range(args.bridges):
                d = work / f"bridge-{i}"
                d.mkdir(parents=True, exist_ok=True)
                store = relay.url() if relay is not None and i == partitioned else redis.url
                bridge_yaml(d / "bridge.yaml", [f"ws://127.0.0.1:{p}" for p in guard_ports], store, args.lease_ttl, wait_secs)
                port = free_port()
                b = stack.enter_context(launched(run_command(d / "bridge.yaml", port), port, env=env, timeout=120))
                keep_log(b.proc, b.startup, str(d / "bridge.log"))
                bridges.append(b)
                records.append(d / "records")
            yield Cluster(redis, guard_ports, engine_ports, bridges, records, [True] * args.bridges, relay,
                          partitioned if relay is not None else None, [work / f"bridge-{i}" / "bridge.log" for i in range(args.bridges)])
    finally:
        redis.stop()


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class Plan:
    waves: int  # per burst
    interval: float  # between bursts
    bursts: int
    span: float  # planned: bursts * interval
    wait_secs: float

    @classmethod
    def of(cls, args) -> "Plan":
        waves = math.ceil(min(args.burst, args.calls) / args.engines)
        interval = waves * (args.call_secs + WAVE_SLACK) + 1.0
        bursts = math.ceil(args.calls / args.burst)
        return cls(waves, interval, bursts, bursts * interval, waves * (args.call_secs + WAVE_SLACK) + 10 + 2 * args.lease_ttl)

    def faults(self, args) -> dict:
        """Seconds from the start: bridge_kill (with more than one bridge), redis_kill, and the Redis cut
        (cut, cut_secs, cut_bridge) when it fits between them: after the kill's hand-over (TTL + 1 s), and
        its renewals back (TTL / 3) at least TTL + 1 s before the restart; none with --no-chaos."""
        if args.no_chaos:
            return {}
        kill = self.span / 3 + args.call_secs / 2
        restart = self.span * 2 / 3 + args.call_secs / 2
        out = {"redis_kill": restart} | ({"bridge_kill": kill} if args.bridges > 1 else {})
        cut_secs = 2 * args.lease_ttl
        cut = (kill + restart) / 2 - cut_secs / 2
        if cut >= kill + args.lease_ttl + 1 and cut + cut_secs + args.lease_ttl / 3 + args.lease_ttl + 1 <= restart:
            out |= {"cut": cut, "cut_secs": cut_secs, "cut_bridge": 1 if args.bridges > 1 else 0}
        return out


@dataclass
class Dialled:
    sid: str
    bridge: int
    seconds: float
    start: float = 0.0  # time.time()
    end: float = 0.0
    error: str | None = None


async def sample_stats(c: Cluster, samples: list[dict], stop: asyncio.Event) -> None:
    import aiohttp

    async def get(session, port):
        try:
            async with session.get(f"http://127.0.0.1:{port}/stats") as r:
                return await r.json()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while not stop.is_set():
            t = time.time()
            got = await asyncio.gather(*(get(session, p) for p in c.guard_ports + c.engine_ports))
            samples.append({"t": t, "guards": got[:len(c.guard_ports)], "engines": got[len(c.guard_ports):]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, t + SAMPLE_SECS - time.time()))


async def drive(args, c: Cluster, plan: Plan) -> tuple[list[Dialled], list[dict], dict]:
    from pipelines.sim.caller import place_call

    samples: list[dict] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_stats(c, samples, stop))
    chaos: dict = {}
    t0 = time.time()
    runs: list[Dialled] = []

    async def call(run: Dialled) -> None:
        run.start = time.time()
        try:
            await place_call(c.bridges[run.bridge].url("/exotel"), np.zeros(round(run.seconds * RATE), np.int16), RATE,
                             seconds=run.seconds, call_sid=run.sid, stream_sid="MZ" + run.sid)
        except Exception as exc:  # counted, not raised
            run.error = f"{type(exc).__name__}: {exc}"[:200]
        run.end = time.time()

    async def kill_bridge(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        c.alive[0] = False
        c.bridges[0].proc.send_signal(signal.SIGKILL)
        chaos["bridge_kill"] = time.time()
        print(f"{chaos['bridge_kill'] - t0:6.1f} s  SIGKILL bridge 0 (pid {c.bridges[0].proc.pid})", flush=True)

    async def restart_redis(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        c.redis.stop()
        chaos["redis_kill"] = time.time()
        await asyncio.to_thread(c.redis.start)
        chaos["redis_back"] = time.time()
        print(f"{chaos['redis_kill'] - t0:6.1f} s  redis-server SIGKILLed, back after {chaos['redis_back'] - chaos['redis_kill']:.2f} s",
              flush=True)

    async def cut_link(at: float, secs: float, bridge: int) -> None:
        """Bridge `bridge`'s link to Redis dropped and refused for `secs`; its /readyz polled meanwhile."""
        import aiohttp

        await asyncio.sleep(max(0.0, at - time.time()))
        cut_off.add(bridge)
        dropped = await asyncio.to_thread(c.relay.cut)
        chaos["cut"] = time.time()
        print(f"{chaos['cut'] - t0:6.1f} s  bridge {bridge} cut off from Redis ({dropped} connections dropped) for {secs:g} s", flush=True)
        readyz = f"http://127.0.0.1:{c.bridges[bridge].port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            async def ready() -> tuple[int | None, str]:
                try:
                    async with session.get(readyz) as r:
                        return r.status, (await r.text()).strip()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    return None, type(exc).__name__

            while time.time() < chaos["cut"] + secs:
                status, why = await ready()
                if status == 503 and "lease store" in why and "cut_unready" not in chaos:
                    chaos["cut_unready"], chaos["cut_readyz"] = time.time(), why
                await asyncio.sleep(min(0.25, max(0.0, chaos["cut"] + secs - time.time())))
            await asyncio.to_thread(c.relay.restore)
            chaos["cut_restored"] = time.time()
            while time.time() < chaos["cut_restored"] + 10:
                if (await ready())[0] == 200:
                    chaos["cut_ready_again"] = time.time()
                    break
                await asyncio.sleep(0.25)
        cut_off.discard(bridge)
        print(f"{chaos['cut_restored'] - t0:6.1f} s  bridge {bridge}'s Redis link restored", flush=True)

    faults = plan.faults(args)
    extra = []
    if "bridge_kill" in faults:
        extra.append(asyncio.create_task(kill_bridge(t0 + faults["bridge_kill"])))
    if "redis_kill" in faults:
        extra.append(asyncio.create_task(restart_redis(t0 + faults["redis_kill"])))
    cut_off: set[int] = set()
    if "cut" in faults and c.relay is not None:
        extra.append(asyncio.create_task(cut_link(t0 + faults["cut"], faults["cut_secs"], faults["cut_bridge"])))
    tasks, rr = [], 0
    patience = 0.0 if args.no_chaos else args.lease_ttl + 2  # a waiter outlasts a killed bridge's leases
    for b in range(plan.bursts):
        await asyncio.sleep(max(0.0, t0 + b * plan.interval - time.time()))
        n = min(args.burst, args.calls - len(runs))
        print(f"{time.time() - t0:6.1f} s  burst {b + 1}/{plan.bursts}: {n} calls", flush=True)
        for k in range(n):
            live = [i for i, a in enumerate(c.alive) if a and i not in cut_off] or [i for i, a in enumerate(c.alive) if a]
            bridge = live[rr % len(live)]
            rr += 1
            wave = k // args.engines
            run = Dialled(f"CL{len(runs):04d}", bridge, args.call_secs + wave * (args.call_secs + WAVE_SLACK) + (wave > 0) * patience)
            runs.append(run)
            tasks.append(asyncio.create_task(call(run)))
            await asyncio.sleep(STAGGER)
    await asyncio.gather(*tasks, *extra)
    await asyncio.sleep(1.0)  # the last releases reach the guards
    stop.set()
    await sampler
    return runs, samples, chaos | {"t0": t0}


# ---- figures -------------------------------------------------------------------------------------


def read_calls(records: list[Path]) -> dict[str, dict]:
    """call id -> bridge, outcome, absolute waiting/acquired/end times, wait_ms, url, from every bridge's records."""
    from pipelines.report import load_events

    calls = {}
    for bridge, d in enumerate(records):
        for f in sorted(d.glob("*/events.jsonl")) if d.is_dir() else []:
            events, _ = load_events(f)
            started = next((e for e in events if e["event"] == "call_started"), None)
            if not started or not started.get("started_at"):
                continue
            base = datetime.datetime.fromisoformat(started["started_at"]).timestamp()
            first = {}
            for e in events:
                first.setdefault(e["event"], e)
            ended = first.get("call_ended")
            acquired = first.get("engine_acquired")
            wait_ms = _num(acquired.get("wait_ms")) if acquired else None
            if acquired and wait_ms is not None:
                asked = base + acquired["t"] - wait_ms / 1000
            else:
                asked = base + first["engine_waiting"]["t"] if "engine_waiting" in first else base
            waited = "engine_waiting" in first or not acquired or wait_ms is None or wait_ms > WAITED_MS
            calls[started["call_id"]] = {
                "bridge": bridge, "outcome": ended.get("outcome") if ended else None,
                "started": base, "end": base + events[-1]["t"], "waiting": asked if waited else None,
                "acquired": base + acquired["t"] if acquired else None,
                "wait_ms": wait_ms, "url": acquired.get("url") if acquired else None,
                "released": base + first["engine_released"]["t"] if "engine_released" in first else None}
    return calls


def _num(v) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def quantile(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 1)


def figures(args, c: Cluster, plan: Plan, runs: list[Dialled], samples: list[dict], chaos: dict) -> dict:
    calls = read_calls(c.records)
    kill, rkill, rback = chaos.get("bridge_kill"), chaos.get("redis_kill"), chaos.get("redis_back")

    # outcomes
    outcomes: dict[str, int] = {}
    per_call = []
    for r in runs:
        rec = calls.get(r.sid, {})
        if rec.get("outcome"):
            outcome = rec["outcome"]
        elif kill and r.bridge == 0 and r.start < kill:
            outcome = "lost with bridge"
        elif r.error:
            outcome = "caller error: " + r.error.split(":")[0]
        else:
            outcome = "no record"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        per_call.append({"sid": r.sid, "bridge": r.bridge, "start_s": round(r.start - chaos["t0"], 2),
                         "end_s": round(r.end - chaos["t0"], 2), "outcome": outcome, "error": r.error,
                         "waited": rec.get("waiting") is not None, "wait_ms": rec.get("wait_ms"), "engine": rec.get("url")})

    # double bookings
    def refused(s):
        return sum((g or {}).get("refused_busy", 0) + (g or {}).get("refused_token", 0) for g in s["guards"])

    last = samples[-1]
    before = [s for s in samples if rkill is None or s["t"] < rkill]
    cut, restored = chaos.get("cut"), chaos.get("cut_restored")
    cut_window = None
    if cut and restored:
        pb = c.partitioned
        holding_at_cut = [rec for rec in calls.values() if rec["bridge"] == pb and rec["acquired"] and rec["acquired"] < cut
                          and (rec["released"] is None or rec["released"] > cut)]
        cut_window = (cut, min(max([restored + args.lease_ttl + 2] + [rec["end"] for rec in holding_at_cut]), rkill or math.inf))

    def in_cut(t: float) -> bool:
        return cut_window is not None and cut_window[0] <= t <= cut_window[1]

    def refused_outside_cut(upto: list[dict]) -> int:
        """Refusals over `upto` (samples in order), less those that arrived in the cut's window."""
        n = refused(upto[0]) if upto else 0
        for prev, s in zip(upto, upto[1:]):
            if not in_cut(s["t"]):
                n += refused(s) - refused(prev)
        return n
    active_max = max((g or {}).get("active", 0) for s in samples for g in s["guards"])
    engine_peak = max((e or {}).get("connections_peak", 0) for s in samples for e in s["engines"])
    double = {"guard_refused": refused(last), "guard_refused_busy": sum((g or {}).get("refused_busy", 0) for g in last["guards"]),
              "guard_refused_token": sum((g or {}).get("refused_token", 0) for g in last["guards"]),
              "guard_refused_before_redis_restart": refused_outside_cut(before),
              "guard_active_max": active_max, "engine_connections_peak": engine_peak,
              "engine_connections_peak_before_redis_restart": max(((e or {}).get("connections_peak", 0) for e in before[-1]["engines"]),
                                                                  default=0) if before else 0,
              "served_twice": int(active_max > 1 or engine_peak > 1)}

    # engine idle while callers waited
    def waiting_at(t: float) -> int:
        n = 0
        for rec in calls.values():
            if rec["waiting"] is None or rec["waiting"] > t:
                continue
            until = rec["acquired"] or rec["end"]
            if kill and rec["bridge"] == 0:
                until = min(until, kill)
            n += t < until
        return n

    # idle engines while callers waited, by where it fell: the killed bridge's leases running out (TTL + 1 s),
    # the Redis restart (its downtime, the settle window and a second), the rest of the run
    windows = {"bridge_kill": (kill, kill + args.lease_ttl + 1) if kill else None,
               "redis_restart": (rkill, rback + SETTLE_SECS + 1) if rkill else None}
    idle_by = {"bridge_kill": 0.0, "redis_restart": 0.0, "elsewhere": 0.0}
    for s in samples:
        idle = sum(1 for g in s["guards"] if g is not None and g.get("active", 0) == 0)
        where = next((name for name, w in windows.items() if w and w[0] <= s["t"] <= w[1]), "elsewhere")
        idle_by[where] += min(idle, waiting_at(s["t"])) * SAMPLE_SECS
    idle_secs = sum(idle_by.values())

    # FIFO across replicas; a caller of the bridge cut off from Redis could not hold its place while it waited
    waited = sorted((rec["waiting"], rec["acquired"], cid) for cid, rec in calls.items() if rec["waiting"] and rec["acquired"])
    violations = []
    for i, (w1, a1, c1) in enumerate(waited):
        for w2, a2, c2 in waited[i + 1:]:
            if w2 - w1 > FIFO_TOLERANCE and a1 - a2 > FIFO_TOLERANCE:
                violations.append([c1, c2])

    def cut_off(cid: str) -> bool:
        rec = calls[cid]
        return bool(cut and restored) and rec["bridge"] == c.partitioned and rec["waiting"] < restored and rec["acquired"] > cut

    by_cut = [pair for pair in violations if cut_off(pair[0]) or cut_off(pair[1])]

    # lease set-up
    setup = [rec["wait_ms"] for rec in calls.values() if rec["waiting"] is None and rec["wait_ms"] is not None]

    result = {"outcomes": outcomes, "double_bookings": double, "engine_idle_while_waiting_s": round(idle_secs, 1),
              "engine_idle_while_waiting_by_s": {k: round(v, 1) for k, v in idle_by.items()},
              "waited_calls": len(waited), "fifo_violations": len(violations), "fifo_violation_pairs": violations[:20],
              "fifo_violations_cut_bridge": len(by_cut),
              "lease_setup_ms": {"n": len(setup), "p50": quantile(setup, 50), "p99": quantile(setup, 99)}}

    # bridge kill: engines held by bridge 0 -> first new admission at their guards
    if kill:
        port_of = {u: i for i, u in enumerate(c.guard_urls)}
        held = sorted({port_of[rec["url"]] for rec in calls.values() if rec["bridge"] == 0 and rec["acquired"]
                       and rec["acquired"] < kill and (rec["released"] is None or rec["released"] > kill) and rec["url"] in port_of})
        at_kill = [s for s in samples if s["t"] <= kill][-1]
        recovery = {}
        for gi in held:
            base = (at_kill["guards"][gi] or {}).get("admitted", 0)
            later = next((s["t"] for s in samples if s["t"] > kill and (s["guards"][gi] or {}).get("admitted", 0) > base), None)
            recovery[f"engine-{gi}"] = None if later is None else round(later - kill, 2)
        known = [v for v in recovery.values() if v is not None]
        result["bridge_kill"] = {"at_s": round(kill - chaos["t0"], 2), "engines_held": len(held), "readmitted_s": recovery,
                                 "max_s": max(known) if known else None, "target_s": args.lease_ttl + 1,
                                 "calls_lost": outcomes.get("lost with bridge", 0)}
    if rkill:
        in_flight = [r for r in runs if r.start < rkill < r.end]
        bad = [r.sid for r in in_flight if calls.get(r.sid, {}).get("outcome") != "completed"]
        window = [p for p in per_call if p["outcome"] != "completed" and p["outcome"] != "lost with bridge"
                  and rkill - chaos["t0"] <= p["end_s"] and p["start_s"] <= rback - chaos["t0"] + REDIS_FAIL_WINDOW]
        next_lease = min((rec["acquired"] for rec in calls.values() if rec["acquired"] and rec["acquired"] > rkill), default=None)
        result["redis_restart"] = {"at_s": round(rkill - chaos["t0"], 2), "down_s": round(rback - rkill, 2),
                                   "in_flight": len(in_flight), "in_flight_failed": len(bad),
                                   "failed_in_window": len(window),
                                   "next_lease_after_kill_s": None if next_lease is None else round(next_lease - rkill, 2),
                                   "next_lease_after_restart_s": None if next_lease is None else round(next_lease - rback, 2)}
    if cut and restored:
        result["redis_cut"] = cut_figures(c, runs, samples, chaos, calls, per_call, cut_window, refused)
    result["per_call"] = per_call
    return result


def cut_figures(c: Cluster, runs: list[Dialled], samples: list[dict], chaos: dict, calls: dict, per_call: list[dict],
                window: tuple[float, float], refused) -> dict:
    """The bridge cut off from Redis: its calls in flight, its /readyz, the guards in the cut's window, its renewals after."""
    pb, t0 = c.partitioned, chaos["t0"]
    cut, restored = chaos["cut"], chaos["cut_restored"]
    in_flight = [r for r in runs if r.bridge == pb and r.start < cut < r.end]
    holding = [r for r in in_flight if (rec := calls.get(r.sid, {})).get("acquired") and rec["acquired"] < cut
               and (rec["released"] is None or rec["released"] > cut)]
    failed = [r.sid for r in in_flight if calls.get(r.sid, {}).get("outcome") != "completed"]
    elsewhere = [p for p in per_call if p["bridge"] != pb and p["outcome"] not in ("completed", "lost with bridge")
                 and cut - t0 <= p["end_s"] and p["start_s"] <= restored - t0 + REDIS_FAIL_WINDOW]
    inside = [s for s in samples if window[0] <= s["t"] <= window[1]]
    at_cut = ([s for s in samples if s["t"] <= cut] or samples[:1])[-1]
    active_max = max(((g or {}).get("active", 0) for s in inside for g in s["guards"]), default=0)
    engine_peak = max(((e or {}).get("connections_peak", 0) for s in inside for e in s["engines"]), default=0)
    renewals = renewals_in(c.logs[pb] if pb < len(c.logs) else None, restored, window[1])
    unready, again = chaos.get("cut_unready"), chaos.get("cut_ready_again")
    return {"bridge": pb, "at_s": round(cut - t0, 2), "down_s": round(restored - cut, 2), "window_s": [round(w - t0, 2) for w in window],
            "in_flight": len(in_flight), "in_flight_holding_engine": len(holding), "in_flight_failed": len(failed),
            "in_flight_failed_calls": failed, "dialled_to_it_during_cut": sum(1 for r in runs if r.bridge == pb and cut <= r.start < restored),
            "failed_elsewhere_near_it": len(elsewhere),
            "readyz_unready_after_s": None if unready is None else round(unready - cut, 2), "readyz_said": chaos.get("cut_readyz"),
            "readyz_ready_after_restore_s": None if again is None else round(again - restored, 2),
            "guard_refused_in_window": refused(inside[-1]) - refused(at_cut) if inside else 0,
            "guard_active_max_in_window": active_max, "engine_connections_peak_by_window_end": engine_peak,
            "leases_claimed_back": renewals[0], "leases_lost": renewals[1]}


def renewals_in(log: Path | None, since: float, until: float) -> tuple[int | None, int | None]:
    """(leases claimed back, leases lost) the bridge's log reports from `since` to `until` (time.time()); None without a log."""
    import re

    if log is None or not log.is_file():
        return None, None
    back = lost = 0
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})", line)
        if not m or not since <= datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() <= until:
            continue
        if (n := re.search(r"forgotten (\d+) .*claimed back", line)) is not None:
            back += int(n.group(1))
        elif re.search(r"lease on engine .* (lost|taken by another holder)", line):
            lost += 1
    return back, lost


def report(args, plan: Plan, r: dict) -> None:
    d, ls = r["double_bookings"], r["lease_setup_ms"]
    rows = [
        ["calls", f"{args.calls} in {plan.bursts} bursts of {args.burst}, {plan.interval:.1f} s apart"],
        ["outcomes", ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))],
        ["guards refused (busy/token)", f"{d['guard_refused']} ({d['guard_refused_busy']}/{d['guard_refused_token']}), "
                                        f"{d['guard_refused_before_redis_restart']} before the Redis restart"
                                        + (" (outside the Redis cut)" if r.get("redis_cut") else "")],
        ["guard active max / engine peak", f"{d['guard_active_max']} / {d['engine_connections_peak']} "
                                           f"({d['engine_connections_peak_before_redis_restart']} before the Redis restart)"],
        ["engine idle while a caller waited", f"{r['engine_idle_while_waiting_s']} s: "
                                              + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["engine_idle_while_waiting_by_s"].items())
                                              + f" ({1000 * r['engine_idle_while_waiting_by_s']['elsewhere'] / max(1, r['waited_calls']):.0f} ms "
                                                "per caller that waited)"],
        ["FIFO violations", f"{r['fifo_violations']} pairs of {r['waited_calls']} calls that waited"
                            + (f", {r['fifo_violations_cut_bridge']} with a caller of the bridge cut off from Redis" if r.get("redis_cut") else "")],
        ["lease set-up ms p50/p99", f"{ls['p50']} / {ls['p99']} (n {ls['n']})"],
    ]
    k = r.get("bridge_kill")
    if k:
        rows += [["bridge 0 killed at", f"{k['at_s']} s: {k['calls_lost']} calls lost, {k['engines_held']} engines held"],
                 ["  re-admitted after s (max)", f"{', '.join(f'{e} {v}' for e, v in k['readmitted_s'].items()) or '-'} "
                                                 f"({k['max_s']}; target {k['target_s']:g})"]]
    x = r.get("redis_restart")
    if x:
        rows += [["Redis killed at", f"{x['at_s']} s, back after {x['down_s']} s"],
                 ["  in flight / failed of them", f"{x['in_flight']} / {x['in_flight_failed']}; failed near it {x['failed_in_window']}"],
                 ["  next lease after kill / restart s", f"{x['next_lease_after_kill_s']} / {x['next_lease_after_restart_s']}"]]
    x = r.get("redis_cut")
    if x:
        rows += [[f"bridge {x['bridge']} cut from Redis at", f"{x['at_s']} s for {x['down_s']} s (2 x TTL); window to {x['window_s'][1]} s"],
                 ["  in flight on it / failed of them", f"{x['in_flight']} ({x['in_flight_holding_engine']} holding an engine) / "
                                                        f"{x['in_flight_failed']}"],
                 ["  dialled to it in the cut / failed elsewhere", f"{x['dialled_to_it_during_cut']} / {x['failed_elsewhere_near_it']}"],
                 ["  its /readyz", f"503 after {x['readyz_unready_after_s']} s, 200 {x['readyz_ready_after_restore_s']} s after the restore"],
                 ["  guards refused / active max / peak", f"{x['guard_refused_in_window']} / {x['guard_active_max_in_window']} / "
                                                          f"{x['engine_connections_peak_by_window_end']} (in the window)"],
                 ["  its leases claimed back / lost", f"{_dash(x['leases_claimed_back'])} / {_dash(x['leases_lost'])} "
                                                      "(restore to window end)"]]
    elif r.get("redis_cut_skipped"):
        rows += [["Redis cut", r["redis_cut_skipped"]]]
    print("\n```")
    print(table(["figure", "value"], rows, first_width=34))
    print("```")


def _dash(v) -> str:
    return "-" if v is None else str(v)


def _bench_cluster(args) -> int:
    argv = command_argv(["bench", "cluster"])
    machine = machine_lines(argv)
    print("\n".join(machine), flush=True)
    if min(args.bridges, args.engines, args.calls, args.burst, args.engines_per_process) < 1 or args.call_secs < 1:
        print("error: --bridges, --engines, --calls, --burst at least 1, --call-secs at least 1", file=sys.stderr)
        return 2
    plan = Plan.of(args)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(args.log_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        faults = plan.faults(args)
        with cluster(args, work, plan.wait_secs, faults.get("cut_bridge")) as c:
            print(f"scenario: {args.bridges} bridges, {args.engines} guarded engines, Redis {c.redis.url} "
                  f"(lease TTL {args.lease_ttl:g} s, wait {plan.wait_secs:.0f} s); planned {plan.span:.0f} s", flush=True)
            runs, samples, chaos = asyncio.run(drive(args, c, plan))
            time.sleep(0.5)  # the last records are written
            r = figures(args, c, plan, runs, samples, chaos)
    if not args.no_chaos and "cut" not in faults:
        r["redis_cut_skipped"] = f"left out: the run ({plan.span:.0f} s) is too short for it between the kill and the restart"
    report(args, plan, r)
    result = {"bench": "cluster", "machine": machine, "argv": argv,
              "params": {k: v for k, v in vars(args).items() if k not in ("name", "log_dir")}
              | {"burst_interval_s": plan.interval, "bursts": plan.bursts, "wait_secs": plan.wait_secs, "sample_s": SAMPLE_SECS},
              **r, "samples": [{"t": round(s["t"] - chaos["t0"], 2), "active": [(g or {}).get("active") for g in s["guards"]],
                                "engine_peak": [(e or {}).get("connections_peak") for e in s["engines"]]}
                               for s in samples]}
    print(f"\nwritten: {write_json(args.json, 'cluster', result)}")
    return 0
