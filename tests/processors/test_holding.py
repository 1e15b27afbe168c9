"""HoldingProcessor alone with run_test: prompt-phase, take-over fade, slow-engine and apology clips; clip config errors.

Short clips written into tmp_path and short timings keep the timer tests fast; assertions are about
which frames come out and in what order, never about how long anything took. The shipped clips
(configs/clips, 24 kHz) are checked once as rendered at the call rate.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from pipelines import builder, config
from pipelines.config import CONFIG_DIR
from processors.audio import read_wav, write_wav
from processors.errors import ParamsError
from processors.holding import HoldingParams, HoldingProcessor
from tests.speech import speech
from transports.frames import EngineFailedFrame, FadeOutFrame, ModelMuteFrame

ROOT = Path(__file__).resolve().parents[2]
CALL_RATE = 8000


def write_clips(directory: Path, **secs: float) -> dict[str, str]:
    """24 kHz clips of real speech (looped to length) named like the shipped ones; paths relative to `directory`."""
    lengths = {"greeting": 0.2, "one_moment": 0.2, "apology": 0.2} | secs
    for name, length in lengths.items():
        write_wav(directory / f"{name}.wav", np.resize(speech(24000), int(length * 24000)), 24000)
    return {name: f"{name}.wav" for name in lengths}


def holding(tmp_path, clip_secs: dict | None = None, **params) -> tuple[HoldingProcessor, HoldingParams]:
    defaults = dict(prompt_repeat_secs=0.1, slow_after_secs=0.15, fade_secs=0.05)
    p = HoldingParams(clips=write_clips(tmp_path, **(clip_secs or {})), **(defaults | params))
    return HoldingProcessor(p, prepared=HoldingProcessor.prepare(p, tmp_path)), p


async def run(processor, frames: list[Frame], **kw):
    down, up = await run_test(
        processor,
        frames_to_send=frames,
        pipeline_params=PipelineParams(audio_in_sample_rate=CALL_RATE, audio_out_sample_rate=CALL_RATE),
        **kw,
    )
    return down, up


def model_audio() -> SpeechOutputAudioRawFrame:
    """20 ms of the model's stream at the call rate (holding sits after the output resampler)."""
    return SpeechOutputAudioRawFrame(audio=bytes(2 * CALL_RATE // 50), sample_rate=CALL_RATE, num_channels=1)


def plays(down, name: str | None = None) -> list[int]:
    """Indices of the clip TTSStartedFrames (optionally of one clip), each checked to be a whole clip."""
    found = []
    for i, f in enumerate(down):
        if isinstance(f, TTSStartedFrame) and (f.context_id or "").startswith("holding:"):
            context = f.context_id
            audio, stopped = down[i + 1], down[i + 2]
            assert isinstance(audio, TTSAudioRawFrame) and audio.context_id == context and audio.sample_rate == CALL_RATE
            assert isinstance(stopped, TTSStoppedFrame) and stopped.context_id == context
            if name is None or context == f"holding:{name}":
                found.append(i)
    return found


def clip_bytes(down, i: int) -> bytes:
    return down[i + 1].audio


def kinds(down) -> list[str]:
    """Frame types with the context of the TTS brackets, for whole-sequence comparisons."""
    out = []
    for f in down:
        name = type(f).__name__
        if isinstance(f, (TTSStartedFrame, TTSStoppedFrame, TTSAudioRawFrame)):
            name += f"({f.context_id})"
        out.append(name)
    return out


def clip(name: str) -> list[str]:
    c = f"holding:{name}"
    return [f"TTSStartedFrame({c})", f"TTSAudioRawFrame({c})", f"TTSStoppedFrame({c})"]


# (a) the prompt clip


@pytest.mark.parametrize("rate", [8000, 16000])
async def test_shipped_greeting_plays_right_after_start_at_the_call_rate(rate):
    bank = HoldingProcessor.prepare(HoldingParams(), CONFIG_DIR)
    down, up = await run_test(
        HoldingProcessor(prepared=bank),  # default params, clips from configs/
        frames_to_send=[SleepFrame(0.2)],
        ignore_start=False,
        pipeline_params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
    )
    assert isinstance(down[0], StartFrame)
    assert kinds(down[1:]) == clip("greeting")  # once: 4.6 s clip + 5 s pause before a repeat
    audio = down[2]
    assert audio.audio == bank.get("greeting", rate) and audio.sample_rate == rate and audio.num_channels == 1
    assert len(audio.audio) / 2 / rate == pytest.approx(4.63, abs=0.02)
    assert [f for f in up if not isinstance(f, StartFrame)] == []


async def test_prompt_repeats_while_the_engine_is_silent_then_stops_when_model_audio_flows(tmp_path):
    processor, params = holding(tmp_path)  # 0.2 s greeting, 0.1 s pause: plays at 0, 0.3, 0.6 s
    audio = OutputAudioRawFrame(audio=bytes(320), sample_rate=CALL_RATE, num_channels=1)  # plain output audio counts too
    down, _ = await run(processor, [SleepFrame(0.75), audio, SleepFrame(0.4)])
    greetings = plays(down, "greeting")
    cut = down.index(audio)
    assert len([i for i in greetings if i < cut]) >= 2
    assert [i for i in greetings if i > cut] == []
    bank = HoldingProcessor.prepare(params, tmp_path)
    assert all(clip_bytes(down, i) == bank.get("greeting", CALL_RATE) for i in greetings)
    assert processor.stats["played"] == {"prompt": len(greetings)}


@pytest.mark.parametrize(
    "engine_frame, repeats",
    [
        (lambda: model_audio(), False),
        (lambda: TTSAudioRawFrame(audio=bytes(320), sample_rate=CALL_RATE, num_channels=1, context_id="holding:x"), True),
    ],
    ids=["model-audio", "tts-audio-is-not-the-engine"],
)
async def test_model_audio_during_the_first_clip_means_no_repeat(tmp_path, engine_frame, repeats):
    processor, _ = holding(tmp_path)
    frame = engine_frame()
    down, _ = await run(processor, [SleepFrame(0.03), frame, SleepFrame(0.4)])
    assert frame in down
    assert (len(plays(down, "greeting")) >= 2) is repeats
    if not repeats:
        assert len(plays(down, "greeting")) == 1


# (b) take-over


async def test_model_speech_over_a_playing_clip_fades_it_first(tmp_path):
    processor, _ = holding(tmp_path, {"greeting": 2.0})
    audio, started = model_audio(), TTSStartedFrame(context_id="bot-1")
    down, _ = await run(processor, [SleepFrame(0.2), audio, started, SleepFrame(0.1)])
    assert kinds(down) == clip("greeting") + ["SpeechOutputAudioRawFrame", "FadeOutFrame", "TTSStartedFrame(bot-1)"]
    fade = down[-2]
    assert isinstance(fade, FadeOutFrame) and fade.secs == 0.05
    assert down[-1] is started
    assert processor.stats["faded"] == 1


@pytest.mark.parametrize("case", ["no-prompt", "clip-ended", "clip-interrupted"])
async def test_no_fade_when_no_clip_is_playing(tmp_path, case):
    if case == "no-prompt":
        processor, _ = holding(tmp_path, prompt_clip=None)
        frames = [model_audio(), SleepFrame(0.1)]
    elif case == "clip-ended":
        processor, _ = holding(tmp_path, {"greeting": 0.2})
        frames = [SleepFrame(0.03), model_audio(), SleepFrame(0.35)]
    else:
        processor, _ = holding(tmp_path, {"greeting": 2.0})
        frames = [SleepFrame(0.1), model_audio(), SleepFrame(0.1), InterruptionFrame(), SleepFrame(0.1)]
    started = TTSStartedFrame(context_id="bot-1")
    down, _ = await run(processor, frames + [started, SleepFrame(0.1)])
    assert not any(isinstance(f, FadeOutFrame) for f in down)
    assert started in down and processor.stats["faded"] == 0


# (c) slow engine


async def test_model_silent_after_the_callers_turn_plays_the_slow_clip(tmp_path):
    processor, params = holding(tmp_path, prompt_clip=None)
    stopped = UserStoppedSpeakingFrame()
    frames = [model_audio(), SleepFrame(0.05), UserStartedSpeakingFrame(), stopped, SleepFrame(0.4)]
    down, _ = await run(processor, frames)
    slow = plays(down, "one_moment")
    assert len(slow) == 1 and slow[0] > down.index(stopped)
    assert clip_bytes(down, slow[0]) == HoldingProcessor.prepare(params, tmp_path).get("one_moment", CALL_RATE)
    assert kinds(down)[-3:] == clip("one_moment")
    assert processor.stats["played"] == {"slow_engine": 1}


@pytest.mark.parametrize("cancel", ["model-starts", "caller-resumes"])
async def test_model_speech_or_caller_speech_within_the_window_cancels_the_slow_clip(tmp_path, cancel):
    processor, _ = holding(tmp_path, prompt_clip=None)
    # no sleep between the caller's pause and what cancels it: both land well inside slow_after_secs
    frames = [model_audio(), SleepFrame(0.05), UserStartedSpeakingFrame(), UserStoppedSpeakingFrame()]
    if cancel == "model-starts":
        frames += [TTSStartedFrame(context_id="bot-1"), SleepFrame(0.35)]
        down, _ = await run(processor, frames)
        assert plays(down) == []
        return
    rearm = UserStoppedSpeakingFrame()
    frames += [UserStartedSpeakingFrame(), SleepFrame(0.3), rearm, SleepFrame(0.4)]
    down, _ = await run(processor, frames)
    # only the caller's next pause gets the clip
    assert [down.index(rearm) < i for i in plays(down)] == [True]
    assert len(plays(down, "one_moment")) == 1


async def test_no_slow_clip_while_the_model_is_muted_after_a_barge_in(tmp_path):
    processor, _ = holding(tmp_path, prompt_clip=None)
    after = UserStoppedSpeakingFrame()
    frames = [model_audio(), SleepFrame(0.05), ModelMuteFrame(muted=True), UserStartedSpeakingFrame(), UserStoppedSpeakingFrame()]
    frames += [SleepFrame(0.4), ModelMuteFrame(muted=False), UserStartedSpeakingFrame(), after, SleepFrame(0.4)]
    down, _ = await run(processor, frames)
    assert [down.index(after) < i for i in plays(down)] == [True]


async def test_no_slow_clip_before_the_engine_answered_or_while_the_model_speaks(tmp_path):
    processor, _ = holding(tmp_path, prompt_clip=None)

    def turn(wait: float):
        stopped = UserStoppedSpeakingFrame()
        return stopped, [UserStartedSpeakingFrame(), stopped, SleepFrame(wait)]

    _, before_engine = turn(0.3)
    _, while_speaking = turn(0.3)
    after, after_speaking = turn(0.4)
    frames = before_engine + [model_audio(), TTSStartedFrame(context_id="bot-1"), SleepFrame(0.05)] + while_speaking
    frames += [TTSStoppedFrame(context_id="bot-1"), SleepFrame(0.05)] + after_speaking
    down, _ = await run(processor, frames)
    # once the model's utterance has ended, the next silent pause gets the clip; the earlier ones did not
    assert [down.index(after) < i for i in plays(down)] == [True]
    assert len(plays(down, "one_moment")) == 1


# (d) engine failure


async def test_engine_failure_during_the_prompt_fades_it_plays_the_apology_and_stops_the_repeats(tmp_path):
    processor, params = holding(tmp_path, {"greeting": 0.5})  # would repeat at 0.6 s
    failed = EngineFailedFrame(reason="engine gone")
    down, _ = await run(processor, [SleepFrame(0.15), failed, SleepFrame(0.7)])
    assert kinds(down) == clip("greeting") + ["FadeOutFrame"] + clip("apology") + ["EngineFailedFrame"]
    assert down[3].secs == 0.05 and down[-1] is failed
    assert clip_bytes(down, 4) == HoldingProcessor.prepare(params, tmp_path).get("apology", CALL_RATE)
    assert processor.stats["played"] == {"prompt": 1, "apology": 1}


async def test_engine_failure_during_model_speech_fades_it_first(tmp_path):
    processor, _ = holding(tmp_path, prompt_clip=None)
    frames = [model_audio(), TTSStartedFrame(context_id="bot-1"), model_audio(), SleepFrame(0.1), EngineFailedFrame(), SleepFrame(0.1)]
    down, _ = await run(processor, frames)
    assert kinds(down) == [
        "SpeechOutputAudioRawFrame", "TTSStartedFrame(bot-1)", "SpeechOutputAudioRawFrame", "FadeOutFrame",
        *clip("apology"), "EngineFailedFrame",
    ]


async def test_engine_failure_with_nothing_playing_apologises_once_and_nothing_follows(tmp_path):
    processor, _ = holding(tmp_path, prompt_clip=None)
    frames = [model_audio(), SleepFrame(0.1), EngineFailedFrame(), SleepFrame(0.1)]
    frames += [UserStartedSpeakingFrame(), UserStoppedSpeakingFrame(), SleepFrame(0.35), EngineFailedFrame(), SleepFrame(0.05)]
    down, _ = await run(processor, frames)
    assert not any(isinstance(f, FadeOutFrame) for f in down)
    assert len(plays(down)) == 1 and len(plays(down, "apology")) == 1  # no slow clip after the failure either
    assert sum(isinstance(f, EngineFailedFrame) for f in down) == 2  # both forwarded


async def test_engine_failure_without_an_apology_clip_is_just_forwarded(tmp_path):
    processor, _ = holding(tmp_path, prompt_clip=None, apology_clip=None)
    down, _ = await run(processor, [model_audio(), SleepFrame(0.05), EngineFailedFrame(), SleepFrame(0.05)])
    assert kinds(down) == ["SpeechOutputAudioRawFrame", "EngineFailedFrame"]


# (e) configuration


def test_prepare_names_the_missing_clip(tmp_path):
    clips = write_clips(tmp_path) | {"one_moment": "nowhere/one_moment.wav"}
    with pytest.raises(ParamsError) as info:
        HoldingProcessor.prepare(HoldingParams(clips=clips), tmp_path)
    assert info.value.loc == ("clips", "one_moment")
    assert "nowhere/one_moment.wav" in info.value.problem


def test_prepare_names_an_unreadable_clip(tmp_path):
    clips = write_clips(tmp_path)
    (tmp_path / "apology.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ParamsError) as info:
        HoldingProcessor.prepare(HoldingParams(clips=clips), tmp_path)
    assert info.value.loc == ("clips", "apology") and "cannot read" in info.value.problem


@pytest.mark.parametrize("key", ["prompt_clip", "slow_clip", "apology_clip"])
def test_params_reject_a_clip_name_not_in_clips(key):
    with pytest.raises(ValueError) as info:
        HoldingParams(**{key: "hold_music"})
    assert "hold_music" in str(info.value) and key in str(info.value)


def test_params_without_clips_and_unknown_keys():
    HoldingParams(clips={}, prompt_clip=None, slow_clip=None, apology_clip=None)
    with pytest.raises(ValueError):
        HoldingParams(clips={})  # greeting, one_moment, apology are named by default
    with pytest.raises(ValueError):
        HoldingParams(volume=3)


def test_relative_clip_paths_resolve_next_to_the_yaml_first_then_configs(tmp_path):
    (tmp_path / "clips").mkdir()
    write_wav(tmp_path / "clips" / "greeting.wav", np.resize(speech(24000), 2400), 24000)  # shadows the shipped one
    absolute = tmp_path / "elsewhere.wav"
    write_wav(absolute, np.resize(speech(24000), 4800), 24000)
    params = HoldingParams(clips={"greeting": "clips/greeting.wav", "one_moment": "clips/one_moment.wav", "apology": str(absolute)})
    bank = HoldingProcessor.prepare(params, tmp_path, CONFIG_DIR)  # as the builder does
    assert bank.get("greeting", 24000) == read_wav(tmp_path / "clips" / "greeting.wav", 24000).tobytes()
    assert bank.get("one_moment", 24000) == read_wav(CONFIG_DIR / "clips" / "one_moment.wav", 24000).tobytes()
    assert bank.get("apology", 8000) == read_wav(absolute, 8000).tobytes()


def deployment_copy(tmp_path, replace: tuple[str, str] | None = None) -> Path:
    text = (CONFIG_DIR / "exotel.yaml").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def test_a_copy_of_the_shipped_deployment_finds_its_clips_in_configs(tmp_path):
    deployment = builder.plan(config.load(deployment_copy(tmp_path), {}))
    holding_plan = next(p for p in deployment.processors if p.entry.name == "holding")
    assert holding_plan.prepared.get("greeting", 8000) == HoldingProcessor.prepare(HoldingParams(), CONFIG_DIR).get("greeting", 8000)


def test_cli_validate_names_file_line_and_clip_key(tmp_path):
    path = deployment_copy(tmp_path, ("one_moment: clips/one_moment.wav", "one_moment: clips/missing.wav"))
    text = path.read_text()
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if "clips/missing.wav" in ln)
    index = [p["type"] for p in yaml.safe_load(text)["processors"]].index("holding")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}:{line}: processors[{index}].params.clips.one_moment: "), last
    assert "clips/missing.wav" in last
