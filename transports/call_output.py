"""The last processor of every call: renders frames with the provider's protocol and sends them.

Shared by every provider; what differs (JSON shape, chunk rules, mark and clear messages) lives
in the pure protocol object.

A transfer (TransferFrame, from call_actions) is carried out at the call's end, after the pacer has
played the bot's last words: the protocol's messages (the browser page's), then `on_transfer` (the
server's REST request, for Twilio), then the usual goodbye and close (for Exotel, closing the stream
is the hand-over: the flow goes on to its next applet).

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

from transports.frames import MarkFrame, PacedAudioFrame, TransferFrame
from transports.socket import CallSocket


class CallOutput(FrameProcessor):
    """Send bot audio, marks and clears to the provider; hang up when the pipeline ends."""

    def __init__(self, protocol, socket: CallSocket, call_id: str, log=None, on_transfer=None, **kwargs):
        """`log`: the call's CallLog, told what audio was sent and when a `clear` went out.
        `on_transfer(to) -> bool | None`: the provider's hand-over request, awaited before the socket
        closes (None: the protocol needs none)."""
        super().__init__(**kwargs)
        self._log = log
        self._on_transfer = on_transfer
        self._transfer: TransferFrame | None = None
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
        if isinstance(frame, TransferFrame):
            self._transfer = frame  # at the end, once the last words have played
            return
        if isinstance(frame, InterruptionFrame):
            self._interruptions += 1
            await self._clear(self._interruptions)
        elif isinstance(frame, TTSStoppedFrame):
            await self._send(self._protocol.flush())
        if isinstance(frame, EndFrame):
            if self._transfer is not None:
                await self._hand_over(self._transfer)
            await self._send(self._protocol.flush() + self._protocol.goodbye())
            await self._socket.close()
        elif isinstance(frame, CancelFrame):
            await self._socket.close()
        else:
            await self._send(self._protocol.event(frame))  # e.g. the browser's state and transcript
        await self.push_frame(frame, direction)

    async def _hand_over(self, transfer: TransferFrame):
        await self._send(self._protocol.flush() + self._protocol.transfer(transfer.target, transfer.to))
        ok = True
        if self._on_transfer is not None and self._socket.is_open:
            result = await self._on_transfer(transfer.to)
            ok = result is not False
            self._protocol.handed_over = result is True
        how = self._protocol.transfer_by
        (logger.info if ok else logger.error)(f"call {self._call_id}: transfer to {transfer.target} ({how}) {'done' if ok else 'failed'}")
        if self._log:
            self._log.emit("transfer", target=transfer.target, to=transfer.to, how=how, ok=ok)
            if not ok:
                self._log.outcome = "transfer_failed"

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
