"""Call events out (pipelines/events.py) against a real aiohttp receiver on 127.0.0.1: retries, signatures,
final answers, a hanging receiver, a full queue, filtering, order and the drain at stop()."""

import asyncio
import contextlib
import inspect
import json
import math
import re
from dataclasses import dataclass

import pytest
from aiohttp import web
from loguru import logger
from pydantic import ValidationError

from pipelines import call_log
from pipelines.errors import validation_problem
from pipelines.events import DEFAULT_EVENTS, EVENT_NAMES, SIGNATURE_HEADER, TIMESTAMP_HEADER, EventsConfig, EventSink, sign, verify
from tests.pipelines.served import until

FAST = {"backoff_secs": 0.01, "max_backoff_secs": 0.02}


@dataclass
class Seen:
    headers: dict
    body: bytes
    status: int | None  # None: the receiver hung on it

    @property
    def doc(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver: answers the statuses in `answers` first (an int, or (status, headers)), then 200;
    with `hang` set it never answers (until the test ends)."""

    def __init__(self):
        self.seen: list[Seen] = []
        self.answers: list = []
        self.hang = False
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang:
            self.seen.append(Seen(dict(request.headers), body, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 10)
            return web.Response(status=200)
        answer = self.answers.pop(0) if self.answers else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        self.seen.append(Seen(dict(request.headers), body, status))
        return web.Response(status=status, headers=headers, text="nope" if status >= 300 else "ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[dict]:
        return [s.doc for s in self.seen if s.status is not None and 200 <= s.status < 300]


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def logs():
    lines: list[str] = []
    handle = logger.add(lines.append, level="INFO", format="{level} {message}")
    yield lines
    logger.remove(handle)


@pytest.fixture
async def sinks():
    """Sinks a test made; each is stopped at the end, so no sender task outlives its test."""
    made: list[EventSink] = []

    def make(config: EventsConfig, **kwargs) -> EventSink:
        made.append(EventSink(config, **kwargs))
        return made[-1]

    yield make
    for sink in made:
        await sink.stop(drain_secs=0)


def balanced(stats: dict) -> bool:
    return stats["published"] == stats["delivered"] + stats["failed"] + stats["dropped"] + stats["abandoned"] + stats["pending"]


async def test_5xx_is_retried_with_the_same_id_and_body_until_it_is_delivered_once(receiver, sinks):
    receiver.answers = [500, 500]
    sink = sinks(EventsConfig(url=receiver.url, **FAST), deployment="exotel")
    await sink.start()
    sink.publish("CA1", "call_started", {"provider": "exotel", "sample_rate": 8000})
    await until(lambda: sink.stats["delivered"] == 1)

    assert [s.status for s in receiver.seen] == [500, 500, 200]
    assert len({s.body for s in receiver.seen}) == 1  # a retry re-sends the same bytes
    assert {s.headers["X-Call-Event-Id"] for s in receiver.seen} == {receiver.seen[0].doc["id"]}
    assert receiver.seen[0].headers["Content-Type"] == "application/json"
    assert SIGNATURE_HEADER not in receiver.seen[0].headers  # no secret, no signature
    [doc] = receiver.delivered()
    assert re.fullmatch(r"[0-9a-f]{32}", doc["id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["at"])
    assert {k: v for k, v in doc.items() if k not in ("id", "at")} == {
        "seq": 1, "deployment": "exotel", "call_id": "CA1", "event": "call_started", "data": {"provider": "exotel", "sample_rate": 8000}}
    stats = sink.stats
    assert (stats["retries"], stats["delivered"], stats["failed"], stats["pending"]) == (2, 1, 0, 0)


async def test_the_signature_verifies_on_the_receiver_and_refuses_tampering_a_wrong_secret_and_replays(receiver, sinks, logs):
    secret = "s3cret-Key"
    config = EventsConfig(url=receiver.url, secret=secret, **FAST)
    assert secret not in repr(config)
    sink = sinks(config)
    await sink.start()
    sink.publish("CA2", "call_ended", {"outcome": "completed", "seconds": 12.5})
    await until(lambda: sink.stats["delivered"] == 1)

    [seen] = receiver.seen
    timestamp, signature, body = seen.headers[TIMESTAMP_HEADER], seen.headers[SIGNATURE_HEADER], seen.body
    assert re.fullmatch(r"\d+", timestamp) and re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert signature == sign(secret, int(timestamp), body)
    assert verify(secret, timestamp, signature, body)
    assert verify(secret, timestamp, signature, body.decode())  # a str body is the same text
    assert not verify(secret, timestamp, signature, body.replace(b"completed", b"completer"))
    assert not verify("another-secret", timestamp, signature, body)
    assert not verify(secret, str(int(timestamp) + 1), signature, body)  # the timestamp is signed too
    assert verify(secret, timestamp, signature, body, now=int(timestamp) + 299)
    assert not verify(secret, timestamp, signature, body, now=int(timestamp) + 301)  # too old: a replay
    assert not verify(secret, timestamp, signature, body, now=int(timestamp) - 301)  # from the future
    assert not verify(secret, None, signature, body)
    assert not verify(secret, "yesterday", signature, body)
    assert not verify(secret, timestamp, None, body)
    assert not verify(secret, timestamp, "sha256=ü", body)
    assert not any(secret in line for line in logs)


async def test_a_4xx_answer_is_final_logged_once_and_the_next_event_goes_out(receiver, sinks, logs):
    receiver.answers = [400]
    sink = sinks(EventsConfig(url=receiver.url, **FAST))
    await sink.start()
    sink.publish("CA3", "barge_in", {"latency_ms": 180})
    sink.publish("CA3", "call_ended", {"outcome": "completed"})
    await until(lambda: sink.stats["delivered"] == 1)  # serial: the first is settled before the second goes

    assert [(s.doc["event"], s.status) for s in receiver.seen] == [("barge_in", 400), ("call_ended", 200)]
    stats = sink.stats
    assert (stats["failed"], stats["retries"], stats["delivered"]) == (1, 0, 1)
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "barge_in" in warnings[0] and "CA3" in warnings[0] and "HTTP 400" in warnings[0]


async def test_publish_is_a_plain_function_that_only_queues_whatever_it_is_given(receiver, sinks, logs):
    assert not inspect.iscoroutinefunction(EventSink.publish)
    sink = sinks(EventsConfig(url=receiver.url, queue_size=2000))  # never started: nothing is sent
    for i in range(1000):
        assert sink.publish(f"CA{i}", "call_started", {"i": i}) is None
    assert sink.stats["published"] == sink.stats["pending"] == 1000

    class Odd:
        def __str__(self):
            return "odd"

    class Broken:
        def __str__(self):
            raise RuntimeError("no")

    cycle: dict = {}
    cycle["self"] = cycle
    for fields in ({"x": Odd()}, {"nan": math.nan, (1, 2): "tuple key", "b": b"\x00", "s": {3}}, cycle, {"broken": Broken()}, None):
        sink.publish("CA-odd", "call_ended", fields)
    sink.publish(["unhashable"], ["event"], {})  # not an event name: ignored, not raised
    assert sink.stats["published"] == 1005
    assert receiver.seen == [] and not any(line.startswith("ERROR") for line in logs)
    await sink.stop(drain_secs=0)  # not started: all of it is abandoned
    assert sink.stats["abandoned"] == 1005 and sink.stats["pending"] == 0 and balanced(sink.stats)


async def test_fields_json_cannot_hold_arrive_as_strings(receiver, sinks):
    sink = sinks(EventsConfig(url=receiver.url, **FAST))
    await sink.start()
    cycle: list = []
    cycle.append(cycle)
    sink.publish("CA4", "call_ended", {"obj": object(), "inf": math.inf, (1, 2): "k", "nested": {"set": {1}, "cycle": cycle}})
    await until(lambda: sink.stats["delivered"] == 1)
    data = receiver.delivered()[0]["data"]
    assert data["inf"] == "inf" and data["(1, 2)"] == "k" and data["nested"]["set"] == [1]
    assert isinstance(data["obj"], str)


async def test_a_hanging_receiver_costs_max_attempts_then_later_events_go_out(receiver, sinks, logs):
    receiver.hang = True
    sink = sinks(EventsConfig(url=receiver.url, timeout_secs=0.05, max_attempts=2, **FAST))
    await sink.start()
    sink.publish("CA5", "transfer", {"to": "+15550100"})
    assert sink.stats["pending"] == 1  # queued, nothing awaited
    await until(lambda: sink.stats["failed"] == 1)
    assert len(receiver.seen) == 2 and sink.stats["retries"] == 1

    receiver.hang = False
    sink.publish("CA6", "call_started", {})
    await until(lambda: sink.stats["delivered"] == 1)
    assert [d["call_id"] for d in receiver.delivered()] == ["CA6"]
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1 and "transfer" in warnings[0] and "CA5" in warnings[0] and "2 attempt" in warnings[0]


async def test_a_full_queue_drops_the_oldest_and_the_newest_arrive_in_order_once_the_receiver_is_up(receiver, sinks):
    await receiver.stop()  # down: connections are refused on its port
    sink = sinks(EventsConfig(url=receiver.url, queue_size=3, max_attempts=10_000, **FAST))
    await sink.start()
    for i in range(1, 6):
        sink.publish(f"CA{i}", "call_started", {})
    assert sink.stats["dropped"] == 2 and sink.stats["pending"] == 3
    await until(lambda: sink.stats["retries"] >= 2)  # trying, and failing, while down

    await receiver.start()
    await until(lambda: sink.stats["delivered"] == 3)
    assert [(d["call_id"], d["seq"]) for d in receiver.delivered()] == [("CA3", 3), ("CA4", 4), ("CA5", 5)]
    assert sink.stats["failed"] == 0 and balanced(sink.stats)


async def test_the_event_being_retried_is_the_oldest_and_is_dropped_when_the_queue_overflows(receiver, sinks):
    await receiver.stop()
    sink = sinks(EventsConfig(url=receiver.url, queue_size=3, max_attempts=10_000, **FAST))
    await sink.start()
    sink.publish("CA1", "call_started", {})
    await until(lambda: sink.stats["retries"] >= 1)  # the sender holds CA1 between attempts
    for i in range(2, 5):
        sink.publish(f"CA{i}", "call_started", {})

    await receiver.start()
    await until(lambda: sink.stats["pending"] == 0)
    assert [d["call_id"] for d in receiver.delivered()] == ["CA2", "CA3", "CA4"]
    assert sink.stats["dropped"] == 1 and sink.stats["delivered"] == 3 and balanced(sink.stats)


async def test_only_chosen_events_go_out_in_order_and_stop_drains_them(receiver, sinks):
    sink = sinks(EventsConfig(url=receiver.url, events=["call_started", "call_ended"], **FAST))
    await sink.start()
    kinds = ["call_started", "barge_in", "call_ended"]
    for i in range(300):
        sink.publish(f"CA{i // 3}", kinds[i % 3], {"i": i})
    assert sink.stats["published"] == 200
    await sink.stop(drain_secs=30)  # returns once the queue is delivered

    docs = receiver.delivered()
    assert [d["data"]["i"] for d in docs] == [i for i in range(300) if i % 3 != 1]
    assert [d["seq"] for d in docs] == list(range(1, 201))
    assert all(d["event"] != "barge_in" for d in docs)
    stats = sink.stats
    assert (stats["delivered"], stats["pending"], stats["abandoned"], stats["retries"]) == (200, 0, 0, 0)
    sink.publish("CA-late", "call_ended", {})  # after stop: counted, never sent
    assert sink.stats["abandoned"] == 1 and balanced(sink.stats)


async def test_stop_gives_up_on_a_receiver_that_is_down_after_drain_secs(receiver, sinks, logs):
    await receiver.stop()
    sink = sinks(EventsConfig(url=receiver.url, max_attempts=10_000, **FAST))
    await sink.start()
    for i in range(4):
        sink.publish(f"CA{i}", "call_ended", {})
    await asyncio.wait_for(sink.stop(drain_secs=0.1), 10)
    stats = sink.stats
    assert (stats["abandoned"], stats["pending"], stats["delivered"]) == (4, 0, 0) and balanced(stats)
    assert any("4 event(s) not delivered" in line for line in logs)


def test_retry_after_is_honoured_within_the_cap_and_backoff_doubles_with_jitter():
    sink = EventSink(EventsConfig(url="http://127.0.0.1:9/hook", backoff_secs=0.5, max_backoff_secs=30))
    assert sink._delay(1, 2.0) == 2.0
    assert sink._delay(1, 3600.0) == 30
    for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0)):
        assert 0.8 * base <= sink._delay(attempt, None) <= 1.2 * base
    assert sink._delay(40, None) == 30


async def test_a_429_with_retry_after_is_retried(receiver, sinks):
    receiver.answers = [(429, {"Retry-After": "0"}), (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 408, 425]
    sink = sinks(EventsConfig(url=receiver.url, **FAST))
    await sink.start()
    sink.publish("CA7", "action", {"name": "lookup"})
    await until(lambda: sink.stats["delivered"] == 1)
    assert [s.status for s in receiver.seen] == [429, 503, 408, 425, 200] and sink.stats["retries"] == 4


def test_a_sink_without_url_accepts_events_and_sends_none():
    sink = EventSink(EventsConfig())
    sink.publish("CA8", "call_started", {})
    assert sink.stats["published"] == 0 and sink.stats["pending"] == 0


def problem(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        EventsConfig(**fields)
    return validation_problem(caught.value, EventsConfig)[1]


def test_config_refuses_bad_urls_secrets_and_events_with_a_clear_message():
    assert "must start with http:// or https://" in problem(url="ftp://crm.example.com/hook")
    assert "must start with http:// or https://" in problem(url="crm.example.com/hook")
    assert "has no host" in problem(url="https:///hook")
    assert "has no host" in problem(url="http://:8080/hook")
    assert "not a URL" in problem(url="http://crm.example.com:port/hook")
    assert "did you mean 'call_ended'" in problem(events=["call_end"])
    assert "secret is empty" in problem(url="https://crm.example.com/hook", secret=" ")
    assert "unknown key" in problem(retries=3)
    assert "greater than 0" in problem(timeout_secs=0)
    assert EventsConfig(url="").url is None  # `url: ${EVENTS_URL:-}` turns it off
    assert EventsConfig(url=" HTTPS://crm.example.com:8443/hook?k=1 ").url == "HTTPS://crm.example.com:8443/hook?k=1"
    assert EventsConfig().events == list(DEFAULT_EVENTS)
    assert all(field.description for field in EventsConfig.model_fields.values())


def test_every_event_the_call_record_documents_can_be_chosen():
    """call_log's table is the list of events; one added there must be added to EVENT_NAMES to be sendable."""
    documented = set(re.findall(r"^    ([a-z_]+)\s", call_log.__doc__, re.MULTILINE))
    assert {"call_started", "barge_in", "call_ended"} <= documented
    assert documented <= set(EVENT_NAMES), f"add to pipelines.events.EVENT_NAMES: {sorted(documented - set(EVENT_NAMES))}"
