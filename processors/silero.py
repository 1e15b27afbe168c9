"""Silero VAD for many calls at once: one ONNX session per process, windows scored in batches.

Pipecat gives every call its own ONNX session: ~40 ms of blocking load, ~11 MB each, and RSS that
ratchets up ~11 MB per finished call (measured on pipecat 1.14); each 32 ms window is then a
separate run (~140 µs on this machine, most of it per-run overhead) and a thread hand-off. Here
every call keeps only Silero's recurrent state and audio context, and the windows that calls have
waiting are scored together in one run of the shared session (a batch of 32 costs ~38 µs per
window). A batch goes out as soon as the previous one is back, so a quiet server adds no delay and a
busy one gets bigger batches. Each call's windows are scored in order, one per batch, so its
confidences are exactly those of pipecat's own analyzer fed 32 ms at a time.
"""

import asyncio
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np

# onnxruntime 1.32 otherwise writes a device id under ~/.cache and may send usage events; a bridge
# on a read-only root filesystem (configs/kubernetes) must write nothing.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime  # noqa: E402
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

RATES = (8000, 16000)
_CONTEXT = {8000: 32, 16000: 64}  # samples of the previous window Silero prepends (as pipecat's wrapper)
_RUNNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero")  # ONNX releases the GIL meanwhile
_session: onnxruntime.InferenceSession | None = None
_session_lock = threading.Lock()


def silero_session() -> onnxruntime.InferenceSession:
    """The process's Silero session, loaded on first use (pipecat's model file and options)."""
    global _session
    with _session_lock:
        if _session is None:
            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = options.intra_op_num_threads = 1
            path = str(resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx"))
            _session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=options)
        return _session


class CallState(SileroOnnxModel):
    """One call's recurrent state and context; pipecat's reset_states() still applies."""

    def __init__(self):  # no session of its own
        self.sample_rates = list(RATES)
        self.reset_states()


class SileroBatcher:
    """Scores windows from many calls in shared runs, on one event loop."""

    def __init__(self):
        self._waiting: list[tuple[CallState, np.ndarray, int, asyncio.Future]] = []
        self._running = False
        self.runs = 0
        self.windows = 0

    async def score(self, state: CallState, window: np.ndarray, rate: int) -> float:
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
        context = _CONTEXT[rate]
        for state, *_ in group:
            if state._last_sr != rate or state._context.shape[1] != context:
                state.reset_states()
                state._context = np.zeros((1, context), np.float32)
        x = np.concatenate([np.concatenate((s._context, w[None, :]), axis=1) for s, w, _, _ in group])
        states = np.concatenate([s._state for s, *_ in group], axis=1)
        inputs = {"input": x, "state": states, "sr": np.array(rate, dtype=np.int64)}
        try:
            out, new_states = await asyncio.get_running_loop().run_in_executor(_RUNNER, silero_session().run, None, inputs)
        except Exception as exc:  # every waiting call hears about it, none hangs
            for *_, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        self.runs += 1
        self.windows += len(group)
        for i, (state, _, _, future) in enumerate(group):
            state._state = new_states[:, i : i + 1, :].copy()
            state._context = x[i : i + 1, -context:].copy()
            state._last_sr = rate
            if not future.done():  # the call may have hung up meanwhile
                future.set_result(float(out[i, 0]))


_batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SileroBatcher]" = weakref.WeakKeyDictionary()


def batcher() -> SileroBatcher:
    """The running loop's batcher (a server has one loop; each test has its own)."""
    loop = asyncio.get_running_loop()
    if loop not in _batchers:
        _batchers[loop] = SileroBatcher()
    return _batchers[loop]


class BatchedSileroAnalyzer(SileroVADAnalyzer):
    """Pipecat's Silero analyzer (its thresholds, smoothing and model resets), scored by the batcher."""

    def __init__(self, *, params: VADParams):
        VADAnalyzer.__init__(self, params=params)  # not SileroVADAnalyzer's: it loads a session per call
        self._model = CallState()
        self._windows_since_reset = 0
        self._low_confidence_windows = 0
        self._score = 0.0
        self.voiced = False  # the last window's verdict: STARTING or SPEAKING, not STOPPING or QUIET
        silero_session()  # the first call loads it (in the caller's worker thread)

    async def analyze_audio(self, buffer: bytes) -> VADState:
        data, self._vad_buffer = self._vad_buffer + buffer, b""
        size = self._vad_frames_num_bytes
        state = self._vad_state
        while len(data) >= size:
            window, data = data[:size], data[size:]
            samples = np.frombuffer(window, np.int16).astype(np.float32) / 32768.0
            self._score = await batcher().score(self._model, samples, self.sample_rate)
            state = self._run_analyzer(window)  # pipecat's state machine, one window at a time
            self.voiced = state in (VADState.STARTING, VADState.SPEAKING)
        self._vad_buffer = data
        return state

    def voice_confidence(self, buffer) -> float:
        self._maybe_reset_model(self._score)
        return self._score

    async def cleanup(self):
        pass  # no executor of its own to shut down
