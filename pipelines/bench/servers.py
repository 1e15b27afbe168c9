"""Our server, the stock baseline and the reference engine as child processes of a bench: their
deployment file, their logs, their GET /stats and their CPU."""

import contextlib
import time
from dataclasses import dataclass


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
            "--mode", options["mode"], "--handshake-delay-secs", str(options["handshake_delay_secs"])]
    for line in options.get("script", []):
        argv += ["--say", f"{line['at']}:{line['wav']}"]
    if options.get("codec_free"):
        argv.append("--codec-free")
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

