"""OpusUplinkWriter: pages the server's strict reader accepts, holding audio that is the caller's speech."""

import io

import av
import numpy as np
import pytest

from pipelines.sim.speech import FIXTURES
from processors.audio import read_wav
from processors.personaplex.ogg_pages import OPUS_HEAD_MAGIC, OPUS_TAGS_MAGIC
from processors.personaplex.ogg_reader import (
    FRAME_SAMPLES,
    OggStreamParser,
    UplinkDecoder,
    is_header_packet,
    packet_duration_us,
    split_opus_packet,
    split_pages,
)
from processors.personaplex.uplink import APPLICATIONS, OpusUplinkWriter

RATE = 24000
PACKET = RATE // 50  # 20 ms


def caller_speech(name: str) -> np.ndarray:
    """A fixture recording (8 or 16 kHz) upsampled to the model's 24 kHz, as float32."""
    return read_wav(FIXTURES / f"{name}.wav", RATE).astype(np.float32) / 32768.0


def encode(pcm: np.ndarray, chunks, **kwargs) -> tuple[OpusUplinkWriter, bytes]:
    """Feed `pcm` in pieces of the given lengths (cycled); the writer and everything it returned."""
    writer = OpusUplinkWriter(RATE, serial=0x5EED, **kwargs)
    out, i, sizes = [], 0, list(chunks)
    while i < len(pcm):
        n = sizes[len(out) % len(sizes)]
        out.append(writer.append_pcm(pcm[i : i + n]))
        i += n
    return writer, b"".join(out)


def snr_at(ref: np.ndarray, out: np.ndarray, lag: int) -> float:
    """SNR (dB) of `out` against `ref` with `out` delayed by `lag` samples, over their overlap."""
    out = out[lag:]
    n = min(len(ref), len(out))
    ref, out = ref[:n].astype(np.float64), out[:n].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def best_lag(ref: np.ndarray, out: np.ndarray, max_lag: int = RATE // 10) -> int:
    scores = [np.dot(ref[: len(out) - lag], out[lag : lag + len(ref)]) for lag in range(max_lag)]
    return int(np.argmax(scores))


@pytest.mark.parametrize("application", APPLICATIONS)
@pytest.mark.parametrize("source", ["question_8k", "question_16k"])
def test_strict_reader_decodes_the_callers_speech(source, application):
    said = caller_speech(source)
    pcm = np.concatenate([said, np.zeros(RATE // 4, np.float32)])
    writer, stream = encode(pcm, [2400], application=application)  # 100 ms frames, as the resampler gives
    heard = UplinkDecoder().decode(stream)  # the ogg crate's rules; raises on any violation
    assert len(heard) == len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES
    # the decoder's output lags the input by exactly the encoder's lookahead, which OpusHead declares
    # (SILK's resampler makes it 155 samples, not 156, in voip mode)
    lag = best_lag(said, heard)
    assert abs(lag - writer.pre_skip * RATE // 48000) <= 2
    # Waveform match at that delay: ~12 dB SNR with SILK (voip), ~20 dB with CELT. The same decoded
    # audio one 20 ms packet out of place, or only 2 ms off, scores about -3 dB.
    threshold = 8.0
    assert snr_at(said, heard, lag) > threshold
    assert snr_at(said, heard, lag + PACKET) < threshold
    assert snr_at(said, heard, lag + 48) < threshold


def test_pages_are_headers_then_one_page_per_80_ms():
    pcm = caller_speech("interrupt_8k")
    writer, stream = encode(pcm, [1920])
    pages = split_pages(stream)  # checks every CRC
    head, tags, audio = pages[0], pages[1], pages[2:]
    assert head.bos and not head.continued and head.granule == 0
    (head_packet, complete), = head.segments()
    assert complete and head_packet.startswith(OPUS_HEAD_MAGIC)
    assert head_packet[8] == 1 and head_packet[9] == 1  # version 1, mono
    assert int.from_bytes(head_packet[10:12], "little") == writer.pre_skip > 0
    assert int.from_bytes(head_packet[12:16], "little") == RATE
    assert not tags.bos and tags.granule == 0 and tags.segments()[0][0].startswith(OPUS_TAGS_MAGIC)
    assert [p.sequence for p in pages] == list(range(len(pages)))
    assert {p.serial for p in pages} == {0x5EED}
    assert len(audio) == len(pcm) // FRAME_SAMPLES == writer.pages
    for k, page in enumerate(audio):
        assert not (page.bos or page.eos or page.continued or page.ends_with_continued)
        packets = [p for p, complete in page.segments() if complete]
        assert len(packets) == 4 and all(packet_duration_us(p) == 20_000 for p in packets)
        assert page.granule == (k + 1) * 3840  # 48 kHz samples, 80 ms per page, pre-skip included
    # the strict incremental parser, fed byte by byte in odd pieces, sees the same packets
    parser = OggStreamParser()
    packets = [p for i in range(0, len(stream), 37) for p in parser.feed(stream[i : i + 37])]
    assert [is_header_packet(p) for p in packets[:2]] == [True, True]
    assert len(packets) == 2 + 4 * len(audio) and not any(is_header_packet(p) for p in packets[2:])


def test_a_spec_reader_trims_pre_skip_and_finds_the_granule_positions():
    """FFmpeg's Ogg demuxer and Opus decoder (RFC 7845 semantics) agree with the header and the granules."""
    pcm = caller_speech("question_16k")
    writer, stream = encode(pcm, [480])
    with av.open(io.BytesIO(stream), format="ogg") as container:
        track = container.streams.audio[0]
        assert track.codec_context.name == "opus" and track.codec_context.channels == 1
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(track)])
    granule = writer.pages * 3840
    assert track.duration == granule
    assert len(decoded) == granule - writer.pre_skip  # 48 kHz output, the encoder's lookahead skipped
    assert len(decoded) + writer.pre_skip == len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES * 2


def test_frames_of_any_length_are_buffered_to_whole_20_ms():
    pcm = caller_speech("interrupt_16k")
    _, reference = encode(pcm, [PACKET])
    for chunks in ([1, 7, 479, 481, 2400, 1919, 960, 3], [2400], [441], [5000, 13]):
        writer, stream = encode(pcm, chunks)
        assert stream == reference, chunks  # same 20 ms frames reach libopus, whatever the chunking
    assert writer.pages == len(pcm) // FRAME_SAMPLES
    heard = UplinkDecoder().decode(reference)
    assert 0 <= len(pcm) - len(heard) < FRAME_SAMPLES  # only the last partial 80 ms is held back


def test_first_call_sends_the_headers_then_nothing_until_80_ms_are_in():
    writer = OpusUplinkWriter(RATE)
    first = writer.append_pcm(np.zeros(100, np.float32))
    assert [p.sequence for p in split_pages(first)] == [0, 1]
    assert writer.append_pcm(np.zeros(FRAME_SAMPLES - 101, np.float32)) == b""
    page = split_pages(writer.append_pcm(np.zeros(1, np.float32)))
    assert [p.sequence for p in page] == [2]
    assert writer.append_pcm(np.zeros(0, np.float32)) == b""


def test_settings_reach_libopus():
    pcm = caller_speech("question_8k")

    def configs(**kwargs):
        _, stream = encode(pcm, [2400], **kwargs)
        return {split_opus_packet(p)[0] >> 3 for page in split_pages(stream)[2:] for p, _ in page.segments()}

    assert all(c >= 16 for c in configs(application="lowdelay"))  # CELT only
    assert any(c < 16 for c in configs(application="voip"))  # SILK or hybrid for speech
    _, low = encode(pcm, [2400], application="voip", complexity=0)
    _, high = encode(pcm, [2400], application="voip", complexity=10)
    assert low != high
    _, small = encode(pcm, [2400], bitrate=16000)
    _, large = encode(pcm, [2400], bitrate=64000)
    assert len(large) > 2 * len(small)
    for bad in ({"complexity": 11}, {"application": "music"}, {"complexity": -1}):
        with pytest.raises(ValueError):
            OpusUplinkWriter(RATE, **bad)


def test_processor_params_bound_the_encoder_settings():
    from pydantic import ValidationError

    from processors.personaplex.processor import PersonaPlexParams

    params = PersonaPlexParams()
    assert (params.uplink_complexity, params.uplink_application, params.uplink_bitrate) == (5, "lowdelay", 48000)
    for bad in ({"uplink_complexity": 11}, {"uplink_application": "music"}, {"uplink_bitrate": 1000}):
        with pytest.raises(ValidationError):
            PersonaPlexParams(**bad)
