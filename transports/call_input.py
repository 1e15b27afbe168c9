"""The provider's socket into the call's frames: the input side of the socket glue (`call_output.py`
is the other). Each message goes through the transport's pure protocol; what the frames mean for the
call (the record, the pipeline, the end) is the caller's `handle`."""

import asyncio
from collections.abc import Awaitable, Callable

from pipecat.frames.frames import Frame, InputAudioRawFrame

from transports.socket import CallSocket


async def read_call(socket: CallSocket, protocol, media_timeout_secs: float, handle: Callable[[Frame], Awaitable[bool]]) -> bool:
    """Feed `handle` every frame the provider's messages make, until it returns True (the provider's
    `stop`: True) or the socket closes (False). TimeoutError when no caller audio came for
    `media_timeout_secs`: providers stream silence, so that is a dead or hostile peer."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(media_timeout_secs) as media_deadline:
        async for message in socket.messages():
            for frame in protocol.receive(message, now=loop.time()):
                if isinstance(frame, InputAudioRawFrame):
                    media_deadline.reschedule(loop.time() + media_timeout_secs)
                if await handle(frame):
                    return True
    return False
