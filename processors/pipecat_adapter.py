"""Every use of pipecat's private attributes and internals, in one module.

Pipecat's public API does not cover three things this project needs, so they are done here and
nowhere else; tests/processors/test_pipecat_contract.py checks each name below against the
installed pipecat and fails naming the one an upgrade moved:

- **the shared Silero session**: pipecat loads an ONNX session per analyzer (~40 ms, ~11 MB a
  call); here one session per process is loaded from pipecat's model file (`silero_session`),
  before serving where a deployment has a VAD.
- **a Silero analyzer scored elsewhere** (`ScoredSileroAnalyzer`): pipecat's own thresholds,
  smoothing, state machine and model resets, with the window's confidence supplied by the
  subclass (processors/silero.py scores windows of many calls in one batch). Its model is a
  `SileroState`, our own recurrent state with the `reset_states()` pipecat's reset logic calls.
- **the VAD wiring** (`LateAnalyzerVADProcessor`): pipecat's VADProcessor wants its analyzer at
  construction and loads it in setup(); ours arrives after setup, from a worker thread.
- **naming a Pipeline** (`set_name`): pipecat's Pipeline takes no `name`.
- **observing pushes inline** (`observe_inline`): pipecat's WorkerObserver queues every push and
  every process_frame of every frame for each observer and wakes a task to hand them over, ~3.6 us
  a hop (40 % of a hop's cost, `bench hops`); the call record needs a dozen rare frame types. Here
  the worker's observer filters by type where the frame is pushed and calls the record at once.
"""

import os
import threading
import weakref
from collections.abc import Callable
from importlib import resources

import numpy as np

# onnxruntime 1.32 otherwise writes a device id under ~/.cache and may send usage events; a bridge
# on a read-only root filesystem (configs/kubernetes) must write nothing.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime  # noqa: E402
from pipecat.audio.vad.silero import SileroVADAnalyzer  # noqa: E402
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState  # noqa: E402
from pipecat.frames.frames import Frame  # noqa: E402
from pipecat.observers.base_observer import FramePushed  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.pipeline.worker_observer import WorkerObserver  # noqa: E402
from pipecat.processors.audio.vad_processor import VADProcessor  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup  # noqa: E402
from pipecat.utils.base_object import BaseObject  # noqa: E402

# Silero's model file as pipecat ships it, and the sizes pipecat's SileroOnnxModel uses with it.
SILERO_MODEL = ("pipecat.audio.vad.data", "silero_vad.onnx")
SILERO_RATES = (8000, 16000)
SILERO_CONTEXT = {8000: 32, 16000: 64}  # samples of the previous window prepended to each window

_session: onnxruntime.InferenceSession | None = None
_session_lock = threading.Lock()


def silero_model_path() -> str:
    package, name = SILERO_MODEL
    return str(resources.files(package).joinpath(name))


def silero_loaded() -> bool:
    """Whether the session is loaded already (then an analyzer costs microseconds, no worker thread)."""
    return _session is not None


def silero_session() -> onnxruntime.InferenceSession:
    """The process's Silero session, loaded on first use (pipecat's model file and options)."""
    global _session
    with _session_lock:
        if _session is None:
            options = onnxruntime.SessionOptions()
            options.inter_op_num_threads = options.intra_op_num_threads = 1
            _session = onnxruntime.InferenceSession(silero_model_path(), providers=["CPUExecutionProvider"], sess_options=options)
        return _session


class SileroState:
    """One stream's Silero recurrent state and audio context (no session of its own).

    Stands where pipecat's analyzer keeps its SileroOnnxModel (`_model`): pipecat's model-reset
    logic calls `reset_states()` on it.
    """

    def __init__(self):
        self.reset_states()

    def reset_states(self):
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros((1, 0), np.float32)
        self.rate = 0


class ScoredSileroAnalyzer(SileroVADAnalyzer):
    """Pipecat's Silero analyzer (its thresholds, smoothing, state machine and model resets) with
    each 32 ms window's confidence from `score()`, which a subclass supplies."""

    def __init__(self, *, params: VADParams):
        VADAnalyzer.__init__(self, params=params)  # not SileroVADAnalyzer's: it loads a session per call
        self._model = SileroState()
        self._windows_since_reset = 0
        self._low_confidence_windows = 0
        self._score = 0.0
        self.voiced = False  # the last window's verdict: STARTING or SPEAKING, not STOPPING or QUIET

    @property
    def state(self) -> SileroState:
        return self._model

    async def score(self, samples: np.ndarray) -> float:
        """Speech probability of one window (float32 samples at `sample_rate`), `state` advanced."""
        raise NotImplementedError

    async def analyze_audio(self, buffer: bytes) -> VADState:
        data, self._vad_buffer = self._vad_buffer + buffer, b""
        size = self._vad_frames_num_bytes
        state = self._vad_state
        while len(data) >= size:
            window, data = data[:size], data[size:]
            samples = np.frombuffer(window, np.int16).astype(np.float32) / 32768.0
            self._score = await self.score(samples)
            state = run_state_machine(self, window)  # pipecat's, one window at a time
            self.voiced = state in (VADState.STARTING, VADState.SPEAKING)
        self._vad_buffer = data
        return state

    def voice_confidence(self, buffer) -> float:
        self._maybe_reset_model(self._score)  # pipecat's: resets `state` in clear non-speech
        return self._score

    async def cleanup(self):
        pass  # no executor of its own to shut down


def run_state_machine(analyzer: VADAnalyzer, window: bytes) -> VADState:
    """Pipecat's VAD state machine on one window (it calls the analyzer's voice_confidence)."""
    return analyzer._run_analyzer(window)


class LateAnalyzerVADProcessor(VADProcessor):
    """Pipecat's VADProcessor (its controller, speech frames and idle timeout) whose analyzer is
    attached after setup() rather than given at construction."""

    def __init__(self, **kwargs):
        super().__init__(vad_analyzer=None, **kwargs)  # type: ignore[arg-type]

    async def setup_without_analyzer(self, setup: FrameProcessorSetup):
        """FrameProcessor's setup only: pipecat's VADProcessor.setup would set up the (absent) analyzer."""
        await FrameProcessor.setup(self, setup)

    async def attach_analyzer(self, analyzer: VADAnalyzer, setup: FrameProcessorSetup):
        """Give the controller its analyzer and set it up."""
        self._vad_controller._vad_analyzer = analyzer
        await self._vad_controller.setup(setup)

    async def start_vad(self):
        """Start the controller, as pipecat's VADProcessor does on the StartFrame (which has passed)."""
        await self._vad_controller.start()

    async def process_without_vad(self, frame: Frame, direction: FrameDirection):
        """FrameProcessor's bookkeeping for a frame (StartFrame, cancel...), without the VAD's."""
        await FrameProcessor.process_frame(self, frame, direction)


def set_name(processor: BaseObject, name: str):
    """Name a processor whose constructor takes no `name` (pipecat's Pipeline)."""
    processor._name = name


class InlineObserver(WorkerObserver):
    """The worker's observer, calling `on_push` synchronously on the first push of `watched` frames.

    Observers added the usual way (`PipelineWorker(observers=...)`, `add_observer`) still get every
    frame through pipecat's queues; with none, a hop costs a type check.
    """

    def __init__(self, watched: tuple[type[Frame], ...], on_push: Callable[[FramePushed], None]):
        super().__init__()
        self._watched = watched
        self._on_push = on_push
        self._seen: weakref.WeakValueDictionary[int, Frame] = weakref.WeakValueDictionary()

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if isinstance(frame, self._watched) and frame.id not in self._seen:
            self._seen[frame.id] = frame
            self._on_push(data)
        if self._proxies:
            await super().on_push_frame(data)

    async def on_process_frame(self, data):
        if self._proxies:
            await super().on_process_frame(data)


def observe_inline(worker: PipelineWorker, watched: tuple[type[Frame], ...], on_push: Callable[[FramePushed], None]):
    """Make `worker`'s processors report pushes of `watched` frames to `on_push` (before it starts)."""
    worker._observer = InlineObserver(watched, on_push)
