"""The pacer's playout alone, in virtual time: the test owns `now` and advances it; nothing sleeps.

What test_pacer.py checks in real time, here exactly: the lead bound, the cadence, the jitter slack,
chunk sizes and padding, a mark per utterance, bot started/stopped, interruption epochs, silence
outside the TTS brackets, underruns, fades and the end-of-call drain.
"""

import numpy as np
import pytest

from processors.playout import GAP_TOLERANCE, Mark, Playout, Send, Speaking

RATE = 8000
CHUNK = 1600  # Exotel at 8 kHz: 3200 B = 200 ms
CHUNK_SECS = CHUNK / RATE


class Sim:
    """A playout and a virtual clock: `run(t)` does everything due up to `t`, recording (time, action)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("chunk_samples", CHUNK)
        self.p = Playout(RATE, **kwargs)
        self.now = 0.0
        self.out: list[tuple[float, object]] = []

    def run(self, until: float) -> None:
        for _ in range(100_000):
            self.record(self.p.due(self.now))
            deadline = self.p.next_deadline(self.now)
            if deadline is None or deadline > until:
                break
            assert deadline > self.now, "a deadline at or before now that due() did not act on"
            self.now = deadline
        else:
            raise AssertionError("the playout never settles")
        self.now = max(self.now, until)
        self.record(self.p.due(self.now))

    def record(self, actions) -> None:
        self.out += [(self.now, a) for a in actions]

    # input, at the current virtual time
    def audio(self, pcm: np.ndarray, frame_ms: int = 80) -> None:
        n = RATE * frame_ms // 1000
        for i in range(0, len(pcm), n):
            self.p.push(pcm[i : i + n].tobytes(), self.now)

    def utterance(self, pcm: np.ndarray, context: str = "bot-1") -> None:
        self.p.open(context, self.now)
        self.audio(pcm)
        self.record(self.p.close(self.now))

    # output
    def sends(self) -> list[tuple[float, Send]]:
        return [(t, a) for t, a in self.out if isinstance(a, Send)]

    def actions(self) -> list[object]:
        return [a for _, a in self.out]

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(a.pcm for _, a in self.sends()), np.int16)


def voice(secs: float, seed: int = 1) -> np.ndarray:
    """Loud noise: every sample non-zero, so padding and fades are easy to see."""
    pcm = np.random.default_rng(seed).integers(1000, 8000, int(secs * RATE)).astype(np.int16)
    return pcm


def leads(sends: list[tuple[float, Send]], chunk_secs: float = CHUNK_SECS) -> list[float]:
    """How long before it plays each chunk was sent (the provider plays them back to back)."""
    play_end, out = 0.0, []
    for t, _ in sends:
        out.append(max(play_end, t) - t)
        play_end = max(play_end, t) + chunk_secs
    return out


# ---- chunks ------------------------------------------------------------------------


def test_chunks_have_the_providers_size_and_the_utterance_end_is_padded_and_marked():
    sim = Sim(mark_timeout_secs=0.05)
    pcm = voice(0.73)  # not a whole number of 200 ms chunks
    sim.utterance(pcm)
    sim.run(5.0)
    sends = sim.sends()
    assert len(sends) == 4 and all(len(a.pcm) == 2 * CHUNK for _, a in sends)
    out = sim.pcm()
    assert np.array_equal(out[: len(pcm)], pcm) and not out[len(pcm):].any()
    kinds = sim.actions()
    assert kinds.index(Mark("bot-1")) == len(kinds) - 2  # after the last chunk, before the stop
    assert kinds.index(Speaking(True)) == 1  # right after the first chunk
    assert kinds[-1] == Speaking(False)  # the unechoed mark timed out
    assert sim.p.stats["chunks_sent"] == 4 and sim.p.stats["marks_missed"] == 1


@pytest.mark.parametrize("samples", [160, 320, 800])
def test_any_chunk_size_cuts_the_stream_into_that_size(samples):
    sim = Sim(chunk_samples=samples)
    pcm = voice(0.73)
    sim.utterance(pcm)
    sim.run(5.0)
    assert {len(a.pcm) for _, a in sim.sends()} == {2 * samples}
    assert len(sim.pcm()) == -(-len(pcm) // samples) * samples


def test_a_playout_needs_a_rate_and_a_chunk_size():
    with pytest.raises(ValueError):
        Playout(RATE, 0)


# ---- timing: lead, cadence, jitter --------------------------------------------------


@pytest.mark.parametrize("lead", [0.05, 0.2, 0.5])
def test_audio_leaves_in_real_time_never_more_than_the_lead_ahead(lead):
    """2 s of speech handed over at once: each chunk is sent at most lead_secs before it plays, and
    once the lead is built, one chunk per chunk length."""
    sim = Sim(lead_secs=lead, jitter_secs=0.0)
    sim.utterance(voice(2.0))
    sim.run(5.0)
    times = [t for t, _ in sim.sends()]
    assert len(times) == 10
    assert max(leads(sim.sends())) <= lead + 1e-9
    assert max(leads(sim.sends())) == pytest.approx(min(lead, 9 * CHUNK_SECS), abs=CHUNK_SECS)
    steady = np.diff(times[-5:])
    assert np.allclose(steady, CHUNK_SECS)  # paced, not a burst
    assert times[-1] == pytest.approx(2.0 - CHUNK_SECS - lead, abs=CHUNK_SECS)
    assert sim.p.stats["max_lead_secs"] <= lead + 1e-9


def test_from_a_dry_buffer_the_first_chunk_waits_the_jitter_slack():
    sim = Sim(jitter_secs=0.12)
    sim.p.open("bot-1", 0.0)
    sim.audio(voice(0.2))  # one chunk, complete at t=0
    sim.run(0.119)
    assert sim.sends() == []
    sim.run(0.5)
    assert [t for t, _ in sim.sends()] == [pytest.approx(0.12)]


def test_audio_already_queued_beyond_the_jitter_goes_at_once():
    """A holding clip arrives whole: no reason to wait, the slack is there."""
    sim = Sim(jitter_secs=0.12)
    sim.utterance(voice(1.0), "holding:x")
    sim.run(0.0)
    assert [t for t, _ in sim.sends()] == [0.0, 0.0]  # the first chunk and the lead's worth
    assert sim.p.stats["onset_ms"] == [0.0]


def test_onset_is_the_time_from_the_utterance_start_to_its_first_chunk():
    sim = Sim(jitter_secs=0.12)
    sim.p.open("bot-1", 0.0)
    sim.run(0.3)
    sim.audio(voice(0.2))  # complete at 0.3, sent at 0.42
    sim.run(1.0)
    assert sim.p.stats["onset_ms"] == [420.0]


def test_next_deadline_is_none_when_nothing_waits():
    sim = Sim()
    assert sim.p.next_deadline(0.0) is None and sim.p.due(0.0) == []
    sim.p.push(voice(0.1).tobytes(), 0.0)  # half a chunk: nothing to send yet
    assert sim.p.next_deadline(0.0) is None


# ---- utterances: marks and the speaking state ---------------------------------------


def test_each_utterance_gets_its_mark_after_its_last_chunk_and_an_echo_ends_speaking():
    sim = Sim(mark_timeout_secs=30)
    sim.utterance(voice(0.5), "bot-1")
    sim.utterance(voice(0.3), "bot-2")
    sim.run(1.0)
    kinds = sim.actions()
    marks = [i for i, a in enumerate(kinds) if isinstance(a, Mark)]
    assert [kinds[i] for i in marks] == [Mark("bot-1"), Mark("bot-2")]
    sends = [i for i, a in enumerate(kinds) if isinstance(a, Send)]
    assert len(sends) == 5 and sends[2] < marks[0] < sends[3] and marks[1] > sends[4]  # 0.5 s -> 3 chunks, 0.3 s -> 2
    assert kinds.count(Speaking(True)) == 1 and Speaking(False) not in kinds  # still waiting for the echoes
    assert sim.p.echoed("bot-1", sim.now) and not sim.p.echoed("bot-1", sim.now) and not sim.p.echoed("x", sim.now)
    sim.run(1.1)
    assert Speaking(False) not in sim.actions()  # bot-2 still out
    assert sim.p.echoed("bot-2", sim.now)
    sim.run(1.2)
    assert sim.actions()[-1] == Speaking(False) and sim.out[-1][0] == pytest.approx(1.1)
    assert sim.p.stats["marks_echoed"] == 2 and sim.p.stats["marks_missed"] == 0


def test_an_unechoed_mark_counts_as_played_mark_timeout_after_its_audio():
    sim = Sim(mark_timeout_secs=1.0, jitter_secs=0.0)
    sim.utterance(voice(0.4))
    sim.run(10.0)
    plays_out = sim.p.play_end
    assert plays_out == pytest.approx(0.4)
    assert sim.out[-1] == (pytest.approx(plays_out + 1.0), Speaking(False))
    assert sim.p.stats["marks_missed"] == 1


def test_without_marks_speaking_ends_when_the_audio_has_played():
    sim = Sim(marks=False, jitter_secs=0.0)
    sim.utterance(voice(0.4))
    sim.run(10.0)
    assert not any(isinstance(a, Mark) for a in sim.actions())
    assert sim.out[-1] == (pytest.approx(0.4), Speaking(False))
    assert sim.p.stats["marks_missed"] == 0


def test_an_utterance_closing_with_nothing_queued_is_marked_at_once():
    sim = Sim(jitter_secs=0.0)
    sim.utterance(voice(0.4), "bot-1")
    sim.run(0.1)  # both chunks sent
    sim.p.open("bot-2", sim.now)
    assert sim.p.close(sim.now) == [Mark("bot-2")]  # an empty utterance: nothing to wait for


def test_an_utterance_of_whole_chunks_leaves_no_speech_behind():
    """The audio after an utterance that ended on a chunk boundary (or had no audio) is silence."""
    sim = Sim(marks=False, jitter_secs=0.0)
    sim.utterance(voice(0.4), "bot-1")  # exactly two chunks
    sim.run(0.1)  # both sent
    sim.p.open("bot-2", sim.now)
    sim.record(sim.p.close(sim.now))  # no audio at all
    sim.audio(np.zeros(CHUNK, np.int16))
    sim.run(10.0)
    assert sim.out[-1] == (pytest.approx(0.4), Speaking(False))  # not after the silence chunk
    assert sim.p.stats["onset_ms"] == [0.0]  # bot-1's; bot-2 never started


def test_speaking_holds_between_utterances_still_queued():
    sim = Sim(marks=False, jitter_secs=0.0)
    sim.utterance(voice(0.4), "bot-1")
    sim.run(0.3)
    sim.utterance(voice(0.4), "bot-2")  # arrives while bot-1 plays
    sim.run(10.0)
    assert sim.actions().count(Speaking(True)) == 1 and sim.actions().count(Speaking(False)) == 1


# ---- interruption -------------------------------------------------------------------


def test_interruption_drops_the_queue_and_later_chunks_carry_the_next_epoch():
    sim = Sim()
    sim.utterance(voice(3.0), "bot-1")
    sim.run(0.5)
    before = len(sim.sends())
    assert sim.p.interrupt(sim.now) == [Speaking(False)]
    assert sim.p.epoch == 1 and sim.p.queued_secs() == 0 and sim.p.play_end == sim.now
    assert sim.p.close(sim.now) == []  # a late TTSStopped of the interrupted utterance: nothing to mark
    sim.utterance(voice(0.73), "bot-2")
    sim.run(5.0)
    sends = [a for _, a in sim.sends()]
    assert all(a.epoch == 0 for a in sends[:before]) and all(a.epoch == 1 for a in sends[before:])
    assert before * CHUNK < 3.0 * RATE / 2  # most of the 3 s never left
    assert len(sends) - before == 4  # the next utterance plays whole
    assert [a for a in sim.actions() if isinstance(a, Mark)] == [Mark("bot-2")]  # the interrupted one never marked
    assert sim.p.stats["interruptions"] == 1


def test_interruption_inside_an_open_utterance_drops_its_rest_too():
    sim = Sim()
    sim.p.open("bot-1", 0.0)
    sim.audio(voice(1.0))
    sim.run(0.3)
    sim.record(sim.p.interrupt(sim.now))
    sim.audio(voice(1.0))  # the rest of the interrupted utterance, after the interruption: silence now
    assert sim.p.close(sim.now) == []
    sim.run(5.0)
    assert all(a.epoch == 1 for a in sim.actions()[sim.actions().index(Speaking(False)):] if isinstance(a, Send))
    assert Speaking(True) not in sim.actions()[sim.actions().index(Speaking(False)):]


def test_interruption_when_silent_says_nothing_but_bumps_the_epoch():
    sim = Sim()
    assert sim.p.interrupt(0.0) == [] and sim.p.epoch == 1
    assert sim.p.interrupt(0.0) == [] and sim.p.epoch == 2


# ---- silence: audio outside the TTS brackets ----------------------------------------


def test_audio_outside_an_utterance_is_silence_sent_but_never_speech():
    sim = Sim(lead_secs=0.2)
    sim.audio(voice(2.0))  # loud, but unbracketed
    sim.run(10.0)
    assert sim.sends() and all(isinstance(a, Send) for a in sim.actions())  # no mark, no speaking
    assert len(sim.sends()) * CHUNK <= 0.4 * RATE  # what was queued when the backlog limit hit
    assert sim.p.stats["silence_dropped_secs"] == pytest.approx(2.0 - 0.24)  # 3 frames of 80 ms reached the lead


def test_silence_is_dropped_only_beyond_the_lead_of_backlog():
    sim = Sim(lead_secs=0.2, jitter_secs=0.0)
    for _ in range(50):  # 4 s of model silence at real time: keeps flowing, nothing dropped
        sim.audio(np.zeros(640, np.int16))
        sim.run(sim.now + 0.08)
    assert sim.p.stats["silence_dropped_secs"] == 0 and len(sim.sends()) >= 18


def test_utterance_audio_is_never_dropped_however_much_is_queued():
    sim = Sim(lead_secs=0.2)
    sim.audio(voice(1.0))  # silence fills the backlog
    sim.utterance(voice(3.0))
    assert sim.p.stats["silence_dropped_secs"] > 0 and sim.p.queued_secs() >= 3.0


# ---- underruns ----------------------------------------------------------------------


def test_a_stall_inside_speech_counts_as_an_underrun():
    sim = Sim(jitter_secs=0.0)
    pcm = voice(1.6)
    sim.p.open("bot-1", 0.0)
    sim.audio(pcm[: 4 * CHUNK])
    sim.run(2.3)  # 0.8 s played by 0.8; the engine stalls 1.5 s
    sim.audio(pcm[4 * CHUNK :])
    sim.record(sim.p.close(sim.now))
    sim.run(10.0)
    assert sim.p.stats["underruns"] == 1 and sim.p.stats["underrun_secs"] == pytest.approx(1.5)


def test_gaps_between_utterances_and_in_silence_are_not_underruns():
    sim = Sim(jitter_secs=0.0)
    sim.utterance(voice(0.4), "bot-1")
    sim.run(2.0)
    sim.utterance(voice(0.4), "bot-2")  # a new utterance after a pause
    sim.run(4.0)
    sim.audio(voice(0.2))
    sim.run(6.0)
    sim.audio(voice(0.2))  # silence after a pause
    sim.run(8.0)
    assert sim.p.stats["underruns"] == 0


def test_a_late_chunk_within_the_tolerance_is_no_underrun():
    sim = Sim(jitter_secs=0.0)
    sim.p.open("bot-1", 0.0)
    sim.audio(voice(0.2))
    sim.run(0.2 + GAP_TOLERANCE / 2)
    sim.audio(voice(0.2))
    sim.run(1.0)
    assert sim.p.stats["underruns"] == 0 and len(sim.sends()) == 2


# ---- fades and the end of the call --------------------------------------------------


def test_fade_out_ramps_the_queued_clip_down_and_drops_its_rest():
    sim = Sim(lead_secs=0.2)
    sim.utterance(np.full(3 * RATE, 8000, np.int16), "holding:x")  # a 3 s "clip"
    sim.run(0.3)
    sim.p.fade_out(0.02, sim.now)
    model = voice(0.73)
    sim.utterance(model, "bot-1")
    sim.run(10.0)
    out = sim.pcm()
    loud = out[: np.flatnonzero(out != 8000)[0]]
    assert len(loud) < RATE  # well under the clip's 3 s went out at full level
    ramp = out[len(loud) : len(loud) + 160]
    assert np.all(np.diff(ramp.astype(int)) <= 0) and ramp[-1] < 100  # 20 ms down to silence, no step
    assert model.tobytes() in out.tobytes()
    assert [a for a in sim.actions() if isinstance(a, Mark)] == [Mark("holding:x"), Mark("bot-1")]


def test_fade_out_of_an_open_utterance_drops_what_is_still_coming():
    sim = Sim()
    sim.p.open("bot-1", 0.0)
    sim.audio(voice(1.1))  # 5 chunks and 0.1 s pending
    sim.p.fade_out(0.5, 0.0)  # 0.5 s of ramp: three chunks kept
    assert sim.p.queued_secs() == pytest.approx(0.6)


def test_end_of_call_pads_the_last_chunk_and_is_idle_once_it_played():
    sim = Sim(mark_timeout_secs=0.5, jitter_secs=0.0)
    sim.utterance(voice(0.4), "holding:apology")
    sim.p.open("bot-1", 0.0)
    sim.audio(voice(0.3))  # the call ends inside an utterance: a chunk and a half queued
    sim.p.flush(sim.now)
    assert sim.p.queued_secs() == pytest.approx(0.8)
    sim.run(0.7)
    assert not sim.p.idle(sim.now)  # the last chunk plays until 0.8
    sim.run(0.8)
    assert not sim.p.idle(sim.now)  # played, but the apology's mark is not settled (0.4 + 0.5)
    sim.run(0.9)
    assert sim.p.idle(sim.now) and len(sim.sends()) == 4 and not sim.pcm()[-CHUNK // 2 :].any()
    assert sim.p.finish(sim.now) == [Speaking(False)]  # bot-1 never closed: finishing ends it
    assert sim.p.finish(sim.now) == []


def test_finish_while_speaking_stops_the_bot():
    sim = Sim()
    sim.utterance(voice(1.0))
    sim.run(0.1)
    assert sim.p.finish(sim.now) == [Speaking(False)] and sim.p.finish(sim.now) == []
