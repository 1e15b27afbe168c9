"""Ogg page writing: the zlib-based CRC against the bitwise definition, and multi-packet pages."""

import os

import pytest

from processors.personaplex.ogg_pages import ogg_crc, write_packets
from processors.personaplex.ogg_reader import parse_page


def bitwise_ogg_crc(data: bytes, crc: int = 0) -> int:
    """The definition, one bit at a time: poly 0x04C11DB7, MSB first, init `crc`, no final xor."""
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def test_crc_matches_the_bitwise_definition():
    assert ogg_crc(b"123456789") == bitwise_ogg_crc(b"123456789") == 0x89A1897F
    assert ogg_crc(b"") == 0
    for size in (1, 2, 3, 27, 255, 1000, 4097):
        data = os.urandom(size)
        assert ogg_crc(data) == bitwise_ogg_crc(data)
        for initial in (1, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF):
            assert ogg_crc(data, initial) == bitwise_ogg_crc(data, initial)
    data = os.urandom(300)
    assert ogg_crc(data[100:], ogg_crc(data[:100])) == ogg_crc(data)  # chains like the table version did
    assert ogg_crc(bytearray(data)) == ogg_crc(memoryview(data)) == ogg_crc(data)


def test_several_packets_in_one_page():
    packets = [b"a" * 10, b"b" * 255, b"", b"c" * 600]
    raw = write_packets(packets, serial=3, sequence=9, granule=3840)
    page, end = parse_page(raw)
    assert end == len(raw)
    assert page.lacing == bytes([10, 255, 0, 0, 255, 255, 90])
    assert page.segments() == [(p, True) for p in packets]
    assert (page.serial, page.sequence, page.granule, page.bos, page.eos) == (3, 9, 3840, False, False)
    with pytest.raises(ValueError):
        write_packets([b"x" * 255 * 200, b"y" * 255 * 60], serial=1, sequence=0, granule=0)
