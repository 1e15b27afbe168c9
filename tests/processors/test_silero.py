"""The batched Silero analyzer against pipecat's own, window for window, with calls interleaved."""

import asyncio

import numpy as np
from pipecat.audio.vad.silero import SileroVADAnalyzer

from pipelines.sim.speech import fixture_wav
from processors import silero
from processors.pipecat_adapter import run_state_machine
from processors.silero import BatchedSileroAnalyzer
from processors.vad import VADParams

RATE = 8000
WINDOW = 256  # samples Silero scores at 8 kHz


def pipecat_reference(pcm: np.ndarray) -> tuple[list[float], list]:
    """(confidence, VAD state) per window from pipecat's analyzer with its own session."""
    analyzer = SileroVADAnalyzer(sample_rate=RATE, params=VADParams().pipecat())
    analyzer.set_sample_rate(RATE)
    scores, states = [], []
    score = analyzer.voice_confidence

    def recording(buffer):
        scores.append(float(np.squeeze(score(buffer))))
        return scores[-1]

    analyzer.voice_confidence = recording
    for i in range(0, len(pcm) - WINDOW + 1, WINDOW):
        states.append(run_state_machine(analyzer, pcm[i : i + WINDOW].tobytes()))
    return scores, states


async def batched(pcm: np.ndarray, frame: int) -> tuple[list[float], list]:
    """(confidence, state) per window from ours, fed `frame` samples at a time."""
    analyzer = BatchedSileroAnalyzer(params=VADParams().pipecat())
    analyzer.set_sample_rate(RATE)
    scores, states = [], []
    original = analyzer._run_analyzer  # the state machine the adapter runs (test_pipecat_contract)

    def recording(window):
        scores.append(analyzer._score)
        states.append(original(window))
        return states[-1]

    analyzer._run_analyzer = recording
    for i in range(0, len(pcm), frame):
        await analyzer.analyze_audio(pcm[i : i + frame].tobytes())
        await asyncio.sleep(0)  # let the other calls queue their windows
    return scores, states


def calls() -> list[np.ndarray]:
    speech, rate = fixture_wav("interrupt_8k")
    assert rate == RATE
    pause = np.zeros(RATE, np.int16)
    question, _ = fixture_wav("question_8k")
    return [
        np.concatenate([pause, speech, pause, speech]),
        np.concatenate([speech, pause]),
        (np.concatenate([pause, question, pause]) * 0.1).astype(np.int16),  # a quiet caller
        np.zeros(3 * RATE, np.int16),
    ]


async def test_interleaved_calls_score_exactly_as_pipecat_alone():
    audio = calls()
    before = silero.batcher().runs, silero.batcher().windows
    # 100 ms frames (Exotel's), 20 ms (Twilio's) and odd sizes: leftovers carry over between frames
    results = await asyncio.gather(*(batched(pcm, frame) for pcm, frame in zip(audio, (800, 160, 333, 800))))
    for pcm, (scores, states) in zip(audio, results):
        want_scores, want_states = pipecat_reference(pcm)
        assert states == want_states
        assert np.allclose(scores, want_scores, atol=1e-5)
    assert max(max(scores) for scores, _ in results[:3]) > 0.9  # speech was there to find
    runs, windows = silero.batcher().runs - before[0], silero.batcher().windows - before[1]
    assert windows == sum(len(pcm) // WINDOW for pcm in audio)
    assert runs < windows  # windows of different calls shared runs


async def test_every_call_shares_one_session():
    a, b = (BatchedSileroAnalyzer(params=VADParams().pipecat()) for _ in range(2))
    assert a._model is not b._model
    assert silero.silero_session() is silero.silero_session()
    assert not hasattr(a._model, "session")
