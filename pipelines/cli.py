"""`python -m pipelines COMMAND`: serve calls, check a config, list parts, run the reference engine,
be the caller, read a call record, and measure.

`run` drains on SIGTERM (calls finish, then the apology; see pipelines/server.py) and stops at
once on SIGINT or a second signal.

Configuration errors print one line (file:line: key: problem) and exit with status 2. A closed stdout
(`list | head -1`) ends the command quietly with status 141, as a shell tool killed by SIGPIPE.
pipecat's import banner is shown only with `-v` (or PIPELINES_PIPECAT_BANNER=1).

Installed as a wheel, the shipped deployments and clips live in the package (CONFIG_DIR): `run
exotel.yaml` works from any directory, and `init DIR` writes editable copies of them.
"""

import argparse
import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from loguru import logger

from pipelines.records import escape_controls

EXIT_CONFIG = 2
ANSWER_SECONDS = 4.0  # default time left after the caller's audio for the bot to answer, at the least
REPLY_MARGIN_SECONDS = 2.0  # ... or as long as what was said plus this: the reference engine says it back


def _load_plan(name: str):
    """The deployment, its `engine.reference:` checked too: the CLI starts the reference engines, so
    the runtime's schema leaves their options to the simulator's own model."""
    from pipelines import builder, config
    from pipelines.sim.engine import EngineOptions

    deployment = builder.plan(config.load(name))
    loaded = deployment.loaded
    loaded.reference = loaded.validate_model(EngineOptions, loaded.config.engine.reference, ("engine", "reference"))
    return deployment


def cmd_validate(args) -> int:
    deployment = _load_plan(args.config)
    cfg = deployment.loaded.config
    from pipelines.builder import uses_engine

    names = " -> ".join(p.entry.name for p in deployment.processors)
    engine = (", ".join(cfg.engine.urls) or f"{cfg.engine.local_engines} embedded reference engines") if uses_engine(deployment) else "none used"
    where = f"{cfg.server.host}:{cfg.server.port}{getattr(deployment.transport_params, 'path', '')}"
    print(f"{deployment.loaded.path}: ok: {cfg.transport.type} on {where}; processors: {names or '(none)'}; engine: {engine}")
    return 0


def cmd_list(args) -> int:
    from pipelines.registry import processors, transports

    for entry in processors().values():
        print(f"processor  {entry.name:<12} {entry.cls.__module__}.{entry.cls.__name__}: {entry.summary}")
    for entry in transports().values():
        print(f"transport  {entry.name:<12} {entry.protocol.__module__}.{entry.protocol.__name__}: {entry.summary}")
    return 0


def shipped_files() -> list[Path]:
    """The shipped deployments and their clips, relative to CONFIG_DIR (not the Kubernetes example)."""
    from pipelines.config import CONFIG_DIR

    out = []
    for path in sorted(CONFIG_DIR.rglob("*")):
        rel = path.relative_to(CONFIG_DIR)
        if path.is_file() and rel.parts[0] not in ("kubernetes", "__pycache__") and rel.suffix in (".yaml", ".wav", ".sh"):
            out.append(rel)
    return out


def cmd_init(args) -> int:
    from pipelines.config import CONFIG_DIR

    dest = Path(args.dir)
    files = shipped_files()
    clashes = [str(rel) for rel in files if (dest / rel).exists()]
    if clashes and not args.force:
        print(f"error: {dest} already has {', '.join(clashes)}; nothing written (--force replaces them)", file=sys.stderr)
        return 1
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CONFIG_DIR / rel, dest / rel)  # not the mode: the installed copy may be read-only
        if rel.suffix == ".sh":
            (dest / rel).chmod(0o755)
    deployments = [str(rel) for rel in files if rel.suffix == ".yaml"]
    print(f"wrote {len(files)} files to {dest}: {', '.join(deployments)} and their clips. Edit them, then: "
          f"{prog()} run {dest / 'exotel.yaml'}")
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("call-pipelines")
    except PackageNotFoundError:
        return "unknown (not installed)"


BANNER_ENV = "PIPELINES_PIPECAT_BANNER"


def import_pipecat(banner: bool = False) -> None:
    """Import pipecat, whose import logs a `ᓚᘏᗢ Pipecat ...` banner at INFO: silenced unless `banner`."""
    if "pipecat" in sys.modules:
        return
    if not banner:
        logger.disable("pipecat")
    try:
        import pipecat  # noqa: F401
    finally:
        logger.enable("pipecat")


LOG_FORMAT = ("<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | call={extra[call_id]} | "
              "<cyan>{name}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>")


MAX_LOG_MESSAGE = 4000  # characters of one log message; the rest is cut
def one_line(record) -> None:
    """Loguru patcher: what a peer sent (ids, marks, reasons) can neither start a line of its own nor
    turn text around; control and bidi characters are escaped, and one message is capped."""
    message = record["message"]
    if len(message) > MAX_LOG_MESSAGE:
        message = message[:MAX_LOG_MESSAGE] + f"... ({len(message) - MAX_LOG_MESSAGE} more characters)"
    record["message"] = escape_controls(message)
    record["extra"]["call_id"] = escape_controls(str(record["extra"].get("call_id", "-")))[:200]


def _configure_logging() -> None:
    """Every line names its call (`-` outside one) and is one line; the level from LOGURU_LEVEL, INFO by default."""
    import os

    logger.remove()
    logger.configure(extra={"call_id": "-"}, patcher=one_line)
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "INFO"), format=LOG_FORMAT)


async def _start_engines(options, count: int):
    from pipelines.sim.engine import ReferenceEngine

    engines = []
    for _ in range(count):
        engine = ReferenceEngine(options)
        await engine.start("127.0.0.1", 0)
        engines.append(engine)
    logger.warning(
        f"No PersonaPlex URL configured (engine.urls / PERSONAPLEX_URL): calls are answered by {count} "
        f"REFERENCE ENGINE(S) in {options.mode!r} mode, not by a model."
    )
    return engines


async def _serve(args) -> int:
    from pipelines.builder import engine_pools, uses_engine
    from pipelines.server import CallServer

    _configure_logging()
    deployment = _load_plan(args.config)
    cfg = deployment.loaded.config
    local = []
    urls = cfg.engine.urls
    if not urls and uses_engine(deployment):
        local = await _start_engines(deployment.loaded.reference, args.engines or cfg.engine.local_engines)
        urls = [e.url for e in local]
    elif args.engines:
        logger.warning(f"--engines {args.engines} ignored: engine.urls names the engines")
    engines = engine_pools(deployment, cfg.engine.model_copy(update={"urls": urls}) if urls else None)
    try:
        server = CallServer(deployment, engines, args.host or cfg.server.host, args.port if args.port is not None else cfg.server.port)
    except OSError as exc:  # caller_memory.dir unusable: said before any call is taken
        print(f"error: {args.config}: caller_memory: {exc}", file=sys.stderr)
        for engine in local:
            await engine.stop()
        return EXIT_CONFIG
    await server.start()
    page = getattr(deployment.transport_params, "page_path", None)
    extra = f"; page: http://{server.host}:{server.port}{page}" if page else ""
    pool = f"; {len(engines.engines)} engine(s)" if engines.engines else ""
    address = f"{server.host}:{server.port}"
    print(f"serving {cfg.transport.type} calls on ws://{address}{server.path} (stats: http://{address}/stats{extra}{pool})", flush=True)
    got = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, got.put_nowait, sig)
    if await got.get() == signal.SIGTERM:
        drain = asyncio.create_task(server.drain())
        stop = asyncio.create_task(got.get())  # a second signal stops at once
        await asyncio.wait([drain, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
    logger.info("shutting down")
    await server.stop()
    for engine in local:
        await engine.stop()
    return 0


def cmd_run(args) -> int:
    return asyncio.run(_serve(args))


def engine_main(argv: list[str]) -> int:
    from pipelines.sim.engine.reference import main

    return main(argv)


def cmd_call(args) -> int:
    from pipelines.sim.caller import place_call
    from processors.audio import read_wav, write_wav

    deployment = _load_plan(args.config)
    cfg = deployment.loaded.config
    tp = deployment.transport_params
    provider = args.provider or cfg.transport.type
    if provider not in ("exotel", "twilio", "browser"):
        print(f"error: the simulated caller speaks exotel, twilio or browser; {args.config} uses {provider} (try --provider)", file=sys.stderr)
        return EXIT_CONFIG
    if bool(args.audio) == bool(args.scenario):
        print("error: give --audio IN.wav or --scenario NAME", file=sys.stderr)
        return EXIT_CONFIG
    rate = args.sample_rate or (getattr(tp, "sample_rate", 16000) if provider == "browser" else 8000)
    try:
        url = dial_url(args.url, provider, cfg.server, tp)
        audio_path = None if args.scenario else caller_audio(args.audio)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.scenario:
        return _call_scenario(args, deployment, url)
    said = read_wav(audio_path, rate)
    audio = np.concatenate([np.zeros(int(args.delay * rate), np.int16), said])
    params = dict(p.split("=", 1) for p in args.param)
    answer = max(ANSWER_SECONDS, len(said) / rate + REPLY_MARGIN_SECONDS)
    seconds = args.seconds if args.seconds is not None else len(audio) / rate + answer
    try:
        result = asyncio.run(place_call(url, audio, rate, provider=provider, seconds=seconds, custom_parameters=params,
                                        auth_token=getattr(tp, "auth_token", None) or None, events=[d for ds in args.dtmf for d in ds],
                                        progress=lambda line: print(line, file=sys.stderr, flush=True)))
    except _dial_errors() as exc:
        print(f"error: the call to {url} failed: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    write_wav(args.out, result.heard, result.sample_rate)
    print(f"wrote {args.out}: {len(result.heard) / rate:.1f} s heard, {len(result.messages)} messages from the bot, "
          f"{len(result.violations)} protocol violations, {result.clears} clears, marks echoed: {len(result.marks_echoed)}")
    for v in result.violations[:10]:
        print(f"  violation: {v}")
    return 1 if result.violations else 0


def _dtmf(text: str):
    """'3:0' or '4.5:*9' -> the presses, 0.3 s apart."""
    import argparse

    from pipelines.sim.caller import Dtmf

    at, _, keys = text.partition(":")
    try:
        start = float(at)
    except ValueError:
        start = -1.0
    if start < 0 or not keys or any(k not in "0123456789*#ABCD" for k in keys):
        raise argparse.ArgumentTypeError(f"--dtmf takes AT:KEYS, e.g. 3:0 or 4.5:*9, not {text!r}")
    return [Dtmf(at=start + 0.3 * i, digit=k) for i, k in enumerate(keys)]


def dial_url(given: str | None, provider: str, server, tp) -> str:
    """What the simulated caller dials. Default: the config's own server. A base URL (`http://host:port`,
    `ws://host:port`) gets the deployment's path: Twilio's webhook (TwiML) for http(s), the stream for
    ws(s); Exotel and the browser page dial a WebSocket, so their http(s) becomes ws(s). A URL with a
    path is dialled as it is (Twilio: http(s) is the webhook, ws(s) the stream)."""
    twiml = getattr(tp, "twiml_path", None) if provider == "twilio" else None
    stream = getattr(tp, "path", "/")
    if not given:
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        return f"http://{host}:{server.port}{twiml}" if twiml else f"ws://{host}:{server.port}{stream}"
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ValueError(f"--url {given!r}: give the server's base URL (http://HOST:PORT) or a ws(s):// or http(s):// URL")
    web = parts.scheme in ("http", "https")
    if provider != "twilio" and web:
        parts = parts._replace(scheme="ws" if parts.scheme == "http" else "wss")
    if parts.path in ("", "/"):
        if provider == "twilio" and web and not twiml:
            raise ValueError(f"--url {given!r}: this deployment serves no TwiML webhook; give its ws(s):// stream URL")
        parts = parts._replace(path=twiml if provider == "twilio" and web else stream)
    return parts.geturl()


def caller_audio(given: str) -> Path:
    """--audio: a WAV file, or the name of a shipped speech recording (`question_8k.wav`, `interrupt_16k`)."""
    from pipelines.sim.speech import FIXTURES

    path = Path(given)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for candidate in (FIXTURES / path.name, FIXTURES / f"{path.name}.wav"):
            if candidate.is_file():
                return candidate
    shipped = ", ".join(sorted(p.name for p in FIXTURES.glob("*.wav")))
    raise ValueError(f"--audio {given}: no such file (shipped recordings: {shipped})")


def _dial_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    from websockets.exceptions import WebSocketException

    return (OSError, WebSocketException, aiohttp.ClientError)


def _call_scenario(args, deployment, url: str) -> int:
    """One scenario from pipelines/sim/scenarios/ against a running server, judged as `bench scenarios` does."""
    import uuid

    from pipelines.bench.scenario_servers import engine_options, target
    from pipelines.bench.scenarios import call_scenario
    from pipelines.sim import scenarios
    from processors.audio import read_wav, write_wav

    scenario = scenarios.load(args.scenario)
    tgt = target(deployment.loaded.path)
    if tgt.provider not in scenario.providers:
        print(f"error: {scenario.name} is for {', '.join(scenario.providers)}, not {tgt.provider}", file=sys.stderr)
        return EXIT_CONFIG
    engine, _note = engine_options(tgt, scenario)
    if scenario.model.model_says or scenario.model.engine:
        print(f"note: {scenario.name} expects the reference engine set up as {engine} (`bench scenarios` starts such a "
              "server itself)", file=sys.stderr)
    clips = {name: read_wav(path, tgt.rate) for name, path in tgt.clips.items()}
    call_id = f"call-{uuid.uuid4().hex[:12]}"
    run, result, _ = asyncio.run(call_scenario(tgt, scenario, url, call_id, clips, records=args.records,
                                               progress=lambda line: print(line, file=sys.stderr, flush=True)))
    if result is not None:
        write_wav(args.out, result.heard, result.sample_rate)
        print(f"wrote {args.out}: {len(result.heard) / result.sample_rate:.1f} s heard")
    print(f"{scenario.name} as {tgt.provider} ({call_id}): {run.heard}")
    for check in run.checks:
        print(f"  {'pass' if check.passed else 'FAIL'}  {check.label}: {check.detail}")
    return 0 if run.passed else 1


def guard_main(argv: list[str]) -> int:
    from pipelines.guard import main

    return main(argv)


def report_main(argv: list[str]) -> int:
    from pipelines.report import main

    return main(argv)


def bench_main(argv: list[str]) -> int:
    from pipelines.bench import main

    return main(argv)


DELEGATED = {"engine": engine_main, "guard": guard_main, "bench": bench_main, "report": report_main}


def prog() -> str:
    """How this command was started: the console script, or `python -m pipelines`."""
    return "call-pipelines" if Path(sys.argv[0]).name == "call-pipelines" else "python -m pipelines"


CONFIG_HELP = "YAML path, or a shipped deployment's name (exotel.yaml, twilio.yaml, browser.yaml, cascaded.yaml)"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=prog(), description="Phone calls as pipecat pipelines assembled from YAML.")
    top.add_argument("--version", action="version", version=f"call-pipelines {package_version()}")
    top.add_argument("-v", "--verbose", action="store_true",
                     help=f"pipecat's import banner and DEBUG logs (unless LOGURU_LEVEL says otherwise); {BANNER_ENV}=1 shows the banner too")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="serve calls for a deployment", description="Serve provider calls; each call gets its own pipeline.")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.add_argument("--engines", type=int, metavar="N", help="embedded reference engines to start (default: engine.local_engines); only without engine.urls")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a deployment file", description="Load and validate a deployment; exit 2 on errors.")
    p.add_argument("config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("init", help="write editable copies of the shipped deployments and clips",
                       description="Copy the shipped deployment files and their clips into DIR, to edit and run "
                       "(`run DIR/exotel.yaml`); existing files are left alone unless --force.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace files DIR already has")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("list", help="registered processors and transports", description="One line per registered processor and transport.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("engine", help="reference PersonaPlex-protocol engine (no GPU)", add_help=False,
                       description="Run the reference engine; `python -m pipelines engine --help` for its options.")

    p = sub.add_parser("guard", help="sidecar in front of one PersonaPlex engine: one session at a time, fenced leases, idle close",
                       add_help=False, description="Relay sessions to one engine, exclusively; `python -m pipelines guard --help` for its options.")

    p = sub.add_parser("call", help="be the caller: dial a running server as the provider does",
                       description="Place a simulated call and write what the caller heard.")
    p.add_argument("config", help="the deployment whose server to dial")
    p.add_argument("--audio", help="WAV the caller says, or a shipped recording's name (question_8k.wav, interrupt_8k.wav, "
                   "question_16k.wav, interrupt_16k.wav)")
    p.add_argument("--scenario", metavar="NAME", help="instead of --audio: play a scenario of pipelines/sim/scenarios/ "
                   "(e.g. user_interruption) and judge what was heard; the exit status says whether it passed")
    p.add_argument("--records", metavar="DIR", help="with --scenario: the server's records.dir, so the call's record is judged too")
    p.add_argument("--out", required=True, help="WAV of what the caller heard")
    p.add_argument("--url", help="the server to dial: its base URL (http://HOST:PORT; the config's paths are added), or a full "
                   "URL: Exotel's ws:// stream, Twilio's http:// webhook or ws:// stream (default: the config's host and port)")
    p.add_argument("--provider", choices=("exotel", "twilio", "browser"), help="speak this provider's protocol (default: the config's transport)")
    p.add_argument("--seconds", type=float, help="call length (default: --delay and the audio, then time for the answer: "
                   "4 s, or the audio's length plus 2 s if longer, as the reference engine says it back)")
    p.add_argument("--delay", type=float, default=1.5,
                   help="silence before the caller speaks: the engine hears nothing before its handshake (default 1.5 s)")
    p.add_argument("--sample-rate", type=int, choices=(8000, 16000, 24000), help="Exotel only (default 8000); Twilio is 8000, the browser its config's")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="custom parameter (repeatable)")
    p.add_argument("--dtmf", action="append", default=[], type=_dtmf, metavar="AT:KEYS",
                   help="press KEYS (0-9 * # A-D, 0.3 s apart) from AT seconds into the call (repeatable; Exotel and Twilio)")
    p.set_defaults(func=cmd_call)

    from pipelines.bench.experiment import add_parser as add_experiment

    add_experiment(sub)

    p = sub.add_parser("report", help="timeline picture and summary of a call record", add_help=False,
                       description="Render CALL_DIR/timeline.png and print a summary; `python -m pipelines report --help`.")

    p = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md)", add_help=False,
                       description="Run a benchmark; `python -m pipelines bench --help` for the list.")
    return top


def main(argv: list[str] | None = None) -> int:
    """The CLI (`python -m pipelines`, the `call-pipelines` console script); returns the exit status."""
    try:
        try:
            return _main(sys.argv[1:] if argv is None else list(argv))
        finally:
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`list | head -1`): stop quietly, as SIGPIPE would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not complain either
        return 141


def _main(argv: list[str]) -> int:
    from pipelines.errors import ConfigError
    from pipelines.extras import MissingExtra

    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):  # before the command, also for the delegated ones
        verbose, argv = True, argv[1:]
    if verbose:
        os.environ.setdefault("LOGURU_LEVEL", "DEBUG")
    banner = verbose or os.environ.get(BANNER_ENV, "") not in ("", "0")
    try:
        if argv and argv[0] in DELEGATED:  # they own their options, --help included
            import_pipecat(banner)
            return DELEGATED[argv[0]](argv[1:])
        args = parser().parse_args(argv)
        import_pipecat(banner)
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
