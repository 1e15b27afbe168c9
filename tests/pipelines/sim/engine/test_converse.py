"""Converse mode: a model's turn-taking, driven with recorded speech through the real Silero VAD."""


import numpy as np
import pytest

from pipelines.sim.engine import EngineOptions, ReferenceEngine
from pipelines.sim.engine.converse import ConverseAgent, steps
from pipelines.sim.engine.reference import SILENCE_RMS, _parser
from pipelines.sim.engine.script import ScriptAgent, text_pieces
from pipelines.sim.speech import FIXTURES
from processors.audio import read_wav
from processors.personaplex.ogg_reader import FRAME_SAMPLES
from tests.pipelines.sim.engine.test_reference import (  # noqa: F401  (make_engine is a fixture)
    frames_of,
    make_engine,
    normalised_xcorr,
    one_page_per_frame,
)
from tests.speech import speech_float

RATE = 24000
TURN_END, REPLY_DELAY, YIELD_AFTER = steps(0.64), steps(0.24), steps(0.48)
ENVELOPE = RATE // 100  # 10 ms


def words(name: str, rate: int = 16000) -> np.ndarray:
    """A fixture's speech as the engine hears it (24 kHz float), without the fixture's padding."""
    x = read_wav(FIXTURES / f"{name}_{rate // 1000}k.wav", RATE).astype(np.float32) / 32768.0
    loud = np.flatnonzero(envelope(x) > 0.005)
    return x[loud[0] * ENVELOPE : (loud[-1] + 1) * ENVELOPE]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def answered(turn: np.ndarray, lead: float = 0.4) -> np.ndarray:
    """`turn` after `lead` s of silence, then silence long enough for the whole reply."""
    return np.concatenate([silence(lead), turn, silence(len(turn) / RATE + 2.0)])


def envelope(x: np.ndarray) -> np.ndarray:
    n = len(x) // ENVELOPE
    return np.sqrt(np.mean(x[: n * ENVELOPE].reshape(n, ENVELOPE).astype(np.float64) ** 2, axis=1))


def step_rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(x.reshape(-1, FRAME_SAMPLES).astype(np.float64) ** 2, axis=1))


def at_step(seconds: float) -> int:
    """The step in which a sound starting `seconds` into the input begins."""
    return int(seconds * RATE) // FRAME_SAMPLES


def end_step(seconds: float) -> int:
    """The step in which a sound ending `seconds` into the input has its last sample."""
    return (int(seconds * RATE) - 1) // FRAME_SAMPLES


class Run:
    """An agent fed `audio` step by step: its output, its pieces as (step, piece), and the agent."""

    def __init__(self, audio: np.ndarray, agent: ConverseAgent | None = None) -> None:
        self.agent = agent or ConverseAgent(text_pieces("You said this."))
        self.input = frames_of(audio)
        outs = [self.agent.step(f) for f in self.input.reshape(-1, FRAME_SAMPLES)]
        self.output = np.concatenate([audio for audio, _ in outs])
        self.texts = [(i, piece) for i, (_, piece) in enumerate(outs) if piece]
        self.rms = step_rms(self.output)

    def sounding(self) -> np.ndarray:
        """Steps with audible output."""
        return np.flatnonzero(self.rms > SILENCE_RMS)


def matches(said: np.ndarray, heard: np.ndarray) -> tuple[int, float]:
    """Where (in samples, to 10 ms) and how well `said`'s envelope is found in `heard`'s."""
    lag, peak = normalised_xcorr(envelope(said), envelope(heard))
    return lag * ENVELOPE, peak


@pytest.mark.parametrize("rate", [16000, 8000], ids=["16k", "8k"])
def test_the_reply_comes_after_the_turn_ends_and_is_the_callers_words(rate):
    question = words("question", rate)
    run = Run(answered(question))
    last_word = end_step(0.4 + len(question) / RATE)
    sounding = run.sounding()
    # Nothing while the caller talks or pauses; the reply's first audible step is the turn end (8 steps of
    # non-speech after Silero's last voiced step), the reply delay and the lead-in away from the last word.
    assert sounding[0] > last_word + TURN_END
    assert sounding[0] <= last_word + 1 + TURN_END + REPLY_DELAY + 2
    lag, peak = matches(question, run.output)
    assert peak > 0.95
    assert abs(lag - sounding[0] * FRAME_SAMPLES) <= FRAME_SAMPLES
    assert sounding[-1] <= (lag + len(question)) // FRAME_SAMPLES + 2  # trailing silence trimmed
    assert (run.agent.turns_heard, run.agent.replies, run.agent.yields) == (1, 1, 0)


@pytest.mark.parametrize("pause", [0.2, 0.3, 0.5])
def test_a_pause_inside_the_turn_is_answered_once_with_the_whole_turn(pause):
    turn = np.concatenate([words("question"), silence(pause), words("interrupt")])
    run = Run(answered(turn))
    assert (run.agent.turns_heard, run.agent.replies) == (1, 1)
    assert run.sounding()[0] > end_step(0.4 + len(turn) / RATE)  # nothing after the first half
    lag, peak = matches(turn, run.output)
    assert peak > 0.95


def test_turn_end_secs_is_the_pause_that_ends_a_turn():
    first, second = words("question"), words("interrupt")
    audio = answered(np.concatenate([first, silence(1.0), second]))
    second_starts = at_step(0.4 + len(first) / RATE + 1.0)
    assert Run(audio).sounding()[0] < second_starts  # answered in the pause
    slow = Run(audio, ConverseAgent(text_pieces("x"), turn_end_secs=1.2))
    assert slow.sounding()[0] > second_starts + len(second) / FRAME_SAMPLES and slow.agent.replies == 1


def test_speech_before_the_reply_is_out_holds_it_and_continues_the_turn():
    first, second = words("question"), words("interrupt")
    turn = np.concatenate([first, silence((TURN_END + 1) * 0.08), second])  # ended, reply not yet out
    run = Run(answered(turn))
    assert (run.agent.replies, run.agent.yields) == (1, 0)
    assert matches(turn, run.output)[1] > 0.95


def reply_then(interruption: np.ndarray, after: float) -> tuple[Run, Run, int]:
    """A question answered, and `interruption` from `after` seconds into the reply's audible part.

    Returns that run, the same without the interruption, and the step where the interruption starts.
    """
    audio = np.concatenate([silence(0.4), words("question"), silence(9.0)])
    plain = Run(audio)
    start = plain.sounding()[0] * FRAME_SAMPLES + round(after * RATE)
    audio[start : start + len(interruption)] += interruption
    return Run(audio), plain, start // FRAME_SAMPLES


def first_difference(run: Run, plain: Run) -> int:
    differs = np.any(run.output.reshape(-1, FRAME_SAMPLES) != plain.output.reshape(-1, FRAME_SAMPLES), axis=1)
    return int(np.flatnonzero(differs)[0])


def test_talked_over_it_fades_out_in_one_step_and_answers_the_interruption_after_it_ends():
    interruption = words("question")  # "Hello," is voiced for 0.48 s unbroken
    run, plain, onset = reply_then(interruption, after=0.6)
    assert (run.agent.yields, run.agent.replies) == (1, 2)
    fade = first_difference(run, plain)
    # Unbroken speech for yield_after_secs from the interruption's first step (Silero may notice it a step late).
    assert onset + YIELD_AFTER - 2 <= fade <= onset + YIELD_AFTER + 1
    frames, plain_frames = run.output.reshape(-1, FRAME_SAMPLES), plain.output.reshape(-1, FRAME_SAMPLES)
    ramp = np.linspace(1.0, 0.0, FRAME_SAMPLES, dtype=np.float32)
    np.testing.assert_array_equal(frames[fade], plain_frames[fade] * ramp)  # to zero within the step: no click
    assert plain.rms[fade] > 5 * SILENCE_RMS and plain.rms[fade + 1 : fade + 4].max() > SILENCE_RMS
    # Silent while the caller holds the floor; then their interruption, from its onset, is the answer.
    interruption_end = end_step(onset * 0.08 + len(interruption) / RATE)
    assert run.rms[fade + 1 : interruption_end + TURN_END + 1].max() < SILENCE_RMS
    assert matches(interruption, run.output[(fade + 1) * FRAME_SAMPLES :])[1] > 0.95


def test_the_yield_needs_unbroken_speech():
    # "Wait," (0.4 s of voicing) alone does not take the floor; "stop," (0.48 s unbroken) does.
    interruption = words("interrupt")
    loud = envelope(interruption) > 0.005
    stop_starts = np.flatnonzero(loud[1:] & ~loud[:-1])[0] + 1  # the first word's end, in 10 ms
    run, plain, onset = reply_then(interruption, after=0.4)
    assert (run.agent.yields, run.agent.replies) == (1, 2)
    assert first_difference(run, plain) >= onset + stop_starts * ENVELOPE // FRAME_SAMPLES + YIELD_AFTER - 2


def short_word() -> np.ndarray:
    """ "Wai-": 0.3 s of real speech, as long as an "uh-huh" or a "yes", with a 20 ms fade rather than a cut."""
    word = words("interrupt")[: round(0.3 * RATE)]
    word[-480:] *= np.linspace(1, 0, 480, dtype=np.float32)
    return word


def test_a_backchannel_neither_stops_the_reply_nor_gets_answered():
    run, plain, _ = reply_then(short_word(), after=0.8)
    assert (run.agent.turns_heard, run.agent.yields, run.agent.replies) == (2, 0, 1)
    np.testing.assert_array_equal(run.output, plain.output)  # as if the caller had said nothing
    assert run.texts == plain.texts


@pytest.mark.parametrize("seconds", [3.0, 0.3], ids=["steady", "burst"])
def test_noise_at_minus_25_dbfs_gets_no_reply(seconds):
    noise = np.random.default_rng(7).standard_normal(round(seconds * RATE)).astype(np.float32)
    noise *= 10 ** (-25 / 20) / np.sqrt(np.mean(noise**2))
    run = Run(np.concatenate([silence(0.5), noise, silence(3.0)]))
    assert run.agent.turns_heard == 0 and run.texts == []
    assert not run.output.any()


def test_silence_gets_no_reply_and_output_stays_one_frame_per_input_frame():
    run = Run(silence(5.0))
    assert len(run.output) == len(run.input) and not run.output.any() and run.texts == []


def test_text_pieces_accompany_the_reply():
    run = Run(answered(words("question")), ConverseAgent(text_pieces("Yes, your order shipped.")))
    assert "".join(piece for _, piece in run.texts).strip() == "Yes, your order shipped."
    reply = np.flatnonzero(run.rms > 0)  # including the lead-in, which is near-silent
    indices = [index for index, _ in run.texts]
    assert indices[0] == reply[0] and indices[-1] <= reply[-1]
    assert len(set(indices)) == len(indices)  # one a step, spread over the reply


@pytest.mark.parametrize("at", [0.24, 1.4], ids=["caller-starts-over-it", "mm-hm-mid-turn"])
def test_a_scripted_line_mixes_in_and_does_not_count_as_speaking(at):
    # The pipecat clip (0.73 s) as a scripted line, from before the caller's first word (0.4 s) or mid-turn:
    # the question is still a turn of its own (not a backchannel), answered as if the line were not there.
    question = words("question")
    script = ScriptAgent([(at, speech_float(RATE), "Mm-hm.")])
    run = Run(answered(question), ConverseAgent(text_pieces("Okay."), script))
    plain = Run(answered(question), ConverseAgent(text_pieces("Okay.")))
    clip_steps = list(range(at_step(at), at_step(at) + 10))
    lag, peak = normalised_xcorr(speech_float(RATE), run.output[: 30 * FRAME_SAMPLES])
    assert lag == round(at * RATE) and peak > 0.99
    assert (run.agent.replies, run.agent.yields) == (1, 0)
    outside = np.ones(len(run.rms), bool)
    outside[clip_steps] = False
    frames, plain_frames = run.output.reshape(-1, FRAME_SAMPLES), plain.output.reshape(-1, FRAME_SAMPLES)
    np.testing.assert_array_equal(frames[outside], plain_frames[outside])
    assert [piece for _, piece in run.texts] == text_pieces("Mm-hm.") + text_pieces("Okay.")


@pytest.mark.parametrize("script", [False, True], ids=["alone", "over-a-scripted-line"])
def test_a_short_turn_is_answered_when_no_reply_plays(script):
    word = short_word()
    line = ScriptAgent([(0.24, speech_float(RATE), "Mm-hm.")]) if script else None  # steps 3-12; the word at step 5
    run = Run(answered(word), ConverseAgent(text_pieces("Okay."), line))
    assert run.agent.replies == 1
    reply_start = run.texts[-2][0]  # " Okay" goes out with the reply's first step
    assert matches(word, run.output[reply_start * FRAME_SAMPLES :])[1] > 0.95


def test_cli_flags_reach_the_converse_options():
    args = _parser().parse_args(["--mode", "converse", "--turn-end-secs", "0.8", "--yield-after-secs", "0.4"])
    assert (args.mode, args.turn_end_secs, args.reply_delay_secs, args.yield_after_secs) == ("converse", 0.8, 0.24, 0.4)
    assert _parser().parse_args([]).mode is None  # unset: EngineOptions' default, converse


def test_engine_options_select_converse_by_default_with_no_greeting():
    options = EngineOptions()
    assert options.mode == "converse" and options.script_lines() == []
    assert (options.turn_end_secs, options.reply_delay_secs, options.yield_after_secs) == (0.64, 0.24, 0.48)
    engine = ReferenceEngine(EngineOptions(script=[{"at": 2.0}], reply_text="Sure."))
    assert [at for at, _, _ in engine._script] == [2.0]
    assert isinstance(engine._new_agent(), ConverseAgent)
    assert EngineOptions(mode="converse", script_at=1.0).script_lines()[0].at == 1.0  # the one-line form still works


async def test_converse_mode_answers_a_spoken_turn_over_the_websocket(make_engine):  # noqa: F811
    engine = await make_engine(reply_text="You said this.")
    question = words("question")
    received, texts = await one_page_per_frame(engine, frames_of(answered(question)))
    rms = step_rms(received)
    last_word = end_step(0.4 + len(question) / RATE)
    assert rms[: last_word + TURN_END].max() < SILENCE_RMS  # quiet while the caller has the floor
    lag, peak = normalised_xcorr(question, received)
    assert peak > 0.5 and lag > (last_word + TURN_END) * FRAME_SAMPLES
    assert "".join(piece for _, piece in texts).strip() == "You said this."
    assert all(index > last_word + TURN_END for index, _ in texts)
