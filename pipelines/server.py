"""The WebSocket server: each provider connection becomes one call with its own pipeline.

The provider's socket is read here (the call's input side): every message goes through the pure
protocol object and the frames it yields are queued into the call's pipeline. `stop` ends the call
gracefully; a vanished socket cancels it. Either way everything the call held is released.
`GET /stats` reports live calls, connections and event-loop tasks as JSON.
"""

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import websockets
from loguru import logger
from pipecat.frames.frames import EndFrame
from pipecat.workers.runner import WorkerRunner
from websockets.asyncio.server import ServerConnection

from pipelines.builder import DeploymentPlan, new_call_processors, new_call_worker
from transports.call_output import CallOutput
from transports.frames import CallStartedFrame, CallStoppedFrame

START_TIMEOUT = 10.0  # Exotel gives a bot 10 s; a connection that never starts a call is dropped
MAX_FRAME = 4 * 1024 * 1024  # protocol objects drop messages over their own, smaller limit
RECENT_CALLS = 50  # finished calls whose processor stats /stats keeps


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
        self.totals = {"calls_total": 0, "dropped_messages": 0, "connections_without_start": 0}
        self.recent: deque[dict] = deque(maxlen=RECENT_CALLS)
        self._server = None

    async def start(self):
        self._server = await websockets.serve(
            self._handle, self.host, self.port, process_request=self._http,
            max_size=MAX_FRAME, compression=None, ping_interval=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self):
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def serve_forever(self):
        await self._server.serve_forever()

    def stats(self) -> dict:
        return {
            "calls_active": len(self.calls),
            "calls": [{"call_id": c.call_id, "provider": c.provider, "seconds": round(time.monotonic() - c.started, 1)} for c in self.calls.values()],
            "connections": self.connections,
            "tasks": len(asyncio.all_tasks()),
            **self.totals,
            "recent_calls": list(self.recent),
        }

    def _http(self, connection: ServerConnection, request):
        path = urlsplit(request.path).path
        if path == "/stats":
            return connection.respond(HTTPStatus.OK, json.dumps(self.stats()) + "\n")
        if path != self.path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no calls are served at {path}; try {self.path}\n")
        return None

    async def _handle(self, ws: ServerConnection):
        self.connections += 1
        query = dict(parse_qsl(urlsplit(ws.request.path).query))
        protocol = self.deployment.new_protocol(query)
        try:
            started = await self._await_start(ws, protocol)
            if started is None:
                self.totals["connections_without_start"] += 1
                return
            await self._run_call(ws, protocol, started)
        finally:
            self.connections -= 1
            self.totals["dropped_messages"] += sum(protocol.dropped.values())

    async def _await_start(self, ws, protocol) -> CallStartedFrame | None:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                async for message in ws:
                    for frame in protocol.receive(message):
                        if isinstance(frame, CallStartedFrame):
                            return frame
        except TimeoutError:
            logger.warning(f"{ws.remote_address}: no `start` within {START_TIMEOUT:.0f} s; closing")
            await ws.close(1008, "no start event")
        except websockets.ConnectionClosed:
            pass
        return None

    async def _run_call(self, ws, protocol, started: CallStartedFrame):
        call = started.call
        record = CallRecord(call.call_id or call.stream_id, call.provider, dropped=protocol.dropped)
        self.calls[id(record)] = record  # keyed by object: providers may reuse or omit call ids
        self.totals["calls_total"] += 1
        logger.info(f"call {record.call_id}: {call.provider} at {call.sample_rate} Hz, params {call.custom_parameters}")
        output = CallOutput(protocol, ws, record.call_id)
        reader = None
        processors = []
        try:
            processors = new_call_processors(self.deployment, self.engine_url)
            worker = new_call_worker(call, processors, output)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            reader = asyncio.create_task(self._read(ws, protocol, worker), name=f"call-reader-{record.call_id}")
            await runner.run()
        except Exception:
            logger.exception(f"call {record.call_id}: the call's pipeline failed")
        finally:
            if reader:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await ws.close()
            del self.calls[id(record)]
            stats = call_stats(processors, output)
            self.recent.append({"call_id": record.call_id, "provider": record.provider,
                                "seconds": round(time.monotonic() - record.started, 1), "stats": stats})
            logger.info(f"call {record.call_id}: ended after {time.monotonic() - record.started:.1f} s, {sum(protocol.dropped.values())} malformed messages dropped, {output.messages_sent} messages sent; {json.dumps(stats)}")

    async def _read(self, ws, protocol, worker):
        """Provider messages into the pipeline until `stop` or the socket closes."""
        try:
            async for message in ws:
                for frame in protocol.receive(message):
                    if isinstance(frame, CallStoppedFrame):
                        logger.info(f"call {protocol.call.call_id}: provider stop ({frame.reason or 'no reason'})")
                        await worker.queue_frame(EndFrame(reason=f"provider stop: {frame.reason}"))
                        return
                    await worker.queue_frame(frame)
        except websockets.ConnectionClosed:
            pass
        await worker.cancel(reason="provider socket closed")
