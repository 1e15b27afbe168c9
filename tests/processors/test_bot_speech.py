"""BotSpeechProcessor alone with run_test: TTSStarted/TTSStopped brackets on the model's continuous 24 kHz audio.

Loud parts are real speech (pipecat's recording, the espeak question fixture); quiet parts are digital
silence or -60 dBFS noise. Positions are checked in audio time (80 ms frames of 20 ms windows), never in
wall time.
"""

import numpy as np
import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    OutputAudioRawFrame,
    SpeechOutputAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from pipelines.sim.speech import FIXTURES
from processors.audio import read_wav
from processors.bot_speech import BotSpeechParams, BotSpeechProcessor
from tests.speech import speech
from transports.frames import ModelMuteFrame

RATE = 24000
FRAME = RATE * 80 // 1000  # samples in an 80 ms model frame
WINDOW = RATE * 20 // 1000  # the detector's 20 ms window
THRESHOLD_DBFS = -40.0
HANGOVER = 0.4


def silence(secs: float) -> np.ndarray:
    return np.zeros(int(secs * RATE), np.int16)


def noise(secs: float, dbfs: float = -60.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, 32768 * 10 ** (dbfs / 20), int(secs * RATE)), -32768, 32767).astype(np.int16)


def word() -> np.ndarray:
    """pipecat's spoken word, cut to its loud windows (the recording has quiet lead-in and tail)."""
    pcm = speech(RATE)
    loud = np.flatnonzero(loud_windows(pcm))
    return pcm[loud[0] * WINDOW : (loud[-1] + 1) * WINDOW]


def question() -> np.ndarray:
    """'Hello, I would like to check my order status.' (espeak, 16 kHz fixture) at 24 kHz: 3.1 s with short pauses."""
    return read_wav(FIXTURES / "question_16k.wav", RATE)


def loud_windows(pcm: np.ndarray) -> np.ndarray:
    """Per 20 ms window: RMS at or above the threshold (computed here independently of the processor)."""
    w = pcm[: len(pcm) // WINDOW * WINDOW].astype(np.float64).reshape(-1, WINDOW)
    return np.sqrt(np.mean(w * w, axis=1)) >= 32768 * 10 ** (THRESHOLD_DBFS / 20)


def frames_of(pcm: np.ndarray, cls=SpeechOutputAudioRawFrame) -> list[OutputAudioRawFrame]:
    """80 ms frames; the tail is padded with silence so every frame is whole."""
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % FRAME, np.int16)])
    return [cls(audio=pcm[i : i + FRAME].tobytes(), sample_rate=RATE, num_channels=1) for i in range(0, len(pcm), FRAME)]


def loud_frames(frames) -> list[int]:
    """Indices of the frames holding at least one loud window."""
    return [i for i, f in enumerate(frames) if loud_windows(np.frombuffer(f.audio, np.int16)).any()]


def audio_of(down) -> list[OutputAudioRawFrame]:
    return [f for f in down if isinstance(f, OutputAudioRawFrame)]


def brackets(down) -> list[tuple[str, str]]:
    return [(type(f).__name__, f.context_id) for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]


def audio_before(down, frame) -> int:
    """How many audio frames had gone through when `frame` (by identity) came out."""
    n = 0
    for f in down:
        if f is frame:
            return n
        if isinstance(f, OutputAudioRawFrame):
            n += 1
    raise AssertionError(f"{frame} not in output")


def assert_audio_kept(down, sent):
    """Nothing dropped: same number of frames, same byte lengths, same frame classes."""
    out = audio_of(down)
    assert len(out) == len(sent)
    assert [len(f.audio) for f in out] == [len(f.audio) for f in sent]
    assert [type(f) for f in out] == [type(f) for f in sent]


def processor(**kw) -> BotSpeechProcessor:
    return BotSpeechProcessor(BotSpeechParams(threshold_dbfs=THRESHOLD_DBFS, hangover_secs=HANGOVER, **kw))


@pytest.mark.parametrize("cls", [OutputAudioRawFrame, SpeechOutputAudioRawFrame])
async def test_silence_and_low_noise_never_open_an_utterance(cls):
    sent = frames_of(np.concatenate([silence(1.0), noise(2.0, -60.0), silence(0.5)]), cls)
    bot = processor()
    down, up = await run_test(bot, frames_to_send=sent)
    assert brackets(down) == [] and up == []
    assert_audio_kept(down, sent)
    assert [f.audio for f in audio_of(down)] == [f.audio for f in sent]  # untouched
    assert bot.stats["utterances"] == 0


@pytest.mark.parametrize(
    "cls, lead",  # four leads: the speech's windows fall at each position inside the 80 ms frames
    [(OutputAudioRawFrame, 0.40), (SpeechOutputAudioRawFrame, 0.42), (SpeechOutputAudioRawFrame, 0.44), (OutputAudioRawFrame, 0.46)],
)
async def test_speech_gives_one_pair_around_its_audio(cls, lead):
    sent = frames_of(np.concatenate([silence(lead), speech(RATE), silence(1.0)]), cls)
    loud = loud_frames(sent)
    down, _ = await run_test(processor(), frames_to_send=sent)
    assert brackets(down) == [("TTSStartedFrame", "bot-1"), ("TTSStoppedFrame", "bot-1")]
    started, stopped = [f for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
    assert audio_before(down, started) == loud[0]  # right before the first frame with a loud window
    # stopped right before the frame whose windows complete hangover_secs of quiet after the last loud window
    windows = loud_windows(np.frombuffer(b"".join(f.audio for f in sent), np.int16))
    last_loud = int(np.flatnonzero(windows)[-1])
    assert audio_before(down, stopped) == (last_loud + round(HANGOVER / 0.02)) // (FRAME // WINDOW)
    assert_audio_kept(down, sent)
    assert [f.audio for f in audio_of(down)] == [f.audio for f in sent]


async def test_natural_pauses_inside_a_sentence_keep_one_utterance():
    sent = frames_of(np.concatenate([silence(0.3), question(), silence(1.0)]))
    down, _ = await run_test(processor(), frames_to_send=sent)
    assert brackets(down) == [("TTSStartedFrame", "bot-1"), ("TTSStoppedFrame", "bot-1")]
    assert_audio_kept(down, sent)


@pytest.mark.parametrize("gap, pairs", [(0.2, 1), (0.8, 2)])
async def test_two_words_are_one_or_two_utterances_by_the_gap_against_hangover(gap, pairs):
    sent = frames_of(np.concatenate([silence(0.32), word(), silence(gap), word(), silence(1.0)]))
    bot = processor()
    down, _ = await run_test(bot, frames_to_send=sent)
    expected = []
    for n in range(1, pairs + 1):
        expected += [("TTSStartedFrame", f"bot-{n}"), ("TTSStoppedFrame", f"bot-{n}")]
    assert brackets(down) == expected
    assert bot.stats["utterances"] == pairs
    assert_audio_kept(down, sent)


async def test_text_piece_alone_opens_an_utterance_and_hangover_closes_it():
    before, after = frames_of(silence(0.4)), frames_of(silence(1.0))
    text = TTSTextFrame(text="Hello", text_type="word")
    down, _ = await run_test(processor(), frames_to_send=before + [text] + after)
    kinds = [type(f) for f in down if not isinstance(f, OutputAudioRawFrame)]
    assert kinds == [TTSStartedFrame, TTSTextFrame, TTSStoppedFrame]
    started = next(f for f in down if isinstance(f, TTSStartedFrame))
    stopped = next(f for f in down if isinstance(f, TTSStoppedFrame))
    assert started.context_id == stopped.context_id == "bot-1"
    assert audio_before(down, started) == len(before)  # the bracket opens at the text, in stream order
    assert down[down.index(started) + 1] is text
    assert (audio_before(down, stopped) - len(before) + 1) * 0.08 >= HANGOVER
    assert_audio_kept(down, before + after)


async def test_text_keeps_a_quiet_utterance_open_and_use_text_false_ignores_it():
    """Words arriving during quiet audio extend the utterance; with use_text off, text is just forwarded."""
    quiet = frames_of(silence(0.24))  # 3 frames, less than the hangover
    texts = [TTSTextFrame(text=t, text_type="word") for t in ("one", "two", "three")]
    sent = [f for t in texts for f in (t, *quiet)] + frames_of(silence(1.0))
    down, _ = await run_test(processor(), frames_to_send=sent)
    assert brackets(down) == [("TTSStartedFrame", "bot-1"), ("TTSStoppedFrame", "bot-1")]
    stopped = next(f for f in down if isinstance(f, TTSStoppedFrame))
    assert down.index(stopped) > down.index(texts[-1])

    down, _ = await run_test(processor(use_text=False), frames_to_send=sent)
    assert brackets(down) == []
    assert [f for f in down if isinstance(f, TTSTextFrame)] == texts


async def test_interruption_mid_utterance_mutes_a_bounded_span_then_the_model_is_heard_again():
    """The model finishes its sentence instead of yielding: only mute_secs of it are silenced."""
    q = question()
    cut = int(1.2 * RATE) // FRAME * FRAME  # interrupted 1.2 s into the sentence (a whole number of frames)
    head = frames_of(np.concatenate([silence(0.32), q[:cut]]))
    rest = frames_of(q[cut:])
    assert len(rest) > 12  # the rest is longer than the 0.48 s mute
    muted_texts = [TTSTextFrame(text=t, text_type="word") for t in ("my", "order")]
    heard_text = TTSTextFrame(text="status", text_type="word")
    rest_with_text = rest[:2] + [muted_texts[0]] + rest[2:4] + [muted_texts[1]] + rest[4:8] + [heard_text] + rest[8:]
    interruption = InterruptionFrame()
    sent = head + [SleepFrame(0.3), interruption, SleepFrame(0.3)] + rest_with_text + frames_of(silence(1.0))

    bot = processor(mute_secs=0.48)  # six 80 ms frames
    down, up = await run_test(bot, frames_to_send=sent)

    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert isinstance(down[i + 1], TTSStoppedFrame) and down[i + 1].context_id == "bot-1"
    assert isinstance(down[i + 2], ModelMuteFrame) and down[i + 2].muted
    assert audio_before(down, down[i]) == len(head)  # nothing of the head was lost or held back
    out = audio_of(down)
    assert_audio_kept(down, [f for f in sent if isinstance(f, OutputAudioRawFrame)])
    # exactly six frames of zeros, frame class kept; the rest untouched
    assert all(f.audio == bytes(len(f.audio)) for f in out[len(head) : len(head) + 6])
    assert all(type(f) is SpeechOutputAudioRawFrame for f in out[len(head) : len(head) + 6])
    assert [f.audio for f in out[len(head) + 6 :]] == [f.audio for f in (rest + frames_of(silence(1.0)))[6:]]
    [end] = [f for f in down if isinstance(f, ModelMuteFrame) and not f.muted]
    assert end.secs == pytest.approx(0.48) and end.words == "my order" and end.speech_secs == pytest.approx(0.48)
    assert audio_before(down, end) == len(head) + 5  # ends with the sixth muted frame, before it goes out
    # the muted words are dropped; what the model says after the mute is heard, as a new utterance
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == ["status"]
    assert [c for _, c in brackets(down)] == ["bot-1", "bot-1", "bot-2", "bot-2"]
    assert bot.stats["text_dropped"] == 2 and bot.stats["muted_secs"] == pytest.approx(0.48) and bot.stats["mutes"] == 1
    assert up == []


async def test_a_model_that_yields_is_heard_when_it_answers():
    w = word()
    head = frames_of(np.concatenate([silence(0.32), w]))
    after = frames_of(np.concatenate([silence(0.6), w, silence(1.0)]))  # quiet, then the answer
    sent = head + [SleepFrame(0.3), InterruptionFrame(), SleepFrame(0.3)] + after
    down, _ = await run_test(processor(mute_secs=0.5), frames_to_send=sent)
    assert [c for _, c in brackets(down)] == ["bot-1", "bot-1", "bot-2", "bot-2"]
    assert [f.audio for f in audio_of(down)[len(head) :]] == [f.audio for f in after]  # the answer is whole
    assert [f.words for f in down if isinstance(f, ModelMuteFrame)] == ["", ""]
    assert [f.speech_secs for f in down if isinstance(f, ModelMuteFrame)] == [0.0, 0.0]  # it had stopped


async def test_interruption_while_quiet_mutes_only_silence():
    quiet = frames_of(silence(0.8))
    after = frames_of(np.concatenate([word(), silence(1.0)]))
    sent = quiet + [SleepFrame(0.2), InterruptionFrame(), SleepFrame(0.2)] + frames_of(silence(0.5)) + after
    down, _ = await run_test(processor(mute_secs=0.5), frames_to_send=sent)
    assert sum(isinstance(f, InterruptionFrame) for f in down) == 1
    assert brackets(down) == [("TTSStartedFrame", "bot-1"), ("TTSStoppedFrame", "bot-1")]
    assert [f.audio for f in audio_of(down)[len(quiet) :]] == [f.audio for f in frames_of(silence(0.5)) + after]


async def test_mute_zero_silences_nothing():
    w = word()
    head = frames_of(np.concatenate([silence(0.32), w]))
    rest = frames_of(np.concatenate([w, silence(1.0)]))
    down, _ = await run_test(processor(mute_secs=0.0), frames_to_send=head + [SleepFrame(0.3), InterruptionFrame(), SleepFrame(0.3)] + rest)
    assert [f.audio for f in audio_of(down)[len(head) :]] == [f.audio for f in rest]
    assert not any(isinstance(f, ModelMuteFrame) for f in down)


def test_params_schema_rejects_unknown_keys_and_positive_threshold():
    with pytest.raises(ValueError):
        BotSpeechParams(threshold=-40)
    with pytest.raises(ValueError):
        BotSpeechParams(threshold_dbfs=3.0)
    with pytest.raises(ValueError):
        BotSpeechParams(hangover_secs=0)
