"""Call records of servers the tests launch go to a temporary directory, not the checkout; a real redis-server
for the tests of shared engine leases (one per test, on a free port, in a temporary directory)."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from pipelines.bench.launch import free_port


@pytest.fixture(scope="session", autouse=True)
def call_records_dir():
    with tempfile.TemporaryDirectory(prefix="call-records-") as path:
        old = os.environ.get("CALL_RECORDS")
        os.environ["CALL_RECORDS"] = path
        yield path
        if old is None:
            os.environ.pop("CALL_RECORDS", None)
        else:
            os.environ["CALL_RECORDS"] = old


class RedisServer:
    def __init__(self, directory: str):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self._launch()

    def restart(self) -> None:
        """Killed and started again on the same port, empty: what a Redis restart without persistence looks like."""
        self.stop()
        self._launch()

    def _launch(self) -> None:
        directory = self.directory
        self.proc = subprocess.Popen(["redis-server", "--save", "", "--appendonly", "no", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING (exit code {self.proc.returncode})")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    """A started redis-server (`.url`, `.stop()`), killed at teardown; the test is skipped where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server): the shared engine pool needs a real Redis")
    server = RedisServer(str(tmp_path))
    yield server
    server.stop()
