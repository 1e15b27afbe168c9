"""Ogg pages and Ogg Opus header packets, written (pure code, no I/O).

Shared by the uplink encoder (processors/personaplex/uplink.py) and the reference engine's Ogg code
(processors/personaplex/ogg_reader.py, which adds the strict reader). RFC 3533 (Ogg), RFC 7845 (Ogg Opus).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

CAPTURE = b"OggS"
FLAG_CONTINUED = 0x01
FLAG_BOS = 0x02
FLAG_EOS = 0x04
HEADER_SIZE = 27
PAGE_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, crc, segments
MAX_SEGMENTS = 255

OPUS_HEAD_MAGIC = b"OpusHead"
OPUS_TAGS_MAGIC = b"OpusTags"
# The header sphn 0.1's StreamWriter writes (the PersonaPlex server's downlink): the defaults below.
PRE_SKIP = 3840
INPUT_RATE = 24000
VENDOR = "sphn-pyo3"

# Ogg's CRC-32 is zlib's polynomial without the bit reflection, initial value and final xor. zlib
# computes it on bit-reversed bytes; its init/xor cancel out as below (the result is bit-reversed back).
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _reverse32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "big").translate(_REVERSED), "little")


def ogg_crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, init 0, not reflected, no final xor (not zlib's CRC)."""
    reflected = zlib.crc32(bytes(data).translate(_REVERSED), _reverse32(crc) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return _reverse32(reflected)


def page_bytes(header_type: int, granule: int, serial: int, sequence: int, lacing: bytes, body: bytes) -> bytes:
    """A page from its fields, with its CRC filled in."""
    header = PAGE_HEADER.pack(CAPTURE, 0, header_type, granule, serial, sequence, 0, len(lacing))
    raw = bytearray(header + lacing + body)
    struct.pack_into("<I", raw, 22, ogg_crc(raw))
    return bytes(raw)


def lacing_values(size: int) -> list[int]:
    """Segment table entries of one complete packet of `size` bytes (ends with a value < 255)."""
    return [255] * (size // 255) + [size % 255]


def write_packets(
    packets: Sequence[bytes],
    *,
    serial: int,
    sequence: int,
    granule: int,
    bos: bool = False,
    eos: bool = False,
) -> bytes:
    """Complete packets in one page; `granule` is the position at the end of the last one."""
    lacing: list[int] = []
    for packet in packets:
        lacing += lacing_values(len(packet))
    if len(lacing) > MAX_SEGMENTS:
        raise ValueError(f"{len(packets)} packets of {sum(map(len, packets))} bytes do not fit in one Ogg page")
    header_type = (FLAG_BOS if bos else 0) | (FLAG_EOS if eos else 0)
    return page_bytes(header_type, granule, serial, sequence, bytes(lacing), b"".join(packets))


def write_page(
    packet: bytes,
    *,
    serial: int,
    sequence: int,
    granule: int,
    bos: bool = False,
    eos: bool = False,
) -> bytes:
    """One complete packet in one page, the layout sphn's writers use for every page."""
    return write_packets([packet], serial=serial, sequence=sequence, granule=granule, bos=bos, eos=eos)


def opus_head(*, channels: int = 1, pre_skip: int = PRE_SKIP, input_rate: int = INPUT_RATE) -> bytes:
    """The identification header (RFC 7845 section 5.1), mapping family 0; pre-skip in 48 kHz samples."""
    return OPUS_HEAD_MAGIC + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str = VENDOR) -> bytes:
    """The comment header (RFC 7845 section 5.2) with no user comments."""
    raw = vendor.encode()
    return OPUS_TAGS_MAGIC + struct.pack("<I", len(raw)) + raw + struct.pack("<I", 0)
