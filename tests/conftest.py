"""Call records of servers the tests launch go to a temporary directory, not the checkout; a real redis-server
for the tests of shared engine leases (one per test, on a free port, in a temporary directory)."""

import os
import shutil
import tempfile

import pytest

from pipelines.bench.launch import RedisServer, free_port


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


@pytest.fixture
def redis_server(tmp_path):
    """A started redis-server (`.url`, `.stop()`), killed at teardown; the test is skipped where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server): the shared engine pool needs a real Redis")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
