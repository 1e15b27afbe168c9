"""`python -m pipelines bench conversation`: barge-in, stale audio, output cadence and start-up audio
on the wire, our server vs the stock pipecat baseline, as the simulated Exotel caller hears them.

Both servers run as their own processes (`python -m pipelines run` with a temporary copy of
configs/exotel.yaml, and pipelines/bench/stock.py); the callers run here. Every figure is on the
caller's timeline (t=0 when `start` is sent; caller chunk k leaves at (k+1)*chunk), so it includes
the provider's uplink chunking, both WebSockets and the server's whole pipeline.

- barge-in: the bot talks from ~1.5 s (our script engine: clip at 0.8 s of its step timeline after a
  0.5 s handshake; stock: `--speak-at 1.5`, same clip); the caller is silent, then says
  pipelines/sim/speech/interrupt_8k.wav from `--speech-at`. Latency = energy onset of that speech -> the
  first `clear` the caller receives. Stale = non-silent media received after that `clear` until the
  interrupted utterance would have ended (as timed by the cadence calls); for ours, at most until
  bot_speech's mute ends: this script engine never yields, so after the bounded mute the model is
  heard again by design (`bench scenarios` measures a model that yields).
- cadence (run first): the same bots, the caller stays silent: gaps in the caller's playout inside
  bot speech, Exotel chunk-rule violations.
- handshake: ours only, engine handshake 3 s (echo mode): `start` -> first non-silent media.
- holding onset: ours only, server side, from GET /stats `recent_calls` (pacer `onset_ms`), with the
  pacer's underruns and the output's refused stale chunks.
- CPU: each server process's CPU over the rounds (/proc), to tell a slow pipeline from a saturated loop.

Our server dials the reference engine running as its own process, as a remote PersonaPlex would be
(`--embedded-engine` puts it in the server's event loop instead); it logs at INFO (LOGURU_LEVEL),
stock pipecat at WARNING.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from processors.bot_speech import BotSpeechParams

RATE = 8000  # an 8 kHz Exotel call
SILENT_RMS = 100.0  # a media payload at or below this RMS (int16) counts as silence
GAP_TOLERANCE = 0.005  # playout gaps up to this long are not underruns (as processors/pacer.py)
FIXTURE = "interrupt_8k"
SCRIPT_AT = 0.8  # our engine's clip starts here on its step timeline...
HANDSHAKE = 0.5  # ...which starts after this handshake
STOCK_SPEAK_AT = 1.5  # the stock bot speaks this long after its pipeline starts
SLOW_HANDSHAKE = 3.0
HANDSHAKE_CALL_SECS = 5.0  # the greeting (4.6 s) plays out within the call
STALE_MARGIN = 0.5  # the stale window runs this long past the end of bot speech in the silent calls
MUTE_SECS = BotSpeechParams().mute_secs  # ours: what the bridge silences after a barge-in
TARGET_FIRST_AUDIO_MS = 300
PARTS = ("barge-in", "cadence", "handshake")
RUN_ORDER = ("cadence", "barge-in", "handshake")  # the silent calls first: they time the uninterrupted utterance


def add_parser(subparsers):
    p = subparsers.add_parser("conversation", help=bench_conversation.__doc__, description=bench_conversation.__doc__)
    p.add_argument("--calls", type=int, nargs="+", default=[1, 10], help="concurrent calls per round (default: 1 10)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of the 1-call barge-in and handshake cases (everything else runs one round)")
    p.add_argument("--chunk-ms", type=int, default=20,
                   help="caller uplink chunk, ms (20: pipecat's own measurement; Exotel streams ~100)")
    p.add_argument("--speech-at", type=float, default=4.0, help="seconds of silence before the caller barges in (>= 2.5)")
    p.add_argument("--call-secs", type=float, default=8.0, help="length of barge-in and cadence calls")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (holding onsets come with ours)")
    p.add_argument("--servers", nargs="+", choices=("ours", "stock"), default=["ours", "stock"])
    p.add_argument("--clip", default=None, help="what the bot says (default: configs/clips/apology.wav, 5.7 s)")
    p.add_argument("--jitter-ms", type=float, default=20.0, help="random stagger of call starts within a round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temporary directory)")
    p.add_argument("--timeline", action="store_true", help="print each call's clears and runs of non-silent chunks")
    p.add_argument("--embedded-engine", action="store_true",
                   help="embed our reference engine in our server's event loop instead of its own process "
                        "(a remote PersonaPlex never shares the server's CPU; embedded, it costs ~25%% of a core at 10 calls)")
    return p


# ---- pure analysis of what a caller received ------------------------------------------------------


@dataclass
class Chunk:
    t: float  # arrival, seconds on the call's timeline
    secs: float  # audio length
    rms: float  # int16 RMS of the payload

    @property
    def loud(self) -> bool:
        return self.rms > SILENT_RMS


def decode_media(msg: dict) -> np.ndarray:
    """The int16 samples of a `media` message (empty if it has no decodable payload)."""
    import base64
    import binascii

    try:
        pcm = base64.b64decode(msg["media"]["payload"], validate=True)
    except (KeyError, TypeError, binascii.Error, ValueError):
        return np.zeros(0, np.int16)
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0


def media_chunks(messages: list[tuple[float, dict]], rate: int) -> list[Chunk]:
    """Every `media` message as (arrival, duration, RMS), in arrival order."""
    out = []
    for t, msg in messages:
        if msg.get("event") == "media":
            samples = decode_media(msg)
            out.append(Chunk(t, len(samples) / rate, rms(samples)))
    return out


def clear_times(messages: list[tuple[float, dict]]) -> list[float]:
    return [t for t, msg in messages if msg.get("event") == "clear"]


def barge_in_latency(messages: list[tuple[float, dict]], onset: float) -> tuple[float | None, int]:
    """(seconds from `onset` to the first `clear` at or after it, None if none came; clears before onset)."""
    clears = clear_times(messages)
    after = [t for t in clears if t >= onset]
    return (after[0] - onset if after else None), len(clears) - len(after)


def stale_chunks(chunks: list[Chunk], cleared: float, until: float) -> list[Chunk]:
    """Non-silent chunks that arrived after the `clear` at `cleared` and before `until`."""
    return [c for c in chunks if cleared < c.t < until and c.loud]


def playout_gaps(messages: list[tuple[float, dict]], rate: int, tolerance: float = GAP_TOLERANCE) -> list[tuple[float, float]]:
    """Underruns inside bot speech: (arrival, gap seconds) for each non-silent chunk that arrived more than
    `tolerance` after the caller's playout of the previous chunk, itself non-silent, had run dry.

    Playout: play_end = max(play_end, arrival) + duration. A `clear` cuts the playout at its arrival and
    ends the speech run (audio after a clear is a new utterance, not a gap)."""
    gaps = []
    play_end: float | None = None
    prev_loud = False
    for t, msg in messages:
        event = msg.get("event")
        if event == "clear":
            play_end = t if play_end is None else min(play_end, t)
            prev_loud = False
        elif event == "media":
            samples = decode_media(msg)
            loud = rms(samples) > SILENT_RMS
            if loud and prev_loud and play_end is not None and t > play_end + tolerance:
                gaps.append((t, t - play_end))
            play_end = max(play_end if play_end is not None else t, t) + len(samples) / rate
            prev_loud = loud
    return gaps


def loud_runs(chunks: list[Chunk]) -> list[tuple[float, float]]:
    """(first arrival, last arrival + its length) of each run of consecutive non-silent chunks."""
    runs: list[tuple[float, float]] = []
    in_run = False
    for c in chunks:
        if c.loud and in_run:
            runs[-1] = (runs[-1][0], c.t + c.secs)
        elif c.loud:
            runs.append((c.t, c.t + c.secs))
        in_run = c.loud
    return runs


def first_audible(chunks: list[Chunk]) -> float | None:
    """Arrival of the first non-silent chunk."""
    return next((c.t for c in chunks if c.loud), None)


def speech_span(chunks: list[Chunk]) -> tuple[float, float] | None:
    """(first non-silent arrival, when the caller finishes playing the last non-silent chunk)."""
    play_end = None
    first = last = None
    for c in chunks:
        play_end = max(play_end if play_end is not None else c.t, c.t) + c.secs
        if c.loud:
            first = c.t if first is None else first
            last = play_end
    return None if first is None else (first, last)


def _p50_p95_max(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" if v is not None else "-" for v in (percentile(values, 50), percentile(values, 95), max(values, default=None)))


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p95 of fewer than 20 values is the maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def pacer_onsets(recent_calls: list[dict], call_ids: set[str]) -> tuple[list[float], list[float]]:
    """(first onset of each call = its greeting clip, every later onset) in ms, from /stats `recent_calls`."""
    first, later = [], []
    for call in recent_calls:
        if call.get("call_id") not in call_ids:
            continue
        onsets = _processor_stats(call, "pacer", "onset_ms").get("onset_ms") or []
        first += onsets[:1]
        later += onsets[1:]
    return first, later


def _processor_stats(call: dict, name: str, key: str) -> dict:
    """A processor's stats by its name, else the first processor's stats holding `key`."""
    stats = call.get("stats") or {}
    if isinstance(stats.get(name), dict):
        return stats[name]
    return next((s for s in stats.values() if isinstance(s, dict) and key in s), {})


def sum_stat(recent_calls: list[dict], call_ids: set[str], name: str, key: str) -> float | None:
    """Sum of processor `name`'s `key` over those finished calls; None if no call reported it."""
    values = [_processor_stats(c, name, key).get(key) for c in recent_calls if c.get("call_id") in call_ids]
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) if values else None


# ---- tables --------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def table(header: list[str], rows: list[list], first_width: int = 8) -> str:
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    widths = [max(first_width, widths[0])] + [max(w, 5) for w in widths[1:]]
    lines = []
    for row in [header, *rows]:
        cells = [f"{row[0]!s:<{widths[0]}}"] + [f"{v!s:>{w}}" for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _block(title: str, notes: list[str], body: str) -> None:
    print(f"\n### {title}\n")
    for note in notes:
        print(note)
    if notes:
        print()
    print("```")
    print(body)
    print("```")


# ---- running servers and calls -------------------------------------------------------------------


@dataclass
class Server:
    name: str  # "ours", "stock", "ours-handshake"
    argv: list[str]
    port: int
    log: str
    pid: int | None = None
    engine_argv: list[str] | None = None  # the reference engine our server dials (None: embedded)
    engine_pid: int | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/exotel"

    @property
    def ours(self) -> bool:
        return self.name.startswith("ours")


@dataclass
class Call:
    server: str
    part: str
    calls: int
    round: int
    sid: str
    result: object = None  # CallResult
    error: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


def our_yaml(path, engine: dict, urls: str | None = None, engines: int = 1, config=None) -> None:
    """`config` (default configs/exotel.yaml) with `engine.reference` replaced, `engine.urls` set when
    given, else `engines` embedded engines (one call each)."""
    import os

    import yaml

    from pipelines.config import CONFIG_DIR

    with open(config or CONFIG_DIR / "exotel.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["engine"]["reference"] = engine
    cfg["engine"]["local_engines"] = engines
    cfg["records"]["dir"] = os.path.join(os.path.dirname(path), "records")  # on, as deployed; kept out of the checkout
    if urls:
        cfg["engine"]["urls"] = urls
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def keep_log(proc, startup: str, path: str) -> None:
    """Drain a child's output into `path` so its pipe never fills and blocks it."""
    import threading

    def drain():
        with open(path, "a", errors="replace") as log:
            log.write(startup)
            for line in proc.stdout:
                log.write(line)

    threading.Thread(target=drain, name=f"log-{path}", daemon=True).start()


def engine_command(ports: list[int], options: dict) -> list[str]:
    """`python -m pipelines engine` (no TLS), one engine per port, with the options our YAML would
    give the embedded engines."""
    import sys

    argv = [sys.executable, "-m", "pipelines", "engine", "--host", "127.0.0.1", "--port", ",".join(map(str, ports)), "--no-tls",
            "--mode", options["mode"], "--handshake-delay", str(options["handshake_delay"])]
    for line in options.get("script", []):
        argv += ["--say", f"{line['at']}:{line['wav']}"]
    return argv


@contextlib.contextmanager
def engine_launched(argv: list[str], env: dict, log: str):
    """The reference engine as a child process, until the block exits; it is ready once it prints its URL."""
    from pipelines.bench.launch import launched

    with launched(argv, env=env, ready="ws://") as engine:
        keep_log(engine.proc, engine.startup, log)
        yield engine.proc


def get_stats(port: int) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


async def settle(server: Server, timeout: float = 15.0) -> dict | None:
    """Wait until our server has no call left (its finished calls are then in `recent_calls`)."""
    import asyncio

    if not server.ours:
        await asyncio.sleep(0.5)  # the stock server has no /stats
        return None
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = await asyncio.to_thread(get_stats, server.port)
        except OSError:
            s = None
        if s and s.get("calls_active") == 0 and s.get("connections") == 0 or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.1)


def process_cpu_secs(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), None if unknown."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


async def run_round(server: Server, part: str, n: int, rnd: int, audio, seconds: float, args, rng,
                    loads: list[dict]) -> list[Call]:
    import asyncio

    from pipelines.sim.caller import place_call

    calls = [Call(server.name, part, n, rnd, f"bench-{server.name}-{part}-{n}x-r{rnd}-c{i}") for i in range(n)]
    delays = rng.uniform(0, args.jitter_ms / 1000, n) if n > 1 else [0.0]

    async def one(call: Call, delay: float):
        await asyncio.sleep(delay)
        try:
            call.result = await place_call(server.url, audio, RATE, seconds=seconds, chunk_ms=args.chunk_ms,
                                           call_sid=call.sid, stream_sid="MZ" + call.sid)
            call.chunks = media_chunks(call.result.messages, RATE)
        except Exception as exc:  # counted as a miss and printed
            call.error = f"{type(exc).__name__}: {exc}"

    cpu0, own0, t0 = process_cpu_secs(server.pid), time.process_time(), time.monotonic()
    engine0 = process_cpu_secs(server.engine_pid) if server.engine_pid else None
    await asyncio.gather(*(one(c, d) for c, d in zip(calls, delays)))
    await settle(server)
    cpu1, own1, wall = process_cpu_secs(server.pid), time.process_time(), time.monotonic() - t0
    engine1 = process_cpu_secs(server.engine_pid) if server.engine_pid else None
    loads.append({"server": server.name, "part": part, "calls": n, "wall": wall, "bench_cpu": own1 - own0,
                  "server_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                  "engine_cpu": None if engine0 is None or engine1 is None else engine1 - engine0})
    return calls


def _rounds(part: str, n: int, args) -> int:
    """--repeat rounds of a single barge-in or handshake call; one round of everything else."""
    return args.repeat if n == 1 and part != "cadence" else 1


# ---- the bench ------------------------------------------------------------------------------------


def machine_lines(argv: list[str]) -> list[str]:
    import os
    import platform
    import shlex
    from importlib.metadata import version

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, pipecat-ai {version('pipecat-ai')}",
        f"command: python -m pipelines {shlex.join(argv)}",
    ]


def bench_conversation(args) -> int:
    """Barge-in latency, stale chunks after clear, playout underruns and first audio: ours vs stock pipecat."""
    import asyncio
    import os
    import tempfile
    from pathlib import Path

    from loguru import logger

    logger.remove()  # before pipecat's import-time banner; the caller's per-chunk warnings are counted in the tables

    from pipelines.bench.harness import command_argv, guarded
    from pipelines.bench.launch import free_port, free_ports, launched, run_command
    from pipelines.bench.stock import stock_server_command
    from pipelines.config import CONFIG_DIR
    from pipelines.sim.speech import energy_onset, fixture_wav
    from processors.audio import read_wav

    argv = command_argv(["bench", "conversation", "..."])
    for line in machine_lines(argv):
        print(line)
    if args.speech_at < 2.5:
        print(f"warning: --speech-at {args.speech_at} is below 2.5 s: Silero's onset latency depends on the silence before speech")

    clip = str(Path(args.clip).resolve()) if args.clip else str(CONFIG_DIR / "clips" / "apology.wav")
    clip_secs = len(read_wav(clip, RATE)) / RATE
    said, rate = fixture_wav(FIXTURE)
    assert rate == RATE
    preroll = np.zeros(round(args.speech_at * RATE), np.int16)
    barge_audio = np.concatenate([preroll, said])
    onset = (len(preroll) + energy_onset(said, RATE) * RATE * 20 // 1000) / RATE
    silent = np.zeros(0, np.int16)
    sessions = max(args.calls)
    parts = [p for p in RUN_ORDER if p in args.only]

    tmp = tempfile.TemporaryDirectory(prefix="bench-conversation-")
    log_dir = Path(args.log_dir or tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PERSONAPLEX_URL"}
    env.setdefault("LOGURU_LEVEL", "INFO")  # our server's logs at INFO, like a deployment (stock: WARNING)

    servers: list[Server] = []

    def ours(name: str, engine: dict) -> Server:
        path = Path(tmp.name) / f"{name}.yaml"
        engine_argv, urls = None, None
        if not args.embedded_engine:
            ports = free_ports(sessions)
            engine_argv, urls = engine_command(ports, engine), ",".join(f"ws://127.0.0.1:{p}" for p in ports)
        our_yaml(path, engine, urls, engines=sessions)
        port = free_port()
        return Server(name, run_command(path, port), port, str(log_dir / f"{name}.log"), engine_argv=engine_argv)

    if "ours" in args.servers and {"barge-in", "cadence"} & set(parts):
        servers.append(ours("ours", {"mode": "script", "handshake_delay": HANDSHAKE,
                                     "script": [{"at": SCRIPT_AT, "wav": clip}]}))
    if "stock" in args.servers and {"barge-in", "cadence"} & set(parts):
        port = free_port()
        servers.append(Server("stock", stock_server_command(port, STOCK_SPEAK_AT, clip), port, str(log_dir / "stock.log")))
    if "ours" in args.servers and "handshake" in parts:
        servers.append(ours("ours-handshake", {"mode": "echo", "handshake_delay": SLOW_HANDSHAKE}))

    print(f"scenario: 8 kHz Exotel calls, caller chunks {args.chunk_ms} ms; bot clip {Path(clip).name} ({clip_secs:.1f} s): "
          f"ours = reference engine ({'embedded' if args.embedded_engine else 'own process'}) script at {SCRIPT_AT} s "
          f"after a {HANDSHAKE} s handshake (exotel.yaml otherwise), "
          f"stock = bench_stock --speak-at {STOCK_SPEAK_AT}; caller speech ({FIXTURE}) from {args.speech_at:.1f} s, "
          f"energy onset at {onset:.2f} s; calls {args.call_secs:.1f} s; 1-call barge-in/handshake x{args.repeat}, "
          "other cases x1")
    if not servers:
        print("nothing to run")
        return 0

    rng = np.random.default_rng(args.seed)
    done: list[Call] = []
    loads: list[dict] = []
    recent: dict[str, list[dict]] = {}
    t_start = time.monotonic()

    async def run() -> None:
        for part in parts:
            for n in args.calls:
                for server in servers:
                    if (part == "handshake") != (server.name == "ours-handshake"):
                        continue
                    for rnd in range(_rounds(part, n, args)):
                        if part == "barge-in":
                            done.extend(await run_round(server, part, n, rnd, barge_audio, args.call_secs, args, rng, loads))
                        elif part == "cadence":
                            done.extend(await run_round(server, part, n, rnd, silent, args.call_secs, args, rng, loads))
                        else:
                            done.extend(await run_round(server, part, n, rnd, silent, HANDSHAKE_CALL_SECS, args, rng, loads))
                    if server.ours:  # /stats keeps the last 50 finished calls: read them after every case
                        stats = await settle(server) or {}
                        if "recent_calls" in stats:
                            have = recent.get(server.name) or []
                            seen = {c.get("call_id") for c in have}
                            recent[server.name] = have + [c for c in stats["recent_calls"] if c.get("call_id") not in seen]
                        else:
                            recent.setdefault(server.name, None)

    def serve() -> int:
        with contextlib.ExitStack() as stack:  # every server is terminated on the way out, Ctrl-C included
            for server in servers:
                if server.engine_argv:
                    engine_log = str(log_dir / f"{server.name}-engine.log")
                    server.engine_pid = stack.enter_context(engine_launched(server.engine_argv, env, engine_log)).pid
                child = stack.enter_context(launched(server.argv, server.port, env=env, timeout=120))
                server.pid = child.proc.pid
                keep_log(child.proc, child.startup, server.log)
            asyncio.run(run())
        return 0

    try:
        code = guarded(serve)
    finally:
        if args.log_dir is None:
            tmp.cleanup()
    if code:
        return code
    print(f"ran {len(done)} calls in {time.monotonic() - t_start:.0f} s")
    report(done, servers, recent, onset, args)
    report_load(loads, args)
    return 0


def utterance_end(done: list[Call], server: str, n: int) -> tuple[float, str]:
    """When the bot's utterance ends without barge-in: the silent calls' latest speech end + margin."""
    spans = [speech_span(c.chunks) for c in _select(done, server, "cadence", n) if c.result is not None]
    ends = [span[1] for span in spans if span]
    return (max(ends) + STALE_MARGIN, "silent calls") if ends else (math.inf, "call end")


def _select(done: list[Call], server: str, part: str, n: int) -> list[Call]:
    return [c for c in done if c.server == server and c.part == part and c.calls == n]


def report(done: list[Call], servers: list[Server], recent: dict, onset: float, args) -> None:
    errors = [c for c in done if c.error]
    for c in errors[:10]:
        print(f"call {c.sid} failed: {c.error}")
    if args.timeline:
        print("\ntimelines (s on the caller's timeline): clears; runs of non-silent chunks (arrival of the first - "
              "arrival + length of the last)")
        for c in done:
            if c.result is not None:
                runs = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in loud_runs(c.chunks))
                clears = ", ".join(f"{t:.3f}" for t in clear_times(c.result.messages))
                print(f"{c.sid}: clears [{clears}]; audible {runs}")

    if any(c.part == "barge-in" for c in done):
        lat_rows, stale_rows, detail = [], [], []
        for n in args.calls:
            for name in ("ours", "stock"):
                calls = _select(done, name, "barge-in", n)
                if not calls:
                    continue
                lats, early, stale, stale_calls = [], 0, 0, 0
                until, source = utterance_end(done, name, n)
                for c in calls:
                    if c.result is None:
                        continue
                    lat, before = barge_in_latency(c.result.messages, onset)
                    early += before
                    if lat is None:
                        detail.append(f"{c.sid}: no clear after onset ({c.result.clears} clears, {len(c.chunks)} media)")
                        continue
                    lats.append(lat)
                    cleared = onset + lat
                    late = stale_chunks(c.chunks, cleared, until if name == "stock" else min(until, cleared + MUTE_SECS))
                    stale += len(late)
                    stale_calls += bool(late)
                    if late:
                        detail.append(f"{c.sid}: clear at {onset + lat:.3f} s, stale at "
                                      + ", ".join(f"{s.t:.3f} s ({s.secs * 1000:.0f} ms, rms {s.rms:.0f})" for s in late[:6]))
                miss = len(calls) - len(lats)
                lat_rows.append([name, n, len(calls), miss, early, _ms(percentile(lats, 50)), _ms(percentile(lats, 95)),
                                 _ms(max(lats) if lats else None)])
                stale_rows.append([name, n, len(lats), stale, stale_calls, f"{until:.2f}" if until < math.inf else "-", source])
        _block("Barge-in: caller speech onset -> `clear` at the caller",
               [f"Caller chunks {args.chunk_ms} ms; onset at {onset:.2f} s after {args.speech_at:.1f} s of silence; "
                "ms on the caller's timeline (includes uplink chunking); p95 nearest-rank. "
                "miss: no `clear` after onset; early: `clear`s before onset."],
               table(["server", "calls", "n", "miss", "early", "p50 ms", "p95 ms", "max ms"], lat_rows))
        _block("Stale audio after `clear`",
               [f"Media messages with RMS > {SILENT_RMS:.0f} received after the barge-in `clear` and before the "
                "interrupted utterance would have ended: `until s` is the latest end of bot speech in the silent "
                f"(cadence) calls of the same server and concurrency + {STALE_MARGIN} s, or the end of the call "
                f"without them. Ours: at most {MUTE_SECS} s (bot_speech mute_secs) after the `clear`; this script "
                "engine never yields, so after the mute the model is heard again by design."],
               table(["server", "calls", "cleared", "stale chunks", "calls with stale", "until s", "from"], stale_rows))
        for line in detail[:20]:
            print(line)

    if any(c.part in ("cadence", "handshake") for c in done):
        rows, detail = [], []
        for part, names in (("cadence", ("ours", "stock")), ("handshake", ("ours-handshake",))):
            for n in args.calls:
                for name in names:
                    calls = [c for c in _select(done, name, part, n) if c.result is not None]
                    if not calls:
                        continue
                    gaps = []
                    spans, speech, violations, chunk_ms = [], 0.0, 0, set()
                    for c in calls:
                        g = playout_gaps(c.result.messages, RATE)
                        gaps += g
                        if g:
                            detail.append(f"{c.sid}: gaps at " + ", ".join(f"{t:.3f} s ({s * 1000:.0f} ms)" for t, s in g[:8]))
                        span = speech_span(c.chunks)
                        if span:
                            spans.append(span)
                        speech += sum(ch.secs for ch in c.chunks if ch.loud)
                        violations += len(c.result.violations)
                        chunk_ms |= {round(ch.secs * 1000) for ch in c.chunks}
                    label = "ours (3 s handshake, greeting)" if part == "handshake" else name
                    sizes = "/".join(str(s) for s in sorted(chunk_ms)[:3]) + ("/..." if len(chunk_ms) > 3 else "")
                    rows.append([label, n, len(calls), f"{speech:.1f}",
                                 f"{np.median([s[0] for s in spans]):.2f}-{np.median([s[1] for s in spans]):.2f}" if spans else "-",
                                 sizes, len(gaps), f"{sum(s for _, s in gaps) * 1000:.0f}", violations])
        _block("Output cadence: underruns in the caller's playout inside bot speech",
               ["Caller silent. Playout end = max(previous end, arrival) + chunk length; an underrun is a non-silent chunk "
                f"arriving > {GAP_TOLERANCE * 1000:.0f} ms after the previous non-silent chunk's playout ended. "
                "speech s: non-silent audio received (all calls); span: median first non-silent arrival - playout end; "
                "violations: Exotel chunk-rule breaches the caller saw (multiple of 320 B, >= 3200 B, <= 100 kB)."],
               table(["server", "calls", "n", "speech s", "span s", "chunk ms", "underruns", "gap ms", "violations"], rows,
                     first_width=30))
        for line in detail[:20]:
            print(line)
        bad = [v for c in done if c.result is not None and c.server.startswith("ours") for v in c.result.violations]
        for v in bad[:5]:
            print(f"ours violation: {v}")

    hs = [c for c in done if c.part == "handshake" and c.result is not None]
    if hs:
        rows = []
        for n in args.calls:
            calls = [c for c in hs if c.calls == n]
            firsts = [first_audible(c.chunks) for c in calls]
            got = [t for t in firsts if t is not None]
            p95 = percentile(got, 95)
            ok = "yes" if p95 is not None and len(got) == len(calls) and p95 * 1000 <= TARGET_FIRST_AUDIO_MS else "no"
            rows.append(["ours", n, len(calls), len(calls) - len(got), _ms(percentile(got, 50)), _ms(p95),
                         _ms(max(got) if got else None), ok])
        _block(f"First audible audio with a {SLOW_HANDSHAKE:.0f} s engine handshake",
               [f"Reference engine in echo mode with handshake_delay {SLOW_HANDSHAKE}; `start` sent -> first media with "
                f"RMS > {SILENT_RMS:.0f} at the caller (the holding greeting). Stock pipecat has no engine handshake "
                "(its bot is in-process), so there is no stock row."],
               table(["server", "calls", "n", "silent", "p50 ms", "p95 ms", "max ms", f"<= {TARGET_FIRST_AUDIO_MS} ms"], rows))

    ours_names = [name for name in ("ours", "ours-handshake") if name in recent]
    if ours_names:
        rows, missing = [], []
        for name in ours_names:
            calls_stats = recent[name]
            if calls_stats is None:
                missing.append(name)
                continue
            for part in PARTS:
                for n in args.calls:
                    ids = {c.sid for c in done if c.server == name and c.part == part and c.calls == n}
                    if not ids:
                        continue
                    found = {c.get("call_id") for c in calls_stats} & ids
                    greet, later = pacer_onsets(calls_stats, ids)
                    underruns = sum_stat(calls_stats, ids, "pacer", "underruns")
                    under_secs = sum_stat(calls_stats, ids, "pacer", "underrun_secs")
                    refused = sum_stat(calls_stats, ids, "output", "stale_chunks_refused")
                    rows.append([part, n, f"{len(found)}/{len(ids)}",
                                 _p50_p95_max(greet),
                                 _p50_p95_max(later),
                                 "-" if underruns is None else f"{underruns:.0f}",
                                 "-" if under_secs is None else f"{under_secs * 1000:.0f}",
                                 "-" if refused is None else f"{refused:.0f}"])
        if rows:
            _block("Ours, server side: holding clip onset and pacer/output counters (GET /stats `recent_calls`)",
                   ["onset: ms from an utterance's TTSStartedFrame reaching the pacer to its first chunk sent (pacer "
                    "`onset_ms`); a call's first onset is its greeting clip, later ones model utterances. "
                    "p50/p95/max. underruns: the pacer's own count and ms; refused: chunks older than the last "
                    "`clear` that the output refused (`stale_chunks_refused`)."],
                   table(["part", "calls", "stats", "greeting onset ms", "later onsets ms", "pacer underruns",
                          "underrun ms", "refused"], rows))
        for name in missing:
            print(f"\n{name}: GET /stats has no `recent_calls` yet: holding onsets and server counters not reported")


def report_load(loads: list[dict], args) -> None:
    rows = []
    for name in ("ours", "stock", "ours-handshake"):
        for part in PARTS:
            for n in args.calls:
                sel = [x for x in loads if x["server"] == name and x["part"] == part and x["calls"] == n]
                if not sel:
                    continue
                wall = sum(x["wall"] for x in sel)
                cpu = [x["server_cpu"] for x in sel]
                server_pct = "-" if None in cpu else f"{sum(cpu) / wall * 100:.0f}"
                engine = [x["engine_cpu"] for x in sel]
                engine_pct = "-" if None in engine else f"{sum(engine) / wall * 100:.0f}"
                rows.append([name, part, n, len(sel), f"{wall:.1f}", server_pct, engine_pct,
                             f"{sum(x['bench_cpu'] for x in sel) / wall * 100:.0f}"])
    if rows:
        _block("CPU while the calls ran",
               ["% of one core over the rounds' wall time (calls plus settling): the server process (one asyncio "
                "loop; ours includes the reference engine unless it ran as its own process, `engine %`), and this "
                "bench process (the simulated callers)."],
               table(["server", "part", "calls", "rounds", "wall s", "server %", "engine %", "callers %"], rows,
                     first_width=14))
