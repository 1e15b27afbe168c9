"""Caller audio to PersonaPlex as Ogg-Opus: libopus through PyAV, with a complexity and a mode to pick.

Why not sphn's ``OpusStreamWriter``: encoding each call's uplink was the bridge's biggest single CPU
cost, ~1.5 % of a core per call (24 kHz speech in 80 ms frames), and sphn sets no complexity or mode.
libopus through PyAV, same speech, same run (``python -m pipelines bench uplink``; PESQ NB/WB against
the 8/16 kHz caller audio): sphn 1.47 %, PESQ 4.38/4.20; voip complexity 5, 1.00 %, 4.27/4.10;
lowdelay (CELT only) complexity 5 at 48 kbit/s, 0.46 %, 4.34/4.20, the defaults. Caller audio is 8 kHz
telephony (or 16 kHz browser audio) upsampled, so SILK's speech modelling buys nothing here that CELT's
bits do not; in CELT mode complexity 1-10 score alike (~0.35-0.6 %), 0 drops to ~3.9/3.6.

The stream is shaped for the server's strict reader (sphn 0.1, the Rust ``ogg`` crate; rebuilt in
processors/personaplex/ogg_reader.py): a BOS page with OpusHead, then OpusTags, then one page per 80 ms (four 20 ms
packets, one model step, so no added model latency and fewer WebSocket messages) with granule positions
in 48 kHz samples counted from the start of the stream (pre-skip included, as RFC 7845 says) and the
encoder's own pre-skip in OpusHead. No DTX: the server is input-clocked, a missing packet is a missing step.
"""

from __future__ import annotations

import random
import struct
from fractions import Fraction
from typing import Literal

import av
import numpy as np

from processors.personaplex.ogg_pages import OPUS_HEAD_MAGIC, opus_head, opus_tags, write_packets

Application = Literal["voip", "audio", "lowdelay"]
APPLICATIONS: tuple[str, ...] = ("voip", "audio", "lowdelay")
FRAME_MS = 20
PACKETS_PER_PAGE = 4  # 80 ms: one Mimi frame, one model step
GRANULE_RATE = 48000  # Ogg Opus granule positions always count 48 kHz samples


class OpusUplinkWriter:
    """Float32 mono PCM in, complete Ogg-Opus pages out; one writer per session (one BOS page).

    ``append_pcm`` takes frames of any length, encodes every whole 20 ms and returns the pages completed
    (the two header pages come with the first call), ``b""`` when none is complete yet.
    """

    def __init__(
        self,
        sample_rate: int = 24000,
        *,
        complexity: int = 5,
        application: Application = "lowdelay",
        bitrate: int = 48000,
        serial: int | None = None,
    ) -> None:
        # Checked here for a clear message (FFmpeg would fail at open() on a bad value, without the name).
        if not 0 <= complexity <= 10:
            raise ValueError(f"Opus complexity must be 0-10, got {complexity}")
        if application not in APPLICATIONS:
            raise ValueError(f"Opus application must be one of {APPLICATIONS}, got {application!r}")
        if sample_rate not in (8000, 12000, 16000, 24000, 48000):
            raise ValueError(f"Opus cannot encode at {sample_rate} Hz")
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = sample_rate
        codec.layout = "mono"
        codec.format = "flt"
        codec.time_base = Fraction(1, sample_rate)
        codec.bit_rate = bitrate
        codec.options = {
            "compression_level": str(complexity),  # libopus OPUS_SET_COMPLEXITY
            "application": application,
            "frame_duration": str(FRAME_MS),
            "vbr": "on",
            "dtx": "0",
        }
        codec.open()
        head = bytes(codec.extradata or b"")
        if not head.startswith(OPUS_HEAD_MAGIC) or len(head) < 12:
            raise RuntimeError(f"libopus gave no OpusHead extradata: {head!r}")
        self.pre_skip = struct.unpack_from("<H", head, 10)[0]  # 48 kHz samples, the encoder's lookahead
        self.complexity, self.application, self.bitrate = complexity, application, bitrate
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        self.serial = random.getrandbits(32) if serial is None else serial
        self._codec = codec
        # One frame, refilled each time: libopus consumes it within encode(), and a new AudioFrame
        # per 20 ms costs ~10 % of the encoding itself.
        self._frame = av.AudioFrame(format="flt", layout="mono", samples=self.frame_samples)
        self._frame.sample_rate = sample_rate
        self._pending = np.zeros(0, dtype=np.float32)
        self._packets: list[bytes] = []
        self._encoded = 0  # samples handed to the encoder
        self._granule = 0
        self._sequence = 0
        self.pages = 0  # audio pages written

    def header_pages(self) -> bytes:
        """OpusHead (BOS) and OpusTags pages; ``append_pcm`` sends them first by itself."""
        head = opus_head(channels=1, pre_skip=self.pre_skip, input_rate=self.sample_rate)
        tags = opus_tags(f"libopus via PyAV {av.__version__}")
        self._sequence = 2
        return (write_packets([head], serial=self.serial, sequence=0, granule=0, bos=True)
                + write_packets([tags], serial=self.serial, sequence=1, granule=0))

    def append_pcm(self, pcm: np.ndarray) -> bytes:
        """Buffer `pcm` (float32 in [-1, 1], mono); return the Ogg pages that are now complete."""
        out = self.header_pages() if self._sequence == 0 else b""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        pending = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = self.frame_samples
        whole = len(pending) - len(pending) % n
        frame, plane = self._frame, self._frame.planes[0]
        for start in range(0, whole, n):
            plane.update(pending[start : start + n])
            frame.pts = self._encoded
            self._encoded += n
            for packet in self._codec.encode(frame):
                self._granule += (packet.duration or n) * GRANULE_RATE // self.sample_rate
                self._packets.append(bytes(packet))
                if len(self._packets) == PACKETS_PER_PAGE:
                    out += self._page()
        self._pending = pending[whole:].copy()
        return out

    def _page(self) -> bytes:
        page = write_packets(self._packets, serial=self.serial, sequence=self._sequence, granule=self._granule)
        self._packets = []
        self._sequence += 1
        self.pages += 1
        return page
