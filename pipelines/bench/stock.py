"""A stock pipecat Exotel bot: the baseline that BENCHMARKS.md compares our barge-in against.

Stock means what pipecat's own telephony examples build, with pipecat's defaults everywhere: FastAPI +
uvicorn, `FastAPIWebsocketTransport` with `ExotelFrameSerializer`, `VADProcessor(SileroVADAnalyzer())` and
`UserTurnProcessor` (VAD start, 0.6 s speech timeout stop). In place of a speech-to-speech service, `Bot`
plays a clip the way a fast TTS does: `TTSStartedFrame`, 40 ms `TTSAudioRawFrame`s at 24 kHz pushed at
8x real time, `TTSStoppedFrame`; an `InterruptionFrame` stops it. The same simulated caller
(pipelines/sim/caller.py) dials this server and ours.

    python -m pipelines.bench.stock --port 5060 [--host 127.0.0.1] [--speak-at 1.0] [--script-wav PATH]
"""

import argparse
import asyncio
import json
import socket
import sys

import numpy as np
from loguru import logger

TTS_RATE = 24000
FRAME_SAMPLES = TTS_RATE * 40 // 1000
SPEEDUP = 8.0  # a fast TTS/S2S produces audio this many times faster than real time
CLIP_SECONDS = 6.0  # the default clip is pipecat's short speech sample repeated to about this long


def stock_server_command(port: int, speak_at: float, script_wav: str | None) -> list[str]:
    """The argv that serves the stock baseline on 127.0.0.1:`port`; it prints a `serving ...` line when ready."""
    command = [sys.executable, "-m", "pipelines.bench.stock", "--port", str(port), "--speak-at", str(speak_at)]
    return command + (["--script-wav", str(script_wav)] if script_wav else [])


def load_clip(script_wav: str | None) -> np.ndarray:
    """The bot's speech: `script_wav`, or pipecat's speech sample repeated to ~6 s; int16 at 24 kHz, whole 40 ms frames."""
    from processors.audio import PIPECAT_SPEECH_WAV, read_wav

    if script_wav:
        clip = read_wav(script_wav, TTS_RATE)
    else:
        sample = read_wav(PIPECAT_SPEECH_WAV, TTS_RATE)
        clip = np.tile(sample, max(1, round(CLIP_SECONDS * TTS_RATE / len(sample))))
    return np.concatenate([clip, np.zeros(-len(clip) % FRAME_SAMPLES, np.int16)])


def make_bot(clip: np.ndarray, speak_at: float):
    """A FrameProcessor standing in for a speech-to-speech service; caller audio passes through it untouched."""
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        InterruptionFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameProcessor

    class Bot(FrameProcessor):
        def __init__(self):
            super().__init__()
            self._speaking: asyncio.Task | None = None

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, (InterruptionFrame, EndFrame, CancelFrame)) and self._speaking:
                await self.cancel_task(self._speaking)
                self._speaking = None
            await self.push_frame(frame, direction)
            if isinstance(frame, StartFrame):
                self._speaking = self.create_task(self._speak())

        async def _speak(self):
            await asyncio.sleep(speak_at)
            await self.push_frame(TTSStartedFrame())
            for i in range(0, len(clip), FRAME_SAMPLES):
                pcm = clip[i : i + FRAME_SAMPLES].tobytes()
                await self.push_frame(TTSAudioRawFrame(audio=pcm, sample_rate=TTS_RATE, num_channels=1))
                await asyncio.sleep(FRAME_SAMPLES / TTS_RATE / SPEEDUP)
            await self.push_frame(TTSStoppedFrame())
            self._speaking = None

    return Bot()


async def run_call(websocket, clip: np.ndarray, speak_at: float) -> None:
    """One Exotel call: read `connected`/`start`, then run the stock pipeline until the caller hangs up."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.serializers.exotel import ExotelFrameSerializer
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
    from pipecat.turns.user_start import VADUserTurnStartStrategy
    from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_processor import UserTurnProcessor
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from pipecat.workers.runner import WorkerRunner

    await websocket.accept()
    message = {}
    while message.get("event") != "start":  # Exotel sends `connected` first
        message = json.loads(await websocket.receive_text())
    start = message["start"]
    rate = int(start["media_format"]["sample_rate"])
    serializer = ExotelFrameSerializer(
        start["stream_sid"], start["call_sid"], params=ExotelFrameSerializer.InputParams(exotel_sample_rate=rate)
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer),
    )
    turns = UserTurnProcessor(
        user_turn_strategies=UserTurnStrategies(
            start=[VADUserTurnStartStrategy()],
            stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.6, wait_for_transcript=False)],
        )
    )
    pipeline = Pipeline([
        transport.input(),
        VADProcessor(vad_analyzer=SileroVADAnalyzer()),
        turns,
        make_bot(clip, speak_at),
        transport.output(),
    ])
    in_rate = min(rate, 16000)  # Silero takes 8 or 16 kHz only: a 24 kHz call is resampled by the serializer
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=in_rate, audio_out_sample_rate=rate))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await runner.cancel()

    await runner.run()


async def serve(args) -> None:
    from pipelines.extras import require

    for module in ("fastapi", "uvicorn"):
        require(module, "bench", "the stock pipecat baseline")
    import uvicorn
    from fastapi import FastAPI, WebSocket

    clip = load_clip(args.script_wav)
    app = FastAPI()

    @app.websocket("/{path:path}")  # /exotel, or any other path
    async def call(websocket: WebSocket):
        await run_call(websocket, clip, args.speak_at)

    sock = socket.create_server((args.host, args.port))
    print(f"serving stock pipecat Exotel calls on ws://{args.host}:{sock.getsockname()[1]}/exotel", flush=True)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", lifespan="off")
    await uvicorn.Server(config).serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench.stock", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--speak-at", type=float, default=1.0, help="seconds after the pipeline starts that the bot speaks")
    p.add_argument("--script-wav", help="what the bot says (default: pipecat's speech sample repeated to ~6 s)")
    p.add_argument("--verbose", action="store_true", help="log at INFO (default WARNING)")
    args = p.parse_args(argv)
    logger.remove()  # before pipecat is imported, so its import-time banner obeys the level too
    logger.add(sys.stderr, level="INFO" if args.verbose else "WARNING")
    from pipelines.extras import MissingExtra

    try:
        asyncio.run(serve(args))
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
