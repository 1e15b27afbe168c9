"""configs/kubernetes/: the bridge's manifests agree with the deployment file they carry and with the drain, and
with the lease store (redis.yaml), the engine fleet and its guards (personaplex.yaml) and the autoscalers."""

import argparse
import copy
import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml

from pipelines import builder, config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "configs" / "kubernetes"
MANIFEST = KUBERNETES / "bridge.yaml"
REDIS = KUBERNETES / "redis.yaml"
ENGINES = KUBERNETES / "personaplex.yaml"
KEDA = KUBERNETES / "keda.yaml"
APPLIED = (MANIFEST, REDIS, ENGINES)   # what the header's kubectl apply names; keda.yaml is the alternative autoscaler


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def docs():
    return load(MANIFEST)


@pytest.fixture(scope="module")
def all_docs():
    return [d for path in APPLIED for d in load(path)]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}"
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
    path = tmp_path / "bridge.yaml"
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


def test_embedded_deployment_is_configs_exotel_yaml(loaded):
    """The ConfigMap extends the shipped exotel.yaml: only server: and records: (off in a pod) differ,
    so the processor chain is written once."""
    shipped = config.load(ROOT / "configs" / "exotel.yaml", environ={}).config
    embedded = loaded.config
    for key in ("transport", "engine", "processors"):
        assert getattr(embedded, key) == getattr(shipped, key), f"ConfigMap's {key}: differs from configs/exotel.yaml"
    assert "processors:" not in yaml.safe_load(loaded.path.read_text()), "the chain is copied, not extended"


def env_of(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_replicas_share_the_engine_fleet_only_through_leases(deployment, container):
    """PersonaPlex serves one call per process: replicas given one URL list must lease through one store."""
    env = env_of(container)
    assert deployment["spec"]["replicas"] > 1, "the shipped bridge runs several replicas"
    assert env["PERSONAPLEX_URL"].get("value"), "the replicas use the shared fleet"
    assert env.get("LEASE_STORE", {}).get("value", "").startswith("redis://"), \
        "PERSONAPLEX_URL is shared by replicas > 1 without LEASE_STORE: they would double-book engines"


def test_shared_fleet_settings_load(deployment_text, container, tmp_path):
    """The deployment file with the pod's env: lease_store and the dns+ws:// URL pass the config's checks."""
    path = tmp_path / "bridge.yaml"
    path.write_text(deployment_text)
    env = {name: e["value"] for name, e in env_of(container).items() if "value" in e}
    loaded = config.load(path, environ=env)
    assert loaded.config.engine.lease_store == env["LEASE_STORE"]
    assert loaded.config.engine.urls == [env["PERSONAPLEX_URL"]]


def test_lease_store_is_the_redis_service(container):
    store = urlsplit(env_of(container)["LEASE_STORE"]["value"])
    redis_docs = load(REDIS)
    service = one(redis_docs, "Service")
    assert store.hostname == service["metadata"]["name"], f"LEASE_STORE names {store.hostname}, the Service is {service['metadata']['name']}"
    assert store.port in [p["port"] for p in service["spec"]["ports"]]
    assert store.path in ("", "/0"), "database 0"
    redis = one(redis_docs, "Deployment")
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate", "one store, never two at once"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [server] = redis["spec"]["template"]["spec"]["containers"]
    assert server["image"].split(":")[0] in ("redis", "valkey/valkey")
    command = server["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no", \
        "in memory only: leases are short-lived and fencing tokens are seeded from the clock"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction", "a lease must never be evicted"
    ports = [p["containerPort"] for p in server["ports"]]
    assert all(port_number(server, p.get("targetPort", p["port"])) in ports for p in service["spec"]["ports"])
    assert {"requests", "limits"} <= server["resources"].keys()
    assert_locked_down(redis["spec"]["template"]["spec"], server)


def test_engine_url_is_every_guard_of_the_headless_service(container):
    url = urlsplit(env_of(container)["PERSONAPLEX_URL"]["value"])
    assert url.scheme == "dns+ws", "resolved to every engine pod at start"
    engines = load(ENGINES)
    service = one(engines, "Service")
    name = service["metadata"]["name"]
    assert url.hostname == name or url.hostname.startswith(f"{name}."), f"{url.hostname} is not the Service {name}"
    assert "." not in url.hostname, "no namespace in the name: Kubernetes DNS searches the pod's own first"
    assert service["spec"]["clusterIP"] == "None", "headless: the name resolves to each engine pod"
    assert [p["port"] for p in service["spec"]["ports"]] == [url.port], "the Service exposes the guard's port, and only that"


@pytest.fixture(scope="module")
def engine_pod():
    statefulset = one(load(ENGINES), "StatefulSet")
    return statefulset["spec"]["template"]["spec"]


def containers_of(pod) -> dict[str, dict]:
    return {c["name"]: c for c in pod["containers"]}


def guard_args(container) -> argparse.Namespace:
    from pipelines.guard import parser

    command = container["command"]
    assert command[:4] == ["python", "-m", "pipelines", "guard"], command
    return parser().parse_args(command[4:])


def test_engines_are_a_statefulset_behind_their_guards(engine_pod, deployment):
    engines = load(ENGINES)
    statefulset, service = one(engines, "StatefulSet"), one(engines, "Service")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"] == "personaplex"
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    containers = containers_of(engine_pod)
    [engine] = [c for c in engine_pod["containers"] if c["resources"].get("limits", {}).get("nvidia.com/gpu")]
    assert str(engine["resources"]["limits"]["nvidia.com/gpu"]) == "1", "one GPU per engine"
    assert engine["image"] == "personaplex:latest"
    [guard] = [c for c in engine_pod["containers"] if c is not engine]
    args = guard_args(guard)
    assert args.require_token and args.idle_secs == 15 and args.capacity == 1
    upstream = urlsplit(args.upstream).port
    assert args.upstream.startswith("ws://127.0.0.1:"), "the engine is reached over the pod's loopback"
    assert upstream == port_number(engine, "engine")
    listen_port = args.listen[1]
    assert listen_port == port_number(guard, "guard")
    targets = [port_number(guard, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]]
    assert targets == [listen_port] and upstream not in targets, "only the guard's port is served, never the engine's"
    bridge_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert guard["image"] == bridge_image, "the guard ships in the bridge's package and image"
    probe = guard["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and port_number(guard, probe["port"]) == listen_port
    assert "httpGet" not in guard["livenessProbe"], "liveness must not follow the engine (it may still be loading)"
    assert set(containers) == {engine["name"], guard["name"]}


def test_guard_sidecar_is_locked_down(engine_pod, dockerfile):
    guard = containers_of(engine_pod)["guard"]
    security = guard["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == dockerfile.uid
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert engine_pod["automountServiceAccountToken"] is False
    assert {"requests", "limits"} <= guard["resources"].keys()


def test_guard_keeps_its_highest_token_on_an_emptydir(engine_pod):
    """--state-file on a writable emptyDir of its own: a restarted guard container still fences stale leases."""
    guard = containers_of(engine_pod)["guard"]
    state_file = guard_args(guard).state_file
    assert state_file and posixpath.isabs(state_file), "the guard keeps its highest token across container restarts"
    volumes = {v["name"]: v for v in engine_pod["volumes"]}
    [mount] = [m for m in guard["volumeMounts"] if posixpath.dirname(state_file) == m["mountPath"].rstrip("/")]
    assert not mount.get("readOnly") and not mount.get("subPath")
    assert "emptyDir" in volumes[mount["name"]], "an emptyDir survives container restarts within the pod"
    assert mount["mountPath"] != "/tmp", "a volume of its own, apart from the scratch space"


@pytest.mark.parametrize("path, port_of", [(REDIS, "redis"), (ENGINES, "guard")])
def test_network_policies_admit_the_bridges_alone(path, port_of, deployment):
    docs_ = load(path)
    policy = one(docs_, "NetworkPolicy")
    workload = next(d for d in docs_ if d["kind"] in ("Deployment", "StatefulSet"))
    pod = workload["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    bridge_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [rule] = policy["spec"]["ingress"]
    assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [{"app": bridge_labels["app"]}]
    [container] = [c for c in pod["spec"]["containers"] if any(p.get("name") == port_of for p in c.get("ports", []))]
    assert [p["port"] for p in rule["ports"]] == [port_number(container, port_of)]


# --- the deletion cost: the API access it needs ---------------------------------------------------


def test_bridge_may_patch_pods_and_nothing_else(docs, pod):
    account = one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True, "pipelines/deletion_cost.py needs the token"
    assert account.get("automountServiceAccountToken") is False, "only the bridge pods (which say so) mount it"
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "its own namespace only"


def test_downward_api_names_the_pod_for_the_deletion_cost(container, tmp_path, monkeypatch):
    from pipelines import deletion_cost
    from pipelines.deletion_cost import DeletionCost

    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # the names the module reads: with them (and a mounted token) it runs
    (tmp_path / "token").write_text("t")
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    fake = {"POD_NAME": "p", "POD_NAMESPACE": "n", "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    default = deletion_cost.ssl.create_default_context
    monkeypatch.setattr(deletion_cost.ssl, "create_default_context", lambda **_: default())  # any CA will do here
    cost = DeletionCost.from_environment(lambda: 0, environ=fake, account_dir=tmp_path)
    assert cost is not None and cost.url.endswith("/api/v1/namespaces/n/pods/p")


# --- autoscaling on active calls -----------------------------------------------------------------


def test_prometheus_scrapes_the_call_port(loaded, deployment):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == loaded.config.server.port


def test_metric_is_the_bridges_gauge():
    from pipelines.metrics import Metrics

    names = {m.name for m in Metrics().registry.collect()}
    assert "bridge_active_calls" in names


CALLS_PER_POD = 1 / 0.029       # one core (the CPU request) per ~34 calls, BENCHMARKS.md


def test_hpa_targets_active_calls_per_pod(docs, deployment, container):
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "bridge_active_calls"
    goal = metric["pods"]["target"]
    assert goal["type"] == "AverageValue"
    per_core = CALLS_PER_POD * quantity(container["resources"]["requests"]["cpu"])
    assert 0 < quantity(goal["averageValue"]) <= per_core, f"target {goal['averageValue']} calls exceeds the ~{per_core:.0f} a pod's CPU serves"
    assert 1 < hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), "scale down one (drained, idlest) pod at a time"


KEDA_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                    "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback"}
KEDA_PROMETHEUS_FIELDS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                          "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes"}


def test_keda_scaled_object_structure(docs, deployment):
    """keda.sh/v1alpha1 is a CRD, not in the offline schema: its shape is checked here."""
    [scaled] = load(KEDA)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SPEC_FIELDS, f"unknown ScaledObject fields {sorted(set(spec) - KEDA_SPEC_FIELDS)}"
    target = spec["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert set(target) <= {"name", "kind", "apiVersion", "envSourceContainerName"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert set(meta) <= KEDA_PROMETHEUS_FIELDS, f"unknown prometheus trigger fields {sorted(set(meta) - KEDA_PROMETHEUS_FIELDS)}"
    assert all(isinstance(v, str) for v in meta.values()), "trigger metadata is a map of strings"
    assert re.match(r"https?://", meta["serverAddress"])
    assert re.fullmatch(r"sum\(bridge_active_calls(\{.*\})?\)", meta["query"]), "the fleet's active calls; KEDA divides per pod"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    assert float(meta["threshold"]) == quantity(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]), "the HPA's target"


def test_keda_behavior_is_a_valid_hpa_behavior(docs):
    """KEDA copies advanced.horizontalPodAutoscalerConfig.behavior into its HPA: validate it as one."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    [scaled] = load(KEDA)
    hpa = copy.deepcopy(one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["behavior"] = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    kubernetes_validate.validate(hpa, kubernetes_validate.latest_version(), strict=True)
    assert set(scaled["spec"]["advanced"]) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}


# --- the API schema, offline ---------------------------------------------------------------------


def test_every_manifest_matches_the_kubernetes_api_schema(all_docs):
    """Strict: an unknown or misspelt field (e.g. `securityContxt`) fails, as `kubectl apply` would
    reject it. The schemas are kubernetes-validate's newest bundled version; no cluster needed.
    Every file the header applies (keda.yaml's CRD is checked by test_keda_scaled_object_structure)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    kinds = {d["kind"] for d in all_docs}
    assert {"ConfigMap", "Deployment", "Service", "StatefulSet", "ServiceAccount", "Role", "RoleBinding",
            "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds, kinds
    errors = []
    for doc in all_docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not errors, f"against the Kubernetes {version} schema:\n" + "\n".join(errors)


@pytest.mark.parametrize("path, kind", [(MANIFEST, "Deployment"), (ENGINES, "StatefulSet"), (REDIS, "Deployment")])
def test_schema_validation_catches_a_misspelt_field(path, kind):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = copy.deepcopy(one(load(path), kind))
    container = broken["spec"]["template"]["spec"]["containers"][-1]
    container["securityContxt"] = container.pop("securityContext")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


# --- hardening -------------------------------------------------------------------------------------


def test_pod_runs_as_the_images_non_root_user(pod, dockerfile):
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile.uid != 0, \
        f"runAsUser {security['runAsUser']} is not the image's USER {dockerfile.uid}"
    assert security.get("runAsGroup", dockerfile.gid) == dockerfile.gid
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is True and pod["serviceAccountName"] != "default", \
        "a token of the bridge's own account (patch pods only), for the deletion cost"


def assert_locked_down(pod, container):
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
    assert not security.get("privileged") and "runAsUser" not in security, "the pod's user is the one place it is set"


def test_container_is_locked_down(pod, container):
    assert_locked_down(pod, container)


def test_only_emptydir_tmp_is_writable(pod, container, dockerfile):
    """Read-only root: /tmp (the image's HOME too) is an emptyDir; every other mount is read-only."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert set(writable) == {"/tmp"}, f"writable mounts {sorted(writable)}: expected only /tmp"
    assert "sizeLimit" in writable["/tmp"]["emptyDir"], "bound the scratch space"
    assert dockerfile.env.get("HOME") == "/tmp", "the image's HOME should be the writable /tmp"


def test_embedded_deployment_writes_no_records(loaded):
    """The root filesystem is read-only: records need a volume of their own, so they stay off here."""
    assert loaded.config.records is None or loaded.config.records.dir is None


# --- resources from BENCHMARKS.md, "Load, soak and faults (issue 6)" -------------------------------

RSS_AT_START_MIB = 121          # bench load: RSS at start, Silero loaded
RSS_PER_CALL_MIB = 4.7          # soak: (214 - 121) MiB at 20 concurrent calls, the largest per-call figure
CORE_PER_CALL = 0.029           # bench load --calls 30: 2.9 % of a core per call


def quantity(text) -> float:
    """A Kubernetes quantity as a number (cores, or bytes)."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * units[suffix]
    return float(text)


def test_requests_and_limits_follow_the_soak_figures(container):
    resources = container["resources"]
    requests, limits = resources["requests"], resources["limits"]
    for key in ("cpu", "memory"):
        assert key in requests and key in limits, f"{key}: set both a request and a limit"
        assert quantity(requests[key]) <= quantity(limits[key])
    calls = quantity(requests["cpu"]) / CORE_PER_CALL
    peak = (RSS_AT_START_MIB + calls * RSS_PER_CALL_MIB) * 2**20
    assert quantity(requests["memory"]) >= peak, \
        f"memory request {requests['memory']} is under the modelled peak of {calls:.0f} calls, {peak / 2**20:.0f} MiB"
    assert quantity(limits["memory"]) >= 1.5 * peak, "an OOM kill drops every call: leave the limit headroom"
    assert quantity(limits["cpu"]) >= quantity(requests["cpu"]) + 1, \
        "a CPU limit at the request throttles the loop (silence on every call) whenever a helper thread runs"


def test_startup_probe_gives_the_bridge_time_to_load(loaded, container):
    probe = container["startupProbe"]
    get = probe["httpGet"]
    assert get["path"] == "/healthz", "start-up is the process listening; /readyz also needs an engine in rotation"
    assert port_number(container, get["port"]) == loaded.config.server.port
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30, "Silero and the engines load before it listens"


# --- the image --------------------------------------------------------------------------------------

DOCKERFILE = ROOT / "configs" / "kubernetes" / "Dockerfile"
DOCKERIGNORE = ROOT / "configs" / "kubernetes" / "Dockerfile.dockerignore"


class Instruction(NamedTuple):
    op: str            # FROM, RUN, COPY, ...
    args: str          # the rest of the line, continuation lines joined
    heredoc: str       # the body of a <<EOF here-document, if any
    stage: int         # index of the FROM it belongs to


class Dockerfile:
    def __init__(self, text: str):
        self.instructions: list[Instruction] = []
        lines, i, stage = text.splitlines(), 0, -1
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            op, _, args = line.partition(" ")
            body = []
            here = re.search(r"<<-?'?\"?(\w+)'?\"?", args)
            if here:
                while i < len(lines) and lines[i].strip() != here[1]:
                    body.append(lines[i])
                    i += 1
                i += 1
            stage += op.upper() == "FROM"
            self.instructions.append(Instruction(op.upper(), args.strip(), "\n".join(body), stage))
        self.final = [x for x in self.instructions if x.stage == stage]
        user = [x.args for x in self.final if x.op == "USER"]
        assert user, "the final stage sets no USER: the bridge would run as root"
        uid, _, gid = user[-1].partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)
        self.env = {}
        for x in self.final:
            if x.op == "ENV":
                self.env.update(dict(shlex.split(pair)[0].split("=", 1) for pair in shlex.split(x.args, posix=False)))

    def stage_named(self, name: str) -> list[Instruction]:
        [index] = [x.stage for x in self.instructions if x.op == "FROM" and x.args.split()[-1] == name]
        return [x for x in self.instructions if x.stage == index]


@pytest.fixture(scope="module")
def dockerfile():
    return Dockerfile(DOCKERFILE.read_text())


def position(instructions, predicate, what):
    found = [i for i, x in enumerate(instructions) if predicate(x)]
    assert found, f"Dockerfile: no {what}"
    return found[0]


def test_image_runs_as_a_named_non_root_user(dockerfile):
    final = dockerfile.final
    assert dockerfile.uid != 0 and dockerfile.gid != 0
    assert any(x.op == "RUN" and f"--uid {dockerfile.uid}" in x.args for x in final), "create the user the image runs as"
    user = position(final, lambda x: x.op == "USER", "USER")
    assert user < position(final, lambda x: x.op == "CMD", "CMD")
    assert all(x.op != "USER" or x.args.split(":")[0] not in ("0", "root") for x in final[user:])


def test_base_is_python_slim(dockerfile):
    base = next(x for x in dockerfile.instructions if x.op == "ARG" and x.args.startswith("BASE="))
    assert re.fullmatch(r"BASE=python:3\.\d+-slim(-\w+)?", base.args), base.args
    assert all(x.args.split()[0] == "${BASE}" for x in dockerfile.instructions if x.op == "FROM")


def test_dependencies_are_a_layer_of_their_own_before_the_sources(dockerfile):
    """The dependency list comes from pyproject.toml alone and is installed before the package,
    which goes in with --no-deps: a source change reuses the dependency layer."""
    requirements = dockerfile.stage_named("requirements")
    copies = [x.args.split() for x in requirements if x.op == "COPY"]
    assert copies == [["pyproject.toml", "./"]], f"the requirements stage may copy pyproject.toml only, got {copies}"
    final = dockerfile.final
    deps = position(final, lambda x: x.op == "RUN" and re.search(r"pip install (-r|--requirement) /tmp/requirements.txt", x.args),
                    "pip install of the requirements")
    package = position(final, lambda x: x.op == "RUN" and "/wheels" in x.args, "install of the built wheel")
    assert deps < package
    assert "--no-deps" in final[package].args and "pip check" in final[package].args
    assert position(final, lambda x: x.op == "COPY" and "--from=requirements" in x.args, "copy of the list") < deps
    # no source reaches the final stage: only the list and the wheel
    assert all("--from=" in x.args for x in final if x.op in ("COPY", "ADD")), "sources copied into the final stage"
    [source] = [x for x in dockerfile.instructions if x.op == "COPY" and x.args.split()[0] == "."]
    assert source.stage == dockerfile.stage_named("wheel")[0].stage


def test_requirements_program_yields_the_projects_dependencies(dockerfile, tmp_path):
    """The here-document that writes requirements.txt, run against this pyproject.toml."""
    [run] = [x for x in dockerfile.stage_named("requirements") if x.op == "RUN"]
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    (tmp_path / "program.py").write_text(run.heredoc)

    def requirements(extras: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "program.py", extras], check=False, cwd=tmp_path,
                              capture_output=True, text=True)

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    plain = requirements("")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == project["dependencies"]
    extra = next(iter(project.get("optional-dependencies", {})), None)
    if extra:
        more = requirements(extra).stdout.splitlines()
        assert more[:len(project["dependencies"])] == project["dependencies"] and len(more) > len(project["dependencies"])
    unknown = requirements("no-such-extra")
    assert unknown.returncode != 0 and "no-such-extra" in unknown.stderr


def test_image_runs_the_installed_package_in_exec_form(dockerfile):
    final = dockerfile.final
    [cmd] = [x for x in final if x.op == "CMD"]
    argv = json.loads(cmd.args)  # exec form: a JSON array, so python is PID 1 and gets SIGTERM
    assert argv[:4] == ["python", "-m", "pipelines", "run"] and len(argv) == 5
    assert "/" not in argv[4] and (config.CONFIG_DIR / argv[4]).is_file(), \
        f"{argv[4]}: the CMD should name a deployment the package ships (configs/), not a path in a source tree"
    workdir = [x.args for x in final if x.op == "WORKDIR"][-1]
    assert workdir not in ("/", "/app", "/src"), "`python -m` imports from the working directory: keep it empty"
    assert position(final, lambda x: x.op == "WORKDIR", "WORKDIR") > position(final, lambda x: "/wheels" in x.args, "wheel")
    assert any(x.op == "RUN" and "pipelines validate" in x.args for x in final), "check the installed package at build"


def test_image_sends_onnxruntime_no_telemetry(dockerfile):
    assert dockerfile.env.get("ORT_DISABLE_TELEMETRY") == "1"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path, or a directory above it, decides."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
                        for part in re.split(r"(\*\*)", pattern))
        if re.fullmatch(regex + "(/.*)?", path):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_wheel_needs():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "pipelines/__init__.py", "pipelines/cli.py", "processors/__init__.py",
              "transports/__init__.py", "configs/exotel.yaml", "configs/clips/greeting.wav"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not dockerignored(path, patterns), f"{path} is left out of the build context"
    for path in (".git/HEAD", "tests/conftest.py", "records/x/events.jsonl", "pipelines/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path, patterns), f"{path} should stay out of the build context"
