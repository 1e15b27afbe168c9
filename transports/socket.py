"""The provider's WebSocket as every call sees it: text or bytes in, text out, one close.

A thin layer over aiohttp's server-side WebSocket so the call's input loop and CallOutput never
touch aiohttp's message types, and a send on a closing socket is a `False`, not an exception.
A peer that stops reading fills the kernel and aiohttp buffers and then blocks every send: after
`send_timeout` the connection is aborted (`stalled`), which also ends the call's reader.
"""

import asyncio
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web


class CallSocket:
    def __init__(self, ws: web.WebSocketResponse, send_timeout: float | None = None, transport: asyncio.Transport | None = None):
        self._ws = ws
        self._send_timeout = send_timeout
        self._transport = transport
        self.stalled = False

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
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._ws.send_str(message)
        except (ConnectionError, RuntimeError):  # aiohttp: reset while writing / closing transport
            return False
        except TimeoutError:
            self.stalled = True
            if self._transport is not None:
                self._transport.abort()
            return False
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self._ws.closed and not self.stalled:
            try:  # the close frame is a send too: a peer that does not read gets no more time
                async with asyncio.timeout(self._send_timeout):
                    await self._ws.close(code=code, message=reason.encode())
            except TimeoutError:
                self.stalled = True
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
