"""Opening a PersonaPlex session: connect, then feed the machine (protocol.py) until its handshake.

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
from processors.personaplex.protocol import Failed, HandshakeDone, Outcome, SessionMachine


class EngineUnreachable(Exception):
    """Connect failed or timed out, the upgrade was refused, or no handshake came in time."""


class SessionRejected(Exception):
    """The engine closed the connection before its handshake: usually the prompts."""


class EngineBusy(EngineUnreachable):
    """The engine's guard refused the upgrade: it serves another session (503) or holds a newer lease (409)."""


LEASE_TOKEN_HEADER = "X-Lease-Token"  # the lease's fencing token, for the guard in front of the engine (pipelines/guard.py)
BUSY_STATUSES = (409, 503)


def tls_context(url: str, verify: bool = False, ca_file: str | None = None) -> ssl.SSLContext | None:
    """PersonaPlex serves self-signed mkcert certificates, so verification is opt-in."""
    if not url.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_session(base_url: str, voice_prompt: str, text_prompt: str, *, timeout: float | None = None,
                       connect_timeout_secs: float = 5.0, tls: ssl.SSLContext | None = None,
                       machine: SessionMachine | None = None, token: int | None = None):
    """A connection past its handshake, ready for audio. `machine` (the processor's, which goes on to
    stream the call through it) or `timeout` (a bare one, for a probe) bounds connect plus handshake.
    `token`: the lease's fencing token, sent to the engine's guard."""
    if machine is None:
        if timeout is None:
            raise TypeError("open_session needs a timeout or a machine")
        machine = SessionMachine(base_url, handshake_timeout_secs=timeout)
    machine.connecting(time.monotonic())
    url = wire.chat_url(base_url, voice_prompt, text_prompt)
    try:
        ws = await websockets.connect(
            url, ssl=tls if tls is not None else tls_context(base_url),
            open_timeout=min(connect_timeout_secs, machine.handshake_timeout_secs), close_timeout=1.0, ping_interval=None,
            compression=None, max_size=None,
            additional_headers={LEASE_TOKEN_HEADER: str(token)} if token is not None else None,
        )
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        if status in BUSY_STATUSES:
            raise EngineBusy(f"{base_url}: its guard refused the session (HTTP {status}: "
                             f"{'serving another' if status == 503 else 'a newer lease holds it'})") from None
        raise EngineUnreachable(f"{base_url}: cannot connect: {exc}") from None
    except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
        what = "connecting timed out" if isinstance(exc, asyncio.TimeoutError) else f"cannot connect: {exc}"
        raise EngineUnreachable(f"{base_url}: {what}") from None
    try:
        while True:
            events = machine.tick(time.monotonic())
            if not events:
                try:
                    message = await asyncio.wait_for(ws.recv(), max(0.0, machine.time_left(time.monotonic())))
                except TimeoutError:
                    continue  # the tick says whether the deadline has really passed
                except websockets.ConnectionClosed:
                    events = machine.closed(ws.close_code)
                else:
                    events = machine.receive(message, time.monotonic())
            for event in events:
                if isinstance(event, HandshakeDone):
                    return ws
                if isinstance(event, Failed):
                    if event.outcome is Outcome.PROMPTS_REFUSED:
                        raise SessionRejected(event.reason)
                    await ws.close()
                    raise EngineUnreachable(event.reason)
    except asyncio.CancelledError:
        await ws.close()  # the call went away while the engine was still in its prompt phase
        raise
