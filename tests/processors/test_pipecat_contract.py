"""What processors/pipecat_adapter.py relies on in pipecat, checked against the installed pipecat.

Each check names the private attribute or signature it needs, so a pipecat upgrade that moves one
fails here, saying which, rather than as a strange VAD or a call that never hears the caller.
"""

import asyncio
import inspect
from importlib import resources

import numpy as np
import pipecat
import pytest
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState
from pipecat.audio.vad.vad_controller import VADController
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, TextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import WorkerRunner
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor

from processors import pipecat_adapter
from processors.pipecat_adapter import SILERO_CONTEXT, SILERO_MODEL, SileroState

VERSION = getattr(pipecat, "__version__", "?")


def need(condition: bool, what: str):
    assert condition, f"pipecat {VERSION}: processors/pipecat_adapter.py relies on {what}, which this pipecat no longer has"


def analyzer(rate: int = 16000) -> SileroVADAnalyzer:
    a = pipecat_adapter.ScoredSileroAnalyzer(params=VADParams())
    a.set_sample_rate(rate)
    return a


# ---- the VAD wiring -------------------------------------------------------------------------


def test_vad_processor_takes_its_analyzer_as_vad_analyzer():
    need("vad_analyzer" in inspect.signature(VADProcessor.__init__).parameters, "VADProcessor.__init__(vad_analyzer=...)")


def test_vad_processor_keeps_a_controller_as_vad_controller():
    processor = VADProcessor(vad_analyzer=None)
    controller = getattr(processor, "_vad_controller", None)
    need(isinstance(controller, VADController), "VADProcessor._vad_controller (a VADController)")
    need(hasattr(controller, "_vad_analyzer"), "VADController._vad_analyzer")
    for method in ("setup", "start", "stop", "cleanup", "process_frame"):
        need(inspect.iscoroutinefunction(getattr(controller, method, None)), f"async VADController.{method}")


def test_vad_controller_sets_its_analyzer_up_from_the_stored_attribute():
    # attach_analyzer writes _vad_analyzer and calls setup(): setup must read it back
    need("_vad_analyzer" in inspect.getsource(VADController.setup), "VADController.setup using self._vad_analyzer")


def test_vad_processor_setup_is_frame_processor_setup_plus_the_controllers():
    # setup_without_analyzer and process_without_vad skip VADProcessor's override for FrameProcessor's
    source = inspect.getsource(VADProcessor.setup)
    need("super().setup(setup)" in source and "_vad_controller.setup(setup)" in source,
         "VADProcessor.setup = FrameProcessor.setup + _vad_controller.setup")
    need(VADProcessor.__mro__[1] is FrameProcessor, "VADProcessor subclassing FrameProcessor directly")
    need("_vad_controller.start()" in inspect.getsource(VADProcessor.process_frame), "VADProcessor starting _vad_controller on StartFrame")


# ---- the Silero analyzer scored elsewhere ---------------------------------------------------


@pytest.mark.parametrize("name, kind", [("_vad_buffer", bytes), ("_vad_frames_num_bytes", int), ("_vad_state", VADState)])
def test_vad_analyzer_keeps_its_window_state_in(name, kind):
    need(isinstance(getattr(analyzer(), name, None), kind), f"VADAnalyzer.{name} ({kind.__name__})")


def test_vad_analyzer_runs_its_state_machine_in_run_analyzer():
    need(callable(getattr(VADAnalyzer, "_run_analyzer", None)), "VADAnalyzer._run_analyzer(buffer)")
    a, asked = analyzer(), []
    a.voice_confidence = lambda buffer: asked.append(len(buffer)) or 1.0  # the state machine must ask us
    state = pipecat_adapter.run_state_machine(a, bytes(a._vad_frames_num_bytes))
    need(asked == [a._vad_frames_num_bytes], "VADAnalyzer._run_analyzer calling voice_confidence once per window")
    need(isinstance(state, VADState), "VADAnalyzer._run_analyzer returning a VADState")


def test_silero_analyzer_resets_its_model_through_maybe_reset_model():
    need(callable(getattr(SileroVADAnalyzer, "_maybe_reset_model", None)), "SileroVADAnalyzer._maybe_reset_model(confidence)")
    a = analyzer()
    for name in ("_windows_since_reset", "_low_confidence_windows"):
        need(name in inspect.getsource(SileroVADAnalyzer._maybe_reset_model), f"SileroVADAnalyzer.{name}")
    a.state.rate = 16000
    for _ in range(200):  # > 2 s of clear non-speech while quiet: a reset is due
        a._maybe_reset_model(0.0)
    need(a.state.rate == 0, "SileroVADAnalyzer._maybe_reset_model calling self._model.reset_states()")


def test_silero_model_file_and_context_are_where_the_adapter_looks():
    package, name = SILERO_MODEL
    need(resources.files(package).joinpath(name).is_file(), f"the model file {package}/{name}")
    model = SileroOnnxModel(pipecat_adapter.silero_model_path())
    for rate, window in ((8000, 256), (16000, 512)):
        model(np.zeros(window, np.float32), rate)
        need(model._context.shape[1] == SILERO_CONTEXT[rate], f"SileroOnnxModel._context of {SILERO_CONTEXT[rate]} samples at {rate} Hz")


def test_the_shared_session_scores_as_pipecats_model():
    from processors.silero import score_now

    model = SileroOnnxModel(pipecat_adapter.silero_model_path())
    state = SileroState()
    rng = np.random.default_rng(1)
    for _ in range(5):
        window = (rng.standard_normal(512) * 0.1).astype(np.float32)
        need(np.isclose(score_now(state, window, 16000), float(model(window, 16000)[0, 0]), atol=1e-6),
             "SileroOnnxModel's inputs (context + window, state, sr)")


# ---- naming a Pipeline ----------------------------------------------------------------------


def test_a_pipelines_name_is_its_name_attribute():
    pipeline = Pipeline([])
    pipecat_adapter.set_name(pipeline, "llm_context")
    need(pipeline.name == "llm_context", "BaseObject._name behind .name")


# ---- observing pushes inline ------------------------------------------------------------------


def test_the_worker_hands_its_observer_to_the_processors_as_observer():
    need("self._observer = WorkerObserver(" in inspect.getsource(PipelineWorker.__init__), "PipelineWorker._observer (a WorkerObserver)")
    need("observer=self._observer" in inspect.getsource(PipelineWorker), "PipelineWorker passing _observer in FrameProcessorSetup")


async def test_an_inline_observer_sees_each_watched_frame_once_where_it_is_pushed():
    class Relay(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)

    class Speaker(Relay):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                await self.push_frame(TextFrame(text="hi"))

    seen = []
    relays = [Relay(), Speaker(), Relay(), Relay()]
    worker = PipelineWorker(Pipeline(relays), enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None)
    pipecat_adapter.observe_inline(worker, (TextFrame,), lambda data: seen.append((data.frame.text, data.source)))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await worker.queue_frames([InputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1), EndFrame()])
    await asyncio.wait_for(running, 10)
    need(seen == [("hi", relays[1])], "FrameProcessor pushing through _setup.observer.on_push_frame")
