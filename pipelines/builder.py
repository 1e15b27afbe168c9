"""Turn a validated deployment into one fresh pipeline per call.

Processor parameters are validated once at load time (so `validate` and `run` fail with the line
of the bad key) and instantiated anew for every call: processors keep per-call state.
"""

import copy
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pydantic import BaseModel, BeforeValidator, ConfigDict, create_model

from pipelines.config import CONFIG_DIR, LoadedConfig
from pipelines.errors import did_you_mean, model_fields
from pipelines.registry import ProcessorEntry, UnknownName, find_processor, find_transport
from processors.errors import ParamsError
from processors.personaplex.pool import PoolParams
from processors.personaplex.pools import EnginePools
from processors.pipecat_adapter import observe_inline
from transports.frames import CallInfo


@dataclass
class ProcessorPlan:
    entry: ProcessorEntry
    params: BaseModel | dict[str, Any]
    name: str | None
    prepared: Any = None  # what the class's `prepare(params, config_dir)` made once for all calls

    @property
    def stats_name(self) -> str:
        """The key of its processor's stats in logs and /stats: the YAML's `name`, else its type."""
        return self.name or self.entry.name


@dataclass
class DeploymentPlan:
    loaded: LoadedConfig
    transport_params: BaseModel
    processors: list[ProcessorPlan]

    @property
    def transport(self):
        return find_transport(self.loaded.config.transport.type)

    def stats_names(self) -> list[str]:
        """Each processor's stats key, in the order `new_call_processors` builds them."""
        return [p.stats_name for p in self.processors]

    def new_protocol(self, query: dict[str, str]):
        return self.transport.protocol(self.transport_params, query)


def plan(loaded: LoadedConfig) -> DeploymentPlan:
    """Resolve every name and validate every `params:` block; raises ConfigError with the line."""
    cfg = loaded.config
    try:
        transport = find_transport(cfg.transport.type)
    except UnknownName as exc:
        raise loaded.error(("transport", "type"), str(exc)) from None
    transport_params = loaded.validate_model(transport.params, cfg.transport.params, ("transport", "params"))
    plans = []
    for i, spec in enumerate(cfg.processors):
        try:
            entry = find_processor(spec.type)
        except UnknownName as exc:
            raise loaded.error(("processors", i, "type"), str(exc)) from None
        loc = ("processors", i, "params")
        prepared = None
        if entry.params is not None:
            params: BaseModel | dict = loaded.validate_model(entry.params, spec.params, loc)
            prepared = _prepare(loaded, entry, params, loc, [p.prepared for p in plans])
        else:
            params = _check_kwargs(loaded, entry, spec.params, loc)
        plans.append(ProcessorPlan(entry, params, spec.name, prepared))
    return DeploymentPlan(loaded, transport_params, plans)


def _prepare(loaded: LoadedConfig, entry: ProcessorEntry, params: BaseModel, loc: tuple, earlier: list) -> Any:
    """Start-up work a processor shares between calls (e.g. rendered clips), done before serving.
    A `prepare` that takes `earlier` also gets what this plan prepared before it, in list order
    (llm_context pairs its halves so): whatever processors share, they share within one plan."""
    prepare = getattr(entry.cls, "prepare", None)
    if prepare is None:
        return None
    kwargs = {"earlier": list(earlier)} if "earlier" in inspect.signature(prepare).parameters else {}
    try:
        return prepare(params, loaded.path.parent, CONFIG_DIR, **kwargs)
    except ParamsError as exc:
        raise loaded.error(loc + exc.loc, exc.problem) from None


def kwargs_model(cls) -> type[BaseModel]:
    """The keyword arguments of every __init__ in the MRO as a pydantic model, typed by their
    annotations: pipecat's BaseObject swallows unknown **kwargs, and nested `settings`/`params`
    (pydantic models or dataclasses) are built from YAML mappings. An annotation pydantic cannot
    check is taken as Any; the throwaway instance in `_check_kwargs` still tries the value."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    fields: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that names what its module does not import
            hints = {}
        for p in inspect.signature(init).parameters.values():
            if p.kind not in kinds or p.name == "self" or p.name in fields:
                continue
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (_checkable(hints.get(p.name, Any)), default)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Kwargs", __config__=config, **fields)


def _checkable(annotation: Any) -> Any:
    """The annotation where pydantic can check it; else Any, with mappings built into the dataclass
    or model the annotation names (pipecat's settings dataclasses hold types pydantic cannot resolve)."""
    try:  # a model of one field: complete only when pydantic can resolve every type inside it
        probe = create_model("Probe", __config__=ConfigDict(arbitrary_types_allowed=True), value=(annotation, None))
        if probe.__pydantic_complete__:
            return annotation
    except Exception:  # pydantic cannot build a validator for it
        pass
    target = next((t for t in (annotation, *typing.get_args(annotation)) if model_fields(t)), None)
    return Any if target is None else Annotated[Any, BeforeValidator(functools.partial(_build, target))]


def _build(target: type, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    known = list(model_fields(target))
    for key in value:
        if key not in known:
            raise ValueError(f"{target.__name__} has no key {key!r}{did_you_mean(key, known)}")
    try:
        return target.model_validate(value) if issubclass(target, BaseModel) else target(**value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{target.__name__}: {exc}") from None


def _check_kwargs(loaded: LoadedConfig, entry: ProcessorEntry, params: dict, loc: tuple) -> dict[str, Any]:
    """Keys and values against the class's annotations, then one throwaway instance for the rest;
    the keyword arguments as validated (nested models built)."""
    model = kwargs_model(entry.cls)
    validated = loaded.validate_model(model, params, loc)
    kwargs = {key: getattr(validated, key) for key in params}
    try:
        entry.cls(**copy.deepcopy(kwargs))
    except Exception as exc:  # whatever the class raises on values it refuses
        raise loaded.error(loc, f"{entry.name}: {type(exc).__name__}: {exc}") from None
    return kwargs


def _takes_engine(p: ProcessorPlan) -> bool:
    return isinstance(p.params, BaseModel) and "engines" in inspect.signature(p.entry.cls).parameters


def uses_engine(deployment: DeploymentPlan) -> bool:
    """Whether any processor talks to the deployment's engine (else no reference engine is started)."""
    return any(_takes_engine(p) for p in deployment.processors)


def engine_pools(deployment: DeploymentPlan, params: PoolParams | None) -> EnginePools:
    """Every pool the calls will lease from, made before serving, so that an engine listed in two
    pools (engine.urls and a processor's url) fails at start-up with its line, not on a call."""
    pools = EnginePools(params)
    for i, p in enumerate(deployment.processors):
        if _takes_engine(p):
            try:
                pools.get(getattr(p.params, "url", None))
            except ValueError as exc:
                raise deployment.loaded.error(("processors", i, "params", "url"), str(exc)) from None
    return pools


def new_processor(p: ProcessorPlan, engines: EnginePools) -> FrameProcessor:
    kwargs: dict[str, Any] = {"name": p.name} if p.name else {}
    if isinstance(p.params, BaseModel):
        if _takes_engine(p):
            kwargs["engines"] = engines.get(getattr(p.params, "url", None))
        if p.prepared is not None:
            kwargs["prepared"] = p.prepared
        processor = p.entry.cls(p.params, **kwargs)  # params are read-only; one model serves every call
    else:
        processor = p.entry.cls(**copy.deepcopy(p.params), **kwargs)  # per call: services may change their settings
    return processor  # nothing written onto it: its stats key is the plan's (DeploymentPlan.stats_names)


def new_call_processors(deployment: DeploymentPlan, engines: EnginePools) -> list[FrameProcessor]:
    return [new_processor(p, engines) for p in deployment.processors]


def new_call_worker(call: CallInfo, processors: list[FrameProcessor], output: FrameProcessor, observer=None) -> PipelineWorker:
    """The call's pipeline: configured processors, then the transport's output. `observer`: its
    `record(FramePushed)` gets the first push of each of its `WATCHED` frame types, inline."""
    params = PipelineParams(
        audio_in_sample_rate=call.sample_rate,
        audio_out_sample_rate=call.sample_rate,
        start_metadata=call.start_metadata(),
    )
    worker = PipelineWorker(
        Pipeline([*processors, output]),
        params=params,
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
        conversation_id=call.call_id,
    )
    if observer is not None:
        observe_inline(worker, observer.WATCHED, observer.record)
    return worker
