"""The call server (aiohttp): each provider WebSocket becomes one call with its own pipeline.

The provider's socket is read here (the call's input side): every message goes through the pure
protocol object and the frames it yields are queued into the call's pipeline. `stop` ends the call
gracefully; a vanished socket cancels it. Either way everything the call held is released.
A transport may add HTTP endpoints (Twilio's TwiML, the browser page) and refuse an upgrade
(signatures): both are pure functions of the request in the transport module; this file only
adapts aiohttp to them.

Operations: `GET /healthz` (the loop answers), `GET /readyz` (an engine is in rotation and the
server is not draining), `GET /metrics` (Prometheus: counts and latencies, no identities), `GET
/stats` (live calls, engines, recent calls as JSON: call ids, record paths, engine URLs, personas).
/stats lives on `server.ops_port` when one is set (bind it to a private interface); without one,
the call port answers it only to loopback peers that came through no proxy. `drain()` (SIGTERM)
refuses new calls and reports not ready. Active calls then
have `server.drain_secs` to end on their own; any still running get the apology clip and a clean
close, and all are gone by DRAIN_FINISH_SECS later. Log lines logged on a call's behalf carry its
id (`logger.contextualize`, inherited by every task the call's pipeline creates).
"""

import asyncio
import datetime
import json
import socket as socketlib
import time
from collections import deque
from dataclasses import dataclass, field, replace

import aiohttp
from aiohttp import web
from loguru import logger
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, InputDTMFFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.workers.runner import WorkerRunner

from pipelines.builder import DeploymentPlan, new_call_processors, new_call_worker
from pipelines.call_log import DRAIN_REASON, CallLog
from pipelines.call_observer import CallObserver
from pipelines.caller_memory import CallerMemory, prompt_note
from pipelines.deletion_cost import DeletionCost
from pipelines.events import EventSink
from pipelines.metrics import Metrics
from pipelines.records import RETENTION_EVERY_SECS, Retention
from processors.personaplex.pools import EnginePools
from transports.base import HttpRequest
from transports.call_input import read_call
from transports.call_output import CallOutput
from transports.frames import CallStartedFrame, CallStoppedFrame, EngineFailedFrame, MarkPlayedFrame
from transports.socket import CallSocket

START_TIMEOUT = 10.0  # Exotel gives a bot 10 s; a connection that never starts a call is dropped
# Well above every transport's own limit (<= 145 kB by default), which drops and counts a larger
# message before decoding it; only beyond this does aiohttp close the socket.
MAX_FRAME = 4 * 1024 * 1024
RECENT_CALLS = 50  # finished calls whose processor stats /stats keeps
HANGUP_TIMEOUT = 5.0
DRAIN_FINISH_SECS = 15  # seconds after the drain deadline for the apology to play and sockets to close


@dataclass(eq=False)
class ActiveCall:
    call_id: str
    provider: str
    log: CallLog
    started: float = field(default_factory=time.monotonic)
    worker: object = None  # the call's PipelineWorker once built
    stopped_by_provider: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    socket: CallSocket | None = None

    def blocked_secs(self) -> float:
        """How long the server has been waiting to write to this caller (the stalled-caller tests watch it)."""
        return 0.0 if self.socket is None else self.socket.blocked_secs()


def call_stats(processors: list, output: CallOutput, names: list[str] | None = None) -> dict:
    """Each processor's `stats` dict under its name in the plan (`names`, in the same order; else its
    class name), for logs and /stats."""
    out = {"output": {**output.stats, "messages_sent": output.messages_sent}}
    names = list(names or [])
    for i, p in enumerate(processors):
        if isinstance(getattr(p, "stats", None), dict):
            name = names[i] if i < len(names) else type(p).__name__
            key, n = name, 2
            while key in out:
                key, n = f"{name}{n}", n + 1
            out[key] = p.stats
    return out


class CallServer:
    def __init__(self, deployment: DeploymentPlan, engines: EnginePools | None, host: str, port: int):
        self.deployment = deployment
        self.engines = engines or EnginePools(None)
        self.host, self.port = host, port
        self.path = getattr(deployment.transport_params, "path", "/")
        self.calls: dict[ActiveCall, ActiveCall] = {}
        self.connections = 0
        self.draining = False
        self.totals = {"calls_total": 0, "dropped_messages": 0, "connections_without_start": 0,
                       "upgrades_refused": 0, "refused_draining": 0, "rest_hangups": 0, "rest_transfers": 0}
        self.recent: deque[dict] = deque(maxlen=RECENT_CALLS)
        self.metrics = Metrics()
        self.metrics.watch(self.calls, self.engines)
        cfg = deployment.loaded.config
        self.records = cfg.records
        self.drain_secs = cfg.server.drain_secs
        self.timeouts = cfg.server  # header_timeout_secs, send_timeout_secs, media_timeout_secs
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self.ops_port: int | None = None
        self._retention = Retention.of(cfg.records)  # old call records deleted at start, then hourly
        self.events = EventSink(cfg.events, deployment=deployment.loaded.path.stem)
        self.memory = CallerMemory(cfg.caller_memory) if cfg.caller_memory.dir else None
        self._memory_prune: asyncio.Task | None = None
        self._deletion_cost: DeletionCost | None = None  # on Kubernetes: scale-down removes the pods with fewest calls
        self._lag_watch: asyncio.Task | None = None

    async def start(self):
        app = web.Application(client_max_size=1024 * 1024)
        if self.timeouts.ops_port is None:
            app.router.add_get("/stats", self._local_stats)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        transport = self.deployment.transport
        for path, route in transport.protocol.routes(self.deployment.transport_params).items():
            app.router.add_route("*", path, self._route(route))
        app.router.add_get(self.path, self._handle)
        # aiohttp's keep-alive timer also closes a connection that has not sent a whole request
        # (its default is an hour: slowloris and silent sockets would hold descriptors that long)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     keepalive_timeout=self.timeouts.header_timeout_secs)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self._retention.start()
        await self.engines.start()
        await self.events.start()
        self._deletion_cost = DeletionCost.from_environment(lambda: len(self.calls))
        if self._deletion_cost is not None:
            await self._deletion_cost.start()
        if self.memory is not None:
            self._memory_prune = asyncio.create_task(self._prune_memory(), name="caller-memory-prune")
        self._lag_watch = asyncio.create_task(self.metrics.watch_loop(), name="loop-lag")
        self.port = self._runner.addresses[0][1]
        if self.timeouts.ops_port is not None:
            await self._start_ops()

    async def _start_ops(self):
        """/stats (and the probes and metrics again) on their own listener, for operators only."""
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._ops_runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                         keepalive_timeout=self.timeouts.header_timeout_secs)
        await self._ops_runner.setup()
        await web.TCPSite(self._ops_runner, self.timeouts.ops_host, self.timeouts.ops_port).start()
        self.ops_port = self._ops_runner.addresses[0][1]

    async def stop(self):
        """Stop now: live calls are cancelled (`drain` first for a graceful exit)."""
        for call in list(self.calls):
            if call.socket is not None:  # a caller that does not read holds no send past the grace
                call.socket.stopped()
            if call.worker is not None:
                await call.worker.cancel(reason="server stopping")
        if self._runner:
            await self._runner.cleanup()
        if self._ops_runner:
            await self._ops_runner.cleanup()
        await self._retention.stop()
        await self.events.stop()
        if self._deletion_cost is not None:
            await self._deletion_cost.stop()
        for task in (self._lag_watch, self._memory_prune):
            if task:
                task.cancel()
        await self.engines.close()

    async def drain(self) -> None:
        """Refuse new calls, let active ones end on their own until the deadline, then apologise and end them."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = self.drain_secs
        logger.info(f"draining: {len(self.calls)} active call(s) have {deadline:.0f} s to finish; new calls are refused")
        for call in self.calls:
            call.log.emit("draining", deadline_secs=deadline)
        if not await self._calls_gone(deadline):
            logger.warning(f"drain deadline reached: ending {len(self.calls)} call(s) with the apology")
            for call in list(self.calls):
                if call.worker is not None:
                    await call.worker.queue_frames([EngineFailedFrame(reason=DRAIN_REASON), EndFrame(reason="drain deadline")])
            if not await self._calls_gone(DRAIN_FINISH_SECS - 2.0):
                for call in list(self.calls):
                    if call.worker is not None:
                        await call.worker.cancel(reason="drain: apology did not finish in time")
                await self._calls_gone(1.0)
        logger.info("drained")

    async def _calls_gone(self, secs: float) -> bool:
        pending = [c.done.wait() for c in self.calls]
        if pending:
            try:
                async with asyncio.timeout(secs):
                    await asyncio.gather(*pending)
            except TimeoutError:
                return False
        return True

    async def serve_forever(self):
        await asyncio.Event().wait()

    def stats(self) -> dict:
        return {
            "calls_active": len(self.calls),
            "calls": [{"call_id": c.call_id, "provider": c.provider, "seconds": round(time.monotonic() - c.started, 1),
                       "record": str(c.log.path) if c.log.path else None} for c in self.calls],
            "draining": self.draining,
            "engines": self.engines.snapshot(),
            "connections": self.connections,
            "tasks": len(asyncio.all_tasks()),
            **self.totals,
            "events_out": self.events.stats,
            "recent_calls": list(self.recent),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.stats()) + "\n", content_type="application/json")

    async def _local_stats(self, request: web.Request) -> web.Response:
        """/stats on the call port: a caller on the internet must not read other calls' ids and engines."""
        proxied = any(h in request.headers for h in ("X-Forwarded-For", "Forwarded", "X-Real-IP"))
        if request.remote not in ("127.0.0.1", "::1") or proxied:
            return web.Response(status=403, text="/stats is for operators: set server.ops_port and read it there\n")
        return await self._stats(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        why = self.engines.problem()
        if why:
            return False, why
        return True, "ready"

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, why = self.ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = self.metrics.content_type
        return response

    def _route(self, route):
        """A transport's pure endpoint (e.g. TwiML) behind aiohttp."""
        params = self.deployment.transport_params

        async def handler(request: web.Request) -> web.Response:
            if self.draining:  # e.g. Twilio's webhook: let the provider fail over to another server
                return web.Response(status=503, text="draining\n", headers={"Retry-After": "1"})
            form = {k: str(v) for k, v in (await request.post()).items()} if request.method == "POST" else {}
            reply = route(params, _request_info(request, form))
            body = {"text": reply.body} if isinstance(reply.body, str) else {"body": reply.body}
            return web.Response(status=reply.status, content_type=reply.content_type, **body)

        return handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """One provider connection: authorize the upgrade, then one call on it."""
        params = self.deployment.transport_params
        if self.draining:
            self.totals["refused_draining"] += 1
            return web.Response(status=503, text="draining: this server takes no new calls\n", headers={"Retry-After": "1"})
        refusal = self.deployment.transport.protocol.authorize(params, _request_info(request, {}))
        if refusal:
            self.totals["upgrades_refused"] += 1
            logger.warning(f"{request.remote}: WebSocket upgrade on {request.path} refused: {refusal}")
            return web.Response(status=403, text=f"forbidden: {refusal}\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, compress=False, autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text=f"{self.path} serves WebSocket calls only\n")
        await ws.prepare(request)
        _bound_send_buffer(request.transport)
        socket = CallSocket(ws, self.timeouts.send_timeout_secs, request.transport)
        self.connections += 1
        protocol = self.deployment.new_protocol(dict(request.query))
        protocol.on_drop = lambda reason, count: self.metrics.malformed.labels(reason).inc()
        try:
            started = await self._await_start(socket, request.remote, protocol)
            if started is None:
                self.totals["connections_without_start"] += 1
            elif self.draining:  # connected before the drain, started after it
                self.totals["refused_draining"] += 1
                await socket.close(1013, "server restarting; call again")
            else:
                await self._run_call(socket, protocol, started)
        finally:
            self.connections -= 1
            self.totals["dropped_messages"] += sum(protocol.dropped.values())
            await socket.close()
        await self._hang_up(protocol)
        return ws

    async def _await_start(self, socket: CallSocket, remote, protocol) -> CallStartedFrame | None:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                async for message in socket.messages():
                    for frame in protocol.receive(message, now=asyncio.get_running_loop().time()):
                        if isinstance(frame, CallStartedFrame):
                            return frame
        except TimeoutError:
            logger.warning(f"{remote}: no `start` within {START_TIMEOUT:.0f} s; closing")
            await socket.close(1008, "no start event")
        return None

    async def _run_call(self, socket: CallSocket, protocol, started: CallStartedFrame):
        call_info = started.call
        log = CallLog(call_info, self.metrics, self.records.dir, self.records.audio, max_bytes=self.records.max_call_bytes,
                      on_event=self.events.publish)
        if self.memory is not None:
            call_info = replace(call_info, caller_note=self._recall(call_info.from_number, datetime.datetime.now(datetime.UTC)))
        call = ActiveCall(log.call_id, call_info.provider, log, socket=socket)
        protocol.on_drop = log.malformed
        with logger.contextualize(call_id=call.call_id):
            self.calls[call] = call  # keyed by object: providers may reuse or omit call ids
            try:
                await self._run_pipeline(call, call_info, socket, protocol)
            finally:
                del self.calls[call]
                call.done.set()

    async def _run_pipeline(self, call: ActiveCall, call_info, socket: CallSocket, protocol):
        self.totals["calls_total"] += 1
        logger.info(f"call {call.call_id}: {call.provider} at {call_info.sample_rate} Hz, params {call_info.custom_parameters}"
                    + (f"; record {call.log.path}" if call.log.path else ""))
        output = CallOutput(protocol, socket, call.call_id, log=call.log, on_transfer=lambda to: self._transfer(protocol, to))
        reader = None
        processors = []
        outcome = "caller_gone"
        try:
            processors = new_call_processors(self.deployment, self.engines)
            call.worker = new_call_worker(call_info, processors, output, observer=CallObserver(call.log))
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(call.worker)
            reader = asyncio.create_task(self._read(socket, protocol, call), name=f"call-reader-{call.call_id}")
            await runner.run()
            if call.stopped_by_provider:
                outcome = "completed"
        except Exception:
            outcome = "error"
            logger.exception(f"call {call.call_id}: the call's pipeline failed")
        finally:
            if reader:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await socket.close()
            if socket.stalled and not call.stopped_by_provider:  # after `stop`, unread audio is no fault
                logger.warning(f"call {call.call_id}: the caller stopped reading for {self.timeouts.send_timeout_secs:g} s; cut")
                call.log.outcome = call.log.outcome or "caller_stalled"
            stats = call_stats(processors, output, self.deployment.stats_names())
            outcome = call.log.end(outcome, protocol.dropped, stats)
            seconds = time.monotonic() - call.started
            if self.memory is not None:
                self._remember(call_info, outcome, seconds)
            self.recent.append({"call_id": call.call_id, "provider": call.provider, "outcome": outcome,
                                "seconds": round(seconds, 1), "stats": stats})
            dropped = sum(protocol.dropped.values())
            logger.info(f"call {call.call_id}: ended ({outcome}) after {seconds:.1f} s, {dropped} malformed messages dropped, "
                        f"{output.messages_sent} messages sent; {json.dumps(stats)}")

    async def _read(self, socket: CallSocket, protocol, call: ActiveCall):
        """Provider messages into the pipeline until `stop`; the call ends with its reader, whatever ends it."""
        try:
            if await self._read_messages(socket, protocol, call):
                return
            reason = "provider socket closed"
        except TimeoutError:
            secs = self.timeouts.media_timeout_secs
            logger.warning(f"call {call.call_id}: no caller media for {secs:g} s; ending the call")
            call.log.emit("caller_silent", secs=secs)
            call.log.outcome = call.log.outcome or "caller_silent"
            reason = "caller silent"
        except Exception:
            logger.exception(f"call {call.call_id}: reading the provider's messages failed; ending the call")
            call.log.outcome = call.log.outcome or "error"
            reason = "reader failed"
        await call.worker.cancel(reason=reason)

    async def _read_messages(self, socket: CallSocket, protocol, call: ActiveCall) -> bool:
        """True once the provider's `stop` was queued; False when the socket closed first; TimeoutError
        when no media came for media_timeout_secs (transports/call_input.py)."""
        return await read_call(socket, protocol, self.timeouts.media_timeout_secs, lambda frame: self._on_frame(call, protocol, frame))

    async def _on_frame(self, call: ActiveCall, protocol, frame) -> bool:
        """One provider frame: into the record and the pipeline; True at the provider's `stop`."""
        worker, log = call.worker, call.log
        if isinstance(frame, InputAudioRawFrame):
            log.caller_audio(frame.audio)
        elif isinstance(frame, CallStoppedFrame):
            logger.info(f"call {protocol.call_id}: provider stop ({frame.reason or 'no reason'})")
            log.emit("provider_stop", reason=frame.reason)
            call.stopped_by_provider = True
            if call.socket is not None:
                call.socket.stopped()
            await worker.queue_frame(EndFrame(reason=f"provider stop: {frame.reason}"))
            return True
        elif isinstance(frame, InputDTMFFrame):
            log.emit("dtmf", digit=frame.button.value)
        elif isinstance(frame, MarkPlayedFrame):
            log.emit("mark_played", mark=frame.mark)
            # From the end, upstream: it reaches the pacer also while an ending call (the apology) waits behind its EndFrame.
            await worker.queue_frame(frame, FrameDirection.UPSTREAM)
            return False
        await worker.queue_frame(frame)
        return False

    def _recall(self, number: str | None, now: datetime.datetime) -> str | None:
        """The returning caller's note for the model's prompt (caller_memory); a failing store costs the note only."""
        try:
            history = self.memory.recall(number, now)
        except OSError as exc:
            logger.error(f"caller memory: recall failed: {exc}")
            return None
        return None if history is None else prompt_note(history, now, self.deployment.loaded.config.caller_memory.note)

    def _remember(self, call_info, outcome: str, seconds: float) -> None:
        started_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
        try:
            self.memory.remember(call_info.from_number, started_at, outcome, seconds)
        except OSError as exc:
            logger.error(f"call {call_info.call_id}: caller memory: remembering failed: {exc}")

    async def _prune_memory(self) -> None:
        while True:
            try:
                gone = await asyncio.to_thread(self.memory.prune)
                if gone:
                    logger.info(f"caller memory: forgot {gone} callers older than {self.memory.config.keep_days:g} days")
            except OSError as exc:
                logger.error(f"caller memory: pruning failed: {exc}")
            await asyncio.sleep(RETENTION_EVERY_SECS)

    async def _hang_up(self, protocol) -> None:
        """The provider's REST hang-up, where the transport has one configured (off by default)."""
        req = protocol.hangup_request(self.deployment.transport_params)
        if req is not None and await _rest(req, protocol.call_id, "hang-up"):
            self.totals["rest_hangups"] += 1

    async def _transfer(self, protocol, to: str) -> bool | None:
        """A call action's transfer, where the provider takes it over REST (Twilio); None where closing
        the stream or a page message is the hand-over."""
        if protocol.transfer_by != "provider_rest":
            return None
        req = protocol.transfer_request(self.deployment.transport_params, to)
        if req is None:
            logger.error(f"call {protocol.call_id}: a {protocol.name} transfer goes over its REST API, which needs "
                         "transport.params account_sid and auth_token; the call is hung up instead")
            return False
        ok = await _rest(req, protocol.call_id, "transfer")
        if ok:
            self.totals["rest_transfers"] += 1
        return ok


async def _rest(req: dict, call_id: str, what: str) -> bool:
    """One provider REST request (hang-up, transfer); True on a 2xx answer, failures logged."""
    auth = aiohttp.BasicAuth(*req["auth"]) if req.get("auth") else None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HANGUP_TIMEOUT)) as session:
            async with session.request(req["method"], req["url"], data=req.get("data"), auth=auth) as resp:
                if resp.status >= 300:
                    logger.warning(f"call {call_id}: REST {what} got HTTP {resp.status}: {(await resp.text())[:200]}")
                    return False
                logger.info(f"call {call_id}: {what} over REST (HTTP {resp.status})")
                return True
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning(f"call {call_id}: REST {what} failed: {exc!r}")
        return False


SEND_BUFFER_BYTES = 64 * 1024  # a call sends < 50 kB/s and keeps ~0.2 s ahead: more is a peer not reading


def _bound_send_buffer(transport) -> None:
    """A small kernel send buffer per call: a peer that stops reading blocks our sends within seconds
    (then send_timeout_secs cuts it) instead of parking megabytes of audio in the kernel first."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_SNDBUF, SEND_BUFFER_BYTES)


def _request_info(request: web.Request, form: dict[str, str]) -> HttpRequest:
    return HttpRequest(method=request.method, scheme=request.scheme, host=request.host, path=request.path,
                       query=dict(request.query), query_string=request.rel_url.raw_query_string, headers=request.headers, form=form)
