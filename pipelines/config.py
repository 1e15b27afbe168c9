"""Deployment YAML: environment substitution, schema validation, and errors that name file, line and key.

PyYAML's composed node tree keeps the line of every key and value, so a pydantic error location
(a path of keys and indexes) can be traced back to the line a user has to edit.
"""

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.caller_memory import CallerMemoryConfig
from pipelines.errors import ConfigError, validation_problem
from pipelines.events import EventsConfig
from processors.personaplex.pool import PoolParams

_PACKAGE = Path(__file__).resolve().parent
# The shipped deployments and clips: a wheel installs configs/ as pipelines/deployments/ (pyproject.toml's
# package-dir); a source checkout and an editable install read the top-level configs/ itself.
CONFIG_DIR = _PACKAGE / "deployments" if (_PACKAGE / "deployments").is_dir() else _PACKAGE.parent / "configs"

_CONSTRUCTOR = yaml.SafeLoader("")  # types plain scalars exactly as yaml.safe_load would
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(5050, ge=0, le=65535)
    drain_secs: float = Field(30.0, gt=0, description="on SIGTERM, how long active calls may run on before the apology")
    header_timeout_secs: float = Field(10.0, gt=0, description="a connection must have sent a whole HTTP request by then (slow or silent sockets are closed)")
    send_timeout_secs: float = Field(5.0, gt=0, description="a caller whose socket takes no data this long is cut (it stopped reading)")
    media_timeout_secs: float = Field(5.0, gt=0, description="a call with no caller media this long ends (`caller_silent`): providers stream silence too")
    ops_host: str = Field("127.0.0.1", description="where ops_port listens")
    ops_port: int | None = Field(None, ge=0, le=65535, description="/stats (call ids, records, engine URLs) served here only; "
                                 "unset: /stats on the call port answers loopback peers without a proxy header only")


class TransportConfig(_Strict):
    type: str
    params: dict[str, Any] = Field(default_factory=dict)


class ProcessorConfig(_Strict):
    type: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class EngineConfig(PoolParams):
    """The PersonaPlex fleet (one call per engine); without URLs, embedded reference engines answer."""

    local_engines: int = Field(4, ge=1, description="reference engines started when no URL is set (`run --engines N` overrides)")
    reference: dict[str, Any] = Field(default_factory=dict, description=(
        "options of the embedded reference engines (EngineOptions: mode, handshake_delay_secs, ...); "
        "checked by `validate` and `run`, which start them"))


class RecordsConfig(_Strict):
    """Per-call records (event log, transcript, optional stereo WAV); off without a directory."""

    dir: str | None = Field(None, description="records go to DIR/<start time>-<call id>/ (relative to the working directory)")
    audio: bool = Field(False, description="also write audio.wav: caller left, bot right")
    max_call_bytes: int | None = Field(5 * 1024 * 1024, ge=128 * 1024, description=(
        "events.jsonl + transcript.txt of one call stop here (a record_truncated event, then only call_ended); "
        "null: no cap. audio.wav grows with the call (4 bytes a frame), up to the WAV format's 4 GiB"))
    keep_days: float | None = Field(None, gt=0, description="delete call records older than this (at start, then hourly)")
    max_total_mb: float | None = Field(None, gt=0, description="delete the oldest call records beyond this total (at start, then hourly)")


class DeploymentConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    transport: TransportConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    caller_memory: CallerMemoryConfig = Field(default_factory=CallerMemoryConfig)
    processors: list[ProcessorConfig] = Field(default_factory=list)


class LoadedConfig:
    """A validated deployment plus what is needed to report later errors against its source lines."""

    def __init__(self, path: Path, config: DeploymentConfig, lines: dict[tuple, tuple[str, int]]):
        self.path, self.config, self.lines = path, config, lines
        self.reference: Any = None  # engine.reference as the reference engine's options, once the CLI checked them

    def error(self, loc: tuple, problem: str) -> ConfigError:
        file, line = line_of(self.lines, loc) or (str(self.path), None)
        return ConfigError(file, line, format_loc(loc), problem)

    def validate_model(self, model: type[BaseModel], data: Any, loc: tuple) -> BaseModel:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self.from_validation(exc, loc, model) from None

    def from_validation(self, exc: ValidationError, prefix: tuple = (), model: type[BaseModel] | None = None) -> ConfigError:
        loc, problem = validation_problem(exc, model)
        return self.error(prefix + loc, problem)


def resolve_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name (`exotel.yaml`, `exotel`) among the shipped deployments (CONFIG_DIR)."""
    path = Path(name)
    if path.exists():
        return path
    if path.parent == Path("."):
        for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(str(name), None, "", f"no such file (looked in the current directory and {CONFIG_DIR}; "
                      "`python -m pipelines init DIR` copies the shipped deployments)")


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[tuple, tuple[str, int]], loc: tuple) -> tuple[str, int] | None:
    """(file, line) of the deepest part of `loc` that exists in the files."""
    for end in range(len(loc), -1, -1):
        if tuple(loc[:end]) in lines:
            return lines[tuple(loc[:end])]
    return None


def load(name: str | os.PathLike, environ: dict[str, str] | None = None) -> LoadedConfig:
    path = resolve_path(name)
    env = os.environ if environ is None else environ
    lines: dict[tuple, tuple[str, int]] = {}
    data = _read(path, env, lines, ())
    loaded = LoadedConfig(path, None, lines)  # type: ignore[arg-type]
    try:
        loaded.config = DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        raise loaded.from_validation(exc, (), DeploymentConfig) from None
    return loaded


def _read(path: Path, env, lines: dict, chain: tuple[Path, ...]) -> dict:
    """One file as data, on top of the file its `extends:` names (mappings merge key by key, this
    file's values win; a list or a scalar replaces the base's). `lines` gets (file, line) per key."""
    file = str(path)
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(file, mark.line + 1 if mark else None, "", f"invalid YAML: {exc.problem if hasattr(exc, 'problem') else exc}") from None
    own: dict[tuple, tuple[str, int]] = {}
    data = _construct(root, (), own, env, file) if root is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(file, 1, "", "the file must be a mapping with transport:, processors: and friends")
    base_name = data.pop("extends", None)
    if base_name is not None:
        where = own.get(("extends",), (file, None))[1]
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError(file, where, "extends", "must name a deployment file")
        relative = path.parent / base_name
        try:
            base_path = relative if relative.is_file() else resolve_path(base_name)
        except ConfigError as exc:
            raise ConfigError(file, where, "extends", exc.problem) from None
        if base_path.resolve() in chain + (path.resolve(),):
            raise ConfigError(file, where, "extends", f"{base_name} extends this file again (a loop)")
        data = _merge(_read(base_path, env, lines, chain + (path.resolve(),)), data, (), lines, own)
    lines.update(own)
    return data


def _merge(base: Any, top: Any, loc: tuple, lines: dict, own: dict) -> Any:
    if not (isinstance(base, dict) and isinstance(top, dict)):
        for key in [k for k in lines if k[: len(loc)] == loc and len(k) > len(loc)]:
            del lines[key]  # the base's lines below a replaced value no longer describe anything
        return top
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(base[key], value, loc + (key,), lines, own) if key in base else value
    return out


def _construct(node: yaml.Node, loc: tuple, lines: dict, env, file: str) -> Any:
    lines.setdefault(loc, (file, node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            lines[loc + (key,)] = (file, key_node.start_mark.line + 1)
            out[key] = _construct(value_node, loc + (key,), lines, env, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, loc + (i,), lines, env, file) for i, item in enumerate(node.value)]
    return _scalar(node, loc, env, file)


def _scalar(node: yaml.ScalarNode, loc: tuple, env, file: str) -> Any:
    text = node.value
    if node.tag == "tag:yaml.org,2002:str" and "${" in text:
        whole = _VAR.fullmatch(text) is not None

        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problem = f"environment variable {name} is not set (write ${{{name}:-default}} to make it optional)"
            raise ConfigError(file, node.start_mark.line + 1, format_loc(loc), problem)

        text = _VAR.sub(substitute, text)
        if whole and not node.style and not text.strip():
            return None  # an unquoted ${X} that is empty leaves the key unset (its default), like `key:` would
        return text  # a string, never re-read as YAML: the schema converts it ("5050" -> 5050, "no" stays "no")
    return _CONSTRUCTOR.construct_object(node, deep=True)
