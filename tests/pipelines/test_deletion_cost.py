"""pipelines/deletion_cost.py against a local server that speaks the Kubernetes pods API's PATCH."""

import asyncio
import datetime
import json
import ssl

import pytest
from aiohttp import web
from loguru import logger

from pipelines.deletion_cost import ANNOTATION, DeletionCost

NS, POD, TOKEN = "calls", "call-bridge-7d9f-abcde", "sa-token-1"


class FakeApi:
    """PATCH /api/v1/namespaces/NS/pods/NAME: checks what the real API server would, records the bodies."""

    def __init__(self, token=TOKEN):
        self.token = token
        self.patches: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.status = 200
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.method != "PATCH":
            return web.json_response({"kind": "Status", "code": 405}, status=405)
        if request.path != f"/api/v1/namespaces/{NS}/pods/{POD}":
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if request.content_type != "application/merge-patch+json":
            return web.json_response({"kind": "Status", "code": 415}, status=415)
        if self.status != 200:
            return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
        body = json.loads(await request.text())
        self.patches.append(body)
        return web.json_response({"kind": "Pod", "metadata": {"name": POD, "namespace": NS, **body["metadata"]}})

    async def start(self, ssl_context=None) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        return self.runner.addresses[0][1]

    async def stop(self):
        await self.runner.cleanup()

    def costs(self) -> list[str]:
        return [p["metadata"]["annotations"][ANNOTATION] for p in self.patches]


@pytest.fixture
async def api():
    server = FakeApi()
    port = await server.start()
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await server.stop()


@pytest.fixture
def warnings():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


async def wait_for(predicate, secs=3.0):
    deadline = asyncio.get_running_loop().time() + secs
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_each_change_is_patched_as_a_string_annotation(api):
    calls = {"n": 0}
    cost = DeletionCost(api.url, TOKEN, NS, POD, lambda: calls["n"], every_secs=0.02)
    await cost.start()
    try:
        await wait_for(lambda: api.costs() == ["0"])
        calls["n"] = 3
        await wait_for(lambda: api.costs() == ["0", "3"])
        calls["n"] = 1
        await wait_for(lambda: api.costs() == ["0", "3", "1"])
    finally:
        await cost.stop()
    assert api.patches[-1] == {"metadata": {"annotations": {ANNOTATION: "1"}}}, "only the annotation is patched"
    assert {r for r in api.requests} == {("PATCH", f"/api/v1/namespaces/{NS}/pods/{POD}")}
    assert cost.sent == 1 and cost.patches == 3 and cost.failures == 0


async def test_an_unchanged_count_sends_nothing(api):
    cost = DeletionCost(api.url, TOKEN, NS, POD, lambda: 7, every_secs=0.01)
    await cost.start()
    try:
        await wait_for(lambda: api.costs() == ["7"])
        await asyncio.sleep(0.2)  # ~20 checks
    finally:
        await cost.stop()
    assert api.costs() == ["7"]


async def test_checks_are_spaced_by_every_secs(api):
    calls = {"n": 0}
    cost = DeletionCost(api.url, TOKEN, NS, POD, lambda: calls["n"], every_secs=10)
    await cost.start()
    try:
        await wait_for(lambda: api.costs() == ["0"])
        calls["n"] = 5
        await asyncio.sleep(0.2)
        assert api.costs() == ["0"], "a change waits for the next check"
    finally:
        await cost.stop()


async def test_the_token_is_read_for_every_request(api):
    """Projected tokens rotate in place: a callable token is called again for each patch."""
    tokens = iter(["stale", TOKEN, TOKEN])
    cost = DeletionCost(api.url, lambda: next(tokens), NS, POD, lambda: 2)
    try:
        assert await cost.sync() is False       # 401 with the first token
        assert await cost.sync() is True
    finally:
        await cost.stop()
    assert api.costs() == ["2"]


async def test_server_down_is_logged_once_and_raises_nothing(warnings):
    server = FakeApi()
    port = await server.start()
    await server.stop()  # nothing listens there now
    calls = {"n": 1}
    cost = DeletionCost(f"http://127.0.0.1:{port}", TOKEN, NS, POD, lambda: calls["n"], every_secs=0.01, timeout_secs=1)
    await cost.start()
    try:
        await wait_for(lambda: cost.failures >= 5)
        calls["n"] = 2
        await wait_for(lambda: cost.failures >= 10)
    finally:
        await cost.stop()
    assert cost.sent is None and cost.patches == 0
    assert len([w for w in warnings if "deletion cost" in w]) == 1, warnings


async def test_refusals_count_as_an_outage_that_ends(api, warnings):
    api.status = 403  # e.g. the Role is missing
    calls = {"n": 4}
    cost = DeletionCost(api.url, TOKEN, NS, POD, lambda: calls["n"], every_secs=0.01)
    await cost.start()
    try:
        await wait_for(lambda: cost.failures >= 3)
        assert api.costs() == []
        api.status = 200
        await wait_for(lambda: api.costs() == ["4"])
    finally:
        await cost.stop()
    assert len([w for w in warnings if "HTTP 403" in w]) == 1, warnings
    assert cost.sent == 4


async def test_a_failing_count_does_not_end_the_task(api):
    state = {"fail": True}

    def count():
        if state["fail"]:
            raise RuntimeError("boom")
        return 6

    cost = DeletionCost(api.url, TOKEN, NS, POD, count, every_secs=0.01)
    await cost.start()
    try:
        await wait_for(lambda: cost.failures >= 2)
        state["fail"] = False
        await wait_for(lambda: api.costs() == ["6"])
    finally:
        await cost.stop()


async def test_stop_without_start_and_twice():
    cost = DeletionCost("http://127.0.0.1:1", TOKEN, NS, POD, lambda: 0)
    await cost.stop()
    await cost.start()
    await cost.stop()
    await cost.stop()


# --- from_environment -------------------------------------------------------------------------------


def test_from_environment_is_none_outside_kubernetes(tmp_path):
    assert DeletionCost.from_environment(lambda: 0, environ={}, account_dir=tmp_path) is None
    # in a pod but without a token (automountServiceAccountToken: false)
    env = {"POD_NAME": POD, "POD_NAMESPACE": NS, "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert DeletionCost.from_environment(lambda: 0, environ=env, account_dir=tmp_path) is None
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "ca.crt").write_text("not a certificate")
    assert DeletionCost.from_environment(lambda: 0, environ={k: v for k, v in env.items() if k != "POD_NAME"},
                                         account_dir=tmp_path) is None
    assert DeletionCost.from_environment(lambda: 0, environ=env, account_dir=tmp_path) is None, "an unusable CA"


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 (its own CA) and its key, as the API server's serving pair."""
    x509 = pytest.importorskip("cryptography.x509")
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "ca.crt", tmp_path / "key.pem"


async def test_from_environment_patches_over_tls_with_the_mounted_token(tmp_path):
    """The in-cluster path end to end: env + token + ca.crt -> https://HOST:PORT, the CA verified."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    cert, key = self_signed(account)
    (account / "token").write_text(TOKEN + "\n")
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    server = FakeApi()
    port = await server.start(ssl_context=serving)
    env = {"POD_NAME": POD, "POD_NAMESPACE": NS, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
    try:
        cost = DeletionCost.from_environment(lambda: 12, environ=env, account_dir=account, every_secs=0.01)
        assert cost is not None and cost.url == f"https://127.0.0.1:{port}/api/v1/namespaces/{NS}/pods/{POD}"
        await cost.start()
        try:
            await wait_for(lambda: server.costs() == ["12"])
            (account / "token").write_text("rotated")   # the kubelet rotated it: the next patch says so
            server.token = "rotated"
            cost.sent = None
            await wait_for(lambda: server.costs() == ["12", "12"])
        finally:
            await cost.stop()
    finally:
        await server.stop()


def test_from_environment_brackets_an_ipv6_api_host(tmp_path):
    cert, _ = self_signed(tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    env = {"POD_NAME": POD, "POD_NAMESPACE": NS, "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    cost = DeletionCost.from_environment(lambda: 0, environ=env, account_dir=tmp_path)
    assert cost is not None and cost.api == "https://[fd00::1]:443"
