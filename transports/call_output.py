"""The last processor of every call: renders frames with the provider's protocol and sends them.

Shared by every provider; what differs (JSON shape, chunk rules, mark and clear messages) lives
in the pure protocol object.
"""

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from websockets.exceptions import ConnectionClosed

from transports.frames import MarkFrame


class CallOutput(FrameProcessor):
    """Send bot audio, marks and clears to the provider; hang up when the pipeline ends."""

    def __init__(self, protocol, websocket, call_id: str, **kwargs):
        super().__init__(**kwargs)
        self._protocol = protocol
        self._ws = websocket
        self._call_id = call_id
        self._rate: int | None = None
        self.messages_sent = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._audio(frame)
            return
        if isinstance(frame, MarkFrame):
            await self._send(self._protocol.mark(frame.mark))
            return
        if isinstance(frame, InterruptionFrame):
            await self._send(self._protocol.clear())
        elif isinstance(frame, TTSStoppedFrame):
            await self._send(self._protocol.flush())
        elif isinstance(frame, EndFrame):
            await self._send(self._protocol.flush())
            await self._ws.close()
        elif isinstance(frame, CancelFrame):
            await self._ws.close()
        await self.push_frame(frame, direction)

    async def _audio(self, frame: OutputAudioRawFrame):
        rate = self._protocol.call.sample_rate
        if frame.sample_rate != rate:
            if self._rate != frame.sample_rate:
                self._rate = frame.sample_rate
                logger.error(f"call {self._call_id}: bot audio at {frame.sample_rate} Hz reaches a {rate} Hz call; add `resample` (audio: output, rate: call)")
            return
        await self._send(self._protocol.audio(frame.audio))

    async def _send(self, messages: list[str]):
        for message in messages:
            try:
                await self._ws.send(message)
            except ConnectionClosed:
                return
            self.messages_sent += 1
