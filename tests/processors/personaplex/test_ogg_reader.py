"""Ogg/Opus helpers of the reference engine, checked against sphn 0.2's real codec and speech."""

import random
import struct

import numpy as np
import pytest
import sphn

from processors.personaplex.ogg_reader import (
    DOWNLINK_SERIAL,
    FRAME_SAMPLES,
    MAX_HUNT_BYTES,
    DownlinkWriter,
    OggCrcError,
    OggStreamError,
    OggStreamParser,
    OpusPacketError,
    UplinkDecoder,
    build_code3_packet,
    frame_duration_us,
    ogg_crc,
    opus_head,
    parse_page,
    split_opus_packet,
    split_pages,
    write_page,
)
from tests.speech import speech_float


def speech_24k() -> np.ndarray:
    return speech_float(24000)


def padded_speech(lead_s: float = 0.2, tail_s: float = 0.3) -> np.ndarray:
    """Speech between silences, cut to whole 80 ms frames."""
    x = np.concatenate(
        [np.zeros(int(lead_s * 24000), np.float32), speech_24k(), np.zeros(int(tail_s * 24000), np.float32)]
    )
    return x[: len(x) // FRAME_SAMPLES * FRAME_SAMPLES]


def sphn_stream(pcm: np.ndarray) -> bytes:
    """What a correct client sends: sphn 0.2's Ogg-Opus output, header pages first."""
    writer = sphn.OpusStreamWriter(24000)
    return b"".join(writer.append_pcm(pcm[i : i + FRAME_SAMPLES]) for i in range(0, len(pcm), FRAME_SAMPLES))


def normalised_xcorr(ref: np.ndarray, out: np.ndarray) -> tuple[int, float]:
    """Lag (samples, out behind ref) and height of the normalised cross-correlation peak."""
    n = len(ref) + len(out)
    c = np.fft.irfft(np.fft.rfft(out, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(out)]
    lag = int(np.argmax(c))
    return lag, float(c[lag] / np.sqrt(np.dot(ref, ref) * np.dot(out, out)))


# --- CRC and pages ---------------------------------------------------------------------------


def test_crc_is_ogg_crc32_not_zlib():
    # CRC-32 with poly 0x04C11DB7, init 0, no reflection, no xorout: check value of "123456789".
    assert ogg_crc(b"123456789") == 0x89A1897F


def test_crc_matches_pages_written_by_sphn():
    for page in split_pages(sphn_stream(speech_24k()[:FRAME_SAMPLES * 3])):
        raw = bytearray(page.to_bytes())
        stored = struct.unpack_from("<I", raw, 22)[0]
        raw[22:26] = bytes(4)
        assert ogg_crc(raw) == stored


def test_write_and_parse_page_round_trip():
    packet = bytes(range(256)) * 3  # 768 bytes: needs lacing 255, 255, 255, 3
    raw = write_page(packet, serial=7, sequence=5, granule=1234, bos=True)
    page, end = parse_page(raw)
    assert end == len(raw)
    assert (page.serial, page.sequence, page.granule, page.bos, page.eos) == (7, 5, 1234, True, False)
    assert page.lacing == bytes([255, 255, 255, 3])
    assert page.segments() == [(packet, True)]
    assert parse_page(raw[:-1]) is None
    assert parse_page(raw[:20]) is None


def test_parse_page_rejects_bad_crc_and_version():
    raw = bytearray(write_page(b"hello", serial=1, sequence=0, granule=0, bos=True))
    raw[-1] ^= 0x01
    with pytest.raises(OggCrcError):
        parse_page(raw)
    raw = bytearray(write_page(b"hello", serial=1, sequence=0, granule=0, bos=True))
    raw[4] = 1
    with pytest.raises(OggStreamError, match="version"):
        parse_page(raw)


# --- strict stream parser --------------------------------------------------------------------


def test_parser_yields_same_packets_for_any_message_boundaries():
    stream = sphn_stream(padded_speech())
    whole = OggStreamParser().feed(stream)
    assert whole[0].startswith(b"OpusHead") and whole[1].startswith(b"OpusTags")
    assert len(whole) == 2 + len(padded_speech()) // 960  # one packet per 40 ms
    rng = random.Random(1)
    for _ in range(5):
        parser, got, pos = OggStreamParser(), [], 0
        while pos < len(stream):
            n = rng.randint(1, 300)
            got += parser.feed(stream[pos : pos + n])
            pos += n
        assert got == whole


def test_parser_rejects_crc_mismatch_and_stays_dead():
    stream = bytearray(sphn_stream(speech_24k()[:FRAME_SAMPLES * 2]))
    pages = split_pages(bytes(stream))
    offset = len(pages[0].to_bytes()) + len(pages[1].to_bytes()) + 40  # inside the first audio page
    stream[offset] ^= 0xFF
    parser = OggStreamParser()
    with pytest.raises(OggCrcError, match="CRC"):
        parser.feed(bytes(stream))
    with pytest.raises(OggStreamError, match="already failed"):
        parser.feed(write_page(opus_head(), serial=9, sequence=0, granule=0, bos=True))


def test_parser_rejects_non_bos_first_page():
    pages = split_pages(sphn_stream(speech_24k()[:FRAME_SAMPLES * 2]))
    without_headers = b"".join(p.to_bytes() for p in pages[2:])
    with pytest.raises(OggStreamError, match="not a BOS page"):
        OggStreamParser().feed(without_headers)


def test_parser_rejects_second_bos_for_same_serial():
    # Recreating the writer mid-session restarts the stream with the same serial: the real reader dies.
    parser = OggStreamParser()
    parser.feed(sphn_stream(speech_24k()[:FRAME_SAMPLES]))
    with pytest.raises(OggStreamError, match="second BOS"):
        parser.feed(sphn_stream(speech_24k()[:FRAME_SAMPLES]))


def test_parser_accepts_new_logical_stream_like_the_ogg_crate():
    parser = OggStreamParser()
    parser.feed(write_page(b"a", serial=1, sequence=0, granule=0, bos=True))
    assert parser.feed(write_page(b"b", serial=2, sequence=0, granule=0, bos=True)) == [b"b"]
    assert parser.serials == [1, 2]


def test_parser_reassembles_packets_spanning_pages():
    packet = bytes(random.Random(2).randbytes(700))
    first = write_page(b"head", serial=3, sequence=0, granule=0, bos=True)
    # 510 bytes with lacing 255,255 => the packet continues on the next page.
    part1 = _page(packet[:510], [255, 255], serial=3, sequence=1, continued=False)
    part2 = _page(packet[510:], [190], serial=3, sequence=2, continued=True)
    parser = OggStreamParser()
    assert parser.feed(first + part1) == [b"head"]
    assert parser.feed(part2) == [packet]


def test_parser_rejects_continued_flag_mismatch():
    parser = OggStreamParser()
    parser.feed(write_page(b"head", serial=3, sequence=0, granule=0, bos=True))
    with pytest.raises(OggStreamError, match="continued flag"):
        parser.feed(_page(b"x", [1], serial=3, sequence=1, continued=True))


def test_parser_hunts_past_junk_and_gives_up_like_the_ogg_crate():
    parser = OggStreamParser()
    assert parser.feed(b"\x01\x02no capture pattern here" * 10) == []
    assert parser.feed(write_page(b"ok", serial=1, sequence=0, granule=0, bos=True)) == [b"ok"]
    # Raw (non-Ogg) Opus never produces a packet; past 150 KiB the crate reports no capture pattern.
    raw_opus = OggStreamParser()
    chunk = bytes([0x6B]) + bytes(1000)
    for _ in range(MAX_HUNT_BYTES // len(chunk)):
        assert raw_opus.feed(chunk) == []
    with pytest.raises(OggStreamError, match="capture pattern"):
        raw_opus.feed(chunk * 2)


def test_parser_keeps_a_capture_pattern_split_across_messages():
    raw = write_page(b"ok", serial=1, sequence=0, granule=0, bos=True)
    parser = OggStreamParser()
    assert parser.feed(b"junk" + raw[:2]) == []
    assert parser.feed(raw[2:]) == [b"ok"]


def _page(body: bytes, lacing: list[int], *, serial: int, sequence: int, continued: bool) -> bytes:
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, 1 if continued else 0, -1, serial, sequence, 0, len(lacing))
    raw = bytearray(header + bytes(lacing) + body)
    struct.pack_into("<I", raw, 22, ogg_crc(raw))
    return bytes(raw)


# --- Opus packet framing (RFC 6716 section 3.2) ----------------------------------------------


def test_split_all_four_packet_codes():
    toc = 13 << 3  # hybrid SWB 20 ms
    assert split_opus_packet(bytes([toc | 0]) + b"abc") == (toc, [b"abc"])
    assert split_opus_packet(bytes([toc | 1]) + b"abcd") == (toc, [b"ab", b"cd"])
    long_frame = bytes(300)  # needs the two-byte length: 252 + (300 & 3) = 252, (300 - 252) >> 2 = 12
    code2 = bytes([toc | 2, 252, 12]) + long_frame + b"tail"
    assert split_opus_packet(code2) == (toc, [long_frame, b"tail"])
    cbr = bytes([toc | 3, 3]) + b"aabbcc"
    assert split_opus_packet(cbr) == (toc, [b"aa", b"bb", b"cc"])
    vbr_padded = bytes([toc | 3, 0x80 | 0x40 | 3, 2, 1, 2]) + b"a" + b"bb" + b"ccc" + b"\x00\x00"
    assert split_opus_packet(vbr_padded) == (toc, [b"a", b"bb", b"ccc"])


def test_split_rejects_malformed_packets():
    toc = 13 << 3
    for bad in [b"", bytes([toc | 1]) + b"abc", bytes([toc | 2, 200]) + b"x", bytes([toc | 3, 7]) + b"abc"]:
        with pytest.raises(OpusPacketError):
            split_opus_packet(bad)
    with pytest.raises(OpusPacketError):  # 7 x 20 ms exceeds the 120 ms a packet may carry
        split_opus_packet(bytes([toc | 3, 7]) + bytes(7))


def test_code3_build_round_trips_with_long_and_empty_frames():
    toc = 13 << 3
    frames = [bytes(300), b"", bytes([5]) * 10, bytes(251)]
    packet = build_code3_packet(toc, frames)
    assert packet[0] & 3 == 3 and packet[1] == 0x80 | 4
    assert split_opus_packet(packet) == (toc, frames)
    assert build_code3_packet(toc, [b"ab", b"cd"])[1] == 2  # CBR when sizes are equal


def test_frame_durations_follow_the_toc_table():
    assert frame_duration_us(10 << 3) == 40_000  # SILK WB 40 ms
    assert frame_duration_us(13 << 3) == 20_000  # hybrid SWB 20 ms
    assert frame_duration_us(16 << 3) == 2_500  # CELT NB 2.5 ms
    assert frame_duration_us(31 << 3) == 20_000  # CELT FB 20 ms


# --- downlink writer (sphn 0.1 StreamWriter look-alike) --------------------------------------


def test_downlink_header_pages_match_sphn_0_1():
    head, tags = DownlinkWriter().header_pages()
    assert len(head) == 47 and len(tags) == 53
    head_page, _ = parse_page(head)
    assert head_page.bos and head_page.serial == DOWNLINK_SERIAL == 42
    assert (head_page.sequence, head_page.granule) == (0, 0)
    assert head_page.body == b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", 3840, 24000, 0, 0)
    tags_page, _ = parse_page(tags)
    assert not tags_page.bos and (tags_page.serial, tags_page.sequence) == (42, 1)
    assert tags_page.body == b"OpusTags" + struct.pack("<I", 9) + b"sphn-pyo3" + struct.pack("<I", 0)


def test_downlink_pages_hold_one_80ms_code3_packet_and_decode_to_the_input():
    speech = padded_speech(0.2, 0.5)
    writer = DownlinkWriter()
    pages = writer.header_pages()
    for i in range(0, len(speech), FRAME_SAMPLES):
        pages.append(writer.encode(speech[i : i + FRAME_SAMPLES]))
    for k, raw in enumerate(pages[2:], start=1):
        page, end = parse_page(raw)
        assert end == len(raw) and page.serial == 42 and page.sequence == k + 1
        assert page.granule == k * FRAME_SAMPLES  # 24 kHz granules, as sphn 0.1 writes them
        (packet, complete), = page.segments()
        assert complete and packet[0] & 0x03 == 3
        toc, frames = split_opus_packet(packet)
        assert len(frames) * frame_duration_us(toc) == 80_000
    reader = sphn.OpusStreamReader(24000)
    decoded = [reader.append_bytes(p) for p in pages]
    assert [len(d) for d in decoded[:2]] == [0, 0]
    assert all(len(d) == FRAME_SAMPLES for d in decoded[2:])
    lag, peak = normalised_xcorr(speech, np.concatenate(decoded[2:]))
    assert lag < 480 and peak > 0.8


def test_downlink_conceals_the_half_page_where_the_encoder_switches_mode():
    # A tone ending in silence makes sphn's encoder switch from hybrid to SILK 40 ms mid-page.
    t = np.arange(24000) / 24000
    signal = np.concatenate([0.3 * np.sin(2 * np.pi * 440 * t), np.zeros(10560)]).astype(np.float32)
    writer = DownlinkWriter()
    pages = writer.header_pages()
    for i in range(0, len(signal), FRAME_SAMPLES):
        pages.append(writer.encode(signal[i : i + FRAME_SAMPLES]))
    assert writer.concealed_frames > 0
    empty = 0
    for raw in pages[2:]:
        toc, frames = split_opus_packet(parse_page(raw)[0].body)
        assert len(frames) * frame_duration_us(toc) == 80_000
        empty += sum(1 for f in frames if not f)
    assert empty == writer.concealed_frames
    reader = sphn.OpusStreamReader(24000)
    decoded = [reader.append_bytes(p) for p in pages][2:]
    assert all(len(d) == FRAME_SAMPLES for d in decoded)
    lag, peak = normalised_xcorr(signal, np.concatenate(decoded))
    assert peak > 0.8


def test_downlink_rejects_wrong_frame_size_and_missing_headers():
    writer = DownlinkWriter()
    with pytest.raises(RuntimeError):
        writer.encode(np.zeros(FRAME_SAMPLES, np.float32))
    writer.header_pages()
    with pytest.raises(ValueError):
        writer.encode(np.zeros(960, np.float32))


# --- uplink decoder -----------------------------------------------------------------------------


def test_uplink_decoder_decodes_a_chunked_sphn_stream_completely():
    speech = padded_speech()
    stream = sphn_stream(speech)
    decoder = UplinkDecoder()
    pcm = np.concatenate([decoder.decode(stream[i : i + 97]) for i in range(0, len(stream), 97)])
    assert len(pcm) == len(speech)
    lag, peak = normalised_xcorr(speech, pcm)
    assert lag < 480 and peak > 0.8


def test_uplink_decoder_raises_on_stream_without_bos():
    pages = split_pages(sphn_stream(speech_24k()[:FRAME_SAMPLES * 2]))
    with pytest.raises(OggStreamError):
        UplinkDecoder().decode(b"".join(p.to_bytes() for p in pages[2:]))
