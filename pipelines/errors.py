"""Errors the CLI turns into exit statuses."""

import dataclasses
import difflib
import types
import typing

from pydantic import BaseModel, ValidationError


class ConfigError(Exception):
    """A deployment file that cannot run; the message is one line: file:line: key: problem."""

    def __init__(self, file: str, line: int | None, key: str, problem: str):
        self.file, self.line, self.key, self.problem = file, line, key, problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key or '<top>'}: {problem}")


def validation_problem(exc: ValidationError, model: type | None = None) -> tuple[tuple, str]:
    """pydantic's first error as (key path, one-line problem) in the words our error lines use; with
    the model, an unknown key gets the nearest known one."""
    first = exc.errors()[0]
    problem = first["msg"]
    if first["type"] == "extra_forbidden":
        problem = "unknown key" + did_you_mean(str(first["loc"][-1]), keys_at(model, tuple(first["loc"][:-1])))
    elif first["type"] == "value_error" and "error" in first.get("ctx", {}):
        problem = str(first["ctx"]["error"])
        if "input" in first and not isinstance(first["input"], (dict, list)):
            problem += f" (got {first['input']!r})"
    elif first["type"] == "missing":
        problem = "required key is missing"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        problem += f" (got {first['input']!r})"
    return tuple(first["loc"]), problem


def nearest(key: str, known) -> str | None:
    """The known name a typo most likely meant, if any is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(key: str, known: list[str]) -> str:
    close = nearest(key, known)
    if close:
        return f"; did you mean {close!r}?"
    return f"; known keys: {', '.join(known)}" if 0 < len(known) <= 12 else ""


def keys_at(model: type | None, loc: tuple) -> list[str]:
    """The keys a (pydantic or dataclass) model accepts at `loc` inside it, following nested models."""
    kind = model
    for part in loc:
        kind = _model_in(kind, isinstance(part, int))
        if kind is None:
            return []
        fields = model_fields(kind)
        if isinstance(part, int):
            continue
        kind = fields.get(part)
    kind = _model_in(kind, False)
    return list(model_fields(kind)) if kind is not None else []


def model_fields(kind: type) -> dict[str, typing.Any]:
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return {name: f.annotation for name, f in kind.model_fields.items()}
    if dataclasses.is_dataclass(kind):
        return {f.name: f.type for f in dataclasses.fields(kind)}
    return {}


def _model_in(annotation: typing.Any, item: bool) -> type | None:
    """The model class inside an annotation: X, X | None, list[X] (when indexing)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg, item)
            if found is not None:
                return found
        return None
    if item and origin in (list, tuple):
        args = typing.get_args(annotation)
        return _model_in(args[0], False) if args else None
    return annotation if model_fields(annotation) else None
