"""Opening a PersonaPlex session: connect, then wait for the 0x00 handshake.

The processor opens one per call, and the engine pool opens one to probe an engine out of
rotation. The two ways this can fail mean different things. An engine that cannot be reached, or
that says nothing before the deadline, is the engine's fault, so the pool takes it out of rotation.
A close before the handshake is how the server rejects the prompts (an unknown voice, for
example; docs/protocols.md, PersonaPlex). That is the call's configuration, and the engine stays.
"""

import asyncio
import ssl
import time

import websockets

from processors.personaplex import wire


class EngineUnreachable(Exception):
    """Connect failed or timed out, the upgrade was refused, or no handshake came in time."""


class SessionRejected(Exception):
    """The engine closed the connection before its handshake: usually the prompts."""


def tls_context(url: str, verify: bool = False, ca_file: str | None = None) -> ssl.SSLContext | None:
    """PersonaPlex serves self-signed mkcert certificates, so verification is opt-in."""
    if not url.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_session(base_url: str, voice_prompt: str, text_prompt: str, *, timeout: float,
                       connect_timeout: float = 5.0, tls: ssl.SSLContext | None = None):
    """A connection past its handshake, ready for audio; `timeout` bounds connect plus handshake."""
    deadline = time.monotonic() + timeout
    url = wire.chat_url(base_url, voice_prompt, text_prompt)
    try:
        ws = await websockets.connect(
            url, ssl=tls if tls is not None else tls_context(base_url),
            open_timeout=min(connect_timeout, timeout), close_timeout=1.0, ping_interval=None, compression=None, max_size=None,
        )
    except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
        what = "connecting timed out" if isinstance(exc, asyncio.TimeoutError) else f"cannot connect: {exc}"
        raise EngineUnreachable(f"{base_url}: {what}") from None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            message = await asyncio.wait_for(ws.recv(), remaining)
            if isinstance(message, bytes) and wire.split(message)[0] == wire.HANDSHAKE:
                return ws
    except asyncio.CancelledError:
        await ws.close()  # the call went away while the engine was still in its prompt phase
        raise
    except TimeoutError:
        await ws.close()
        raise EngineUnreachable(f"{base_url}: no handshake within {timeout:g} s") from None
    except websockets.ConnectionClosed:
        code = ws.close_code
        how = f"code {code}" if code else "abnormal close, no close frame"
        raise SessionRejected(f"{base_url} closed the connection before its handshake ({how}); check voice_prompt/text_prompt") from None
