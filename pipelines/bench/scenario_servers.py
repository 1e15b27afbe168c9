"""`bench scenarios`' servers: a deployment under test (Target), the reference engine a scenario needs on
it, and one server process per deployment and engine setup (Group), started and stopped."""

import os
from dataclasses import dataclass
from pathlib import Path

UPLINK_MS = {"exotel": 100, "twilio": 20}  # each provider's caller chunk (the browser's is its config's chunk_ms)


@dataclass
class Target:
    """One deployment under test: how its callers dial and what its holding clips are."""

    config: Path
    provider: str
    rate: int
    uplink_ms: int
    path: str
    twiml_path: str | None
    clips: dict[str, Path]
    reference: dict  # the file's engine.reference

    def url(self, port: int) -> str:
        if self.provider == "twilio" and self.twiml_path:
            return f"http://127.0.0.1:{port}{self.twiml_path}"
        return f"ws://127.0.0.1:{port}{self.path}"


def target(config: str | os.PathLike) -> Target:
    """Read a deployment file (validated as `run` would) into a Target."""
    import yaml

    from pipelines import builder
    from pipelines import config as config_mod

    loaded = config_mod.load(config)
    deployment = builder.plan(loaded)
    provider = loaded.config.transport.type
    tp = deployment.transport_params
    if provider not in ("exotel", "twilio", "browser"):
        raise config_mod.ConfigError(str(loaded.path), None, "transport.type",
                                     f"the simulated caller speaks exotel, twilio and browser, not {provider!r}")
    rate = getattr(tp, "sample_rate", 8000) if provider == "browser" else 8000
    uplink = getattr(tp, "chunk_ms", 40) if provider == "browser" else UPLINK_MS[provider]
    clips: dict[str, Path] = {}
    for proc in deployment.processors:
        if proc.entry.name == "holding":
            for name, given in proc.params.clips.items():
                path = Path(given)
                candidates = [path] if path.is_absolute() else [loaded.path.parent / path, config_mod.CONFIG_DIR / path]
                found = next((c for c in candidates if c.is_file()), None)
                if found:
                    clips[name] = found
    raw = yaml.safe_load(loaded.path.read_text())
    reference = dict(((raw.get("engine") or {}).get("reference")) or {})
    return Target(loaded.path, provider, rate, uplink, getattr(tp, "path", "/"), getattr(tp, "twiml_path", None), clips, reference)


def engine_options(tgt: Target, scenario) -> tuple[dict, str | None]:
    """The reference engine for this scenario on this deployment: converse mode, the scenario's
    overrides and script lines. Where the installed engine has no converse mode, the deployment's own
    mode, and a note saying so."""
    from pydantic import ValidationError

    from pipelines.errors import ConfigError
    from pipelines.sim.engine.reference import EngineOptions

    opts = {**tgt.reference, "mode": "converse", **scenario.model.engine}
    handshake = float(opts.get("handshake_delay_secs", EngineOptions.model_fields["handshake_delay_secs"].default))
    script = scenario.engine_script(handshake)
    if script:
        opts["script"] = script
    try:
        EngineOptions.model_validate(opts)
        return opts, None
    except ValidationError as exc:
        mode_error = any(e["loc"] == ("mode",) for e in exc.errors())
        if not mode_error or "mode" in scenario.model.engine:
            raise ConfigError(str(scenario.path), None, "engine", f"the reference engine refuses {opts}: {exc.errors()[0]['msg']}") from None
    fallback = {**opts, "mode": tgt.reference.get("mode", "echo")}
    if fallback["mode"] not in ("script",):
        fallback.pop("script", None)
    return fallback, (f"the reference engine has no `converse` mode: {scenario.name} ran against {fallback['mode']!r} mode"
                      + (", without its script lines" if script else ""))


@dataclass
class Group:
    """One server process: a deployment with one engine setup, serving the scenarios that need it."""

    name: str
    target: Target
    engine: dict
    scenarios: list[str]
    engines: int
    port: int = 0
    records: Path | None = None
    log: Path | None = None
    error: str | None = None
    handle: object = None  # the `launched` context while it runs
    deployment: int = 0  # index of its deployment in run_suite's `configs`
    pid: int | None = None
    cpu_at_ready: float | None = None  # the server process's CPU seconds once it was serving
    cpu_secs: float | None = None  # ... used from then until just before it was stopped


def group_yaml(tgt: Target, group: Group, work: Path) -> Path:
    import yaml

    cfg = yaml.safe_load(tgt.config.read_text())
    cfg.setdefault("engine", {})["reference"] = group.engine
    cfg["engine"]["local_engines"] = group.engines
    cfg["records"] = {"dir": str(group.records), "audio": False}
    path = work / f"{group.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_group(group: Group, work: Path) -> None:
    """Launch the group's server (blocking: run in a thread); on failure, group.error says why."""
    from pipelines.bench.fleet import bench_env
    from pipelines.bench.launch import free_port, launched, run_command
    from pipelines.bench.servers import keep_log, process_cpu_secs

    group.records = work / "records" / group.name
    group.records.mkdir(parents=True, exist_ok=True)
    group.log = work / f"{group.name}.log"
    path = group_yaml(group.target, group, work)
    for _ in range(3):  # a port taken between picking and binding: try another
        group.port = free_port()
        context = launched(run_command(path, group.port), group.port, env=bench_env(), timeout=120)
        try:
            server = context.__enter__()
        except RuntimeError as exc:
            group.error = str(exc).strip().splitlines()[-1] if str(exc).strip() else "did not start"
            if "address already in use" in str(exc).lower():
                continue
            group.log.write_text(str(exc))
            return
        keep_log(server.proc, server.startup, str(group.log))
        group.handle, group.error = context, None
        group.pid = server.proc.pid
        group.cpu_at_ready = process_cpu_secs(group.pid)
        return


def stop_group(group: Group) -> None:
    from pipelines.bench.servers import process_cpu_secs

    if group.handle is not None:
        cpu = process_cpu_secs(group.pid)
        if cpu is not None and group.cpu_at_ready is not None:
            group.cpu_secs = round(cpu - group.cpu_at_ready, 3)
        group.handle.__exit__(None, None, None)
        group.handle = None
