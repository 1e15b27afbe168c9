"""Ogg and Opus bit-level code for the reference engine (pure code, no I/O).

The PersonaPlex server reads the uplink with sphn 0.1 (the Rust ``ogg`` crate, strict) and writes the
downlink with sphn 0.1's ``StreamWriter`` (one 80 ms Opus packet per page). sphn 0.2, which is what we
have, is lenient on input and writes 40 ms pages, so both behaviours are rebuilt here on top of its codec:
``OggStreamParser`` enforces the ``ogg`` crate's rules, ``DownlinkWriter`` repacketises sphn 0.2's frames
into sphn-0.1-shaped pages, and ``UplinkDecoder`` glues the strict parser to sphn 0.2's decoder.
Writing pages and Opus headers is processors/personaplex/ogg_pages.py's (the bridge's uplink writes with it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sphn

from processors.personaplex.ogg_pages import (
    CAPTURE,
    FLAG_BOS,
    FLAG_CONTINUED,
    FLAG_EOS,
    HEADER_SIZE,
    OPUS_HEAD_MAGIC,
    OPUS_TAGS_MAGIC,
    PAGE_HEADER,
    ogg_crc,
    opus_head,
    opus_tags,
    page_bytes,
    write_page,
)

SAMPLE_RATE = 24000
FRAME_SAMPLES = 1920  # one Mimi frame = one model step = 80 ms at 24 kHz
DOWNLINK_SERIAL = 42  # sphn 0.1 StreamWriter hard-codes it

# The ogg crate gives up hunting for a capture pattern after this many bytes (NoCapturePatternFound).
MAX_HUNT_BYTES = 150 * 1024


class OggStreamError(ValueError):
    """The uplink broke a rule the server's Ogg reader enforces; the real reader dies on it."""


class OggCrcError(OggStreamError):
    """Page checksum mismatch (the ogg crate's HashMismatch)."""


class OpusPacketError(ValueError):
    """An Opus packet that RFC 6716 section 3.2 does not allow."""


@dataclass(frozen=True)
class OggPage:
    header_type: int
    granule: int
    serial: int
    sequence: int
    lacing: bytes
    body: bytes

    @property
    def bos(self) -> bool:
        return bool(self.header_type & FLAG_BOS)

    @property
    def eos(self) -> bool:
        return bool(self.header_type & FLAG_EOS)

    @property
    def continued(self) -> bool:
        return bool(self.header_type & FLAG_CONTINUED)

    @property
    def ends_with_continued(self) -> bool:
        """True when the last packet spills into the next page (lacing ends with 255)."""
        return bool(self.lacing) and self.lacing[-1] == 255

    def segments(self) -> list[tuple[bytes, bool]]:
        """Packet pieces in page order, each flagged True when the packet ends in this page."""
        pieces: list[tuple[bytes, bool]] = []
        start = size = 0
        for value in self.lacing:
            size += value
            if value < 255:
                pieces.append((self.body[start : start + size], True))
                start += size
                size = 0
        if size:
            pieces.append((self.body[start : start + size], False))
        elif self.ends_with_continued:
            pieces.append((b"", False))
        return pieces

    def to_bytes(self) -> bytes:
        return page_bytes(self.header_type, self.granule, self.serial, self.sequence, self.lacing, self.body)


def parse_page(buf: bytes | bytearray, start: int = 0) -> tuple[OggPage, int] | None:
    """Parse the page whose capture pattern sits at ``start``; None while it is incomplete.

    Returns the page and the offset just past it. Raises on a non-zero version or a bad CRC,
    in the same order the ogg crate checks them.
    """
    if len(buf) - start < HEADER_SIZE:
        return None
    capture, version, header_type, granule, serial, sequence, crc, n_segs = PAGE_HEADER.unpack_from(
        buf, start
    )
    if capture != CAPTURE:
        raise OggStreamError(f"no capture pattern at offset {start}")
    if version != 0:
        raise OggStreamError(f"unsupported Ogg stream structure version {version}")
    lacing_end = start + HEADER_SIZE + n_segs
    if len(buf) < lacing_end:
        return None
    lacing = bytes(buf[start + HEADER_SIZE : lacing_end])
    end = lacing_end + sum(lacing)
    if len(buf) < end:
        return None
    raw = bytearray(buf[start:end])
    raw[22:26] = b"\x00\x00\x00\x00"
    computed = ogg_crc(raw)
    if computed != crc:
        raise OggCrcError(
            f"Ogg page CRC mismatch (serial {serial}, seq {sequence}): "
            f"header says {crc:#010x}, computed {computed:#010x}"
        )
    page = OggPage(header_type, granule, serial, sequence, lacing, bytes(buf[lacing_end:end]))
    return page, end


def split_pages(data: bytes) -> list[OggPage]:
    """Pages of a buffer known to hold whole pages back to back (e.g. one sphn writer output)."""
    pages = []
    offset = 0
    while offset < len(data):
        parsed = parse_page(data, offset)
        if parsed is None:
            raise OggStreamError(f"truncated Ogg page at offset {offset}")
        page, offset = parsed
        pages.append(page)
    return pages


class OggStreamParser:
    """Incremental uplink reader with the ogg crate's strictness (what sphn 0.1 enforces).

    A byte stream: message boundaries need not align with pages. Rules, as in the crate's
    ``push_page`` (not seeked): a page of an unknown serial must be BOS and not continued; a known
    serial must not see BOS again, and a page's continued flag must match whether the previous page
    of that serial ended mid-packet; CRC must match; version must be 0. Bytes before a capture
    pattern are skipped, up to ``MAX_HUNT_BYTES``. After the first error the parser stays dead, like
    the server's decoder thread.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._open_packets: dict[int, bytearray | None] = {}  # serial -> spilled packet or None
        self._hunted = 0
        self._error: OggStreamError | None = None

    @property
    def serials(self) -> list[int]:
        return list(self._open_packets)

    def feed(self, data: bytes) -> list[bytes]:
        """Append bytes; return the packets completed by them."""
        if self._error is not None:
            raise OggStreamError(f"stream already failed: {self._error}")
        self._buf += data
        packets: list[bytes] = []
        try:
            while self._sync():
                parsed = parse_page(self._buf)
                if parsed is None:
                    break
                page, end = parsed
                del self._buf[:end]
                self._hunted = 0
                packets.extend(self._push_page(page))
        except OggStreamError as exc:
            self._error = exc
            raise
        return packets

    def _sync(self) -> bool:
        """Drop junk before the next capture pattern; False when none is in the buffer yet."""
        idx = self._buf.find(CAPTURE)
        if idx < 0:
            keep = self._partial_capture_len()
            self._skip(len(self._buf) - keep)
            return False
        self._skip(idx)
        return True

    def _partial_capture_len(self) -> int:
        for n in (3, 2, 1):
            if self._buf.endswith(CAPTURE[:n]):
                return n
        return 0

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        del self._buf[:n]
        self._hunted += n
        if self._hunted > MAX_HUNT_BYTES:
            raise OggStreamError(f"no Ogg capture pattern in {self._hunted} bytes")

    def _push_page(self, page: OggPage) -> list[bytes]:
        if page.serial not in self._open_packets:
            if not page.bos:
                raise OggStreamError(
                    f"first page of serial {page.serial} (seq {page.sequence}) is not a BOS page"
                )
            if page.continued:
                raise OggStreamError(f"BOS page of serial {page.serial} claims a continued packet")
            spilled = None
        else:
            if page.bos:
                raise OggStreamError(f"second BOS page for serial {page.serial}")
            spilled = self._open_packets[page.serial]
            if page.continued != (spilled is not None):
                raise OggStreamError(
                    f"page seq {page.sequence} of serial {page.serial}: continued flag "
                    f"{page.continued} but previous page "
                    f"{'ended mid-packet' if spilled is not None else 'ended on a packet boundary'}"
                )
        packets: list[bytes] = []
        for index, (piece, complete) in enumerate(page.segments()):
            current = spilled if index == 0 and spilled is not None else bytearray()
            current += piece
            spilled = None
            if complete:
                packets.append(bytes(current))
            else:
                spilled = current
        self._open_packets[page.serial] = spilled
        return packets


# --- Opus (RFC 6716 section 3, RFC 7845) ---------------------------------------------------------

def is_header_packet(packet: bytes) -> bool:
    """sphn 0.1's reader skips these wherever they appear instead of decoding them."""
    return packet.startswith(OPUS_HEAD_MAGIC) or packet.startswith(OPUS_TAGS_MAGIC)


def frame_duration_us(toc: int) -> int:
    """Duration of one frame of the TOC's configuration (RFC 6716 table 2)."""
    config = toc >> 3
    if config < 12:  # SILK-only: 10, 20, 40, 60 ms
        return (10_000, 20_000, 40_000, 60_000)[config % 4]
    if config < 16:  # Hybrid: 10, 20 ms
        return (10_000, 20_000)[config % 2]
    return (2_500, 5_000, 10_000, 20_000)[config % 4]  # CELT-only


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise OpusPacketError("truncated frame length")
    first = data[pos]
    if first < 252:
        return first, pos + 1
    if pos + 1 >= len(data):
        raise OpusPacketError("truncated two-byte frame length")
    return first + 4 * data[pos + 1], pos + 2


def _encode_length(n: int) -> bytes:
    if n < 252:
        return bytes([n])
    first = 252 + (n & 3)
    return bytes([first, (n - first) >> 2])


def split_opus_packet(packet: bytes) -> tuple[int, list[bytes]]:
    """Split a packet into its frames; returns the TOC with the code bits cleared and the frames."""
    if not packet:
        raise OpusPacketError("empty packet")
    toc = packet[0]
    code = toc & 0x03
    body = packet[1:]
    if code == 0:
        frames = [body]
    elif code == 1:
        if len(body) % 2:
            raise OpusPacketError("code 1 packet with odd payload length")
        half = len(body) // 2
        frames = [body[:half], body[half:]]
    elif code == 2:
        n1, pos = _read_length(packet, 1)
        if pos + n1 > len(packet):
            raise OpusPacketError("code 2 first frame overruns the packet")
        frames = [packet[pos : pos + n1], packet[pos + n1 :]]
    else:
        frames = _split_code3(packet)
    if any(len(f) > 1275 for f in frames):
        raise OpusPacketError("frame longer than 1275 bytes")
    return toc & 0xFC, frames


def _split_code3(packet: bytes) -> list[bytes]:
    if len(packet) < 2:
        raise OpusPacketError("code 3 packet without frame count byte")
    count_byte = packet[1]
    vbr, padded, count = count_byte & 0x80, count_byte & 0x40, count_byte & 0x3F
    if count == 0 or count * frame_duration_us(packet[0]) > 120_000:
        raise OpusPacketError(f"code 3 packet with {count} frames")
    pos, padding = 2, 0
    while padded:
        if pos >= len(packet):
            raise OpusPacketError("truncated padding length")
        value = packet[pos]
        pos += 1
        padding += 254 if value == 255 else value
        padded = value == 255
    end = len(packet) - padding
    if vbr:
        lengths = []
        for _ in range(count - 1):
            n, pos = _read_length(packet, pos)
            lengths.append(n)
        lengths.append(end - pos - sum(lengths))
    else:
        total = end - pos
        if total < 0 or total % count:
            raise OpusPacketError("CBR code 3 payload not divisible by the frame count")
        lengths = [total // count] * count
    if any(n < 0 for n in lengths) or pos + sum(lengths) > end:
        raise OpusPacketError("code 3 frames overrun the packet")
    frames = []
    for n in lengths:
        frames.append(packet[pos : pos + n])
        pos += n
    return frames


def build_code3_packet(toc: int, frames: list[bytes]) -> bytes:
    """Pack frames of one configuration into a code 3 packet (VBR when their sizes differ)."""
    if not 1 <= len(frames) <= 48:
        raise OpusPacketError(f"code 3 packet cannot hold {len(frames)} frames")
    vbr = len({len(f) for f in frames}) > 1
    out = bytearray([(toc & 0xFC) | 0x03, (0x80 if vbr else 0) | len(frames)])
    if vbr:
        for frame in frames[:-1]:
            out += _encode_length(len(frame))
    for frame in frames:
        out += frame
    return bytes(out)


def packet_duration_us(packet: bytes) -> int:
    toc, frames = split_opus_packet(packet)
    return len(frames) * frame_duration_us(toc)


class DownlinkWriter:
    """sphn 0.1 ``StreamWriter`` look-alike: 80 ms per page, built from sphn 0.2's 40 ms packets.

    sphn 0.1 hands libopus 1920 samples at once and gets one code 3 packet (4x20 ms, or 2x40 ms in
    SILK-only mode). sphn 0.2 encodes 40 ms packets, so two consecutive packets are merged into one
    code 3 packet. Opus forbids mixing configurations inside a packet; when the encoder switches mode
    between the two halves, the half with the other configuration is sent as empty frames, which the
    decoder conceals (counted in ``concealed_frames``). This is rare (mode switches) and costs <= 40 ms.
    """

    def __init__(self) -> None:
        self._encoder: sphn.OpusStreamWriter | None = None  # made on first encode: page() alone needs none
        self._parser = OggStreamParser()
        self._sequence = 0
        self._granule = 0
        self.concealed_frames = 0

    def header_pages(self) -> list[bytes]:
        """OpusHead (BOS) and OpusTags pages, each meant for its own 0x01 message."""
        head = write_page(opus_head(), serial=DOWNLINK_SERIAL, sequence=0, granule=0, bos=True)
        tags = write_page(opus_tags(), serial=DOWNLINK_SERIAL, sequence=1, granule=0)
        self._sequence = 2
        return [head, tags]

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode exactly one 1920-sample frame into one page holding one 80 ms packet."""
        if self._sequence == 0:
            raise RuntimeError("header_pages() must be sent before audio pages")
        return self.page(self.encode_packet(pcm))

    def encode_packet(self, pcm: np.ndarray) -> bytes:
        """One 1920-sample frame as one 80 ms packet, unframed: a packet encoded once can be framed by
        any number of streams (``page``)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (FRAME_SAMPLES,):
            raise ValueError(f"expected {FRAME_SAMPLES} mono samples, got shape {pcm.shape}")
        if self._encoder is None:
            self._encoder = sphn.OpusStreamWriter(SAMPLE_RATE)
        packets = [
            p for p in self._parser.feed(self._encoder.append_pcm(pcm)) if not is_header_packet(p)
        ]
        return self._merge(packets)

    def page(self, packet: bytes) -> bytes:
        """The next page of this stream holding one 80 ms packet: serial, sequence, granule and CRC."""
        if self._sequence == 0:
            raise RuntimeError("header_pages() must be sent before audio pages")
        self._granule += FRAME_SAMPLES
        page = write_page(
            packet, serial=DOWNLINK_SERIAL, sequence=self._sequence, granule=self._granule
        )
        self._sequence += 1
        return page

    def _merge(self, packets: list[bytes]) -> bytes:
        split = [split_opus_packet(p) for p in packets]
        total = sum(len(frames) * frame_duration_us(toc) for toc, frames in split)
        if total != FRAME_SAMPLES * 1_000_000 // SAMPLE_RATE:
            raise RuntimeError(f"sphn encoder returned {total} us of audio for one 80 ms frame")
        toc = split[0][0]
        duration = frame_duration_us(toc)
        frames: list[bytes] = []
        for other_toc, other_frames in split:
            if other_toc == toc:
                frames.extend(other_frames)
                continue
            span = len(other_frames) * frame_duration_us(other_toc)
            if span % duration:
                raise RuntimeError(f"cannot conceal {span} us with {duration} us frames")
            frames.extend([b""] * (span // duration))
            self.concealed_frames += span // duration
        return build_code3_packet(toc, frames)


class UplinkDecoder:
    """Strict uplink Ogg reader in front of sphn 0.2's Opus decoder.

    Validated packets are re-wrapped into one clean single-serial stream before decoding, so that
    what sphn 0.2 sees never depends on the client's page layout (continued packets, chained
    serials); OpusHead/OpusTags packets are skipped wherever they appear, as sphn 0.1 does.
    """

    def __init__(self) -> None:
        self.parser = OggStreamParser()
        self._decoder: sphn.OpusStreamReader | None = None  # made on first decode: counting needs none
        self._sequence = 0
        self._granule = 0
        self.packets = 0

    def audio_packets(self, data: bytes) -> list[tuple[bytes, int]]:
        """Feed uplink bytes; return the audio packets they completed, each with its duration in 24 kHz
        samples (from its TOC), checked as ``decode`` checks them. Raises on violations."""
        out = []
        for packet in self.parser.feed(data):
            if is_header_packet(packet):
                continue
            # splitting rejects garbage before it reaches the decoder
            out.append((packet, packet_duration_us(packet) * SAMPLE_RATE // 1_000_000))
            self.packets += 1
        return out

    def decode(self, data: bytes) -> np.ndarray:
        """Feed uplink bytes; return the PCM (24 kHz float32) they completed. Raises on violations."""
        if self._decoder is None:
            self._decoder = sphn.OpusStreamReader(SAMPLE_RATE)
        out: list[np.ndarray] = []
        for packet, samples in self.audio_packets(data):
            pcm = self._decoder.append_bytes(self._wrap(packet, samples))
            if pcm is not None and len(pcm):
                out.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _wrap(self, packet: bytes, samples: int) -> bytes:
        pages = b""
        if self._sequence == 0:
            pages += write_page(opus_head(), serial=1, sequence=0, granule=0, bos=True)
            pages += write_page(opus_tags(), serial=1, sequence=1, granule=0)
            self._sequence = 2
        self._granule += samples * 48000 // SAMPLE_RATE
        pages += write_page(packet, serial=1, sequence=self._sequence, granule=self._granule)
        self._sequence += 1
        return pages
