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
import time

import numpy as np

from pipelines.bench.conversation_report import PARTS, SLOW_HANDSHAKE, Call, report, report_load
from pipelines.bench.received import RATE, media_chunks
from pipelines.bench.servers import Server, process_cpu_secs, settle

FIXTURE = "interrupt_8k"
SCRIPT_AT = 0.8  # our engine's clip starts here on its step timeline...
HANDSHAKE = 0.5  # ...which starts after this handshake
STOCK_SPEAK_AT = 1.5  # the stock bot speaks this long after its pipeline starts
HANDSHAKE_CALL_SECS = 5.0  # the greeting (4.6 s) plays out within the call
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


def caller_audio(speech_at: float) -> tuple[np.ndarray, float]:
    """The barge-in caller's audio (silence, then the fixture's speech from `speech_at`) and the speech's
    energy onset, s on the caller's timeline (caller chunks of 20 ms)."""
    from pipelines.sim.speech import energy_onset, fixture_wav

    said, rate = fixture_wav(FIXTURE)
    assert rate == RATE
    preroll = np.zeros(round(speech_at * RATE), np.int16)
    onset = (len(preroll) + energy_onset(said, RATE) * RATE * 20 // 1000) / RATE
    return np.concatenate([preroll, said]), onset


def plan_servers(args, parts: list[str], clip: str, work, log_dir) -> list[Server]:
    """The servers the parts need: ours (script engine), stock, ours with a slow handshake (echo engine);
    our deployment files go to `work`, every log to `log_dir`."""
    from pipelines.bench.launch import free_port, free_ports, run_command
    from pipelines.bench.servers import engine_command, our_yaml
    from pipelines.bench.stock import stock_server_command

    sessions = max(args.calls)
    servers: list[Server] = []

    def ours(name: str, engine: dict) -> Server:
        path = work / f"{name}.yaml"
        engine_argv, urls = None, None
        if not args.embedded_engine:
            ports = free_ports(sessions)
            engine_argv, urls = engine_command(ports, engine), ",".join(f"ws://127.0.0.1:{p}" for p in ports)
        our_yaml(path, engine, urls, engines=sessions)
        port = free_port()
        return Server(name, run_command(path, port), port, str(log_dir / f"{name}.log"), engine_argv=engine_argv)

    if "ours" in args.servers and {"barge-in", "cadence"} & set(parts):
        servers.append(ours("ours", {"mode": "script", "handshake_delay_secs": HANDSHAKE,
                                     "script": [{"at": SCRIPT_AT, "wav": clip}]}))
    if "stock" in args.servers and {"barge-in", "cadence"} & set(parts):
        port = free_port()
        servers.append(Server("stock", stock_server_command(port, STOCK_SPEAK_AT, clip), port, str(log_dir / "stock.log")))
    if "ours" in args.servers and "handshake" in parts:
        servers.append(ours("ours-handshake", {"mode": "echo", "handshake_delay_secs": SLOW_HANDSHAKE}))
    return servers


def collect_recent(server: Server, stats: dict, recent: dict[str, list[dict] | None]) -> None:
    """Add the finished calls in our server's /stats not seen yet to recent[server] (None: it lists none)."""
    if "recent_calls" in stats:
        have = recent.get(server.name) or []
        seen = {c.get("call_id") for c in have}
        recent[server.name] = have + [c for c in stats["recent_calls"] if c.get("call_id") not in seen]
    else:
        recent.setdefault(server.name, None)


async def run_parts(servers: list[Server], parts: list[str], audio: dict[str, np.ndarray], args, rng,
                    done: list[Call], loads: list[dict], recent: dict) -> None:
    """Every round of every part on every server that serves it, in order; our servers' finished calls
    are read after each case."""
    for part in parts:
        seconds = HANDSHAKE_CALL_SECS if part == "handshake" else args.call_secs
        for n in args.calls:
            for server in servers:
                if (part == "handshake") != (server.name == "ours-handshake"):
                    continue
                for rnd in range(_rounds(part, n, args)):
                    done.extend(await run_round(server, part, n, rnd, audio[part], seconds, args, rng, loads))
                if server.ours:  # /stats keeps the last 50 finished calls: read them after every case
                    collect_recent(server, await settle(server) or {}, recent)


def serve(servers: list[Server], env: dict, log_dir, body) -> int:
    """Start every server (and our engines), run `body()` while they serve; all are stopped on the way
    out, Ctrl-C included."""
    from pipelines.bench.launch import launched
    from pipelines.bench.servers import engine_launched, keep_log

    with contextlib.ExitStack() as stack:
        for server in servers:
            if server.engine_argv:
                engine_log = str(log_dir / f"{server.name}-engine.log")
                server.engine_pid = stack.enter_context(engine_launched(server.engine_argv, env, engine_log)).pid
            child = stack.enter_context(launched(server.argv, server.port, env=env, timeout=120))
            server.pid = child.proc.pid
            keep_log(child.proc, child.startup, server.log)
        body()
    return 0


def bench_conversation(args) -> int:
    """Barge-in latency, stale chunks after clear, playout underruns and first audio: ours vs stock pipecat."""
    import asyncio
    import os
    import tempfile
    from pathlib import Path

    from loguru import logger

    logger.remove()  # before pipecat's import-time banner; the caller's per-chunk warnings are counted in the tables

    from pipelines.bench.harness import command_argv, guarded, machine_lines
    from pipelines.config import CONFIG_DIR
    from processors.audio import read_wav

    argv = command_argv(["bench", "conversation", "..."])
    for line in machine_lines(argv):
        print(line)
    if args.speech_at < 2.5:
        print(f"warning: --speech-at {args.speech_at} is below 2.5 s: Silero's onset latency depends on the silence before speech")

    clip = str(Path(args.clip).resolve()) if args.clip else str(CONFIG_DIR / "clips" / "apology.wav")
    clip_secs = len(read_wav(clip, RATE)) / RATE
    barge_audio, onset = caller_audio(args.speech_at)
    silent = np.zeros(0, np.int16)
    parts = [p for p in RUN_ORDER if p in args.only]

    tmp = tempfile.TemporaryDirectory(prefix="bench-conversation-")
    log_dir = Path(args.log_dir or tmp.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PERSONAPLEX_URL"}
    env.setdefault("LOGURU_LEVEL", "INFO")  # our server's logs at INFO, like a deployment (stock: WARNING)
    servers = plan_servers(args, parts, clip, Path(tmp.name), log_dir)

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
    recent: dict[str, list[dict] | None] = {}
    t_start = time.monotonic()
    audio = {"barge-in": barge_audio, "cadence": silent, "handshake": silent}

    def body() -> None:
        asyncio.run(run_parts(servers, parts, audio, args, rng, done, loads, recent))

    try:
        code = guarded(lambda: serve(servers, env, log_dir, body))
    finally:
        if args.log_dir is None:
            tmp.cleanup()
    if code:
        return code
    print(f"ran {len(done)} calls in {time.monotonic() - t_start:.0f} s")
    report(done, recent, onset, args)
    report_load(loads, args)
    return 0
