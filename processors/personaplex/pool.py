"""Engine pool: each call gets a PersonaPlex process of its own, for the call's whole life.

A PersonaPlex server holds one conversation at a time. A second connection is upgraded, then
waits silently, and its prompts can overwrite the first one's (docs/protocols.md, PersonaPlex).
So engines are leased exclusively. An engine whose connect or handshake fails, or which dies
mid-call, leaves the rotation. It is probed in the background with a full handshake, as a call
would make, until it answers again.

When every healthy engine is busy, a call waits its turn, first come first served, for up to
`wait_secs`; the caller hears the holding clip meanwhile. When no engine is healthy, the call
fails at once, with no wait for a probe.
"""

import asyncio
import contextvars
import enum
import time
from collections import deque
from dataclasses import dataclass, field

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from processors.personaplex.discovery import is_dns

MAX_RETRY_SECS = 60.0


class PoolParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list, description="engine URLs; a string is split on commas")
    wait_secs: float = Field(20.0, ge=0, description="all engines busy: the caller hears holding clips this long, then the apology")
    retry_secs: float = Field(5.0, gt=0, description="first probe of an engine out of rotation; the interval doubles up to 60 s")
    probe_timeout_secs: float = Field(20.0, gt=0, description="a probe's connect plus handshake (the prompt phase is 2-9 s)")
    probe_voice_prompt: str = Field("NATF0.pt", description="the voice a probe asks for")
    lease_store: str | None = Field(None, description=(
        "redis://HOST:PORT/DB: every bridge replica leases from one fleet through this Redis (or Valkey); "
        "empty: this process's own pool"))
    lease_ttl_secs: float = Field(10.0, gt=0, le=10.0, description="a lease whose holder stops renewing it expires after this")
    capacity: int = Field(1, ge=1, description=(
        "sessions each engine serves at once: 1 for PersonaPlex; more for a multi-session server (its guard's --capacity), "
        "with lease_store"))
    discover_secs: float = Field(10.0, gt=0, description="dns+ws:// entries are resolved again this often; engines that join or leave follow")

    @field_validator("lease_store", mode="before")
    @classmethod
    def _store(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not str(value).startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"lease_store must be a redis:// (rediss://, unix://) URL, got {str(value)[:40]!r}")
        return value

    @model_validator(mode="after")
    def _capacity_needs_leases(self):
        if self.capacity > 1 and not self.lease_store:
            raise ValueError("capacity above 1 is served through lease_store (the in-process pool leases whole engines): "
                             "set lease_store, or capacity: 1")
        return self

    @field_validator("urls", mode="before")
    @classmethod
    def _split(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @field_validator("urls")
    @classmethod
    def _distinct_ws(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("ws://", "wss://", "dns+ws://", "dns+wss://")):
                raise ValueError(f"engine URL must be ws://, wss:// (or dns+ws://, dns+wss:// to resolve a name), got {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError("an engine URL is listed twice: one engine serves one call, so each must be distinct")
        return urls


class NoEngine(Exception):
    """No engine for this call: all busy past the wait, or none in rotation."""


class State(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    DOWN = "down"  # out of rotation, being probed


@dataclass(eq=False)
class Engine:
    url: str
    state: State = State.IDLE
    call_id: str | None = None
    idle_since: float = field(default_factory=time.monotonic)
    failures: int = 0
    last_error: str = ""
    token: int | None = None  # the fencing token of the current lease (a shared pool's; grows per engine)


class EngineFleet:
    """What every pool shows of its engines: for /stats, /readyz and the metrics."""

    engines: list[Engine]

    @property
    def size(self) -> int:
        return len(self.engines)

    def count(self, state: State) -> int:
        return sum(e.state is state for e in self.engines)

    @property
    def available(self) -> bool:
        """At least one engine in rotation (idle or busy): what readiness reports."""
        return self.count(State.DOWN) < self.size

    @property
    def problem(self) -> str | None:
        """Why calls cannot be served now, for /readyz; None when they can."""
        return None if self.available else "no engine in rotation"

    def snapshot(self) -> list[dict]:
        return [{"url": e.url, "state": e.state.value, "call_id": e.call_id, "failures": e.failures, "last_error": e.last_error,
                 "token": e.token} for e in self.engines]

    async def start(self) -> None:
        """Whatever the pool needs before its first lease (a process's own pool: nothing)."""


class EnginePool(EngineFleet):
    """Exclusive leases on engines, FIFO waiting, failover and background recovery."""

    def __init__(self, params: PoolParams, probe=None):
        """`probe(url, timeout)` raises when the engine does not hand-shake (default: a PersonaPlex session)."""
        if not params.urls:
            raise ValueError("an engine pool needs at least one URL")
        self.params = params
        self.engines = [Engine(url) for url in params.urls if not is_dns(url)]  # dns+ws:// entries: set_urls, from discovery
        self._probe = probe or _personaplex_probe(params.probe_voice_prompt)
        self._waiters: deque[tuple[asyncio.Future, str]] = deque()
        self._probes: dict[Engine, asyncio.Task] = {}
        self.stats = {"leases": 0, "waits": 0, "no_engine": 0, "failures": 0, "recoveries": 0}

    def set_urls(self, urls: list[str]) -> None:
        """Discovery's new list: an engine that joined serves the longest waiter at once; one that left is dropped (a
        call on it goes on; at its end the engine is not handed over)."""
        known = {e.url: e for e in self.engines}
        self.engines = [known.get(url) or Engine(url) for url in urls]
        for url in set(known) - set(urls):
            if known[url] in self._probes:
                self._probes.pop(known[url]).cancel()
        for engine in self.engines:
            if engine.url not in known:
                self._hand_over(engine)  # to the longest waiter, else idle
        if not self.available:
            self._fail_waiters()

    async def acquire(self, call_id: str, timeout: float | None = None) -> Engine:
        """An idle engine, leased to `call_id` until `release` or `failed`; NoEngine otherwise."""
        idle = [e for e in self.engines if e.state is State.IDLE]
        if idle:
            return self._lease(min(idle, key=lambda e: e.idle_since), call_id)  # least recently used
        if not self.available:
            self.stats["no_engine"] += 1
            raise NoEngine(self._all_down())
        wait = self.params.wait_secs if timeout is None else timeout
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiters.append((future, call_id))
        self.stats["waits"] += 1

        def give_up() -> None:
            if not future.done():
                self.stats["no_engine"] += 1
                future.set_exception(NoEngine(f"all {self.size} engines stayed busy for {wait:g} s"))

        # Not asyncio.wait_for: on Python 3.11 it returns the result, swallowing the cancellation, when
        # the call is cancelled just after the hand-over; that call would then hold the engine unseen.
        timer = loop.call_later(wait, give_up)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # handed over to a call that has since gone
            future.cancel()
            raise
        finally:
            timer.cancel()

    def release(self, engine: Engine) -> None:
        """The call ended normally: the engine serves the next caller (unless discovery dropped it meanwhile)."""
        if engine.state is State.BUSY:
            engine.call_id = None
            if engine in self.engines:
                self._hand_over(engine)
            else:
                engine.state = State.IDLE

    def busy(self, engine: Engine) -> None:
        """The engine's guard serves another session (a bridge that shares no leases with this one): given back."""
        self.release(engine)

    def failed(self, engine: Engine, reason: str) -> None:
        """The engine did not answer or died: out of rotation, probed until it answers."""
        if engine.state is State.DOWN:
            return
        engine.state, engine.call_id = State.DOWN, None
        engine.failures += 1
        engine.last_error = reason
        self.stats["failures"] += 1
        logger.warning(f"engine {engine.url} out of rotation ({self.count(State.DOWN)}/{self.size} down): {reason}")
        if engine not in self.engines:
            return  # discovery dropped it: nothing to probe
        # A fresh context: the probe outlives the call that failed, and its log lines are not that call's.
        self._probes[engine] = asyncio.get_running_loop().create_task(
            self._recover(engine), name=f"engine-probe-{engine.url}", context=contextvars.Context())
        if not self.available:
            self._fail_waiters()

    def _fail_waiters(self) -> None:
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                self.stats["no_engine"] += 1
                future.set_exception(NoEngine(self._all_down()))

    async def close(self) -> None:
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lease(self, engine: Engine, call_id: str) -> Engine:
        engine.state, engine.call_id = State.BUSY, call_id
        self.stats["leases"] += 1
        return engine

    def _hand_over(self, engine: Engine) -> None:
        """To the longest-waiting call, else idle."""
        while self._waiters:
            future, call_id = self._waiters.popleft()
            if not future.done():
                future.set_result(self._lease(engine, call_id))
                return
        engine.state, engine.idle_since = State.IDLE, time.monotonic()

    def _all_down(self) -> str:
        return all_down(self.engines)

    async def _recover(self, engine: Engine) -> None:
        delay = self.params.retry_secs
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._probe(engine.url, self.params.probe_timeout_secs)
                except Exception as exc:  # noqa: BLE001 - any failure keeps it out
                    engine.last_error = f"probe: {exc!r}"
                    delay = min(delay * 2, MAX_RETRY_SECS)
                    continue
                self.stats["recoveries"] += 1
                logger.info(f"engine {engine.url} back in rotation after {engine.failures} failure(s)")
                self._hand_over(engine)
                return
        finally:
            self._probes.pop(engine, None)


def all_down(engines: list[Engine]) -> str:
    """NoEngine's words when no engine is in rotation."""
    if not engines:
        return "no engine in rotation: discovery has found none (yet)"
    last = engines[-1].last_error if len(engines) == 1 else "; ".join(f"{e.url}: {e.last_error}" for e in engines)
    return f"no engine in rotation (all {len(engines)} failed; probing): {last}"


def _personaplex_probe(voice_prompt: str):
    async def probe(url: str, timeout: float) -> None:
        from processors.personaplex.session import open_session

        ws = await open_session(url, voice_prompt, "You are being health-checked; say nothing.", timeout=timeout)
        await ws.close()

    return probe
