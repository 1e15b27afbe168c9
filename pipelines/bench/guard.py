"""`python -m pipelines bench guard`: what the guard (pipelines/guard.py) costs per relayed session.

N sessions go through a guard in its own process (`python -m pipelines guard`, pinned to one CPU when
this process may use two or more) to a reference engine in another (script mode, codec-free, so the
engine stays cheap); one more session goes to the engine directly, as the baseline. Each session is
the bridge's own opening (processors/personaplex/session.py: prompts in the query, the handshake),
then 80 ms Ogg-Opus pages of speech at real time, encoded once by the bridge's uplink writer
(processors/personaplex/uplink.py) and sent by every session.

Reported: the guard process's CPU (from /proc/PID/stat) over the steady part of the run, as % of
one core per session (target: <= 1 %), its RSS idle and at the end, and the added latency of a
relayed frame: the engine answers each uplink page with one audio page at once (input-clocked), so
page k sent -> audio page k received is the round trip; guarded minus direct is what the guard's two
extra loopback hops and its relaying add, both ways together.
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.bench.harness import command_argv, guarded, machine_lines, write_json

PAGE_SECS = 0.08
KIND_AUDIO = 0x01
HEADER_PAGES = 2  # the engine's OpusHead and OpusTags pages, before its first step
VOICE, PROMPT = "NATF0.pt", "You are the guard bench's agent."


def add_parser(subparsers):
    p = subparsers.add_parser("guard", help="the guard's CPU per relayed session, its RSS and added latency", description=__doc__)
    p.add_argument("--sessions", type=int, default=10, help="concurrent sessions through the guard (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="audio each session sends (default: %(default)s)")
    p.add_argument("--json", help="result file (default: bench-results/guard-<UTC stamp>.json)")
    return p


def bench_guard(args) -> int:
    from loguru import logger

    logger.remove()
    return guarded(lambda: _bench_guard(args))


def uplink_pages(seconds: float) -> list[bytes]:
    """The header pages, then one page per 80 ms of speech (pipecat's clip, repeated)."""
    from processors.audio import PIPECAT_SPEECH_WAV, read_wav
    from processors.personaplex.uplink import OpusUplinkWriter

    clip = read_wav(PIPECAT_SPEECH_WAV, 24000).astype(np.float32) / 32768.0
    steps = int(seconds / PAGE_SECS)
    pcm = np.tile(clip, steps * 1920 // len(clip) + 2)
    writer = OpusUplinkWriter(24000)
    pages = [writer.header_pages()]
    for i in range(steps):
        pages.append(writer.append_pcm(pcm[i * 1920:(i + 1) * 1920]))
    return pages


async def one_session(url: str, pages: list[bytes], start: float) -> list[float]:
    """Open as the bridge does, send the pages at real time from `start`; the round trip of each page."""
    from processors.personaplex.session import open_session

    ws = await open_session(url, VOICE, PROMPT, timeout=30.0)
    sent: list[float] = []
    received: list[float] = []

    async def receive() -> None:
        async for message in ws:
            if message[:1] == bytes([KIND_AUDIO]):
                received.append(time.perf_counter())

    reader = asyncio.create_task(receive())
    try:
        await ws.send(b"\x01" + pages[0])  # the header pages make no step
        loop = asyncio.get_running_loop()
        for i, page in enumerate(pages[1:]):
            await asyncio.sleep(max(0.0, start + i * PAGE_SECS - loop.time()))
            sent.append(time.perf_counter())
            await ws.send(b"\x01" + page)
        deadline = loop.time() + 5
        while len(received) < HEADER_PAGES + len(sent) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    answered = received[HEADER_PAGES:]
    return [(r - s) * 1000 for s, r in zip(sent, answered)]


async def drive(args, guard_url: str, engine_url: str, guard_pid: int, pages: list[bytes]) -> dict:
    from pipelines.bench.servers import process_cpu_secs

    loop = asyncio.get_running_loop()
    start = loop.time() + 3.0  # time for every handshake (0.5 s prompt phase each, all at once)
    rng = np.random.default_rng(0)
    offsets = rng.uniform(0, PAGE_SECS, args.sessions + 1)
    tasks = [asyncio.create_task(one_session(guard_url, pages, start + o)) for o in offsets[:-1]]
    tasks.append(asyncio.create_task(one_session(engine_url, pages, start + offsets[-1])))
    duration = (len(pages) - 1) * PAGE_SECS
    window = (start + 1.0, start + duration - 0.5)  # steady: every session sending
    await asyncio.sleep(max(0.0, window[0] - loop.time()))
    cpu0, t0 = process_cpu_secs(guard_pid), loop.time()
    await asyncio.sleep(max(0.0, window[1] - loop.time()))
    cpu1, t1 = process_cpu_secs(guard_pid), loop.time()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    guarded_ms = [x for r in results[:-1] if not isinstance(r, BaseException) for x in r]
    direct_ms = [] if isinstance(results[-1], BaseException) else results[-1]
    cpu = None if None in (cpu0, cpu1) else (cpu1 - cpu0) / (t1 - t0) * 100
    return {"guard_cpu_percent": cpu, "window_secs": round(t1 - t0, 2), "failed": failed,
            "guarded_ms": guarded_ms, "direct_ms": direct_ms}


def _quantiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {"n": len(a), "p50": round(float(np.median(a)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "p99": round(float(np.percentile(a, 99)), 2)}


def _bench_guard(args) -> int:
    from pipelines.bench.fleet import proc_status
    from pipelines.bench.launch import free_ports, launched
    from pipelines.bench.ramp import pin
    from pipelines.bench.servers import get_stats, keep_log

    argv = command_argv(["bench", "guard"])
    machine = machine_lines(argv)
    print("\n".join(machine), flush=True)
    if args.sessions < 1 or args.seconds < 3:
        print("error: --sessions at least 1, --seconds at least 3", file=sys.stderr)
        return 2
    pages = uplink_pages(args.seconds)
    engine_port, guard_port = free_ports(2)
    py = [sys.executable, "-m", "pipelines"]
    engine_argv = py + ["engine", "--host", "127.0.0.1", "--port", str(engine_port), "--no-tls", "--codec-free",
                        "--sessions", str(args.sessions + 1), "--handshake-delay-secs", "0.5"]
    guard_argv = py + ["guard", "--listen", f"127.0.0.1:{guard_port}", "--upstream", f"ws://127.0.0.1:{engine_port}",
                       "--capacity", str(args.sessions)]
    env = {**os.environ, "LOGURU_LEVEL": "WARNING"}
    cpus = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp, \
            launched(engine_argv, env=env, ready="ws://") as engine, \
            launched(guard_argv, guard_port, env=env, ready="serving ") as guard:
        keep_log(engine.proc, engine.startup, str(Path(tmp) / "engine.log"))
        keep_log(guard.proc, guard.startup, str(Path(tmp) / "guard.log"))
        pinned = None
        if len(cpus) >= 2:
            pinned = min(cpus)
            pin(guard.proc.pid, {pinned})
            for pid in (engine.proc.pid, os.getpid()):
                pin(pid, cpus - {pinned})
        time.sleep(0.5)
        rss_idle = proc_status(guard.proc.pid).get("rss_mb")
        r = asyncio.run(drive(args, f"ws://127.0.0.1:{guard_port}", f"ws://127.0.0.1:{engine_port}", guard.proc.pid, pages))
        status = proc_status(guard.proc.pid)
        stats = get_stats(guard_port)
    per_session = None if r["guard_cpu_percent"] is None else r["guard_cpu_percent"] / args.sessions
    g, d = _quantiles(r["guarded_ms"]), _quantiles(r["direct_ms"])
    added = {k: round(g[k] - d[k], 2) for k in ("p50", "p90", "p99") if k in g and k in d}
    print(f"\n{args.sessions} sessions through the guard (pinned to CPU {pinned}) + 1 direct, {args.seconds:g} s of 80 ms pages each; "
          f"CPU over {r['window_secs']} s")
    print(f"guard CPU: {r['guard_cpu_percent']:.2f} % of a core, {per_session:.3f} % per session (target <= 1 %)"
          if per_session is not None else "guard CPU: unknown (no /proc)")
    print(f"guard RSS: {rss_idle} MB idle, {status.get('rss_mb')} MB with the sessions; threads {status.get('threads')}, fds {status.get('fds')}")
    print(f"round trip page -> answer, ms: guarded {g}, direct {d}; added by the guard: {added}")
    print(f"guard /stats: {stats}")
    if r["failed"]:
        print(f"failed sessions: {r['failed'][:5]}")
    result = {"bench": "guard", "machine": machine, "argv": argv,
              "params": {"sessions": args.sessions, "seconds": args.seconds, "pinned_cpu": pinned},
              "guard_cpu_percent": r["guard_cpu_percent"], "per_session_percent": per_session, "window_secs": r["window_secs"],
              "rss_mb_idle": rss_idle, "rss_mb": status.get("rss_mb"), "guarded_ms": g, "direct_ms": d, "added_ms": added,
              "stats": stats, "failed": r["failed"]}
    print(f"\nwritten: {write_json(args.json, 'guard', result)}")
    return 1 if r["failed"] else 0
