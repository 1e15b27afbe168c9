"""`python -m pipelines bench stall`: what the biggest messages a peer may send cost every other call.

One Exotel call (the victim) hears the reference engine say configs/clips/apology.wav twice while a
second connection (the attacker) sends `--messages` media messages of one kind, `--every` s apart,
from 3 s into the victim's call. Kinds, each against a bridge of its own (`python -m pipelines run`,
engines in their own process, so the bridge's loop does the bridge's work only):

- none: no attacker, the baseline;
- largest: the largest message Exotel may legally send, a 100 KiB PCM chunk (6.4 s at 8 kHz) in JSON,
  decoded and pushed through VAD, resampling and the Opus uplink like any caller audio;
- oversize: 1 MB of base64, the message that once stalled the loop 731 ms (dropped undecoded now);
- nested: 10,000 levels of JSON arrays (dropped as too deep).

Figures, per kind: the bridge's own event-loop lag (`bridge_event_loop_lag_*` on /metrics: how late a
10 ms timer fired; max, and ticks later than 5 and 20 ms), and the victim's output gaps inside bot
speech (the excess of an inter-arrival gap over the chunk before it: dead air the caller heard).
"""

import asyncio
import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import websockets

from pipelines.bench.fleet import CallRun, fleet, run_call, script_options
from pipelines.bench.harness import command_argv, guarded, machine_lines, table, write_json
from pipelines.bench.load import CLIP
from pipelines.bench.received import RATE, gap_figures, speech_gaps

SAY = ((0.8, CLIP), (7.0, CLIP))  # bot speech from ~1.3 s to ~13.2 s on the victim's timeline
CALL_SECS = 15.0
ATTACK_AT = 3.0
KINDS = ("none", "largest", "oversize", "nested")
LATE_MS = (5, 20)


def attack_message(kind: str) -> str:
    if kind == "largest":
        pcm = (np.random.default_rng(0).normal(0, 3000, 51_200)).astype(np.int16).tobytes()  # 102,400 B
        payload = base64.b64encode(pcm).decode()
        return json.dumps({"event": "media", "stream_sid": "attacker", "media": {"chunk": "1", "timestamp": "0", "payload": payload}})
    if kind == "oversize":
        return json.dumps({"event": "media", "stream_sid": "attacker", "media": {"payload": "A" * 1_000_000}})
    if kind == "nested":
        return "[" * 10_000 + "]" * 10_000
    raise ValueError(kind)


async def attack(url: str, kind: str, messages: int, every: float) -> int:
    """Start a call, then send the messages; returns how many were sent before the server closed."""
    start = {"event": "start", "stream_sid": "attacker", "start": {"stream_sid": "attacker", "call_sid": "attacker"}}
    message = attack_message(kind)
    sent = 0
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        await ws.send(json.dumps(start))
        for _ in range(messages):
            try:
                await ws.send(message)
            except websockets.ConnectionClosed:
                break
            sent += 1
            await asyncio.sleep(every)
    return sent


async def drive(f, kind: str, messages: int, every: float) -> tuple[CallRun, int]:
    audio = np.zeros(round(CALL_SECS * RATE), np.int16)
    victim = asyncio.create_task(run_call(f, CallRun("victim"), audio, CALL_SECS))
    sent = 0
    if kind != "none":
        await asyncio.sleep(ATTACK_AT)
        sent = await attack(f.url, kind, messages, every)
    return await victim, sent


def scrape(port: int) -> dict[str, float]:
    """The loop-lag and malformed-message series of the bridge's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("bridge_event_loop_lag", "bridge_malformed_messages_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def lag_figures(m: dict[str, float]) -> dict:
    count = m.get("bridge_event_loop_lag_seconds_count", 0.0)

    def over(ms: int) -> float:
        le = f'bridge_event_loop_lag_seconds_bucket{{le="{ms / 1000}"}}'
        return count - m.get(le, count)

    return {"ticks": int(count), "max_ms": round(m.get("bridge_event_loop_lag_max_seconds", 0.0) * 1000, 1),
            **{f"over_{ms}ms": int(over(ms)) for ms in LATE_MS}}


def run_kind(args, kind: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-stall-{kind}-") as tmp:
        with fleet(args.config, 2, 2, script_options(SAY), Path(tmp)) as f:
            if f.provider != "exotel":
                raise RuntimeError("bench stall speaks Exotel: its largest legal message is the one worth measuring")
            t = time.monotonic()
            victim, sent = asyncio.run(drive(f, kind, args.messages, args.every))
            metrics = scrape(f.server.port)
    dropped = {k.split('reason="')[1].rstrip('"}'): int(v) for k, v in metrics.items()
               if k.startswith("bridge_malformed_messages_total") and v}
    return {"kind": kind, "sent": sent, "dropped": dropped, "lag": lag_figures(metrics),
            "victim_gaps": gap_figures(speech_gaps(victim.messages or [])), "victim_error": victim.error,
            "secs": round(time.monotonic() - t, 1)}


def add_parser(subparsers):
    p = subparsers.add_parser("stall", help="the event-loop cost of a peer's biggest messages, seen by another call",
                              description=__doc__)
    p.add_argument("--config", default="exotel.yaml", help="an Exotel deployment file, path or name in configs/")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--messages", type=int, default=5, help="attacker messages per kind")
    p.add_argument("--every", type=float, default=2.0,
                   help="s between them (2 s: the rate limit admits every largest message)")
    p.add_argument("--json", help="result file (default: bench-results/stall-<UTC stamp>.json)")
    return p


def bench_stall(args) -> int:
    from loguru import logger

    logger.remove()
    return guarded(lambda: _bench_stall(args))


def _bench_stall(args) -> int:
    argv = command_argv(["bench", "stall"])
    machine = machine_lines(argv)
    print("\n".join(machine), flush=True)
    rows = []
    for kind in args.kinds:
        rows.append(run_kind(args, kind))
        print(f"{kind}: done in {rows[-1]['secs']} s", file=sys.stderr, flush=True)
    print(f"\n{args.messages} attacker messages {args.every:g} s apart from {ATTACK_AT:g} s; victim {CALL_SECS:g} s\n")
    print(table(["attack", "sent", "dropped", "ticks", "lag max ms", *(f">{ms} ms" for ms in LATE_MS),
                 "victim gap excess max ms"],
                [[r["kind"], r["sent"], ",".join(f"{k}:{v}" for k, v in r["dropped"].items()) or "-", r["lag"]["ticks"],
                  r["lag"]["max_ms"], *(r["lag"][f"over_{ms}ms"] for ms in LATE_MS), r["victim_gaps"]["excess_max_ms"]]
                 for r in rows]))
    result = {"bench": "stall", "machine": machine, "argv": argv,
              "params": {"messages": args.messages, "every_s": args.every, "attack_at_s": ATTACK_AT, "call_s": CALL_SECS},
              "rows": rows}
    print(f"\nwritten: {write_json(args.json, 'stall', result)}")
    return 0
