"""The provider's WebSocket as every call sees it: text or bytes in, text out, one close.

A thin layer over aiohttp's server-side WebSocket so the call's input loop and CallOutput never
touch aiohttp's message types, and a send on a closing socket is a `False`, not an exception.
A peer that stops reading fills the kernel and aiohttp buffers and then blocks every send: after
`send_timeout` the connection is aborted (`stalled`), which also ends the call's reader. Once the
provider has said `stop` nothing we send will be played, so from then on a send or the close frame
gets at most `STOP_GRACE_SECS` (the call ends at once, whatever the send side is doing).
"""

import asyncio
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web

STOP_GRACE_SECS = 0.5


class CallSocket:
    def __init__(self, ws: web.WebSocketResponse, send_timeout: float | None = None, transport: asyncio.Transport | None = None):
        self._ws = ws
        self._send_timeout = send_timeout
        self._transport = transport
        self.stalled = False
        self._sending_since: float | None = None
        self._deadline: asyncio.Timeout | None = None  # of the send or close in progress

    def blocked_secs(self) -> float:
        """How long the send in progress has waited for the peer to take data (0 when none waits)."""
        since = self._sending_since
        return 0.0 if since is None else asyncio.get_running_loop().time() - since

    @property
    def is_open(self) -> bool:
        return not self._ws.closed

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def send(self, message: str) -> bool:
        """Send one text message; False when the socket is already gone."""
        if self._ws.closed or self.stalled:
            return False
        self._sending_since = asyncio.get_running_loop().time()
        try:
            async with self._timeout() as self._deadline:
                await self._ws.send_str(message)
        except (ConnectionError, RuntimeError):  # aiohttp: reset while writing / closing transport
            return False
        except TimeoutError:
            self.stalled = True
            if self._transport is not None:
                self._transport.abort()
            return False
        finally:
            self._sending_since = self._deadline = None
        return True

    def stopped(self) -> None:
        """The provider said `stop`: shorten the send deadline, also of the send waiting now."""
        grace = STOP_GRACE_SECS if self._send_timeout is None else min(self._send_timeout, STOP_GRACE_SECS)
        self._send_timeout = grace
        deadline = self._deadline  # set only while a send or the close is in progress
        if deadline is not None:
            due = asyncio.get_running_loop().time() + grace
            if deadline.when() is None or deadline.when() > due:
                deadline.reschedule(due)

    def _timeout(self) -> asyncio.Timeout:
        return asyncio.timeout(self._send_timeout)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._ws.closed and not self.stalled:
            try:  # the close frame is a send too: a peer that does not read gets no more time
                async with self._timeout() as self._deadline:
                    await self._ws.close(code=code, message=reason.encode())
            except TimeoutError:
                self.stalled = True
            finally:
                self._deadline = None
        if self.stalled and self._transport is not None:
            self._transport.abort()

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Inbound text and binary messages until the peer closes or the socket fails."""
        async for msg in self._ws:
            if msg.type == WSMsgType.TEXT:
                yield msg.data
            elif msg.type == WSMsgType.BINARY:
                yield msg.data
            else:  # ERROR; CLOSE/CLOSING end the iteration inside aiohttp
                return
