"""`bench cluster`, tiny: real redis-server, guards, engines and bridge processes, a bridge kill and a Redis restart.

No timing is asserted; the figures' keys are, and that no engine ever served two calls at once."""

import json
import shutil

import pytest

from pipelines.bench import main

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")


def test_a_tiny_cluster_run_writes_its_figures_and_never_double_books(tmp_path):
    out = tmp_path / "cluster.json"
    rc = main(["cluster", "--bridges", "2", "--engines", "2", "--calls", "6", "--call-secs", "2", "--json", str(out),
               "--log-dir", str(tmp_path / "work")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert {"outcomes", "double_bookings", "engine_idle_while_waiting_s", "fifo_violations", "lease_setup_ms", "bridge_kill",
            "redis_restart", "per_call", "samples"} <= r.keys()
    d = r["double_bookings"]
    assert d["guard_active_max"] <= 1 and d["engine_connections_peak"] <= 1 and d["served_twice"] == 0
    assert d["guard_refused_before_redis_restart"] == 0  # the restart wipes leases in flight: later refusals are the guard's job
    assert len(r["per_call"]) == 6 and sum(r["outcomes"].values()) == 6
    assert {"engines_held", "readmitted_s", "calls_lost"} <= r["bridge_kill"].keys()
    assert {"in_flight", "in_flight_failed", "next_lease_after_kill_s"} <= r["redis_restart"].keys()
    assert {"n", "p50", "p99"} <= r["lease_setup_ms"].keys()
