"""Short names for the processors and transports a YAML file may use.

A processor is registered with the pydantic model of its parameters, which is also its YAML schema.
Anything else is reached by dotted import path (`package.module.Class` or `package.module:Class`),
so any pipecat FrameProcessor can be dropped into a pipeline; its `params:` become keyword arguments.
"""

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from pipecat.processors.frame_processor import FrameProcessor
from pydantic import BaseModel

from pipelines.errors import nearest


@dataclass(frozen=True)
class ProcessorEntry:
    name: str
    cls: type[FrameProcessor]
    params: type[BaseModel] | None
    summary: str


@dataclass(frozen=True)
class TransportEntry:
    name: str
    protocol: type
    params: type[BaseModel]
    summary: str


def _summary(obj) -> str:
    return (inspect.getdoc(obj) or "").split("\n", 1)[0]


def processors() -> dict[str, ProcessorEntry]:
    from processors.barge_in import BargeInProcessor
    from processors.bot_speech import BotSpeechProcessor
    from processors.call_actions import CallActionsProcessor
    from processors.holding import HoldingProcessor
    from processors.llm_context import LLMContextProcessor
    from processors.pacer import PacerProcessor
    from processors.personaplex.processor import PersonaPlexProcessor
    from processors.resample import ResampleProcessor
    from processors.turn import TurnProcessor
    from processors.vad import VADProcessor

    classes = {
        "vad": VADProcessor,
        "turn": TurnProcessor,
        "barge_in": BargeInProcessor,
        "resample": ResampleProcessor,
        "personaplex": PersonaPlexProcessor,
        "bot_speech": BotSpeechProcessor,
        "holding": HoldingProcessor,
        "call_actions": CallActionsProcessor,
        "pacer": PacerProcessor,
        "llm_context": LLMContextProcessor,
    }
    return {name: ProcessorEntry(name, cls, cls.Params, _summary(cls)) for name, cls in classes.items()}


def transports() -> dict[str, TransportEntry]:
    from transports.browser import BrowserParams, BrowserProtocol
    from transports.exotel import ExotelParams, ExotelProtocol
    from transports.twilio import TwilioParams, TwilioProtocol

    entries = [
        TransportEntry("exotel", ExotelProtocol, ExotelParams, _summary(ExotelProtocol)),
        TransportEntry("twilio", TwilioProtocol, TwilioParams, _summary(TwilioProtocol)),
        TransportEntry("browser", BrowserProtocol, BrowserParams, _summary(BrowserProtocol)),
    ]
    return {e.name: e for e in entries}


class UnknownName(LookupError):
    pass


def find_processor(type_name: str) -> ProcessorEntry:
    """A registered short name, or a dotted path to a FrameProcessor subclass."""
    registered = processors()
    if type_name in registered:
        return registered[type_name]
    if "." not in type_name:
        close = nearest(type_name, registered)
        hint = f"did you mean {close!r}? " if close else ""
        raise UnknownName(f"unknown processor {type_name!r}; {hint}registered: {', '.join(sorted(registered))}, or a dotted import path")
    module_name, _, attr = type_name.replace(":", ".").rpartition(".")
    try:
        obj: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownName(f"cannot import processor {type_name!r}: {exc}") from None
    if not (inspect.isclass(obj) and issubclass(obj, FrameProcessor)):
        raise UnknownName(f"{type_name!r} is not a pipecat FrameProcessor class")
    params = getattr(obj, "Params", None)
    params = params if inspect.isclass(params) and issubclass(params, BaseModel) else None
    return ProcessorEntry(type_name, obj, params, _summary(obj))


def find_transport(type_name: str) -> TransportEntry:
    registered = transports()
    if type_name not in registered:
        close = nearest(type_name, registered)
        hint = f"did you mean {close!r}? " if close else ""
        raise UnknownName(f"unknown transport {type_name!r}; {hint}registered: {', '.join(sorted(registered))}")
    return registered[type_name]
