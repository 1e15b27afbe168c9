"""Keep this pod's `controller.kubernetes.io/pod-deletion-cost` at its number of active calls.

When a Deployment scales down, its ReplicaSet deletes the pods with the lowest deletion cost first
(then the usual order). A bridge pod's cost is what deleting it costs: the calls it would have to
drain. So a small task PATCHes its own pod's annotation to the active-call count whenever that
changes, checking at most every `every_secs` (5 s): scale-down then takes the idlest pods, whose
drain (SIGTERM, /readyz 503, calls finish or hear the apology) disturbs the fewest callers.

It runs only inside Kubernetes: `DeletionCost.from_environment(count)` returns None unless POD_NAME
and POD_NAMESPACE are set (the downward API, configs/kubernetes/bridge.yaml) and the service
account's token and CA are mounted (/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt},
KUBERNETES_SERVICE_HOST and _PORT). The pod's service account needs `patch` on `pods` in its
namespace (the Role in bridge.yaml).

The request is a JSON merge patch (`Content-Type: application/merge-patch+json`) of
metadata.annotations only, with the value as a string (annotations are strings; the controller
reads it as an int32). The token is re-read for every request: the kubelet rotates projected tokens
in place. A failed patch is logged once per outage (and its end once), retried at the next check,
and never raised: calls do not depend on it. A cost that is stale or missing only makes scale-down
choose less well.

Wiring (the server):

    cost = DeletionCost.from_environment(lambda: len(active_calls))
    if cost:
        await cost.start()
    ...
    if cost:
        await cost.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
from loguru import logger

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
EVERY_SECS = 5.0
TIMEOUT_SECS = 5.0
INT32 = (-(2**31), 2**31 - 1)  # the controller parses the annotation as an int32


class DeletionCost:
    """PATCHes `pod`'s deletion-cost annotation in `namespace` to `count()` whenever it changes.

    api: the API server's base URL (https://HOST:PORT); token: the bearer token, or a callable that
    reads it (called for every request); ssl_context: verifies the API server (None: the default,
    which for https:// is the system's CAs); every_secs: the least time between two checks.
    """

    def __init__(self, api: str, token: str | Callable[[], str], namespace: str, pod: str, count: Callable[[], int],
                 ssl_context: ssl.SSLContext | None = None, every_secs: float = EVERY_SECS, timeout_secs: float = TIMEOUT_SECS):
        self.api, self.namespace, self.pod = api.rstrip("/"), namespace, pod
        self.url = f"{self.api}/api/v1/namespaces/{namespace}/pods/{pod}"
        self._token = token if callable(token) else (lambda: token)
        self._count = count
        self._ssl = ssl_context
        self.every_secs, self.timeout_secs = every_secs, timeout_secs
        self.sent: int | None = None     # the cost the API server last accepted from us
        self.patches = 0                 # patches accepted
        self.failures = 0                # patches that failed (each outage is logged once)
        self._failing = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    def from_environment(cls, count: Callable[[], int], environ: Mapping[str, str] | None = None,
                         account_dir: Path | str = SERVICE_ACCOUNT_DIR, every_secs: float = EVERY_SECS) -> DeletionCost | None:
        """The in-cluster instance for this pod, or None outside Kubernetes (nothing to run)."""
        env = os.environ if environ is None else environ
        pod, namespace = env.get("POD_NAME", "").strip(), env.get("POD_NAMESPACE", "").strip()
        host, port = env.get("KUBERNETES_SERVICE_HOST", "").strip(), env.get("KUBERNETES_SERVICE_PORT", "").strip()
        if not (pod and namespace):
            return None
        account = Path(account_dir)
        token_path, ca_path = account / "token", account / "ca.crt"
        missing = [str(p) for p in (token_path, ca_path) if not p.is_file()]
        if missing or not (host and port):
            what = ", ".join(missing) if missing else "KUBERNETES_SERVICE_HOST/PORT"
            logger.warning(f"pod deletion cost off: POD_NAME is set but {what} is missing "
                           "(automountServiceAccountToken: true and a Role allowing patch on pods are needed)")
            return None
        try:
            context = ssl.create_default_context(cafile=str(ca_path))
        except (OSError, ssl.SSLError) as exc:
            logger.warning(f"pod deletion cost off: {ca_path} unusable ({exc})")
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address

        def token() -> str:
            return token_path.read_text().strip()

        return cls(f"https://{host}:{port}", token, namespace, pod, count, ssl_context=context, every_secs=every_secs)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="pod-deletion-cost")
        logger.info(f"pod deletion cost: {self.namespace}/{self.pod} follows the active calls (checked every {self.every_secs:g} s)")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.every_secs)

    async def sync(self) -> bool:
        """One check: patch when the count differs from what was last accepted. False when a patch failed.
        (start() runs it every `every_secs`; called alone, stop() closes its HTTP session.)"""
        try:
            cost = min(max(int(self._count()), INT32[0]), INT32[1])
        except Exception as exc:  # noqa: BLE001 - the count is the server's; a bug there must not end the task
            return self._failed(f"counting the active calls failed ({exc!r})")
        if cost == self.sent:
            return True
        try:
            status, text = await self._patch(cost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, TLS, token file: all the same outage
            return self._failed(f"{type(exc).__name__}: {exc}")
        if not 200 <= status < 300:
            return self._failed(f"HTTP {status}: {text[:200]}")
        if self._failing:
            logger.info(f"pod deletion cost: patching works again ({self.failures} failed); cost {cost}")
        self._failing = False
        self.sent = cost
        self.patches += 1
        return True

    async def _patch(self, cost: int) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_secs))
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}})
        headers = {"Authorization": f"Bearer {self._token()}", "Content-Type": MERGE_PATCH, "Accept": "application/json"}
        async with self._session.patch(self.url, data=body, headers=headers, ssl=self._ssl if self._ssl is not None else True) as response:
            return response.status, await response.text()

    def _failed(self, why: str) -> bool:
        self.failures += 1
        if not self._failing:
            logger.warning(f"pod deletion cost: cannot patch {self.namespace}/{self.pod} ({why}); "
                           "retrying every check, calls unaffected (logged once until it works again)")
        self._failing = True
        return False
