"""Start a server as a child process and wait until it says `serving ...`: tests and benchmarks share it.

Running servers in their own process keeps the measuring client off the server's event loop,
as a real provider would be.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages): children run from here


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (held together while picked, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Launched:
    proc: subprocess.Popen
    port: int
    startup: str  # everything it printed up to and including the `serving` line

    def url(self, path: str = "/exotel") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


def run_command(config: str | os.PathLike, port: int) -> list[str]:
    """Our own server: `python -m pipelines run CONFIG` on loopback."""
    return [sys.executable, "-m", "pipelines", "run", str(config), "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def launched(argv: list[str], port: int = 0, *, env: dict | None = None, timeout: float = 60.0,
             ready: str = "serving ") -> Iterator[Launched]:
    """The process runs until the block exits, ready once a line starts with `ready` (the reference
    engine prints its URL); RuntimeError with its output if it never gets there."""
    env = {k: v for k, v in (env or os.environ).items() if k != "PERSONAPLEX_URL"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(ready):
                break
        if not lines or not lines[-1].startswith(ready) or proc.poll() is not None:
            raise RuntimeError(f"{' '.join(argv)} did not start:\n" + "".join(lines))
        yield Launched(proc, port, "".join(lines))
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """A redis-server on `port` in `work` (no persistence, its log in work/redis.log): stop() kills it,
    start() again comes back empty on the same port, as a Redis restart without persistence does."""

    def __init__(self, port: int, work: Path):
        self.port, self.work, self.proc = port, Path(work), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        with open(self.work / "redis.log", "a") as log:
            self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.work)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start (see {self.work / 'redis.log'})")
            time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
