"""Helpers for tests that run `python -m pipelines run` on a shipped config and dial it."""

import asyncio
import json
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
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


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
