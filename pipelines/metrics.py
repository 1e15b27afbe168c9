"""Prometheus metrics for one server process (`GET /metrics`).

Each server has its own registry rather than prometheus-client's global one, so several servers in
one process (tests, benchmarks) do not mix their counts. Calls report through `CallLog`. Gauges
that mirror live state (active calls, the engine pool) are read when Prometheus scrapes.

The process's own figures are on the same registry, read at scrape time: `process_cpu_seconds_total`,
`process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
`process_max_fds`, `process_start_time_seconds` (Linux: read from /proc), `python_info` and the
garbage collector's `python_gc_*`. They are what the Deployment's requests and limits are checked
against (configs/kubernetes/bridge.yaml).
"""

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
DECISION_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
BARGE_IN_RULES = ("floor", "overlap", "unknown")  # unknown: a clear over caller speech with no BargeInFrame
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LAG_TICK_SECS = 0.01
OUTCOMES = ("completed", "caller_gone", "caller_stalled", "caller_silent", "engine_failed", "no_engine", "drained", "error",
            "bot_hung_up", "caller_idle", "max_duration", "transferred", "transfer_failed")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_*: CPU seconds, RSS, open fds (empty where /proc is missing)
        PlatformCollector(registry=r)  # python_info: version and implementation
        GCCollector(registry=r)  # python_gc_*: collections and objects collected, per generation
        self.active_calls = Gauge("bridge_active_calls", "Calls in progress", registry=r)
        self.calls = Counter("bridge_calls", "Finished calls by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.calls.labels(outcome)  # every outcome from 0, so rates work before the first one
        self.barge_ins = Counter("bridge_barge_ins", "Caller took the floor from the bot: `clear` sent, by barge_in's rule",
                                 ["rule"], registry=r)
        for rule in BARGE_IN_RULES:
            self.barge_ins.labels(rule)
        self.muted_seconds = Counter("bridge_model_muted_seconds", "Model speech silenced after a barge-in (never heard)",
                                     registry=r)
        self.holding_clips = Counter("bridge_holding_clips", "Holding clips played", ["clip"], registry=r)
        self.actions = Counter("bridge_call_actions", "Call actions taken (refused: not done, see the record)", ["action", "result"],
                               registry=r)
        self.malformed = Counter("bridge_malformed_messages", "Provider messages dropped as malformed", ["reason"], registry=r)
        self.engine_failures = Counter("bridge_engine_failures", "Engines taken out of rotation", registry=r)
        self.handshake = Histogram("bridge_engine_handshake_seconds", "Engine connect plus handshake (prompt phase)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.engine_wait = Histogram("bridge_engine_wait_seconds", "Time a call waited for a free engine",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.first_audio = Histogram("bridge_first_audio_seconds", "Call start to the first bot audio sent",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.barge_in_latency = Histogram("bridge_barge_in_seconds", "Caller speech onset over audible bot audio to the `clear`",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.barge_in_decision = Histogram("bridge_barge_in_decision_seconds", "Barge-in decided to the `clear` sent",
                                           buckets=DECISION_BUCKETS, registry=r)
        self.pool_size = Gauge("bridge_engines", "Engines configured", registry=r)
        self.pool_busy = Gauge("bridge_engines_busy", "Engines serving a call", registry=r)
        self.pool_down = Gauge("bridge_engines_down", "Engines out of rotation, being probed", registry=r)
        self.draining = Gauge("bridge_draining", "1 while the server drains before exit", registry=r)
        self.loop_lag = Histogram("bridge_event_loop_lag_seconds", f"How late a {LAG_TICK_SECS * 1000:g} ms timer fired: "
                                  "work that held the event loop (and every call's audio) that long", buckets=LAG_BUCKETS, registry=r)
        self.loop_lag_max = Gauge("bridge_event_loop_lag_max_seconds", "Largest event-loop lag since the process started",
                                  registry=r)

    def watch(self, calls: dict, engines) -> None:
        """Gauges read from the server's live state at scrape time."""
        from processors.personaplex.pool import State

        self.active_calls.set_function(lambda: len(calls))
        self.pool_size.set_function(lambda: len(engines.engines))
        self.pool_busy.set_function(lambda: sum(e.state is State.BUSY for e in engines.engines))
        self.pool_down.set_function(lambda: sum(e.state is State.DOWN for e in engines.engines))

    async def watch_loop(self, tick: float = LAG_TICK_SECS) -> None:
        """Time a short timer, forever: one computation that holds the loop delays every call's audio,
        and its lateness is the one figure that shows it (`bench stall` reads it)."""
        loop = asyncio.get_running_loop()
        worst = 0.0
        while True:
            due = loop.time() + tick
            await asyncio.sleep(tick)
            lag = max(0.0, loop.time() - due)
            self.loop_lag.observe(lag)
            if lag > worst:
                worst = lag
                self.loop_lag_max.set(lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)
