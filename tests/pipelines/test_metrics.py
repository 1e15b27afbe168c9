"""/metrics carries the process's own figures (CPU, memory, file descriptors) beside the bridge's.

The Deployment's requests and limits (configs/kubernetes/bridge.yaml) are checked against these, so
they must be on every server's registry, scraped from the call port. One in-process server, no call.
"""

import asyncio
import platform
import sys
import textwrap
import time

import pytest

from pipelines import builder, config
from pipelines.metrics import Metrics
from pipelines.server import CallServer
from processors.personaplex.pools import EnginePools
from tests.pipelines.served import metric

DEPLOYMENT = """\
transport: {type: exotel, params: {path: /exotel}}
processors:
  - type: resample
    params: {audio: input, rate: 24000}
"""

PROCESS = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
           "process_open_fds", "process_max_fds", "process_start_time_seconds")


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* comes from /proc")
async def test_metrics_carry_process_cpu_memory_and_fds(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(DEPLOYMENT))
    server = CallServer(builder.plan(config.load(path, {})), EnginePools.of("ws://127.0.0.1:9"), "127.0.0.1", 0)
    await server.start()
    try:
        status, text = await get(server.port, "/metrics")
    finally:
        await server.stop()
    assert status == 200
    for name in PROCESS:
        assert metric(text, name) is not None, f"{name} missing from /metrics"
    rss = metric(text, "process_resident_memory_bytes")
    assert 10e6 < rss < 10e9, f"RSS {rss} bytes is not this process's"
    assert metric(text, "process_cpu_seconds_total") > 0
    assert 3 <= metric(text, "process_open_fds") <= metric(text, "process_max_fds")
    assert 0 < metric(text, "process_start_time_seconds") <= time.time()
    assert metric(text, "python_info", implementation=platform.python_implementation(),
                  major=str(sys.version_info.major), minor=str(sys.version_info.minor)) == 1
    assert metric(text, "python_gc_collections_total", generation="0") is not None
    assert metric(text, "bridge_active_calls") == 0  # the bridge's own metrics are still there


def test_two_servers_in_one_process_each_report_the_process():
    """Each server's registry has its own process collector, so neither registration fails nor is missing."""
    first, second = Metrics().render().decode(), Metrics().render().decode()
    for text in (first, second):
        assert metric(text, "process_resident_memory_bytes") > 0
