"""The call server (aiohttp): each provider WebSocket becomes one call with its own pipeline.

The provider's socket is read here (the call's input side): every message goes through the pure
protocol object and the frames it yields are queued into the call's pipeline. `stop` ends the call
gracefully; a vanished socket cancels it. Either way everything the call held is released.
`GET /stats` reports live calls, connections and event-loop tasks as JSON. A transport may add
HTTP endpoints (Twilio's TwiML, the browser page) and refuse an upgrade (signatures): both are
pure functions of the request in the transport module; this file only adapts aiohttp to them.
"""

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from loguru import logger
from pipecat.frames.frames import EndFrame
from pipecat.workers.runner import WorkerRunner

from pipelines.builder import DeploymentPlan, new_call_processors, new_call_worker
from transports.base import HttpRequest
from transports.call_output import CallOutput
from transports.frames import CallStartedFrame, CallStoppedFrame
from transports.socket import CallSocket

START_TIMEOUT = 10.0  # Exotel gives a bot 10 s; a connection that never starts a call is dropped
MAX_FRAME = 4 * 1024 * 1024  # protocol objects drop messages over their own, smaller limit
RECENT_CALLS = 50  # finished calls whose processor stats /stats keeps
HANGUP_TIMEOUT = 5.0


@dataclass
class CallRecord:
    call_id: str
    provider: str
    started: float = field(default_factory=time.monotonic)
    dropped: dict = field(default_factory=dict)


def call_stats(processors: list, output: CallOutput) -> dict:
    """Each processor's `stats` dict under its registered name (or class name), for logs and /stats."""
    out = {"output": {**output.stats, "messages_sent": output.messages_sent}}
    for p in processors:
        if isinstance(getattr(p, "stats", None), dict):
            name = getattr(p, "registry_name", None) or type(p).__name__
            key, n = name, 2
            while key in out:
                key, n = f"{name}{n}", n + 1
            out[key] = p.stats
    return out


class CallServer:
    def __init__(self, deployment: DeploymentPlan, engine_url: str | None, host: str, port: int):
        self.deployment = deployment
        self.engine_url = engine_url
        self.host, self.port = host, port
        self.path = getattr(deployment.transport_params, "path", "/")
        self.calls: dict[str, CallRecord] = {}
        self.connections = 0
        self.totals = {"calls_total": 0, "dropped_messages": 0, "connections_without_start": 0,
                       "upgrades_refused": 0, "rest_hangups": 0}
        self.recent: deque[dict] = deque(maxlen=RECENT_CALLS)
        self._runner: web.AppRunner | None = None

    async def start(self):
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get("/stats", self._stats)
        transport = self.deployment.transport
        for path, route in transport.protocol.routes(self.deployment.transport_params).items():
            app.router.add_route("*", path, self._route(route))
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self):
        if self._runner:
            await self._runner.cleanup()

    async def serve_forever(self):
        await asyncio.Event().wait()

    def stats(self) -> dict:
        return {
            "calls_active": len(self.calls),
            "calls": [{"call_id": c.call_id, "provider": c.provider, "seconds": round(time.monotonic() - c.started, 1)} for c in self.calls.values()],
            "connections": self.connections,
            "tasks": len(asyncio.all_tasks()),
            **self.totals,
            "recent_calls": list(self.recent),
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self.stats()) + "\n", content_type="application/json")

    def _route(self, route):
        """A transport's pure endpoint (e.g. TwiML) behind aiohttp."""
        params = self.deployment.transport_params

        async def handler(request: web.Request) -> web.Response:
            form = {k: str(v) for k, v in (await request.post()).items()} if request.method == "POST" else {}
            reply = route(params, _request_info(request, form))
            body = {"text": reply.body} if isinstance(reply.body, str) else {"body": reply.body}
            return web.Response(status=reply.status, content_type=reply.content_type, **body)

        return handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """One provider connection: authorize the upgrade, then one call on it."""
        params = self.deployment.transport_params
        refusal = self.deployment.transport.protocol.authorize(params, _request_info(request, {}))
        if refusal:
            self.totals["upgrades_refused"] += 1
            logger.warning(f"{request.remote}: WebSocket upgrade on {request.path} refused: {refusal}")
            return web.Response(status=403, text=f"forbidden: {refusal}\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, compress=False, autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, text=f"{self.path} serves WebSocket calls only\n")
        await ws.prepare(request)
        socket = CallSocket(ws)
        self.connections += 1
        protocol = self.deployment.new_protocol(dict(request.query))
        try:
            started = await self._await_start(socket, request.remote, protocol)
            if started is None:
                self.totals["connections_without_start"] += 1
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
                    for frame in protocol.receive(message):
                        if isinstance(frame, CallStartedFrame):
                            return frame
        except TimeoutError:
            logger.warning(f"{remote}: no `start` within {START_TIMEOUT:.0f} s; closing")
            await socket.close(1008, "no start event")
        return None

    async def _run_call(self, socket: CallSocket, protocol, started: CallStartedFrame):
        call = started.call
        record = CallRecord(call.call_id or call.stream_id, call.provider, dropped=protocol.dropped)
        self.calls[id(record)] = record  # keyed by object: providers may reuse or omit call ids
        self.totals["calls_total"] += 1
        logger.info(f"call {record.call_id}: {call.provider} at {call.sample_rate} Hz, params {call.custom_parameters}")
        output = CallOutput(protocol, socket, record.call_id)
        reader = None
        processors = []
        try:
            processors = new_call_processors(self.deployment, self.engine_url)
            worker = new_call_worker(call, processors, output)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            reader = asyncio.create_task(self._read(socket, protocol, worker), name=f"call-reader-{record.call_id}")
            await runner.run()
        except Exception:
            logger.exception(f"call {record.call_id}: the call's pipeline failed")
        finally:
            if reader:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await socket.close()
            del self.calls[id(record)]
            stats = call_stats(processors, output)
            self.recent.append({"call_id": record.call_id, "provider": record.provider,
                                "seconds": round(time.monotonic() - record.started, 1), "stats": stats})
            logger.info(f"call {record.call_id}: ended after {time.monotonic() - record.started:.1f} s, {sum(protocol.dropped.values())} malformed messages dropped, {output.messages_sent} messages sent; {json.dumps(stats)}")

    async def _read(self, socket: CallSocket, protocol, worker):
        """Provider messages into the pipeline until `stop` or the socket closes."""
        async for message in socket.messages():
            for frame in protocol.receive(message):
                if isinstance(frame, CallStoppedFrame):
                    logger.info(f"call {protocol.call_id}: provider stop ({frame.reason or 'no reason'})")
                    await worker.queue_frame(EndFrame(reason=f"provider stop: {frame.reason}"))
                    return
                await worker.queue_frame(frame)
        await worker.cancel(reason="provider socket closed")

    async def _hang_up(self, protocol) -> None:
        """The provider's REST hang-up, where the transport has one configured (off by default)."""
        req = protocol.hangup_request(self.deployment.transport_params)
        if req is None:
            return
        auth = aiohttp.BasicAuth(*req["auth"]) if req.get("auth") else None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HANGUP_TIMEOUT)) as session:
                async with session.request(req["method"], req["url"], data=req.get("data"), auth=auth) as resp:
                    if resp.status >= 300:
                        logger.warning(f"call {protocol.call_id}: REST hang-up got HTTP {resp.status}: {(await resp.text())[:200]}")
                        return
                    logger.info(f"call {protocol.call_id}: hung up over REST (HTTP {resp.status})")
                    self.totals["rest_hangups"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning(f"call {protocol.call_id}: REST hang-up failed: {exc!r}")


def _request_info(request: web.Request, form: dict[str, str]) -> HttpRequest:
    return HttpRequest(method=request.method, scheme=request.scheme, host=request.host, path=request.path,
                       query=dict(request.query), query_string=request.query_string, headers=request.headers, form=form)
