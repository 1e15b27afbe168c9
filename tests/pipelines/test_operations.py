"""Operations of `python -m pipelines run` as a subprocess: call records, the report, health,
readiness, metrics, the engine pool seen from the caller, log lines and the SIGTERM drain.

Every server here is a real process, dialled over loopback by the simulated Exotel caller
with real speech. Records go to a temporary directory.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import websockets

from pipelines.bench.launch import free_port, launched, run_command
from pipelines.server import DRAIN_FINISH_SECS
from pipelines.sim.caller import place_call
from tests.pipelines.served import fetch, metric, rms, variant_config
from tests.speech import speech

RATE = 8000


def records_of(root) -> list:
    return sorted(p for p in root.iterdir() if p.is_dir())


def events_of(record) -> list[dict]:
    """Every line of events.jsonl, each of which must parse."""
    text = (record / "events.jsonl").read_text()
    assert text.endswith("\n"), "a line was left half-written"
    return [json.loads(line) for line in text.splitlines()]


def names(events) -> list[str]:
    return [e["event"] for e in events]


def caller_audio(seconds: float) -> np.ndarray:
    """The word said twice, after 1.5 s of silence (the engine's prompt phase), padded to `seconds`."""
    said = speech(RATE, repeat=2, gap=0.5)
    audio = np.concatenate([np.zeros(int(1.5 * RATE), np.int16), said])
    return np.concatenate([audio, np.zeros(max(0, int(seconds * RATE) - len(audio)), np.int16)])


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records"
    path.mkdir()
    return path


def server_env(records) -> dict:
    return {**os.environ, "CALL_RECORDS": str(records)}


def start(config: str, records, *extra: str):
    port = free_port()
    return launched(run_command(config, port) + list(extra), port, env=server_env(records)), port


async def test_a_call_leaves_a_record_metrics_and_a_report(tmp_path, records):
    config = variant_config(tmp_path, "exotel.yaml", records={"audio": True})
    ctx, port = start(config, records, "--engines", "2")
    with ctx as srv:
        assert fetch(port, "/healthz") == (200, "ok\n")
        assert fetch(port, "/readyz")[0] == 200
        result = await place_call(srv.url(), caller_audio(5.0), RATE, seconds=5.0)
        assert result.violations == []
        await asyncio.sleep(0.5)
        status, text = fetch(port, "/metrics")
        proc = srv.proc
    output = proc.stdout.read()
    assert status == 200
    assert metric(text, "bridge_calls_total", outcome="completed") == 1
    assert metric(text, "bridge_active_calls") == 0
    assert metric(text, "bridge_engines") == 2 and metric(text, "bridge_engines_busy") == 0
    assert metric(text, "bridge_engine_handshake_seconds_count") == 1
    assert metric(text, "bridge_first_audio_seconds_count") == 1
    assert metric(text, "bridge_holding_clips_total", clip="greeting") >= 1
    # the loop watch ticked all along (10 ms timer) and its worst lateness is one of its ticks
    assert metric(text, "bridge_event_loop_lag_seconds_count") > 100
    assert 0 < metric(text, "bridge_event_loop_lag_max_seconds") <= metric(text, "bridge_event_loop_lag_seconds_sum")

    [record] = records_of(records)
    events = events_of(record)
    seen = names(events)
    for event in ("call_started", "engine_acquired", "engine_ready", "holding", "first_audio", "user_started",
                  "user_stopped", "bot_started", "bot_stopped", "provider_stop", "engine_released", "call_ended"):
        assert event in seen, (event, seen)
    assert seen[0] == "call_started" and seen[-1] == "call_ended"
    assert events[-1]["outcome"] == "completed"
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    ready = next(e for e in events if e["event"] == "engine_ready")
    assert ready["handshake_ms"] >= 400  # the reference engine's 0.5 s prompt phase
    call_id = events[0]["call_id"]

    audio, rate = sf.read(record / "audio.wav", dtype="int16")
    assert rate == RATE and audio.ndim == 2 and audio.shape[1] == 2
    assert 4.0 < len(audio) / RATE < 6.5
    assert rms(audio[:, 0]) > 100 and rms(audio[:, 1]) > 100  # the caller spoke; the bot (clip, echo) too

    report = subprocess.run([sys.executable, "-m", "pipelines", "report", str(record)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert call_id in report.stdout and "completed" in report.stdout
    png = (record / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # every line logged while the call ran names it
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if f"call {call_id}: exotel at" in line)
    last = next(i for i, line in enumerate(lines) if f"call {call_id}: ended" in line)
    during = [line for line in lines[first:last + 1] if " | " in line]
    assert len(during) >= 3
    assert all(f"call={call_id}" in line for line in during if "pipelines.sim.engine.reference" not in line), during


async def test_sigkill_mid_call_leaves_every_line_valid(tmp_path, records):
    config = variant_config(tmp_path, "exotel.yaml", records={"audio": True})
    ctx, port = start(config, records, "--engines", "1")
    with ctx as srv:
        call = asyncio.create_task(place_call(srv.url(), caller_audio(8.0), RATE, seconds=8.0))
        await asyncio.sleep(4.0)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        await asyncio.gather(call, return_exceptions=True)
    [record] = records_of(records)
    events = events_of(record)
    assert names(events)[0] == "call_started" and "call_ended" not in names(events)
    assert {"engine_ready", "first_audio", "holding"} <= set(names(events))
    audio, rate = sf.read(record / "audio.wav", dtype="int16")  # the header was patched at the last flush
    assert audio.shape[1] == 2 and len(audio) / rate > 2.0
    report = subprocess.run([sys.executable, "-m", "pipelines", "report", str(record)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "no call_ended" in report.stdout


async def test_callers_beyond_the_pool_hear_holding_then_the_apology(tmp_path, records):
    config = variant_config(tmp_path, "exotel.yaml", engine={"wait_secs": 2.0})
    ctx, port = start(config, records, "--engines", "1")
    with ctx as srv:
        first = asyncio.create_task(place_call(srv.url(), caller_audio(9.0), RATE, seconds=9.0, call_sid="first"))
        await asyncio.sleep(1.0)
        second = await place_call(srv.url(), caller_audio(14.0), RATE, seconds=14.0, call_sid="second")
        assert fetch(port, "/readyz")[0] == 200  # busy is not down
        await first
        await asyncio.sleep(0.5)
        text = fetch(port, "/metrics")[1]
    assert second.close_code == 1000 and second.sent_seconds < 13  # the bot hung up on the second caller
    assert rms(second.heard) > 100  # greeting, then apology
    assert metric(text, "bridge_calls_total", outcome="no_engine") == 1
    assert metric(text, "bridge_calls_total", outcome="completed") == 1
    assert metric(text, "bridge_holding_clips_total", clip="apology") == 1
    by_call = {events_of(r)[0]["call_id"]: events_of(r) for r in records_of(records)}
    waited = names(by_call["second"])
    assert waited.index("engine_waiting") < waited.index("no_engine") < waited.index("apology")
    assert "engine_acquired" not in waited


async def test_readiness_fails_once_every_engine_is_out_of_rotation(tmp_path, records):
    dead = f"ws://127.0.0.1:{free_port()}"
    config = variant_config(tmp_path, "exotel.yaml", engine={"urls": dead, "retry_secs": 60})
    ctx, port = start(config, records)
    with ctx as srv:
        assert fetch(port, "/readyz")[0] == 200  # not known to be down yet
        result = await place_call(srv.url(), caller_audio(12.0), RATE, seconds=12.0)
        assert result.close_code == 1000 and rms(result.heard) > 100  # greeting, then apology
        assert fetch(port, "/readyz") == (503, "no engine in rotation\n")
        assert fetch(port, "/healthz")[0] == 200
        text = fetch(port, "/metrics")[1]
    assert metric(text, "bridge_engines_down") == 1
    assert metric(text, "bridge_engine_failures_total") == 1
    [record] = records_of(records)
    seen = names(events_of(record))
    assert seen.index("engine_failed") < seen.index("no_engine") < seen.index("apology")


async def test_sigterm_drains_an_active_call_with_the_apology(tmp_path, records):
    drain = 2.0
    config = variant_config(tmp_path, "exotel.yaml", server={"drain_secs": drain})
    ctx, port = start(config, records, "--engines", "2")
    with ctx as srv:
        call = asyncio.create_task(place_call(srv.url(), caller_audio(20.0), RATE, seconds=20.0))
        await asyncio.sleep(3.0)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert fetch(port, "/readyz") == (503, "draining\n")
        with pytest.raises(websockets.InvalidStatus, match="503"):  # a new call is turned away
            await place_call(srv.url(), caller_audio(1.0), RATE, seconds=1.0)
        result = await call
        exit_code = await asyncio.to_thread(srv.proc.wait, drain + DRAIN_FINISH_SECS + 5)
        exited = time.monotonic() - signalled
    assert exit_code == 0
    assert exited < drain + DRAIN_FINISH_SECS
    assert result.close_code == 1000 and result.sent_seconds < 15  # ended by the bot, not by the caller
    assert result.violations == []
    after = result.heard[int((3.0 + drain) * RATE):]
    assert rms(after) > 100  # the apology played after the deadline
    [record] = records_of(records)
    events = events_of(record)
    seen = names(events)
    assert seen.index("draining") < seen.index("apology") < seen.index("call_ended")
    assert events[-1]["outcome"] == "drained"


async def test_sigterm_lets_a_short_call_finish(tmp_path, records):
    config = variant_config(tmp_path, "exotel.yaml", server={"drain_secs": 10.0})
    ctx, port = start(config, records, "--engines", "1")
    with ctx as srv:
        call = asyncio.create_task(place_call(srv.url(), caller_audio(5.0), RATE, seconds=5.0))
        await asyncio.sleep(2.5)
        srv.proc.send_signal(signal.SIGTERM)
        result = await call
        assert await asyncio.to_thread(srv.proc.wait, 15) == 0
    assert result.violations == []
    [record] = records_of(records)
    events = events_of(record)
    assert "draining" in names(events) and "apology" not in names(events)
    assert events[-1]["outcome"] == "completed"
