"""The configuration reference (docs/configuration.md), generated from the pydantic models.

Every block of a deployment file is validated by a pydantic model: the top-level blocks by
pipelines/config.py, `transport.params` by the registered transport's params model and each
processor's `params` by the model the processor registers (pipelines/registry.py). This module walks
those models and renders one table per model: field, type, default, description. Models nested in
them (a rate limit, the reference engine's options, a persona) get tables of their own.

    python -m pipelines.config_reference > docs/configuration.md

tests/docs/test_docs.py fails when docs/configuration.md differs from `render()`.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REGENERATE = "python -m pipelines.config_reference > docs/configuration.md"


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _type(annotation: Any, nested: list[type[BaseModel]]) -> str:
    """A readable type: `float`, `int | null`, `"input" | "output"`, `list[str]`, a nested model's link."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:  # constraints inside a union: `Annotated[int, Gt(0)] | None`
        bounds = _bounds(args[1:])
        return _type(args[0], nested) + (f" ({bounds})" if bounds else "")
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a, nested) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type(a, nested) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        key, value = args
        return f"map[{_type(key, nested)}, {_type(value, nested)}]"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        if annotation not in nested:
            nested.append(annotation)
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥"), ("max_length", "length ≤"))


def _bounds(metadata) -> str:
    out = []
    for item in metadata:
        for attr, sign in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {_value(value)}")
    return ", ".join(out)


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, (dict, list)):
        if not value:
            return "{}" if isinstance(value, dict) else "[]"
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel) and value == type(value)():
            return f"[its defaults](#{_anchor(type(value))})"
        return f"`{_value(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{_value(field.default)}`"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("|", "\\|")).strip()


def model_table(model: type[BaseModel], nested: list[type[BaseModel]]) -> str:
    """One model's fields as a Markdown table; nested models it names are appended to `nested`."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = _type(field.annotation, nested)
        bounds = _bounds(field.metadata)
        if bounds:
            kind += f" ({bounds})"
        rows.append(f"| `{name}` | {kind} | {_default(field)} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def _doc(model: type) -> str:
    doc = inspect.getdoc(model) or ""
    if doc == inspect.getdoc(BaseModel):
        return ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _section(title: str, model: type[BaseModel] | None, intro: str, nested: list[type[BaseModel]]) -> list[str]:
    out = [f'<a id="{_anchor(model)}"></a>', ""] if model is not None else []
    out += [f"### {title}", ""]
    if intro:
        out += [intro, ""]
    if model is None:
        out += ["No params model: `params:` are the class's keyword arguments.", ""]
    else:
        out += [model_table(model, nested), ""]
    return out


TOP_LEVEL = {
    "server": "The call server: where it listens and how long peers may take.",
    "transport": "Which provider protocol serves the calls; `params` are that transport's model below.",
    "engine": "The PersonaPlex engines; without URLs, embedded reference engines answer.",
    "records": "Per-call records: events, transcript, optional audio.",
    "events": "Call events out: a webhook that gets signed JSON POSTs (started, engine leased, barge-in, action, transfer, "
              "ended); off without a URL. The body and how to verify it: pipelines/events.py.",
    "caller_memory": "Per-caller memory, keyed by a salted hash of the number: personaplex may tell the model when a "
                     "returning caller last called and how that call ended; off without a directory.",
    "processors": "The call's processors in order; each item's `params` are the processor's model below.",
}


def render() -> str:
    """docs/configuration.md, in full."""
    from pipelines import registry
    from pipelines.config import DeploymentConfig

    nested: list[type[BaseModel]] = []
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the pydantic models; do not edit. Regenerate with:",
        f"     {REGENERATE} -->",
        "",
        "A deployment file is YAML with the top-level blocks below. Every block, and every `params:` of a",
        "transport or processor, is validated by the pydantic model shown here: an unknown key or a wrong",
        "value stops `python -m pipelines validate` (and `run`) with the file, line and key, and the",
        "nearest known key when one is close. `${VAR}` and `${VAR:-default}` are taken from the environment",
        "as strings, never re-read as YAML: the model converts them (`\"6060\"` to a port, `no` stays the text",
        "`no`); an unquoted one that comes out empty leaves the key at its default. A processor named by",
        "dotted import path instead of a registered name takes its `params:` as keyword arguments of its",
        "class, typed by the class's annotations (a mapping given for a pipecat `settings=` or `params=`",
        "becomes that object, key by key).",
        "",
        "`extends: FILE` puts a deployment on top of another: FILE is looked up next to this file, then",
        "among the shipped deployments (`extends: exotel.yaml`). Mappings merge key by key and this file's",
        "values win; a list (`processors:`) or a scalar replaces the base's whole. How the blocks fit",
        "together is in [architecture.md](architecture.md); how to add a processor of your own is in",
        "[processors.md](processors.md).",
        "",
        "## The deployment file",
        "",
    ]
    out += ["| block | type | default | what it is |", "|---|---|---|---|"]
    for name, field in DeploymentConfig.model_fields.items():
        out.append(f"| `{name}:` | {_type(field.annotation, [])} | {_default(field)} | {TOP_LEVEL.get(name, '')} |")
    out.append("")
    top_models = {name: field.annotation for name, field in DeploymentConfig.model_fields.items()}
    for name, intro in TOP_LEVEL.items():
        annotation = top_models[name]
        model = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
        if inspect.isclass(model) and issubclass(model, BaseModel):
            doc = _doc(model)
            out += _section(f"`{name}:`", model, " ".join(x for x in (intro, doc) if x and x != intro), nested)
            if model in nested:
                nested.remove(model)
    out += ["## Transports (`transport.type`)", ""]
    for name, entry in registry.transports().items():
        out += _section(f"`{name}`", entry.params, f"{entry.summary} ({entry.protocol.__module__})", nested)
    out += ["## Processors (`processors[].type`)", ""]
    for name, entry in registry.processors().items():
        out += _section(f"`{name}`", entry.params, f"{entry.summary} ({entry.cls.__module__})", nested)
    out += ["## Nested models", ""]
    from pipelines.sim.engine import EngineOptions  # engine.reference: the simulator's model, checked by the CLI

    nested.insert(0, EngineOptions)
    done: set[type[BaseModel]] = set()
    while nested:
        model = nested.pop(0)
        if model in done:
            continue
        done.add(model)
        out += _section(model.__name__, model, _doc(model), nested)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
