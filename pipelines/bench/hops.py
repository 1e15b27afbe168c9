"""`python -m pipelines bench hops`: what one processor hop costs, and what observing it adds.

A pipeline of `--processors` pass-through processors (pipecat FrameProcessors that push what they
get) carries `--frames` 100 ms Exotel-sized audio frames, queued by the worker in bursts of 50. CPU
(`time.process_time`) over the run, per frame per hop, for each way the call record can watch:

- none: no observer at all, the floor;
- queued: an observer given to pipecat the usual way (`PipelineWorker(observers=[...])`) that
  keeps the first push of a dozen rare frame types, as the call record did: pipecat queues every
  push and every process_frame for it and wakes its task;
- inline: the same filter run where the frame is pushed (processors/pipecat_adapter.py
  `observe_inline`), as the call record does now.

Rounds are interleaved (`--rounds`) and each mode's best round kept, to keep the machine's noise out
of the comparison.
"""

import asyncio
import time

from pipecat.frames.frames import EndFrame, InputAudioRawFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import WorkerRunner
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor

from pipelines.call_observer import WATCHED
from processors.pipecat_adapter import observe_inline

MODES = ("none", "queued", "inline")
BURST = 50


class _Relay(FrameProcessor):
    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class _Counted(_Relay):
    def __init__(self, frames: int):
        super().__init__()
        self.left = frames
        self.done = asyncio.Event()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.left -= 1
            if not self.left:
                self.done.set()


class _QueuedRecord(BaseObserver):
    """The record's filter behind pipecat's observer queue."""

    def __init__(self):
        super().__init__()
        self.kept = 0

    async def on_push_frame(self, data: FramePushed):
        if data.first_push and isinstance(data.frame, WATCHED):
            self.kept += 1


async def one_round(mode: str, processors: int, frames: int) -> float:
    """CPU seconds per frame per hop."""
    last = _Counted(frames)
    kept = []
    worker = PipelineWorker(Pipeline([_Relay() for _ in range(processors - 1)] + [last]),
                            observers=[_QueuedRecord()] if mode == "queued" else None,
                            enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None)
    if mode == "inline":
        observe_inline(worker, WATCHED, kept.append)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await asyncio.sleep(0.2)  # started
    pcm = bytes(1600)
    started = time.process_time()
    for i in range(frames):
        await worker.queue_frame(InputAudioRawFrame(audio=pcm, sample_rate=8000, num_channels=1))
        if i % BURST == BURST - 1:
            await asyncio.sleep(0)
    await last.done.wait()
    cpu = time.process_time() - started
    await worker.queue_frame(EndFrame())
    await running
    return cpu / frames / processors


def add_parser(subparsers):
    p = subparsers.add_parser("hops", help="CPU per processor hop, unobserved, observed through pipecat's queue, and inline",
                              description=__doc__)
    p.add_argument("--processors", type=int, default=10)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    return p


def bench_hops(args) -> int:
    from loguru import logger

    logger.remove()
    best = {mode: float("inf") for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            best[mode] = min(best[mode], asyncio.run(one_round(mode, args.processors, args.frames)))
    floor = best["none"]
    print(f"{args.processors} processors, {args.frames} frames, best of {args.rounds} rounds")
    print(f"{'observer':<10}{'us per hop':>12}{'vs none':>10}")
    for mode in MODES:
        print(f"{mode:<10}{best[mode] * 1e6:>12.2f}{best[mode] / floor:>10.2f}")
    return 0
