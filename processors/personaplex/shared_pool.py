"""Engine pool shared by any number of bridge replicas through one Redis: same interface as EnginePool.

Every step that reads and writes more than one key is a Lua script (EVALSHA), so it is atomic against
every other replica's steps; no lease is ever granted from a stale local view.

Keys (P = `prefix`; URL = an engine URL; POOL = a digest of the pool's sorted URLs):
  P:cap                 hash URL -> sessions the engine serves at once (1 for PersonaPlex), written by start()
  P:lease:URL:SLOT      "TOKEN|HOLDER|CALL_ID", PX lease_ttl: a slot is free when the key is absent, so a
                        holder that dies frees it within the TTL; renewed (PEXPIRE) every ttl/3 only while the
                        value still names this holder and token (written back if the slot is empty), released by
                        compare-and-delete (idempotent)
  P:token:URL           the fencing token, INCR per lease; first seeded from Redis's clock in ms, so it keeps
                        growing after a Redis restart or FLUSHALL wiped it (unless > 1000 leases/s)
  P:lru  P:seq          hash URL -> release sequence: the least recently released free engine is leased first
  P:q:POOL              sorted set of waiter ids, scored by arrival (µs of Redis's clock): the fleet-wide FIFO of
                        callers; a waiter passes its score on every try, so after a flush it re-registers in its place
  P:w:WAITER            heartbeat, PX 1.5 s, refreshed by each poll: a waiter whose replica died is skipped
  P:wake                pub/sub channel: a slot freed or an engine changed state (the URL)
  P:down:URL            hash {reason, delay}: out of rotation for every replica until a probe succeeds
  P:probe:URL           "wait" PX backoff, then the prober's id (SET NX PX): exactly one probe per backoff, fleet-wide
  P:failures            hash URL -> times the engine left the rotation
  P:epoch               the store's epoch, made when absent; a replica that knew another sees the store lost its data
  P:settle              PX SETTLE_SECS from the epoch's making: no lease is granted while holders claim back and
                        waiters re-register (a new store waits too: it cannot be told from an emptied one)

Acquire: one script prunes dead waiters, finds the caller's place k among the live ones (a newcomer's place
is the tail) and, outside a settle window, takes a slot only if k < free slots of healthy engines, so no caller is overtaken: those
ahead still have a slot each. Otherwise it queues the caller, who retries when woken: every release,
engine down and engine back publishes on P:wake, and each replica's one subscriber wakes its waiters
(about a millisecond); a poll every 250 ms covers a lost message or a lease that expired unreleased, and
refreshes the waiter's heartbeat. Only a waiter's own script grants it a lease, so timing out or being
cancelled cannot strand one; a script answer that arrives after the caller left is released.

Lost data (FLUSHALL, or a restart without persistence): the first replica to touch the store after it (its
watcher every 250 ms, or an acquire, or a replica just started) makes a new epoch and opens the settle window; each replica, seeing the new
epoch, renews at once, which claims its leases back, and its waiters re-register with their arrival scores. When
the window closes (SETTLE_SECS, about a second) the store knows again which engines are taken and who waits in
which order, so leases resume in FIFO order without landing on taken engines. A replica that stalls through the
window is still safe: its engine's guard refuses the newcomer (503), which takes the next engine.

Renewal: one task per pool renews all its leases every ttl/3 in one script. A slot found empty (Redis
flushed or restarted without persistence, or the lease expired during a stall) is claimed back with the
same value, so the store learns again which engines are taken. A lease found in another holder's hands
(it expired while this replica could not reach Redis) is lost: its Lease.lost event is set and an error
logged, but renewal goes on, and claims it back as soon as the other holder, refused by the engine's guard
while this call's session lives, gives the slot up; so the store converges to what the guards know. A lease that expired during a stall or a partition
from Redis may meanwhile have been granted to another call: its guard answers 503, and that bridge gives it back
and takes the next (EngineBusy).

Health: failed() marks the engine down fleet-wide (and frees the failed lease) in one script; each
replica's watcher sees down engines every 250 ms and the one whose SET NX wins the probe lock probes.
Redis unreachable: acquire raises NoEngine at once (a waiter keeps trying until its deadline), `available`
is False, and the outage is logged once, with its end. Needs one standalone Redis (scripts touch keys
they compute, so no Redis Cluster).
"""

import asyncio
import contextvars
import hashlib
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from processors.personaplex.discovery import is_dns
from processors.personaplex.pool import MAX_RETRY_SECS, Engine, EngineFleet, NoEngine, PoolParams, State, _personaplex_probe, all_down

POLL_SECS = 0.25  # a waiter's poll, when no wake-up comes first; also its heartbeat
VIEW_SECS = 0.25  # the fleet view (count, available, snapshot) and the probe schedule
WAITER_TTL_SECS = 1.5  # a waiter silent this long (its replica died or stalled) loses its place
PLACE_KEPT_SECS = 60.0  # a place kept after a guard's "busy" and not taken up by then: its call has ended
SETTLE_SECS = 1.0  # after the store lost its data: time for every watcher (VIEW_SECS) to claim back, every waiter (POLL_SECS) to re-register
STORE_TIMEOUT_SECS = 2.0  # one Redis command, connect included
STORE_ERRORS = (RedisError, OSError, TimeoutError)

_EPOCH = """
local function epoch_of(p, settle_ms)
  local cur = redis.call('GET', p .. ':epoch')
  if cur then return cur end
  local t = redis.call('TIME')
  cur = t[1] .. '.' .. t[2]
  redis.call('SET', p .. ':epoch', cur)
  redis.call('SET', p .. ':settle', cur, 'PX', settle_ms)
  return cur
end
"""
# The store's epoch, made when absent: by the fleet's first replica on a new store, or after the store lost
# its data (a flush, or a restart without persistence). Either way the settle window opens, in which no
# lease is granted: every holder claims its lease back and every waiter re-registers in its old place
# before leases resume. A new store and an emptied one look alike, so both wait: once per store's life.

_ACQUIRE = _EPOCH + """
local p, me = ARGV[1], ARGV[2]
local hb_ms, ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local holder, call_id, since = ARGV[5], ARGV[6], ARGV[7]
local epoch = epoch_of(p, ARGV[8])
local q, hb = KEYS[1], p .. ':w:' .. me
local free, healthy = {}, 0
for i = 9, #ARGV do
  local url = ARGV[i]
  if redis.call('EXISTS', p .. ':down:' .. url) == 0 then
    healthy = healthy + 1
    local cap = tonumber(redis.call('HGET', p .. ':cap', url) or '1')
    for s = 0, cap - 1 do
      if redis.call('EXISTS', p .. ':lease:' .. url .. ':' .. s) == 0 then free[#free + 1] = {url, s} end
    end
  end
end
if healthy == 0 then
  redis.call('ZREM', q, me)
  redis.call('DEL', hb)
  return {'down', epoch}
end
if since == '' then
  local t = redis.call('TIME')
  since = t[1] .. string.format('%06d', tonumber(t[2]))
end
local pos = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', q, '-inf', '(' .. since)) do
  if redis.call('EXISTS', p .. ':w:' .. id) == 1 then pos = pos + 1 else redis.call('ZREM', q, id) end
end
if pos < #free and redis.call('EXISTS', p .. ':settle') == 0 then
  local best, best_seq = nil, nil
  for _, f in ipairs(free) do
    local seq = tonumber(redis.call('HGET', p .. ':lru', f[1]) or '0')
    if best == nil or seq < best_seq then best, best_seq = f, seq end
  end
  local tk = p .. ':token:' .. best[1]
  if redis.call('EXISTS', tk) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', tk, t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)))
  end
  local token = redis.call('INCR', tk)
  redis.call('SET', p .. ':lease:' .. best[1] .. ':' .. best[2], string.format('%d', token) .. '|' .. holder .. '|' .. call_id, 'PX', ttl_ms)
  redis.call('ZREM', q, me)
  redis.call('DEL', hb)
  return {'ok', best[1], best[2], token, since, epoch}
end
redis.call('ZADD', q, since, me)
redis.call('SET', hb, '1', 'PX', hb_ms)
return {'wait', pos, #free, since, epoch}
"""

_SEE_EPOCH = _EPOCH + """
return epoch_of(ARGV[1], ARGV[2])
"""

_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

_RENEW = """
local out = {}
for i, k in ipairs(KEYS) do
  local held = redis.call('GET', k)
  if held == ARGV[i + 1] then
    redis.call('PEXPIRE', k, ARGV[1])
    out[i] = 1
  elseif not held then
    redis.call('SET', k, ARGV[i + 1], 'PX', ARGV[1])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""
# 2: the slot's key was gone (Redis flushed or restarted without persistence) and is claimed back, so the
# store learns again which engines are taken; only another holder's value in the slot means a lost lease.

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', ARGV[2] .. ':lru', ARGV[3], redis.call('INCR', ARGV[2] .. ':seq'))
redis.call('PUBLISH', ARGV[2] .. ':wake', ARGV[3])
return 1
"""

_MARK_DOWN = """
local p, url = ARGV[1], ARGV[2]
if redis.call('GET', KEYS[1]) == ARGV[3] then redis.call('DEL', KEYS[1]) end
local down = p .. ':down:' .. url
if redis.call('EXISTS', down) == 1 then return 0 end
redis.call('HSET', down, 'reason', ARGV[4], 'delay', ARGV[5])
redis.call('SET', p .. ':probe:' .. url, 'wait', 'PX', ARGV[5])
redis.call('HINCRBY', p .. ':failures', url, 1)
redis.call('PUBLISH', p .. ':wake', url)
return 1
"""

_PROBE_LOCK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_PROBE_DONE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
local delay = math.min(tonumber(redis.call('HGET', KEYS[1], 'delay') or ARGV[4]) * 2, tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'delay', string.format('%d', delay), 'reason', ARGV[3])
redis.call('SET', KEYS[2], 'wait', 'PX', string.format('%d', delay))
return 0
"""


@dataclass(eq=False)
class Lease(Engine):
    """What acquire returns: an Engine, plus its lease's key and value and `lost`, set when a renewal finds the lease gone."""

    slot: int = 0
    key: str = ""
    value: str = ""
    since: str = ""  # the call's place in the queue (its arrival on Redis's clock), kept if a guard says busy
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class SharedEnginePool(EngineFleet):
    """Exclusive leases on a fleet of engines shared by every replica through Redis; EnginePool's interface."""

    def __init__(self, params: PoolParams, store_url: str, *, replica: str | None = None, lease_ttl_secs: float = 10.0, probe=None,
                 prefix: str = "cp", capacity: int | dict[str, int] = 1):
        """`capacity`: sessions each engine serves at once (a multi-session server: more than 1), or per URL."""
        if not params.urls:
            raise ValueError("an engine pool needs at least one URL")
        if lease_ttl_secs <= 0:
            raise ValueError("lease_ttl_secs must be positive")
        self.params = params
        self.urls = [url for url in params.urls if not is_dns(url)]  # dns+ws:// entries: set_urls, from discovery
        self.replica = replica or uuid.uuid4().hex[:12]
        self.lease_ttl_secs = lease_ttl_secs
        self.prefix = prefix
        self._capacity = capacity
        self.capacity = {url: self._capacity_of(url) for url in self.urls}
        self.engines = [Engine(url) for url in self.urls]  # the fleet view, refreshed every VIEW_SECS
        self.stats = {"leases": 0, "waits": 0, "no_engine": 0, "failures": 0, "recoveries": 0, "lost": 0}
        self._probe = probe or _personaplex_probe(params.probe_voice_prompt)
        self._store = _redacted(store_url)
        self._redis = aioredis.Redis.from_url(store_url, decode_responses=True, socket_timeout=STORE_TIMEOUT_SECS,
                                              socket_connect_timeout=STORE_TIMEOUT_SECS, retry=Retry(NoBackoff(), 1))
        # retried once: a restarted Redis leaves every pooled connection dead, and the first command on each fails
        s = self._redis.register_script
        self._acquire, self._leave, self._renew, self._see_epoch = s(_ACQUIRE), s(_LEAVE), s(_RENEW), s(_SEE_EPOCH)
        self._release, self._mark_down, self._probe_lock, self._probe_done = s(_RELEASE), s(_MARK_DOWN), s(_PROBE_LOCK), s(_PROBE_DONE)
        # named by the configured list, so replicas share one queue while discovery changes the engines
        self._queue = f"{prefix}:q:{hashlib.sha1(' '.join(sorted(params.urls)).encode()).hexdigest()[:12]}"
        self._held: set[Lease] = set()
        self._places: dict[str, tuple[str, float]] = {}  # call id -> (its place, when kept): between a guard's "busy" and the next acquire
        self._pending: set[asyncio.Task] = set()
        self._probes: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._store_ok = True
        self._wake = asyncio.Event()  # set (and replaced) whenever a slot may have freed or an engine changed state
        self._epoch = ""  # the store's epoch this replica knows; another one means the store lost its data
        self._renew_now = asyncio.Event()

    # -- the view (EngineFleet's, from Redis at most VIEW_SECS old; IDLE means a free slot) -------------------------

    @property
    def problem(self) -> str | None:
        """Why calls cannot be served from this fleet now, for /readyz; None when they can."""
        if not self._store_ok:
            return f"lease store {self._store} unreachable"
        return None if self.available else "no engine in rotation"

    @property
    def available(self) -> bool:
        """Redis answers and at least one engine is in rotation fleet-wide: what readiness reports."""
        return self._store_ok and super().available

    def _capacity_of(self, url: str) -> int:
        return int(self._capacity.get(url, 1) if isinstance(self._capacity, dict) else self._capacity)

    def set_urls(self, urls: list[str]) -> None:
        """Discovery's new list: engines that joined are offered at once; one that left is no longer leased (a call on it
        goes on, its lease renewed until released)."""
        views = {e.url: e for e in self.engines}
        self.urls = list(urls)
        self.capacity = {url: self._capacity_of(url) for url in self.urls}
        self.engines = [views.get(url) or Engine(url) for url in self.urls]
        for url in set(views) - set(self.urls):
            if url in self._probes:
                self._probes.pop(url).cancel()
        self._wake_waiters()

    # -- leases --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Registers the engines' capacities and starts the watcher and the renewer; acquire calls it when needed."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        for name, coro in (("watch", self._watch()), ("renew", self._renew_loop()), ("listen", self._listen())):
            self._tasks.append(loop.create_task(coro, name=f"engine-pool-{name}-{self.replica}", context=contextvars.Context()))
        try:
            await self._refresh()
        except STORE_ERRORS as exc:
            self._outage(exc)

    async def acquire(self, call_id: str, timeout: float | None = None) -> Engine:
        """A free engine slot, leased to `call_id` until `release` or `failed`; NoEngine otherwise."""
        await self.start()
        loop = asyncio.get_running_loop()
        wait = self.params.wait_secs if timeout is None else timeout
        deadline = loop.time() + wait
        waiter = uuid.uuid4().hex
        holder = f"{self.replica}/{waiter}"
        since = self._places.pop(call_id, ("", 0.0))[0]  # the waiter's place: its arrival on Redis's clock, or its place before a busy engine
        waited, left = False, False
        try:
            while True:
                wake = self._wake  # taken before the step, so a wake-up between the step and the nap is not missed
                try:
                    reply = await self._try(waiter, holder, call_id, since, max(0.25, deadline - loop.time()))
                except STORE_ERRORS as exc:
                    self._outage(exc)
                    if not waited or loop.time() >= deadline:
                        self.stats["no_engine"] += 1
                        raise NoEngine(f"engine pool store {self._store} unreachable: {_why(exc)}") from exc
                    await self._nap(wake, deadline)
                    continue
                self._store_back()
                self._saw_epoch(reply[-1])
                if reply[0] == "ok":
                    left = True
                    return self._leased(reply, holder, call_id)
                if reply[0] == "down":
                    left = True
                    self.stats["no_engine"] += 1
                    await self._refresh_quietly()
                    raise NoEngine(all_down(self.engines))
                since = reply[3]
                if not waited:
                    waited = True
                    self.stats["waits"] += 1
                if loop.time() >= deadline:
                    self.stats["no_engine"] += 1
                    raise NoEngine(f"all {self.size} engines stayed busy for {wait:g} s")
                await self._nap(wake, deadline)
        finally:
            if not left:
                self._spawn(self._leave(keys=[self._queue, f"{self.prefix}:w:{waiter}"], args=[waiter]))

    def release(self, engine: Engine) -> None:
        """The call ended normally: the lease is deleted if it is still this call's (so twice is harmless)."""
        if not isinstance(engine, Lease) or engine.state is not State.BUSY:
            return
        engine.state, engine.call_id = State.IDLE, None
        self._held.discard(engine)
        self._spawn(self._release(keys=[engine.key], args=[engine.value, self.prefix, engine.url]))

    def busy(self, engine: Engine) -> None:
        """The engine's guard serves another session (its lease expired on a bridge cut off from Redis, or the store
        lost it): given back, and the call keeps its place in the queue for its next acquire."""
        if isinstance(engine, Lease) and engine.state is State.BUSY and engine.call_id:
            now = asyncio.get_running_loop().time()
            self._places = {call: kept for call, kept in self._places.items() if now - kept[1] < PLACE_KEPT_SECS}  # calls that ended meanwhile
            self._places[engine.call_id] = (engine.since, now)
        self.release(engine)

    def failed(self, engine: Engine, reason: str) -> None:
        """The engine did not answer or died: out of rotation for the whole fleet, probed by one replica until it answers."""
        if engine.state is State.DOWN:
            return
        engine.state, engine.call_id = State.DOWN, None
        engine.last_error = reason
        self.stats["failures"] += 1
        if isinstance(engine, Lease):
            self._held.discard(engine)
        for view in self.engines:
            if view.url == engine.url:
                view.state, view.call_id, view.last_error = State.DOWN, None, reason
        logger.warning(f"engine {engine.url} out of rotation ({self.count(State.DOWN)}/{self.size} down, fleet-wide): {reason}")
        key, value = (engine.key, engine.value) if isinstance(engine, Lease) else ("", "")
        self._spawn(self._mark_down(keys=[key or f"{self.prefix}:none"],
                                    args=[self.prefix, engine.url, value, reason, _ms(self.params.retry_secs)]))

    async def close(self, *, release_held: bool = True) -> None:
        """Stops renewing and probing; leases still held are released (`release_held=False`: left to expire, as a crash would)."""
        for task in [*self._tasks, *self._probes.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._probes.values(), return_exceptions=True)
        self._tasks.clear()
        if release_held:
            for lease in list(self._held):
                self.release(lease)
        self._held.clear()
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        await self._redis.aclose()

    # -- internals -----------------------------------------------------------------------------------------------

    async def _try(self, waiter: str, holder: str, call_id: str, since: str, timeout: float) -> list:
        """One acquire step. Shielded: if the caller is cancelled or times out, a lease the step granted anyway is released."""
        args = [self.prefix, waiter, _ms(WAITER_TTL_SECS), _ms(self.lease_ttl_secs), holder, call_id, since, _ms(SETTLE_SECS), *self.urls]
        step = asyncio.ensure_future(self._acquire(keys=[self._queue], args=args))
        try:
            return await asyncio.wait_for(asyncio.shield(step), timeout)
        except BaseException:
            step.add_done_callback(lambda done: self._orphan(done, holder, call_id))
            raise

    async def _nap(self, wake: asyncio.Event, deadline: float) -> None:
        """Until a wake-up, the next poll or the deadline."""
        try:
            await asyncio.wait_for(wake.wait(), max(0.0, min(POLL_SECS, deadline - asyncio.get_running_loop().time())))
        except TimeoutError:
            pass

    def _wake_waiters(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def _listen(self) -> None:
        """Wake-ups from every replica (a release, an engine down or back), over pub/sub; polling covers a lost message."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(f"{self.prefix}:wake")
                while True:
                    if await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is not None:
                        self._wake_waiters()
            except STORE_ERRORS as exc:
                self._outage(exc)
                await asyncio.sleep(VIEW_SECS)
            finally:
                await pubsub.aclose()

    def _saw_epoch(self, epoch: str) -> None:
        if self._epoch and epoch != self._epoch:
            logger.warning(f"engine pool store {self._store} lost its data (a flush, or a restart without persistence): "
                           f"claiming this replica's {len(self._held)} leases back; no lease is granted for {SETTLE_SECS:g} s")
            self._renew_now.set()
        self._epoch = epoch

    def _orphan(self, step: asyncio.Future, holder: str, call_id: str) -> None:
        if step.cancelled() or step.exception() is not None or step.result()[0] != "ok":
            return
        lease = self._leased(step.result(), holder, call_id)
        logger.info(f"call {call_id}: engine {lease.url} granted after the call stopped waiting; released")
        self.release(lease)

    def _leased(self, reply: list, holder: str, call_id: str) -> Lease:
        _, url, slot, token = reply[:4]
        token = int(token)
        lease = Lease(url, state=State.BUSY, call_id=call_id, token=token, slot=int(slot), key=f"{self.prefix}:lease:{url}:{slot}",
                      value=f"{token}|{holder}|{call_id}", since=reply[4])
        self._held.add(lease)
        self.stats["leases"] += 1
        for view in self.engines:
            if view.url == url and self.capacity.get(url, 1) == 1:
                view.state, view.call_id, view.token = State.BUSY, call_id, token
        return lease

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._outage(task.exception())

    def _outage(self, exc: BaseException) -> None:
        if self._store_ok:
            self._store_ok = False
            logger.error(f"engine pool store {self._store} unreachable: {_why(exc)}; no engine can be leased until it answers")

    def _store_back(self) -> None:
        if not self._store_ok:
            self._store_ok = True
            logger.info(f"engine pool store {self._store} answers again")

    async def _renew_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._renew_now.wait(), self.lease_ttl_secs / 3)
            except TimeoutError:
                pass
            self._renew_now.clear()
            leases = [lease for lease in self._held if lease.state is State.BUSY]
            if not leases:
                continue
            try:
                kept = await self._renew(keys=[lease.key for lease in leases], args=[_ms(self.lease_ttl_secs), *(lease.value for lease in leases)])
            except STORE_ERRORS as exc:
                self._outage(exc)
                continue
            self._store_back()
            reclaimed = sum(ok == 2 for ok in kept)
            if reclaimed:
                self.stats["reclaimed"] = self.stats.get("reclaimed", 0) + reclaimed
                logger.warning(f"engine pool store {self._store} had forgotten {reclaimed} of this replica's leases; claimed back")
            for lease, ok in zip(leases, kept):
                if not ok and not lease.lost.is_set():
                    self.stats["lost"] += 1
                    lease.lost.set()
                    logger.error(f"call {lease.call_id}: lease on engine {lease.url} (token {lease.token}) taken by another holder "
                                 "(it expired while this replica could not renew it); the call keeps its session, whose guard "
                                 "refuses the other, and the lease is claimed back when the slot is free")
                elif ok == 2 and lease.lost.is_set():
                    lease.lost.clear()
                    logger.info(f"call {lease.call_id}: lease on engine {lease.url} claimed back")

    async def _watch(self) -> None:
        while True:
            try:
                down = await self._refresh()
                self._store_back()
                for url in down:
                    if url not in self._probes:
                        await self._maybe_probe(url)
            except STORE_ERRORS as exc:
                self._outage(exc)
            await asyncio.sleep(VIEW_SECS)

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except STORE_ERRORS as exc:
            self._outage(exc)

    async def _refresh(self) -> list[str]:
        """The fleet view from Redis; returns the URLs out of rotation."""
        p, urls, views, capacity = self.prefix, list(self.urls), list(self.engines), dict(self.capacity)  # set_urls may run meanwhile
        self._saw_epoch(await self._see_epoch(args=[p, _ms(SETTLE_SECS)]))
        if not urls:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{p}:cap", mapping=capacity)  # again after a flush or a restart of Redis
            for url in urls:
                pipe.hgetall(f"{p}:down:{url}")
                pipe.mget([f"{p}:lease:{url}:{slot}" for slot in range(capacity[url])])
                pipe.get(f"{p}:token:{url}")
            pipe.hmget(f"{p}:failures", urls)
            replies = await pipe.execute()
        failures = replies[-1]
        down_urls = []
        for i, view in enumerate(views):
            down, leases, token = replies[1 + 3 * i: 4 + 3 * i]
            held = [value.split("|", 2) for value in leases if value]
            view.failures = int(failures[i] or 0)
            view.token = int(token) if token else None
            view.call_id = held[0][2] if held else None
            if down:
                view.state, view.last_error = State.DOWN, down.get("reason", "")
                down_urls.append(view.url)
            else:
                view.state = State.BUSY if len(held) >= capacity[view.url] else State.IDLE
        return down_urls

    async def _maybe_probe(self, url: str) -> None:
        me = f"{self.replica}/{uuid.uuid4().hex[:8]}"
        lock = _ms(self.params.probe_timeout_secs + STORE_TIMEOUT_SECS * 2)
        if await self._probe_lock(keys=[f"{self.prefix}:down:{url}", f"{self.prefix}:probe:{url}"], args=[me, lock]):
            self._probes[url] = asyncio.get_running_loop().create_task(self._probe_once(url, me), name=f"engine-probe-{url}",
                                                                       context=contextvars.Context())

    async def _probe_once(self, url: str, me: str) -> None:
        """This replica won the fleet's probe of `url`: one handshake, then the verdict for every replica."""
        try:
            error = ""
            try:
                await asyncio.wait_for(self._probe(url, self.params.probe_timeout_secs), self.params.probe_timeout_secs)
            except Exception as exc:  # noqa: BLE001 - any failure keeps it out
                error = f"probe: {exc!r}"
            keys = [f"{self.prefix}:down:{url}", f"{self.prefix}:probe:{url}"]
            verdict = await self._probe_done(keys=keys, args=[me, "0" if error else "1", error, _ms(MAX_RETRY_SECS), f"{self.prefix}:wake", url])
            if verdict == 1:
                self.stats["recoveries"] += 1
                logger.info(f"engine {url} back in rotation for the fleet (probed by replica {self.replica})")
                await self._refresh()
        except STORE_ERRORS as exc:
            self._outage(exc)
        finally:
            self._probes.pop(url, None)


def _ms(secs: float) -> int:
    return max(1, round(secs * 1000))


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
