"""Silero VAD for many calls at once: one ONNX session per process, windows scored in batches.

Pipecat gives every call its own ONNX session: ~40 ms of blocking load, ~11 MB each, and RSS that
ratchets up ~11 MB per finished call (measured on pipecat 1.14); each 32 ms window is then a
separate run (~140 µs on this machine, most of it per-run overhead) and a thread hand-off. Here
every call keeps only Silero's recurrent state and audio context, and the windows that calls have
waiting are scored together in one run of the shared session (a batch of 32 costs ~38 µs per
window). A batch goes out as soon as the previous one is back, so a quiet server adds no delay and a
busy one gets bigger batches. Each call's windows are scored in order, one per batch, so its
confidences are exactly those of pipecat's own analyzer fed 32 ms at a time.

What this needs of pipecat's internals (its model file, its analyzer's state machine and resets) is
in processors/pipecat_adapter.py; here is only Silero's own arithmetic and the batching.
"""

import asyncio
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from processors.pipecat_adapter import SILERO_CONTEXT, SILERO_RATES, ScoredSileroAnalyzer, SileroState, silero_session

RATES = SILERO_RATES
_RUNNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero")  # ONNX releases the GIL meanwhile
__all__ = ["RATES", "BatchedSileroAnalyzer", "SileroBatcher", "SileroState", "batcher", "score_now", "silero_session"]


def _inputs(group: list[tuple[SileroState, np.ndarray]], rate: int) -> dict[str, np.ndarray]:
    """One run's inputs: each stream's context before its window (a fresh context after a rate change)."""
    context = SILERO_CONTEXT[rate]
    for state, _ in group:
        if state.rate != rate or state.context.shape[1] != context:
            state.reset_states()
            state.context = np.zeros((1, context), np.float32)
    x = np.concatenate([np.concatenate((s.context, w[None, :]), axis=1) for s, w in group])
    states = np.concatenate([s.state for s, _ in group], axis=1)
    return {"input": x, "state": states, "sr": np.array(rate, dtype=np.int64)}


def _advance(group: list[tuple[SileroState, np.ndarray]], rate: int, inputs: dict, new_states: np.ndarray):
    context = SILERO_CONTEXT[rate]
    for i, (state, _) in enumerate(group):
        state.state = new_states[:, i : i + 1, :].copy()
        state.context = inputs["input"][i : i + 1, -context:].copy()
        state.rate = rate


def score_now(state: SileroState, window: np.ndarray, rate: int) -> float:
    """One window scored synchronously on the shared session (as pipecat's SileroOnnxModel would)."""
    group = [(state, window)]
    inputs = _inputs(group, rate)
    out, new_states = silero_session().run(None, inputs)
    _advance(group, rate, inputs, new_states)
    return float(out[0, 0])


class SileroBatcher:
    """Scores windows from many calls in shared runs, on one event loop."""

    def __init__(self):
        self._waiting: list[tuple[SileroState, np.ndarray, int, asyncio.Future]] = []
        self._running = False
        self.runs = 0
        self.windows = 0

    async def score(self, state: SileroState, window: np.ndarray, rate: int) -> float:
        """Speech probability of one window (float32 samples) of this call, its state advanced."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((state, window, rate, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain(), name="silero-batch")
        return await future

    async def _drain(self):
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                for rate in RATES:
                    group = [item for item in batch if item[2] == rate]
                    if group:
                        await self._run(group, rate)
        finally:
            self._running = False

    async def _run(self, group: list, rate: int):
        pairs = [(state, window) for state, window, _, _ in group]
        inputs = _inputs(pairs, rate)
        try:
            out, new_states = await asyncio.get_running_loop().run_in_executor(_RUNNER, silero_session().run, None, inputs)
        except Exception as exc:  # every waiting call hears about it, none hangs
            for *_, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        self.runs += 1
        self.windows += len(group)
        _advance(pairs, rate, inputs, new_states)
        for i, (*_, future) in enumerate(group):
            if not future.done():  # the call may have hung up meanwhile
                future.set_result(float(out[i, 0]))


_batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SileroBatcher]" = weakref.WeakKeyDictionary()


def batcher() -> SileroBatcher:
    """The running loop's batcher (a server has one loop; each test has its own)."""
    loop = asyncio.get_running_loop()
    if loop not in _batchers:
        _batchers[loop] = SileroBatcher()
    return _batchers[loop]


class BatchedSileroAnalyzer(ScoredSileroAnalyzer):
    """Pipecat's Silero analyzer (its thresholds, smoothing and model resets), scored by the batcher."""

    def __init__(self, *, params):
        super().__init__(params=params)
        silero_session()  # the first call loads it (in the caller's worker thread)

    async def score(self, samples: np.ndarray) -> float:
        return await batcher().score(self.state, samples, self.sample_rate)
