"""The conversation core end to end: `python -m pipelines run` on the shipped exotel.yaml (only the
reference engine's behaviour changed), dialled over loopback by the simulated Exotel caller."""

import base64

import numpy as np

from pipelines.bench.launch import free_port, launched, run_command
from pipelines.config import CONFIG_DIR
from pipelines.sim.caller import place_call
from pipelines.sim.speech import FIXTURES, energy_onset, fixture_wav
from processors.audio import read_wav, write_wav
from tests.pipelines.served import finished_call, rms, scripted_config

RATE = 8000
SILENT_RMS = 50


def deployment(tmp_path, **reference) -> str:
    return scripted_config(tmp_path, "exotel.yaml", **reference)


def media(result) -> list[tuple[float, np.ndarray]]:
    return [(t, np.frombuffer(base64.b64decode(m["media"]["payload"]), np.int16))
            for t, m in result.messages if m["event"] == "media"]


def best_match(heard: np.ndarray, clip: np.ndarray) -> float:
    """Normalised cross-correlation of the clip's first second anywhere in what was heard."""
    probe = clip[:RATE].astype(np.float64)
    h = heard.astype(np.float64)
    c = np.correlate(h, probe, "valid")
    energy = np.sqrt(np.convolve(h**2, np.ones(len(probe)), "valid"))
    return float((np.abs(c) / (energy * np.linalg.norm(probe) + 1e-9)).max())


async def test_a_model_that_keeps_talking_is_muted_for_a_bounded_span_and_the_caller_takes_the_floor_back(tmp_path):
    """A scripted model never yields: after the caller takes the floor, mute_secs of it are silenced, then it
    is heard again over the caller, who keeps talking: that is the caller taking the floor back (overlap)."""
    sentence = read_wav(FIXTURES / "question_16k.wav", 24000)[4800:-4800]  # the fixture's 200 ms pads trimmed
    bot_speech = tmp_path / "bot.wav"
    write_wav(bot_speech, np.tile(sentence, 3), 24000)  # 8.1 s with no pause as long as the hangover
    config = deployment(tmp_path, mode="script", handshake_delay_secs=0.5, script=[{"at": 0.5, "wav": str(bot_speech), "text": "I would like to check"}])
    # "Wait, stop, I have a question. Hello, I ...": the first barge-in comes ~0.4 s into it; after its
    # 0.5 s mute the bot is heard again and ~1.8 s of speech are left, so the overlap rule (1.0 s) fires
    # once, and what is left after the second mute (~0.5 s) cannot fire it again, even when a loaded
    # machine moves the first barge-in 0.3 s later
    question = fixture_wav("question_8k")[0]
    said = np.concatenate([fixture_wav("interrupt_8k")[0], question[: round(0.9 * RATE)]])
    speak_at = 3.0
    audio = np.concatenate([np.zeros(round(speak_at * RATE), np.int16), said])
    port = free_port()
    with launched(run_command(config, port), port) as server:
        result = await place_call(server.url(), audio, RATE, seconds=10.0, chunk_ms=20)
        call = await finished_call(port)
    onset = speak_at + energy_onset(said, RATE) * 0.02
    clears = [t for t, m in result.messages if m["event"] == "clear"]
    assert len(clears) == 2 and onset + 0.4 < clears[0] < clears[1] < speak_at + len(said) / RATE
    before = [pcm for t, pcm in media(result) if t < onset]
    assert max(rms(p) for p in before) > 1000  # the bot was talking
    for clear in clears:  # the muted span: nothing of the sentence right after each `clear`
        after = [(round(t, 2), round(rms(p))) for t, p in media(result) if clear < t < clear + 0.4]
        assert after and all(level < SILENT_RMS for _, level in after), after
    assert any(rms(p) > 1000 for t, p in media(result) if clears[0] + 0.6 < t < clears[1])  # heard again in between
    assert result.violations == []
    assert call["barge_in"]["interruptions"] == 2 and call["barge_in"]["overlaps"] >= 1
    assert call["bot_speech"]["mutes"] == 2 and 0.9 < call["bot_speech"]["muted_secs"] < 1.1
    assert call["pacer"]["interruptions"] == 2


async def test_a_slow_engine_handshake_is_covered_by_the_greeting_clip(tmp_path):
    config = deployment(tmp_path, mode="echo", handshake_delay_secs=3.0)
    port = free_port()
    with launched(run_command(config, port), port) as server:
        result = await place_call(server.url(), np.zeros(RATE, np.int16), RATE, seconds=4.0, chunk_ms=20)
        call = await finished_call(port)
    greeting = read_wav(CONFIG_DIR / "clips" / "greeting.wav", RATE)
    audible = np.flatnonzero(np.abs(result.heard) > 300)
    assert len(audible) and audible[0] < 0.5 * RATE  # the bound: heard within 0.5 s of start
    assert best_match(result.heard[: 3 * RATE], greeting) > 0.9
    assert call["holding"]["played"].get("prompt") == 1
    assert result.violations == []


async def test_an_engine_killed_mid_call_gives_the_apology_and_a_clean_hang_up(tmp_path):
    config = deployment(tmp_path, mode="echo", handshake_delay_secs=0.5, fail_after_frames=25)  # dies 2 s into the session
    port = free_port()
    with launched(run_command(config, port), port) as server:
        result = await place_call(server.url(), np.zeros(RATE, np.int16), RATE, seconds=15.0, chunk_ms=20, linger=2.0)
        call = await finished_call(port)
    apology = read_wav(CONFIG_DIR / "clips" / "apology.wav", RATE)
    assert result.close_code == 1000  # the bot hung up, gracefully, before the caller did
    assert result.sent_seconds < 12.0
    assert best_match(result.heard, apology) > 0.9
    last_audible = np.flatnonzero(np.abs(result.heard) > 300)[-1] / RATE
    first_apology = last_audible - len(apology) / RATE
    assert result.heard.size / RATE >= last_audible  # heard to its end before the socket closed
    assert first_apology > 2.0  # it followed the failure, not the call start
    assert call["holding"]["played"].get("apology") == 1
    assert result.violations == []
