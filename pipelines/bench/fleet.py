"""What `bench load` and `bench soak` share: the bridge and a fleet of reference engines as their own
processes, simulated calls placed from this process, and per-call figures on the caller's timeline.

The bridge is `python -m pipelines run` on a temporary copy of the deployment file whose `engine.urls`
lists the fleet, one engine per concurrent call as PersonaPlex servers would be (records on, as
deployed). Engines are grouped K to a process, so that no engine process is the bottleneck and so that
one process can be killed like a crashed GPU server.
"""

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.bench.received import RATE, pcm_messages
from pipelines.bench.servers import Server, engine_command, engine_launched, keep_log, our_yaml

UPLINK_MS = {"exotel": 100, "twilio": 20}  # each provider's real caller chunk
HANDSHAKE = 0.5  # the engines' prompt phase; their script timeline starts after it
FIXTURE = "interrupt_8k"


# ---- what one call's row says ----------------------------------------------------------------


def is_failed(row: dict) -> bool:
    """A call failed when the caller errored or the bridge did not record it as completed."""
    return bool(row.get("error")) or row.get("outcome") not in ("completed", None)


# ---- processes -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    server: Server  # the bridge (`ours`) or the stock baseline (`stock`)
    url: str  # where the callers dial
    provider: str
    engines: list[tuple[object, list[int]]]  # (Popen, its ports) per engine process
    records: Path | None  # the bridge's call records

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.engines]


def deployment(config) -> tuple[Path, str, str]:
    """(file, provider, WebSocket path) of a deployment; the simulated caller speaks exotel and twilio."""
    import yaml

    from pipelines.config import resolve_path
    from pipelines.errors import ConfigError

    path = resolve_path(config)
    with open(path) as f:
        transport = yaml.safe_load(f)["transport"]
    provider = transport["type"]
    if provider not in UPLINK_MS:
        raise ConfigError(str(path), None, "transport.type", f"the bench's callers speak {' and '.join(UPLINK_MS)}, not {provider!r}")
    return path, provider, (transport.get("params") or {}).get("path") or f"/{provider}"


def bench_env() -> dict:
    """This environment for the children, minus anything that would reach real engines or Twilio's API."""
    env = {k: v for k, v in os.environ.items() if k != "PERSONAPLEX_URL" and not k.startswith("TWILIO_")}
    env["LOGURU_LEVEL"] = "INFO"  # the bridge logs as deployed
    return env


def script_options(lines: list[tuple[float, str]]) -> dict:
    """Reference engine options: script mode, our handshake, `(at, wav)` utterances on its step timeline.
    Codec-free, so that the engines' CPU (one shared core under `--pin`) does not cap the calls measured."""
    return {"mode": "script", "handshake_delay_secs": HANDSHAKE, "codec_free": True,
            "script": [{"at": at, "wav": wav} for at, wav in lines]}


@contextlib.contextmanager
def fleet(config, engines: int, per_process: int, options: dict, work: Path) -> Iterator[Fleet]:
    """`engines` reference engines in processes of `per_process`, and the bridge dialling them; logs,
    the bridge's YAML and its records under `work`. Everything is stopped when the block exits."""
    from pipelines.bench.launch import free_port, free_ports, launched, run_command

    path, provider, ws_path = deployment(config)
    ports = free_ports(engines)
    groups = [ports[i : i + per_process] for i in range(0, engines, per_process)]
    bridge_yaml = work / "bridge.yaml"
    our_yaml(bridge_yaml, options, ",".join(f"ws://127.0.0.1:{p}" for p in ports), engines=engines, config=path)
    env = bench_env()
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(engine_launched(engine_command(group, options), env, str(work / f"engine-{i}.log")))
                 for i, group in enumerate(groups)]
        port = free_port()
        argv = run_command(bridge_yaml, port)
        child = stack.enter_context(launched(argv, port, env=env, timeout=120))
        keep_log(child.proc, child.startup, str(work / "bridge.log"))
        server = Server("ours", argv, port, str(work / "bridge.log"), pid=child.proc.pid)
        yield Fleet(server, f"ws://127.0.0.1:{port}{ws_path}", provider, list(zip(procs, groups)), work / "records")


@contextlib.contextmanager
def stock_fleet(speak_at: float, clip: str, work: Path) -> Iterator[Fleet]:
    """The stock pipecat baseline (pipelines/bench/stock.py, Exotel only): no engines, /stats or records."""
    from pipelines.bench.launch import free_port, launched
    from pipelines.bench.stock import stock_server_command

    port = free_port()
    argv = stock_server_command(port, speak_at, clip)
    with launched(argv, port, env=bench_env(), timeout=120) as child:
        keep_log(child.proc, child.startup, str(work / "stock.log"))
        server = Server("stock", argv, port, str(work / "stock.log"), pid=child.proc.pid)
        yield Fleet(server, f"ws://127.0.0.1:{port}/exotel", "exotel", [], None)


def proc_status(pid: int) -> dict:
    """VmRSS (MB), threads and open file descriptors of a process (Linux /proc); {} once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return {}


def machine_cpu_secs() -> float | None:
    """CPU seconds all cores have been busy (Linux /proc/stat), to tell other work on the machine apart."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait; guest is in user


def read_records(records: Path | None, outcomes: dict[str, dict]) -> None:
    """Add each finished call's record not read yet to `outcomes` (call id -> outcome, engine, apology,
    caller audio ms at the first barge-in decision)."""
    from pipelines.report import load_events, summarize

    if records is None or not records.is_dir():
        return
    for events_file in sorted(records.glob("*/events.jsonl")):
        if events_file.parent.name.split("-", 1)[-1] in outcomes:  # <UTC start>-<call id>: read already
            continue
        events, _ = load_events(events_file)
        summary = summarize(events)
        if summary["call_id"] in outcomes or not any(e["event"] == "call_ended" for e in events):
            continue
        decided = [e["audio_ms"] for e in events if e["event"] == "barge_in" and e.get("audio_ms") is not None]
        outcomes[summary["call_id"]] = {"outcome": summary["outcome"], "engine_url": summary["engine_url"],
                                        "apology": any(e["event"] == "apology" for e in events),
                                        "barge_in_audio_ms": decided[0] if decided else None}


# ---- calls ---------------------------------------------------------------------------------------


def call_audio(speech_at: float, seconds: float) -> tuple[np.ndarray, float]:
    """Silence, then the fixture's real speech from `speech_at`, then silence to `seconds`; and the
    speech's energy onset in s (the barge-in moment)."""
    from pipelines.sim.speech import energy_onset, fixture_wav

    said, rate = fixture_wav(FIXTURE)
    assert rate == RATE
    audio = np.concatenate([np.zeros(round(speech_at * RATE), np.int16), said])[: round(seconds * RATE)]
    return audio, speech_at + energy_onset(said, RATE) * 20 / 1000


@dataclass
class CallRun:
    sid: str
    start: float | None = None  # time.monotonic() when dialled
    end: float | None = None
    messages: list | None = None  # what the caller received, PCM16 payloads
    violations: list | None = None
    close_code: int | None = None
    sent_secs: float = 0.0
    unsent_secs: float = 0.0  # the caller's audio before the bridge accepted the call: the bridge's audio clock starts here
    error: str | None = None


async def run_call(fleet: Fleet, run: CallRun, audio: np.ndarray, seconds: float) -> CallRun:
    """Place one call as the fleet's provider at its real uplink cadence; errors are kept, not raised."""
    from pipelines.sim.caller import place_call

    run.start = time.monotonic()
    try:
        result = await place_call(fleet.url, audio, RATE, provider=fleet.provider, seconds=seconds,
                                  chunk_ms=UPLINK_MS[fleet.provider], call_sid=run.sid, stream_sid="MZ" + run.sid)
        run.messages = pcm_messages(result.messages, fleet.provider)
        run.violations, run.close_code, run.sent_secs = result.violations, result.close_code, result.sent_seconds
        run.unsent_secs = result.unsent_seconds
    except Exception as exc:  # counted as failed and listed
        run.error = f"{type(exc).__name__}: {exc}"
    run.end = time.monotonic()
    return run
