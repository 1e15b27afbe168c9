"""configs/cascaded.yaml: exotel.yaml with PersonaPlex swapped for pipecat's OpenAI STT -> LLM -> TTS.

Nothing here reaches the internet: building never connects, and the one call that talks to
"OpenAI" talks to a fake of its three endpoints on loopback (OPENAI_BASE_URL).
"""

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from aiohttp import web
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_response_universal import LLMAssistantAggregator, LLMUserAggregator
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.stt import OpenAISTTService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.workers.runner import WorkerRunner

from pipelines import builder, config
from pipelines.sim.speech import FIXTURES
from processors.audio import read_wav
from processors.llm_context import LLMContextProcessor
from transports.frames import CallInfo, PacedAudioFrame

ROOT = Path(__file__).resolve().parents[2]
RATE = 8000
SERVICES = [OpenAISTTService, LLMContextProcessor, OpenAILLMService, OpenAITTSService, LLMContextProcessor]


def load_plan(env: dict | None = None):
    return builder.plan(config.load("cascaded.yaml", env or {}))


def call_info(rate: int = RATE) -> CallInfo:
    return CallInfo(provider="exotel", stream_id="stream-1", call_id="call-1", sample_rate=rate, chunk_samples=rate // 5)


class Collect(FrameProcessor):
    """Stands in for the transport's output: keeps what reaches the end of the pipeline."""

    def __init__(self):
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        await self.push_frame(frame, direction)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails the test (loopback included)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test that must not touch it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_cascaded_config_is_valid_without_a_key():
    deployment = load_plan()
    assert [p.entry.name for p in deployment.processors] == [
        "vad", "barge_in", "pipecat.services.openai.stt.OpenAISTTService", "llm_context",
        "pipecat.services.openai.llm.OpenAILLMService", "pipecat.services.openai.tts.OpenAITTSService",
        "llm_context", "resample", "holding", "pacer"]
    assert "bot_speech" not in [p.entry.name for p in deployment.processors]
    keys = [p.params["api_key"] for p in deployment.processors if isinstance(p.params, dict)]
    assert keys == ["not-set"] * 3  # a stand-in the openai client accepts; OpenAI refuses it at the first request
    assert [p.params.role for p in deployment.processors if p.entry.name == "llm_context"] == ["user", "assistant"]


def test_cli_validate_accepts_it_with_openai_api_key_unset():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "PERSONAPLEX_URL")}
    result = subprocess.run([sys.executable, "-m", "pipelines", "validate", "configs/cascaded.yaml"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "OpenAISTTService -> llm_context -> pipecat.services.openai.llm.OpenAILLMService" in result.stdout


def test_call_processors_and_worker_build_without_network(no_network):
    deployment = load_plan({"OPENAI_API_KEY": "sk-from-env"})
    processors = builder.new_call_processors(deployment, None)
    worker = builder.new_call_worker(call_info(), processors, Collect())
    assert isinstance(worker, PipelineWorker)
    cascade = [p for p in processors if isinstance(p, (OpenAISTTService, OpenAILLMService, OpenAITTSService, LLMContextProcessor))]
    assert [type(p) for p in cascade] == SERVICES
    stt, user, llm, tts, assistant = cascade
    assert processors.index(stt) < processors.index(user) < processors.index(llm) < processors.index(tts) < processors.index(assistant)
    assert {stt._client.api_key, llm._client.api_key, tts._client.api_key} == {"sk-from-env"}
    assert isinstance(user.aggregator, LLMUserAggregator) and isinstance(assistant.aggregator, LLMAssistantAggregator)
    assert user.context is assistant.context  # one conversation per call ...
    again = builder.new_call_processors(deployment, None)
    assert again[3].context is again[6].context and again[3].context is not user.context  # ... and one per call
    assert no_network == []


async def test_user_and_assistant_halves_share_the_calls_context():
    """A caller turn through the user half, the LLM's reply through the assistant half: one context."""
    processors = builder.new_call_processors(load_plan(), None)
    user, assistant = [p for p in processors if isinstance(p, LLMContextProcessor)]
    down, _ = await run_test(user, frames_to_send=[
        VADUserStartedSpeakingFrame(start_secs=0.1),
        TranscriptionFrame("What time is it?", "caller", "2026-01-01T00:00:00Z", finalized=True),
        VADUserStoppedSpeakingFrame(stop_secs=0.2),
        SleepFrame(0.9),  # the 0.6 s turn-end pause
    ])
    runs = [f for f in down if isinstance(f, LLMContextFrame)]
    assert len(runs) == 1 and runs[0].context is assistant.context
    await run_test(assistant, frames_to_send=[
        LLMFullResponseStartFrame(), LLMTextFrame("It is "), LLMTextFrame("noon."), LLMFullResponseEndFrame()])
    messages = assistant.context.get_messages()
    assert messages == [{"role": "user", "content": "What time is it?"}, {"role": "assistant", "content": "It is noon."}]


class FakeOpenAI:
    """OpenAI's transcription, chat and speech endpoints, canned, on loopback; keeps each request."""

    def __init__(self, transcript: str, reply: str, speech_pcm: bytes):
        self.transcript, self.reply, self.speech_pcm = transcript, reply, speech_pcm
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/speech", self._speech)
        self._runner = web.AppRunner(app)

    async def start(self) -> str:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self):
        await self._runner.cleanup()

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]

    async def _transcribe(self, request: web.Request) -> web.Response:
        form = await request.post()
        wav, rate = soundfile.read(io.BytesIO(form["file"].file.read()), dtype="int16")
        self.requests.append((request.path, dict(request.headers), {"model": form["model"], "rate": rate, "secs": len(wav) / rate}))
        return web.json_response({"text": self.transcript})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, dict(request.headers), body))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        for delta, finish in (({"role": "assistant", "content": self.reply}, None), ({}, "stop")):
            chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _speech(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, dict(request.headers), body))
        return web.Response(body=self.speech_pcm, content_type="application/octet-stream")


def tone_chunks(frames: list[Frame], hz: float) -> int:
    """Paced chunks whose loudest frequency is `hz` (the fake TTS voice), not the greeting's speech."""
    count = 0
    for f in frames:
        if isinstance(f, PacedAudioFrame):
            pcm = np.frombuffer(f.audio, np.int16).astype(np.float64)
            spectrum = np.abs(np.fft.rfft(pcm))
            peak = np.fft.rfftfreq(len(pcm), 1 / f.sample_rate)[int(np.argmax(spectrum))]
            count += abs(peak - hz) < 20 and np.sqrt(np.mean(pcm**2)) > 1000
    return count


async def test_a_caller_turn_goes_through_stt_llm_and_tts_to_the_caller(monkeypatch):
    """The whole cascade on one call, with a fake OpenAI on loopback: caller speech -> VAD-cut WAV ->
    transcript in the context -> chat completion -> speech -> resampled and paced to the caller."""
    t = np.arange(int(0.8 * 24000)) / 24000
    voice = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()
    fake = FakeOpenAI("Hello, I would like to check my order status.", "It shipped yesterday.", voice)
    monkeypatch.setenv("OPENAI_BASE_URL", await fake.start())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    processors = builder.new_call_processors(load_plan({"OPENAI_API_KEY": "sk-fake"}), None)
    output = Collect()
    worker = builder.new_call_worker(call_info(), processors, output)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        said = read_wav(FIXTURES / "question_8k.wav", RATE)
        audio = np.concatenate([said, np.zeros(RATE, np.int16)])  # then a second of silence: VAD stops
        await asyncio.sleep(0.5)  # Silero loads in the background
        for i in range(0, len(audio), RATE // 50):
            await worker.queue_frame(InputAudioRawFrame(audio=audio[i:i + RATE // 50].tobytes(), sample_rate=RATE, num_channels=1))
            await asyncio.sleep(0.005)  # 4x real time
        for _ in range(200):  # 20 s at most
            if tone_chunks(output.frames, 440) >= 3:
                break
            await asyncio.sleep(0.1)
    finally:
        await worker.cancel()
        await running
        for service in processors[2], processors[4], processors[5]:
            await service._client.close()  # pipecat leaves each call's OpenAI clients to the GC
        await fake.stop()
    paths = fake.paths()
    assert paths[-2:] == ["/v1/chat/completions", "/v1/audio/speech"], paths
    assert set(paths[:-2]) == {"/v1/audio/transcriptions"}  # one WAV per VAD segment of the caller's turn
    assert {headers["Authorization"] for _, headers, _ in fake.requests} == {"Bearer sk-fake"}
    segments = [body for path, _, body in fake.requests if path.endswith("transcriptions")]
    assert {s["rate"] for s in segments} == {RATE} and 2.0 < sum(s["secs"] for s in segments) < 5.0  # at the call rate
    (_, _, chat), (_, _, tts) = fake.requests[-2:]
    assert [m["role"] for m in chat["messages"]][1:] == ["user"] and chat["stream"] is True
    assert "phone" in chat["messages"][0]["content"]  # the system instruction, from the YAML
    assert chat["messages"][1]["content"].startswith(fake.transcript)
    assert tts["input"] == "It shipped yesterday." and tts["response_format"] == "pcm"
    assert tone_chunks(output.frames, 440) >= 3  # 24 kHz speech reached the caller at 8 kHz, in 200 ms chunks
    assert {f.sample_rate for f in output.frames if isinstance(f, PacedAudioFrame)} == {RATE}
    assert [m["role"] for m in processors[6].context.get_messages()] == ["user", "assistant"]
