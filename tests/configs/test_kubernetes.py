"""configs/kubernetes/bridge.yaml: the manifests agree with the deployment file they carry and with the drain."""

import posixpath
from pathlib import Path

import pytest
import yaml

from pipelines import builder, config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "configs" / "kubernetes" / "bridge.yaml"


@pytest.fixture(scope="module")
def docs():
    with open(MANIFEST) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFEST.name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def configmap(docs):
    return one(docs, "ConfigMap")


@pytest.fixture(scope="module")
def deployment(docs):
    return one(docs, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment):
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod):
    assert len(pod["containers"]) == 1, "the bridge pod runs one container"
    return pod["containers"][0]


@pytest.fixture(scope="module")
def config_path(container):
    command = container["command"]
    assert command[:4] == ["python", "-m", "pipelines", "run"] and len(command) == 5, \
        f"container command should be `python -m pipelines run <config>`, got {command}"
    return command[4]


@pytest.fixture(scope="module")
def deployment_text(configmap, config_path):
    name = posixpath.basename(config_path)
    assert name in configmap["data"], f"{config_path}: no key {name!r} in ConfigMap {configmap['metadata']['name']}"
    return configmap["data"][name]


@pytest.fixture
def loaded(deployment_text, tmp_path):
    path = tmp_path / "exotel.yaml"
    path.write_text(deployment_text)
    return config.load(path, environ={})


def port_number(container, port):
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    names = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in names, f"port name {port!r} is not one of the container's ports {sorted(names)}"
    return names[port]


def test_embedded_deployment_loads_and_plans(loaded):
    plan = builder.plan(loaded)
    assert plan is not None


def test_container_port_is_the_servers_port(loaded, container):
    ports = [p["containerPort"] for p in container["ports"]]
    assert loaded.config.server.port in ports, f"server.port {loaded.config.server.port} not in containerPorts {ports}"


@pytest.mark.parametrize("probe, path", [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")])
def test_probes_hit_the_servers_port(loaded, container, probe, path):
    get = container[probe]["httpGet"]
    assert get["path"] == path, f"{probe} should GET {path}, not {get['path']}"
    assert port_number(container, get["port"]) == loaded.config.server.port, f"{probe} port is not server.port"


def test_readiness_reacts_within_one_period(container):
    probe = container["readinessProbe"]
    assert probe["failureThreshold"] == 1 and probe["periodSeconds"] <= 2, \
        "a draining bridge must leave the endpoints within one probe period"


def test_service_targets_the_container_port(docs, deployment, container, loaded):
    service = one(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pod labels"
    targets = [port_number(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]]
    assert loaded.config.server.port in targets, f"Service targets {targets}, not server.port"


def test_config_mount_holds_the_commands_config(configmap, pod, container, config_path):
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(config_path)]
    assert mounts, f"nothing is mounted at {posixpath.dirname(config_path)} (the command's config directory)"
    volume = volumes[mounts[0]["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"], "the config mount is not the ConfigMap"


def test_grace_period_covers_prestop_drain_and_finish(configmap, deployment_text, pod, container):
    from pipelines.server import DRAIN_FINISH_SECS

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop should be `sleep S`, got {command}"
    sleep = float(command[1])
    drain = float((yaml.safe_load(deployment_text).get("server") or {}).get("drain_secs", 30))
    grace = pod["terminationGracePeriodSeconds"]
    assert sleep + drain + DRAIN_FINISH_SECS == grace, \
        f"terminationGracePeriodSeconds {grace} != preStop sleep {sleep} + drain_secs {drain} + DRAIN_FINISH_SECS {DRAIN_FINISH_SECS}"


def test_embedded_deployment_is_configs_exotel_yaml(deployment_text):
    """Only server: (and records:, off in a pod) may differ from the shipped configs/exotel.yaml."""
    with open(ROOT / "configs" / "exotel.yaml") as f:
        shipped = yaml.safe_load(f)
    embedded = yaml.safe_load(deployment_text)
    for key in ("transport", "engine", "processors"):
        assert embedded.get(key) == shipped.get(key), f"ConfigMap's {key}: differs from configs/exotel.yaml"


def test_replicas_never_share_an_engine_list(deployment, container):
    """PersonaPlex serves one call per process: one URL list in a Deployment's env is shared by every replica."""
    env = {e["name"]: e for e in container.get("env", [])}
    shared = "PERSONAPLEX_URL" in env and (env["PERSONAPLEX_URL"].get("value") or "valueFrom" in env["PERSONAPLEX_URL"])
    assert not (shared and deployment["spec"]["replicas"] > 1), \
        "PERSONAPLEX_URL is set for a Deployment with replicas > 1: its pods would share engines"
