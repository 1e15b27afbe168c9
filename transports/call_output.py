"""The last processor of every call: renders frames with the provider's protocol and sends them.

Shared by every provider; what differs (JSON shape, chunk rules, mark and clear messages) lives
in the pure protocol object.

No chunk of interrupted audio may follow a `clear`. The pacer stamps each chunk with the number of
interruptions it had seen; this output counts the `clear`s it sent. An older stamp is refused; a
newer one means its InterruptionFrame is still on the way, so the `clear` goes out first.
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

from transports.frames import MarkFrame, PacedAudioFrame
from transports.socket import CallSocket


class CallOutput(FrameProcessor):
    """Send bot audio, marks and clears to the provider; hang up when the pipeline ends."""

    def __init__(self, protocol, socket: CallSocket, call_id: str, log=None, **kwargs):
        """`log`: the call's CallLog, told what audio was sent and when a `clear` went out."""
        super().__init__(**kwargs)
        self._log = log
        self._protocol = protocol
        self._socket = socket
        self._call_id = call_id
        self._rate: int | None = None
        self._clears = 0  # interruptions answered with a `clear`
        self._interruptions = 0  # InterruptionFrames seen
        self.messages_sent = 0
        self.stats = {"stale_chunks_refused": 0, "sends_after_close": 0}

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._audio(frame)
            return
        if isinstance(frame, MarkFrame):
            await self._send(self._protocol.mark(frame.mark))
            return
        if isinstance(frame, InterruptionFrame):
            self._interruptions += 1
            await self._clear(self._interruptions)
        elif isinstance(frame, TTSStoppedFrame):
            await self._send(self._protocol.flush())
        if isinstance(frame, EndFrame):
            await self._send(self._protocol.flush() + self._protocol.goodbye())
            await self._socket.close()
        elif isinstance(frame, CancelFrame):
            await self._socket.close()
        else:
            await self._send(self._protocol.event(frame))  # e.g. the browser's state and transcript
        await self.push_frame(frame, direction)

    async def _clear(self, epoch: int):
        if epoch > self._clears:
            self._clears = epoch
            await self._send(self._protocol.clear())
            if self._log:
                self._log.cleared()

    async def _audio(self, frame: OutputAudioRawFrame):
        if isinstance(frame, PacedAudioFrame):
            if frame.epoch < self._clears:
                self.stats["stale_chunks_refused"] += 1
                return
            await self._clear(frame.epoch)
        rate = self._protocol.call.sample_rate
        if frame.sample_rate != rate:
            if self._rate != frame.sample_rate:
                self._rate = frame.sample_rate
                logger.error(f"call {self._call_id}: bot audio at {frame.sample_rate} Hz reaches a {rate} Hz call; add `resample` (audio: output, rate: call)")
            return
        await self._send(self._protocol.audio(frame.audio))
        if self._log:
            self._log.bot_audio(frame.audio)

    async def _send(self, messages: list[str]):
        for message in messages:
            if not self._socket.is_open:
                self.stats["sends_after_close"] += 1  # not sent: counted to show nothing leaks after close
                continue
            if await self._socket.send(message):
                self.messages_sent += 1
