"""`python -m pipelines guard`: a sidecar in front of one PersonaPlex engine that makes it exclusive.

A PersonaPlex server serves one conversation at a time, yet upgrades a second connection and leaves
it silent (its prompts may overwrite the first's), and a client that vanished without closing holds
its lock for good (docs/protocols.md, PersonaPlex). The bridge's pool leases engines, but only the
engine's own door can enforce it, so the guard stands there, on the engine's machine:

- it relays WebSocket sessions to the upstream unchanged: the same path and query string (the
  prompts), binary and text frames both ways in order, close codes and reasons both ways. An upstream
  that refuses the upgrade gives the client its HTTP status; one that cannot be reached gives 502. An
  upstream that drops the connection without a close frame has the client's connection dropped too
  (the client sees 1006, as from the engine itself). Pings are answered on each hop, not relayed.
- it admits at most `capacity` sessions and refuses another before the upgrade: 503 with
  `Retry-After: 1` (`refused_busy`). The token (below) is judged first: a stale lease gets 409 even then.
- fencing: the header `X-Lease-Token: N` (a non-negative integer, the lease's fencing token) is read
  and stripped before relaying. A token lower than the highest one admitted is refused with 409; an
  equal or higher one is admitted (the highest is raised when the slot is taken, before the upstream
  answers). A malformed token gets 400, a missing one 428 under `--require-token`; all three count
  as `refused_token`. Without `--require-token` a session without a token is admitted (a bridge
  without shared leases).
- the highest token admitted lives in memory, and with `state_file` (`--state-file PATH`) on disk
  too, so that a restarted guard still refuses what it refused before: it is read at the start (a
  missing file: none admitted yet; one that cannot be read or parsed is an error, exit status 2) and
  written whenever it rises, once per lease, before the session is relayed upstream: JSON
  `{"highest_token": N}`, written to a temporary file in the same directory, fsynced, put in place
  with os.replace and the directory fsynced, so that the file is always whole and a crash right after
  an admission cannot forget it. A guard that cannot write it refuses the session with 500
  (`refused_state`; the in-memory highest stays raised, the next admission writes it again).
- a session whose client sent no data frame for `idle_secs` is closed (`idle_closed`): 1000 to the
  upstream, and to the client 4000 with the reason `idle: no frame from the client for S s`. The
  clock starts at the upgrade and is reset by each client frame and by the upstream's first frame
  (PersonaPlex's handshake), since the bridge sends nothing during the 2-9 s prompt phase.
- when either side closes or fails, the other is closed at once: a close frame's code and reason are
  passed on (a code that cannot be sent, such as 1005 or 1006, becomes 1000 towards the upstream).
- the slot stays taken `teardown_secs` (0.25 s) after the upstream's closing handshake, and the client's
  close waits for it, so the next session reaches the engine only after the last one's handler has
  returned: the engine (aiohttp) closes the TCP connection at the handshake, but its handler runs on
  (PersonaPlex finishes the model step it is in, then frees its lock), and a connection upgraded
  meanwhile would sit beside the old session. `bench cluster` saw that: an engine's connection peak
  of 2 once in 200 calls without it, the new session upgraded a few ms before the old handler ended.
  `stop()` closes every session with 1001 both ways.

Close codes the guard itself sends to a client: 4000 idle, 1001 guard stopping.

The same port serves GET /healthz (200 while the upstream accepts a TCP connection, else 503) and
GET /stats (JSON): admitted, refused_busy, refused_token, refused_upstream (the upstream refused or
could not be reached), refused_state (the state file could not be written), idle_closed, active,
capacity, highest_token (null before any), state_file (its path, or null), bytes_up (client to
upstream, frame payloads) and bytes_down (upstream to client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType, web
from loguru import logger

TOKEN_HEADER = "X-Lease-Token"
IDLE_CLOSE_CODE = 4000
STOPPING_CLOSE_CODE = 1001
CLOSE_TIMEOUT_SECS = 2.0  # how long a close waits for the peer's reply (a frozen peer gets no longer)
CONNECT_TIMEOUT_SECS = 5.0
HEALTH_TIMEOUT_SECS = 2.0
TEARDOWN_SECS = 0.25  # the slot stays taken this long after the engine's closing handshake (module docstring)
# not relayed: hop-by-hop, the WebSocket handshake's own (each hop has its own), and the lease token
NOT_RELAYED = frozenset(h.lower() for h in (
    "Host", "Connection", "Upgrade", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Content-Length",
    "Proxy-Connection", "Proxy-Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept", TOKEN_HEADER))
_DATA = (WSMsgType.BINARY, WSMsgType.TEXT)


def sendable(code: int | None) -> bool:
    """Whether a close code may be put in a close frame (RFC 6455 7.4: not 1005, 1006, 1015 or reserved)."""
    return code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


@dataclass
class GuardStats:
    admitted: int = 0
    refused_busy: int = 0
    refused_token: int = 0
    refused_upstream: int = 0
    refused_state: int = 0
    idle_closed: int = 0
    active: int = 0
    capacity: int = 1
    highest_token: int | None = None
    state_file: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class StateFileError(ValueError):
    """The state file cannot be read, holds no valid token, or its directory cannot be written."""


def load_state(path: str) -> int | None:
    """The highest token a state file holds; None when there is no file yet. Its directory must be
    writable too (the file is replaced, not written in place), or the first admission would fail."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateFileError(f"state file {path}: its directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StateFileError(f"state file {path}: its directory {directory} is not writable")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"state file {path} cannot be read: {exc}") from None
    try:
        token = json.loads(text)["highest_token"]
        if type(token) is not int or token < 0:
            raise ValueError(f"highest_token {token!r} is not a non-negative integer")
    except (ValueError, TypeError, KeyError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StateFileError(f'state file {path} is corrupt (expected {{"highest_token": N}}): {exc!r}') from None
    return token


def save_state(path: str, token: int) -> None:
    """Write `token` to `path` durably and atomically: a temporary file beside it, fsync, os.replace, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps({"highest_token": token}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself
    finally:
        os.close(dir_fd)


class Guard:
    """Relay `path` to `upstream` (ws:// or wss://, host and port; a path of its own is put in front).

    With `state_file`, the highest token admitted is read from it here (StateFileError, a ValueError,
    when it cannot be) and written to it whenever it rises, before the session is relayed."""

    def __init__(self, upstream: str, *, capacity: int = 1, idle_secs: float = 15.0, path: str = "/api/chat",
                 require_token: bool = False, state_file: str | os.PathLike | None = None, teardown_secs: float = TEARDOWN_SECS) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"upstream must be ws://HOST:PORT or wss://HOST:PORT, got {upstream!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if idle_secs <= 0:
            raise ValueError(f"idle_secs must be positive, got {idle_secs}")
        if teardown_secs < 0:
            raise ValueError(f"teardown_secs must not be negative, got {teardown_secs}")
        self.teardown_secs = teardown_secs
        self.upstream = upstream.rstrip("/")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or (443 if parts.scheme == "wss" else 80)
        self._upstream_prefix = parts.path.rstrip("/")
        self._upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.capacity, self.idle_secs, self.path, self.require_token = capacity, idle_secs, path, require_token
        self.stats = GuardStats(capacity=capacity)
        self.state_file = os.fspath(state_file) if state_file is not None else None
        self._persisted: int | None = None  # the highest token the state file holds
        self._persisting = asyncio.Lock()
        if self.state_file is not None:
            self._persisted = self.stats.highest_token = load_state(self.state_file)
            self.stats.state_file = self.state_file
        self.host: str | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._sessions: set[asyncio.Task] = set()
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; port 0 picks a free one. Returns ws://HOST:PORT."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECS),
                                           auto_decompress=False)
        app = web.Application()
        app.router.add_get(self.path, self._session)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        return f"ws://{shown}:{self.port}"

    async def stop(self) -> None:
        """Close every session (1001 both ways), then stop listening."""
        self._stopping = True
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Guard:
        if self.port is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- HTTP --------------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self._upstream_host, self._upstream_port), HEALTH_TIMEOUT_SECS)
        except (OSError, TimeoutError) as exc:
            return web.Response(status=503, text=f"upstream {self._upstream_origin} unreachable: {exc or type(exc).__name__}\n")
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    def _token(self, request: web.Request) -> tuple[int | None, web.Response | None]:
        """(the token, None) or (None, the refusal)."""
        values = request.headers.getall(TOKEN_HEADER, [])
        if not values:
            if self.require_token:
                return None, web.Response(status=428, text=f"{TOKEN_HEADER} required\n")
            return None, None
        text = values[0].strip()
        if len(values) > 1 or not text.isascii() or not text.isdigit() or len(text) > 30:
            return None, web.Response(status=400, text=f"{TOKEN_HEADER} must be one non-negative integer\n")
        token = int(text)
        highest = self.stats.highest_token
        if highest is not None and token < highest:
            return None, web.Response(status=409, text=f"{TOKEN_HEADER} {token} is stale: {highest} has been admitted\n")
        return token, None

    async def _persist(self, token: int) -> None:
        """Return once the state file holds `token` or a higher one (OSError if it cannot be written).
        Concurrent admissions share a write: each writes the highest in memory at the time."""
        async with self._persisting:
            if self._persisted is not None and self._persisted >= token:
                return
            highest = self.stats.highest_token
            assert highest is not None and highest >= token
            await asyncio.to_thread(save_state, self.state_file, highest)
            self._persisted = highest

    async def _session(self, request: web.Request) -> web.StreamResponse:
        token, refusal = self._token(request)
        if refusal is not None:
            self.stats.refused_token += 1
            logger.info(f"guard: {request.remote}: refused ({refusal.status}): {refusal.text.strip()}")
            return refusal
        if self.stats.active >= self.capacity or self._stopping:
            self.stats.refused_busy += 1
            logger.info(f"guard: {request.remote}: refused (503): {self.stats.active} of {self.capacity} sessions active")
            return web.Response(status=503, text="engine busy\n", headers={"Retry-After": "1"})
        self.stats.active += 1  # the slot is taken before the first await
        if token is not None:
            self.stats.highest_token = token if self.stats.highest_token is None else max(token, self.stats.highest_token)
        task = asyncio.current_task()
        self._sessions.add(task)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.stats.active -= 1

        try:
            if token is not None and self.state_file is not None:
                try:
                    await self._persist(token)
                except OSError as exc:
                    self.stats.refused_state += 1
                    logger.error(f"guard: {request.remote}: refused (500): state file {self.state_file} cannot be written: {exc}")
                    return web.Response(status=500, text=f"guard cannot record the lease token: {exc}\n")
            upstream = await self._connect(request)
            if isinstance(upstream, web.Response):
                self.stats.refused_upstream += 1
                return upstream
            self.stats.admitted += 1
            client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (), timeout=CLOSE_TIMEOUT_SECS, autoclose=False,
                                           autoping=True, heartbeat=None, compress=False, max_msg_size=0, decode_text=False)
            try:
                await client.prepare(request)
            except BaseException:
                await upstream.close()
                raise
            logger.info(f"guard: {request.remote}: session admitted (token {token}; {self.stats.active} of {self.capacity} active)")
            await self._relay(request, client, upstream, release)
            return client
        finally:
            release()
            self._sessions.discard(task)

    async def _connect(self, request: web.Request) -> aiohttp.ClientWebSocketResponse | web.Response:
        """The upstream's WebSocket, or the response that tells the client why there is none."""
        assert self._http is not None
        url_type = type(request.url)  # yarl.URL, aiohttp's own: encoded=True keeps the query byte for byte
        url = url_type(self._upstream_origin + self._upstream_prefix + request.raw_path, encoded=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_RELAYED]
        protocols = [p.strip() for h in request.headers.getall("Sec-WebSocket-Protocol", []) for p in h.split(",") if p.strip()]
        try:
            return await self._http.ws_connect(
                url, headers=headers, protocols=protocols, autoping=True, heartbeat=None, compress=0, max_msg_size=0,
                decode_text=False, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_SECS),
                ssl=False if url.scheme == "wss" else True)  # PersonaPlex serves self-signed certificates
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            logger.warning(f"guard: {request.remote}: the upstream refused the upgrade ({exc.status} {exc.message})")
            return web.Response(status=status, text=f"upstream refused the upgrade: {exc.status} {exc.message}\n")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.warning(f"guard: {request.remote}: upstream {self._upstream_origin} unreachable: {exc!r}")
            return web.Response(status=502, text=f"upstream unreachable: {exc or type(exc).__name__}\n")

    # --- one session -------------------------------------------------------------------------------

    async def _relay(self, request: web.Request, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                     release) -> None:
        loop = asyncio.get_running_loop()
        idle: asyncio.Future = loop.create_future()
        last = [loop.time()]  # the last client frame (or the upstream's first)
        timer = [loop.call_at(last[0] + self.idle_secs, lambda: check())]

        def check() -> None:
            due = last[0] + self.idle_secs
            if loop.time() >= due:
                if not idle.done():
                    idle.set_result(None)
            else:
                timer[0] = loop.call_at(due, check)

        up = asyncio.create_task(self._pump(client, upstream, True, last, loop), name="guard-up")
        down = asyncio.create_task(self._pump(upstream, client, False, last, loop), name="guard-down")
        what = "stopped"
        try:
            await asyncio.wait({up, down, idle}, return_when=asyncio.FIRST_COMPLETED)
            if idle.done():
                what = "idle"
                self.stats.idle_closed += 1
                await self._end(up, down)
                await _close(upstream.close(code=1000, message=b"idle client"), upstream)
                await self._torn_down(release)
                await _close(client.close(code=IDLE_CLOSE_CODE, message=f"idle: no frame from the client for {self.idle_secs:g} s".encode()), client)
            elif up.done():  # the client ended
                msg = await self._end(up, down)
                code = msg.data if msg.type is WSMsgType.CLOSE and sendable(msg.data) else 1000
                what = f"client closed ({msg.type.name} {msg.data if msg.type is WSMsgType.CLOSE else ''})"
                await _close(upstream.close(code=code, message=(msg.extra or "").encode() if msg.type is WSMsgType.CLOSE else b""), upstream)
                await self._torn_down(release)
                await _close(client.close(), client)
            else:  # the upstream ended
                msg = await self._end(down, up)
                what = f"upstream closed ({msg.type.name} {msg.data if msg.type is WSMsgType.CLOSE else ''})"
                await _close(upstream.close(), upstream)
                await self._torn_down(release)
                if msg.type is WSMsgType.CLOSE and sendable(msg.data):
                    await _close(client.close(code=msg.data, message=(msg.extra or "").encode()), client)
                elif msg.type is WSMsgType.CLOSE:
                    await _close(client.close(), client)
                elif request.transport is not None:  # no close frame from the engine: none to the client either
                    request.transport.abort()
        except asyncio.CancelledError:  # stop(), or the server going away
            await self._end(up, down)
            await _close(upstream.close(code=STOPPING_CLOSE_CODE, message=b"guard stopping"), upstream)
            release()
            await _close(client.close(code=STOPPING_CLOSE_CODE, message=b"guard stopping"), client)
            raise
        finally:
            timer[0].cancel()
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            if not upstream.closed:
                await _close(upstream.close(), upstream)
            logger.info(f"guard: {request.remote}: session over: {what}")

    async def _torn_down(self, release) -> None:
        """Frees the slot once the engine's handler has had `teardown_secs` to return after the closing handshake."""
        await asyncio.sleep(self.teardown_secs)
        release()

    @staticmethod
    async def _end(first: asyncio.Task, other: asyncio.Task) -> aiohttp.WSMessage:
        """Stop `other`; the message `first` ended on (an ERROR message for a failure)."""
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        if not first.done():
            first.cancel()
        results = await asyncio.gather(first, return_exceptions=True)
        result = results[0]
        if isinstance(result, aiohttp.WSMessage):
            return result
        return aiohttp.WSMessage(WSMsgType.ERROR, result, None)

    async def _pump(self, src, dst, from_client: bool, last: list[float], loop) -> aiohttp.WSMessage:
        """Relay src's data frames to dst until src ends (its last message) or dst fails (an ERROR message)."""
        first = not from_client
        while True:
            msg = await src.receive()
            if msg.type not in _DATA:
                return msg
            if from_client or first:
                last[0] = loop.time()
                first = False
            try:
                await dst.send_frame(msg.data, msg.type)
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                # the destination is gone: end as if it had ended (its own pump sees it too)
                return aiohttp.WSMessage(WSMsgType.ERROR, exc, None)
            if from_client:
                self.stats.bytes_up += len(msg.data)
            else:
                self.stats.bytes_down += len(msg.data)


async def _close(closing, ws) -> None:
    """A close that waits for the peer's reply at most CLOSE_TIMEOUT_SECS, as aiohttp's does, and also
    bounds sending it: a peer that stopped reading (a full TCP window) has its connection dropped."""
    try:
        await asyncio.wait_for(closing, CLOSE_TIMEOUT_SECS + 0.5)
    except TimeoutError:
        owner = getattr(ws, "_response", None) or getattr(ws, "_req", None)  # the client's request / the upstream's response
        transport = getattr(owner, "transport", None) or getattr(getattr(owner, "connection", None), "transport", None)
        if transport is not None:
            transport.abort()


# --- CLI -----------------------------------------------------------------------------------------


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give HOST:PORT, not {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines guard",
                                description="Sidecar in front of one PersonaPlex engine: admits at most --capacity sessions, "
                                "fences stale leases (X-Lease-Token), closes idle sessions; GET /healthz and /stats on the same port.")
    p.add_argument("--listen", type=_host_port, required=True, metavar="HOST:PORT", help="where to listen (port 0: any free)")
    p.add_argument("--upstream", required=True, metavar="ws://HOST:PORT", help="the engine (ws:// or wss://, certificate not verified)")
    p.add_argument("--capacity", type=int, default=1, help="concurrent sessions admitted (default: %(default)s; PersonaPlex serves one)")
    p.add_argument("--idle-secs", type=float, default=15.0,
                   help="close a session whose client sent no frame for this long (default: %(default)s; above the 2-9 s prompt phase)")
    p.add_argument("--path", default="/api/chat", help="the WebSocket path relayed (default: %(default)s)")
    p.add_argument("--teardown-secs", type=float, default=TEARDOWN_SECS,
                   help="keep the slot this long after the engine's closing handshake, while its handler ends (default: %(default)s)")
    p.add_argument("--require-token", action="store_true", help=f"refuse sessions without {TOKEN_HEADER} (428)")
    p.add_argument("--state-file", metavar="PATH",
                   help="keep the highest token admitted in this file (read at start, written durably when it rises), "
                   "so that a restarted guard still fences stale leases; its directory must exist (default: memory only)")
    return p


async def _serve(args, guard: Guard) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the `serving` line: a SIGTERM right after it stops cleanly
        loop.add_signal_handler(sig, stop.set)
    url = await guard.start(*args.listen)
    state = f"state file {guard.state_file}, highest token {guard.stats.highest_token}" if guard.state_file else "no state file"
    print(f"serving {url}{guard.path} -> {guard.upstream} (capacity {guard.capacity}, idle {guard.idle_secs:g} s, {state}; "
          f"stats: http://{url.removeprefix('ws://')}/stats)", flush=True)
    try:
        await stop.wait()
    finally:
        await guard.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        guard = Guard(args.upstream, capacity=args.capacity, idle_secs=args.idle_secs, path=args.path,
                      require_token=args.require_token, state_file=args.state_file, teardown_secs=args.teardown_secs)
    except ValueError as exc:  # StateFileError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, guard))
