"""Call events out: chosen call events POSTed as JSON to one webhook (a CRM, a ticketing or analytics system).

The call record (`pipelines/call_log.py`) is written to local disk after the fact; a system that must react
while the call runs (open the customer's card on `call_started`, log the outcome on `call_ended`) needs the
events pushed to it. The call must never wait for that system: `EventSink.publish` only appends to an
in-memory queue, and one sender task delivers the queue in order, one POST at a time.

Body (UTF-8 JSON, `Content-Type: application/json`), one event per POST:

    {"id": "<uuid4 hex>", "seq": 7, "at": "2026-01-31T12:00:00.123Z", "deployment": "exotel" | null,
     "call_id": "...", "event": "call_ended", "data": {the event's fields, as in call_log's table}}

`id` is the same on every retry of an event (the body is byte-for-byte the same), so a receiver that saw it
already can answer 2xx and skip it. `seq` rises by 1 per event a sink accepted (gaps: dropped or failed
events). `at` is when the event was published, not when it was sent. Values that JSON cannot hold are sent
as their `str()`.

Headers: `X-Call-Event-Id` (the body's id) and, when `secret` is set, `X-Call-Event-Timestamp` (unix seconds
of this attempt) and `X-Call-Event-Signature: sha256=<hex>`, the HMAC-SHA256 under the secret of
`"<timestamp>.<raw body>"`. The timestamp is inside the signed text so that a recorded request cannot be
replayed later. To verify, on the raw body bytes, before parsing them: `verify(secret, timestamp_header,
signature_header, body)` here; elsewhere, recompute the HMAC of `timestamp + "." + body`, compare
`"sha256=" + hex` in constant time, and refuse timestamps more than 5 minutes from your clock.

Delivery: 2xx is delivered. Connection errors, timeouts (`timeout_secs` an attempt), 408, 425, 429 and 5xx
are retried up to `max_attempts` attempts in all, after `backoff_secs` doubled each retry (±20 % jitter,
capped by `max_backoff_secs`; a numeric `Retry-After` on 429/503 is honoured, within the same cap). Any
other answer (3xx: redirects are not followed; 4xx) is final. An event given up is counted as `failed` and
logged once; the next one is then sent. Events wait in a queue of `queue_size`: when it is full the oldest
is dropped (counted) so memory stays bounded while a receiver is down. `stop()` drains for a while, then
counts the rest as `abandoned`. Delivery is at-least-once within those limits, never guaranteed: the call
record on disk stays the complete account.
"""

import asyncio
import datetime
import hashlib
import hmac
import json
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.errors import did_you_mean

TIMESTAMP_HEADER = "X-Call-Event-Timestamp"
SIGNATURE_HEADER = "X-Call-Event-Signature"
ID_HEADER = "X-Call-Event-Id"

# Every event a call can emit: call_log's table, plus what the server and the call's actions emit. A name
# outside it in `events:` is a typo that would silently send nothing, so the config refuses it.
EVENT_NAMES = (
    "call_started", "malformed", "dtmf", "mark_played", "provider_stop", "caller_silent",
    "user_started", "user_stopped", "turn_started", "turn_ended", "bot_started", "bot_stopped", "speech_started", "speech_stopped",
    "bot_text", "holding", "first_audio", "barge_in", "clear", "mute_started", "mute_ended",
    "engine_waiting", "engine_acquired", "engine_ready", "engine_failed", "engine_released", "no_engine",
    "apology", "error", "draining", "record_truncated", "action", "transfer", "call_ended",
)
DEFAULT_EVENTS = ("call_started", "engine_acquired", "barge_in", "action", "transfer", "call_ended")

_RETRYABLE = frozenset({408, 425, 429})
_RETRY_AFTER = frozenset({429, 503})
_MAX_DEPTH = 32  # deeper values are sent as str(): a self-referencing structure must not recurse forever
_LOG_DROPS_EVERY = 100


class EventsConfig(BaseModel):
    """The `events:` section of a deployment: where call events go and how hard to try."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="http:// or https:// receiver of the events (one POST each); unset or empty: no events go out")
    secret: str | None = Field(None, repr=False, description=(
        "HMAC-SHA256 key: every POST carries X-Call-Event-Timestamp and X-Call-Event-Signature (see pipelines/events.py to verify)"))
    events: list[str] = Field(default_factory=lambda: list(DEFAULT_EVENTS), description="which call events are sent (call record event names)")
    timeout_secs: float = Field(5.0, gt=0, description="one attempt's limit: connect, send, answer")
    max_attempts: int = Field(6, ge=1, description="attempts per event, the first included; then it is given up (logged, counted as failed)")
    backoff_secs: float = Field(0.5, ge=0, description="wait before the first retry, doubled each retry (±20 % jitter)")
    max_backoff_secs: float = Field(30.0, ge=0, description="the longest wait between attempts, Retry-After included")
    queue_size: int = Field(1000, ge=1, description="events waiting to be sent; when full the oldest is dropped (counted)")

    @field_validator("url", mode="before")
    @classmethod
    def _empty_url_is_off(cls, value):
        # `url: ${EVENTS_URL:-}` switches the webhook off where the variable is unset
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError("the events URL must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("the events URL has no host (http://HOST[:PORT]/PATH)")
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the secret is empty: set one, or remove the key to send unsigned events")
        return value

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in EVENT_NAMES:
                raise ValueError(f"unknown call event {name!r}" + did_you_mean(name, list(EVENT_NAMES)))
        return value


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Call-Event-Signature value: `sha256=` + hex HMAC-SHA256 under `secret` of `"<timestamp>.<body>"`."""
    mac = hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp_header: str | None, signature_header: str | None, body: bytes | str, *,
           now: float | None = None, tolerance_secs: float = 300) -> bool:
    """For a receiver: True when the headers sign this raw body under `secret` and the timestamp is within
    `tolerance_secs` of `now` (default: this clock), so a replayed old request is refused too."""
    try:
        timestamp = int(str(timestamp_header).strip())
    except ValueError:
        return False
    if signature_header is None or abs((time.time() if now is None else now) - timestamp) > tolerance_secs:
        return False
    if isinstance(body, str):
        body = body.encode()
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), str(signature_header).strip().encode("utf-8", "replace"))


def _jsonable(value, depth: int = 0):
    """`value` with everything JSON cannot hold made str(): non-str keys, NaN/inf, objects, cycles (by depth)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {k if isinstance(k, str) else _str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_jsonable(v, depth + 1) for v in value]
    return _str(value)


def _str(value) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not cost the event
        return f"<unprintable {type(value).__name__}>"


def _encode(doc: dict) -> bytes:
    try:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_str)
    except (TypeError, ValueError, RecursionError):  # non-str keys, NaN, a cycle
        text = json.dumps(_jsonable(doc), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "replace")  # "replace": lone surrogates in a transcript


@dataclass(eq=False)
class _Event:
    id: str
    seq: int
    call_id: str
    event: str
    body: bytes
    evicted: bool = False  # dropped from the queue (queue full) while the sender held it


class EventSink:
    """Sends one deployment's call events to `config.url`; see the module docstring. A sink without a URL
    accepts publish() and sends nothing."""

    def __init__(self, config: EventsConfig, *, deployment: str | None = None):
        self.config = config
        self.deployment = deployment
        self._wanted = frozenset(config.events) if config.url else frozenset()
        self._queue: deque[_Event] = deque()
        self._wake = asyncio.Event()
        self._seq = 0
        self._sending: _Event | None = None  # the event whose POST is in flight
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._closing = False  # stop() was called: the sender ends once the queue is empty
        self._stopped = False
        self._counts = dict.fromkeys(("published", "delivered", "retries", "failed", "dropped", "abandoned"), 0)

    @property
    def stats(self) -> dict:
        """Counters: published (accepted), delivered (2xx), retries (attempts after an event's first), failed
        (given up: attempts spent or a final answer), dropped (queue full), abandoned (left at stop()),
        pending (waiting or in flight). published == delivered + failed + dropped + abandoned + pending."""
        return {**self._counts, "pending": self.pending}

    @property
    def pending(self) -> int:
        held = self._sending is not None and self._sending.evicted  # out of the queue, its last attempt in flight
        return len(self._queue) + held

    async def start(self) -> None:
        if self._task is not None or self._stopped or not self.config.url:
            return
        self._session = aiohttp.ClientSession(headers={"User-Agent": "call-pipelines-events"})
        self._task = asyncio.create_task(self._run(), name="call-events")
        logger.info(f"call events: {', '.join(self.config.events) or 'none'} to {_safe_url(self.config.url)}"
                    + (" (signed)" if self.config.secret else ""))

    async def stop(self, drain_secs: float = 5.0) -> None:
        """Delivers what is queued for up to `drain_secs`, then counts the rest as abandoned; closes the session."""
        if self._stopped:
            return
        self._stopped = self._closing = True
        self._wake.set()
        try:
            if self._task is not None:
                done, _ = await asyncio.wait({self._task}, timeout=max(drain_secs, 0))
                if not done:
                    self._task.cancel()
                    await asyncio.wait({self._task})
        finally:
            left = self.pending
            self._queue.clear()
            self._sending = None
            if left:
                self._counts["abandoned"] += left
                logger.warning(f"call events: {left} event(s) not delivered by shutdown (drain_secs {drain_secs}) to {_safe_url(self.config.url)}")
            if self._session is not None:
                await self._session.close()

    def publish(self, call_id: str, event: str, fields: dict | None = None) -> None:
        """Queues one event if it is wanted; never waits, never raises."""
        try:
            if not isinstance(event, str) or event not in self._wanted:
                return
            if self._stopped:
                self._counts["published"] += 1
                self._counts["abandoned"] += 1
                return
            self._seq += 1
            at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            doc = {"id": uuid.uuid4().hex, "seq": self._seq, "at": at, "deployment": self.deployment,
                   "call_id": call_id, "event": event, "data": fields if fields is not None else {}}
            item = _Event(doc["id"], self._seq, _str(call_id), event, _encode(doc))
            if len(self._queue) >= self.config.queue_size:
                self._evict()
            self._queue.append(item)
            self._counts["published"] += 1
            self._wake.set()
        except Exception:  # publishing is never worth a call
            logger.opt(exception=True).error(f"call events: could not queue {event} of call {call_id}")

    def _evict(self) -> None:
        oldest = self._queue.popleft()
        oldest.evicted = True
        if oldest is not self._sending:  # one in flight is counted when its attempt ends (it may yet arrive)
            self._dropped()

    def _dropped(self) -> None:
        self._counts["dropped"] += 1
        n = self._counts["dropped"]
        if n == 1 or n % _LOG_DROPS_EVERY == 0:
            logger.warning(f"call events: queue full ({self.config.queue_size}), oldest dropped; {n} dropped so far")

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            try:
                await self._deliver(item)
            except Exception:  # a bug here must not stop every later event
                logger.opt(exception=True).error(f"call events: {item.event} of call {item.call_id} lost")
                self._counts["failed"] += 1
            finally:
                self._sending = None
            if self._queue and self._queue[0] is item:
                self._queue.popleft()

    async def _deliver(self, item: _Event) -> None:
        config = self.config
        for attempt in range(1, config.max_attempts + 1):
            if attempt > 1:
                self._counts["retries"] += 1
            self._sending = item
            try:
                status, reason, retry_after = await self._attempt(item)
            except asyncio.CancelledError:  # stop() ran out of time: an evicted event in flight is lost here
                if item.evicted:
                    self._dropped()
                raise
            finally:
                self._sending = None
            if status is not None and 200 <= status < 300:
                self._counts["delivered"] += 1
                return
            if item.evicted:  # dropped while this attempt was in flight
                self._dropped()
                return
            if status is not None and not (status in _RETRYABLE or 500 <= status < 600):
                break  # final answer
            if attempt == config.max_attempts:
                break
            await asyncio.sleep(self._delay(attempt, retry_after))
            if item.evicted:  # dropped (and counted) while waiting
                return
        self._counts["failed"] += 1
        tries = f"after {attempt} attempt(s)" if attempt > 1 else "at once"
        logger.warning(f"call events: gave up on {item.event} of call {item.call_id} (seq {item.seq}) {tries}: {reason}")

    async def _attempt(self, item: _Event) -> tuple[int | None, str, float | None]:
        """One POST: (status or None when no answer came, why it was not delivered, Retry-After seconds)."""
        headers = {"Content-Type": "application/json", ID_HEADER: item.id}
        if self.config.secret:
            timestamp = int(time.time())
            headers[TIMESTAMP_HEADER] = str(timestamp)
            headers[SIGNATURE_HEADER] = sign(self.config.secret, timestamp, item.body)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_secs)
        try:
            async with self._session.post(self.config.url, data=item.body, headers=headers, timeout=timeout, allow_redirects=False) as resp:
                text = (await resp.content.read(2048)).decode("utf-8", "replace") if not 200 <= resp.status < 300 else ""
                retry_after = _retry_after(resp.headers.get("Retry-After")) if resp.status in _RETRY_AFTER else None
                reason = f"HTTP {resp.status}" + (f" {text.strip()[:200]!r}" if text.strip() else "")
                if 300 <= resp.status < 400:
                    reason += " (redirects are not followed: set events.url to the final address)"
                return resp.status, reason, retry_after
        except TimeoutError:
            return None, f"no answer within {self.config.timeout_secs} s", None
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}", None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cap = self.config.max_backoff_secs
        if retry_after is not None:
            return min(retry_after, cap)
        base = self.config.backoff_secs * 2 ** min(attempt - 1, 60)
        return min(base * random.uniform(0.8, 1.2), cap)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; None for an HTTP date or garbage (then the backoff applies)."""
    try:
        secs = float(value)
    except (TypeError, ValueError):
        return None
    return secs if math.isfinite(secs) and secs >= 0 else None


def _safe_url(url: str | None) -> str:
    """The URL for logs: no credentials, no query (either may hold a token)."""
    if not url:
        return "nowhere"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
