"""A TCP relay on loopback that can cut a link: one bridge's Redis behind it is a network partition on demand.

`Relay(target_port)` listens on 127.0.0.1 (a free port unless given) and relays every connection to
the target byte for byte, both ways. `cut()` drops every open connection at once (both sides see a
reset) and, until `restore()`:
- `blackhole=False` (default): stops listening, so a new connection is refused (ECONNREFUSED), as
  from a host whose service is down or a firewall that rejects;
- `blackhole=True`: accepts new connections and never answers (what is sent is read and thrown
  away), so a client waits for its own timeout, as across a partition that drops packets.
`restore()` drops the blackholed connections (their stream lost bytes, so none may carry on) and
listens again on the same port; new connections are relayed again. A connection relays until
either side closes it, then both are closed.

`ThreadedRelay` is the same relay on an event loop of its own in a daemon thread, with blocking
methods: for a process whose own loop is not running yet (bench cluster starts its bridges first).
`stats`: accepted, relayed, refused_upstream (the target did not answer), blackholed, dropped, cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

CHUNK = 65536


class _Link:
    """One client connection, its upstream once connected, and the task that serves it."""

    def __init__(self, client: asyncio.StreamWriter, task: asyncio.Task | None):
        self.client, self.upstream, self.task = client, None, task

    def drop(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class Relay:
    """127.0.0.1:`port` -> `target_host`:`target_port`, with cut() and restore()."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, port: int = 0, host: str = "127.0.0.1"):
        self.target_host, self.target_port = target_host, target_port
        self.host, self.port = host, port
        self.is_cut = False
        self.blackhole = False
        self.stats = {"accepted": 0, "relayed": 0, "refused_upstream": 0, "blackholed": 0, "dropped": 0, "cuts": 0}
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    async def start(self) -> int:
        """Listen (the port chosen at the first start is kept); returns the port."""
        await self._listen()
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        self._close_listener()
        self._drop_all()
        await asyncio.sleep(0)

    async def cut(self, *, blackhole: bool = False) -> int:
        """Drop every open connection; refuse (or blackhole) new ones until restore(). Returns how many were dropped."""
        self.is_cut, self.blackhole = True, blackhole
        self.stats["cuts"] += 1
        if not blackhole:
            self._close_listener()
        dropped = self._drop_all()
        await asyncio.sleep(0)
        return dropped

    async def restore(self) -> None:
        """Relay again: blackholed connections are dropped, the port listens again."""
        if not self.is_cut:
            return
        self.is_cut, self.blackhole = False, False
        self._drop_all()
        if self._server is None:
            await self._listen()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _drop_all(self) -> int:
        links, self._links = list(self._links), set()
        for link in links:
            link.drop()
        self.stats["dropped"] += len(links)
        return len(links)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, asyncio.current_task())
        self._links.add(link)
        self.stats["accepted"] += 1
        try:
            if self.is_cut:  # blackholed (or accepted just as the listener closed): read and never answer
                self.stats["blackholed"] += 1
                while await reader.read(CHUNK):
                    pass
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                self.stats["refused_upstream"] += 1
                return
            if link not in self._links:  # cut while connecting
                return
            self.stats["relayed"] += 1
            pumps = [asyncio.ensure_future(_pump(reader, link.upstream)), asyncio.ensure_future(_pump(up_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            for w in (writer, link.upstream):
                if w is not None:
                    w.transport.abort()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()


class ThreadedRelay:
    """A Relay on its own event loop in a daemon thread; start/cut/restore/stop block until done."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, port: int = 0):
        self.relay = Relay(target_port, target_host, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def stats(self) -> dict:
        return dict(self.relay.stats)

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return self.relay.url(scheme, path)

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> int:
        self._thread.start()
        return self._call(self.relay.start())

    def cut(self, *, blackhole: bool = False) -> int:
        return self._call(self.relay.cut(blackhole=blackhole))

    def restore(self) -> None:
        self._call(self.relay.restore())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self.relay.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ThreadedRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
