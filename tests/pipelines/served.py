"""Helpers for tests that run `python -m pipelines run` on a shipped config and dial it."""

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import yaml

from pipelines.config import CONFIG_DIR


def scripted_config(tmp_path, name: str, **reference) -> str:
    """configs/NAME with only the reference engine's behaviour changed, for one scenario."""
    config = yaml.safe_load((CONFIG_DIR / name).read_text())
    config["engine"]["reference"] = reference
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def stats(port: int) -> dict:
    """GET /stats of the server on `port` (blocking: from a coroutine, via asyncio.to_thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


async def until(condition, timeout: float = 10.0, every: float = 0.05) -> None:
    """Poll `condition()` until it holds; TimeoutError after `timeout` s rather than a hang."""
    async def poll():
        while not condition():
            await asyncio.sleep(every)

    await asyncio.wait_for(poll(), timeout)


async def idle_stats(port: int, timeout: float = 10.0) -> dict:
    """GET /stats once the server has no call and no connection left (its finished calls are then in
    `recent_calls`); TimeoutError if it never gets there."""
    got: dict = {}

    async def poll():
        while True:
            got.clear()
            got.update(await asyncio.to_thread(stats, port))
            if got["calls_active"] == 0 and got["connections"] == 0:
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)
    return got


async def finished_call(port: int) -> dict:
    """Per-processor stats of the last finished call, once the server has recorded it."""
    for _ in range(50):
        recent = (await asyncio.to_thread(stats, port))["recent_calls"]
        if recent:
            return recent[-1]["stats"]
        await asyncio.sleep(0.1)
    raise AssertionError("the call never finished on the server")


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


def variant_config(tmp_path, name: str, **sections) -> str:
    """configs/NAME with the given top-level sections merged in (one level deep), for one scenario."""
    config = yaml.safe_load((CONFIG_DIR / name).read_text())
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / f"variant-{name}"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fetch(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH, errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels) -> float | None:
    """One sample from Prometheus text, e.g. metric(t, "bridge_calls_total", outcome="completed")."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
