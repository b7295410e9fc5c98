"""deploy/: every overlay renders, every object validates against the Kubernetes schemas, and
the objects agree with each other and with the service.

Rendering is ``kubectl kustomize`` (kustomize is built into kubectl, which this project's
machines have; without it the tests skip, except in CI, where they fail). Validation is
``kubernetes-validate`` in strict mode (an unknown field fails), offline with the schemas its
wheel ships, for the oldest Kubernetes the manifests support and the newest the wheel knows;
the ServiceMonitor, a custom resource, against deploy/schemas/servicemonitor-v1.json.
Beyond the schemas: selectors select the pods, probes ask the right health names, every
FACESVC_* variable is a real setting, the Redis values and the service's URL name the same
release, and the autoscaler's custom metric is the one the adapter serves.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from facesvc.config import load_settings, settings_info
from facesvc.serve.health import FACESVC_SERVICE, LIVENESS_SERVICE
from facesvc.serve.tls import check_exposure

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = ("local", "production")
# preStop's "sleep" action is on by default from 1.30: the oldest Kubernetes these manifests run on.
OLDEST = "1.30.0"
VERSIONS = (OLDEST, latest_version())
SERVICE_MONITOR_SCHEMA = DEPLOY / "schemas" / "servicemonitor-v1.json"

Obj = dict[str, Any]


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        message = "kubectl (with its built-in kustomize) is needed to render deploy/"
        if os.environ.get("CI"):
            pytest.fail(message + ": install it on the CI machine")
        pytest.skip(message)
    return found


@cache
def _render_path(path: Path) -> tuple[Obj, ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(overlay: str) -> tuple[Obj, ...]:
    return copy.deepcopy(_render_path(DEPLOY / "overlays" / overlay))


def one(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(obj: Obj) -> None:
    """Raise when ``obj`` breaks its schema (every Kubernetes version in VERSIONS)."""
    if obj["kind"] == "ServiceMonitor":
        schema = json.loads(SERVICE_MONITOR_SCHEMA.read_text())
        jsonschema.validate(obj, schema)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def pod_spec(objects: tuple[Obj, ...]) -> Obj:
    spec: Obj = one(objects, "Deployment", "facesvc")["spec"]["template"]["spec"]
    return spec


def container(objects: tuple[Obj, ...]) -> Obj:
    (main,) = pod_spec(objects)["containers"]
    return dict(main)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(overlay)
    assert objects
    for obj in objects:
        try:
            validate(obj)
        except Exception as error:  # name the object: the schema's message alone does not
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {error}")


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Deployment", ("spec", "template", "spec", "containers", 0, "imagePulPolicy"), "Never"),
        ("HorizontalPodAutoscaler", ("spec", "minReplicas"), "two"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "intervall"), "15s"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "15 seconds"),
    ],
)
def test_a_broken_manifest_fails_validation(kind: str, path: tuple[Any, ...], value: Any) -> None:
    """The validation above can fail: a misspelt field or a wrong type is caught."""
    obj = one(render("production"), kind)
    target: Any = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(obj)


# ---------------------------------------------------------------- the objects agree


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_service_pods(overlay: str) -> None:
    objects = render(overlay)
    deployment = one(objects, "Deployment", "facesvc")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(objects)["ports"]}

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert selects(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    pdb = one(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    policy = one(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert {"Ingress", "Egress"} == set(policy["spec"]["policyTypes"])
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= ports
    for constraint in pod_spec(objects)["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "facesvc",
    }
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count


def test_grpc_is_a_headless_service_for_client_side_balancing() -> None:
    grpc_service = one(render("production"), "Service", "facesvc-grpc")
    assert grpc_service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in grpc_service["spec"]["ports"]] == [50051]
    settings = one(render("production"), "ConfigMap", "facesvc-settings")["data"]
    # Connections are recycled, so clients re-resolve the name and reach new pods.
    assert float(settings["FACESVC_SERVER_MAX_CONNECTION_AGE_S"]) > 0


def test_the_prometheus_service_monitor_scrapes_the_http_service() -> None:
    objects = render("production")
    monitor = one(objects, "ServiceMonitor")
    http = one(objects, "Service", "facesvc-http")
    assert selects(monitor["spec"]["selector"]["matchLabels"], http["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in http["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # Production serves TLS: the scrape must too.
    assert one(objects, "ConfigMap")["data"]["FACESVC_SECURITY_ALLOW_PLAINTEXT"] == "false"
    assert endpoint["scheme"] == "https"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_grpc_health_service_for_the_right_names(overlay: str) -> None:
    main = container(render(overlay))
    grpc_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")

    def service_asked(probe: str) -> str:
        """The health service name the probe asks about ("": the whole server's)."""
        spec = main[probe]
        if "grpc" in spec:  # the kubelet's own gRPC health probe (plaintext)
            assert spec["grpc"]["port"] == grpc_port
            return str(spec["grpc"].get("service", ""))
        command = spec["exec"]["command"]  # facesvc.commands.healthcheck, with the service's TLS
        assert command[:3] == ["python", "-m", "facesvc.commands.healthcheck"], command
        return command[command.index("--service") + 1] if "--service" in command else ""

    # Readiness: the service's own health (models loaded, Redis reachable), which the
    # health service reports alike for "" and facesvc.v1.FaceVerification.
    assert service_asked("readinessProbe") in ("", FACESVC_SERVICE)
    # Liveness and start-up: only whether the process answers, so a Redis outage restarts
    # no pod.
    assert service_asked("livenessProbe") == LIVENESS_SERVICE
    assert service_asked("startupProbe") == LIVENESS_SERVICE
    # With the service's own TLS the kubelet's gRPC probe cannot connect.
    plaintext = _environment(render(overlay)).get("FACESVC_SECURITY_ALLOW_PLAINTEXT") != "false"
    assert all(("grpc" in main[p]) == plaintext for p in ("readinessProbe", "livenessProbe"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_on_a_read_only_root(overlay: str) -> None:
    objects = render(overlay)
    spec = pod_spec(objects)
    main = container(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the only writable place
    assert "memory" in main["resources"]["limits"]


def _environment(objects: tuple[Obj, ...]) -> dict[str, str | None]:
    """Every variable the container sees: the ConfigMap's, then its own (None: a Secret)."""
    env: dict[str, str | None] = dict(one(objects, "ConfigMap", "facesvc-settings")["data"])
    for item in container(objects)["env"]:
        env[item["name"]] = item.get("value")
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_facesvc_variable_is_a_real_setting(overlay: str) -> None:
    objects = render(overlay)
    known = {info.env for info in settings_info()}
    env = _environment(objects)
    unknown = sorted(n for n in env if n.startswith("FACESVC_") and n not in known)
    assert not unknown, f"no such settings: {unknown}"
    # Secrets reach the pods only by reference, never as literals in the manifests.
    assert env["FACESVC_TEMPLATES_KEY"] is None
    assert "$(REDIS_PASSWORD)" in str(env["FACESVC_REDIS_URL"])
    # One thread per worker, one requested core per worker.
    workers = int(str(env["FACESVC_SERVER_WORKERS"]))
    assert env["FACESVC_MODELS_THREADS"] == "1"
    if overlay == "production":
        assert container(objects)["resources"]["requests"]["cpu"] == str(workers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_would_start_with_what_the_overlay_says_about_tls_and_keys(overlay: str) -> None:
    # Pods listen on 0.0.0.0: facesvc serve refuses that without TLS and API keys unless
    # security.allow_insecure_network says so (issue 18.6). Production must not need it.
    env = {k: v for k, v in _environment(render(overlay)).items() if v is not None}
    settable = {k: v for k, v in env.items() if k.startswith("FACESVC_SECURITY_")}
    settable |= {k: env[k] for k in ("FACESVC_SERVER_GRPC_HOST", "FACESVC_SERVER_HTTP_HOST")}
    settings = load_settings(env=settable)
    problems = check_exposure(settings)  # raises when the pods would refuse to start
    if overlay == "production":
        assert problems == [] and not settings.security.allow_insecure_network


def _secrets_used(objects: tuple[Obj, ...]) -> set[str]:
    names = {v["secret"]["secretName"] for v in pod_spec(objects)["volumes"] if "secret" in v}
    for item in container(objects)["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            names.add(ref["name"])
    return names


def test_every_secret_the_pods_use_is_documented_and_made_for_a_local_cluster() -> None:
    readme = (REPO / "README.md").read_text()
    local_up = (DEPLOY / "local-up.sh").read_text()
    production = _secrets_used(render("production"))
    assert {"facesvc-token-keys", "facesvc-template-keys", "facesvc-api-keys"} <= production
    assert all(f"`{name}`" in readme for name in production), production
    assert all(f"secret generic {name}" in local_up for name in _secrets_used(render("local")))


# ---------------------------------------------------------------- Redis and the adapter


def _versions() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (DEPLOY / "versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {k: v for k, v in pairs}


def test_redis_comes_from_a_pinned_chart_in_cluster_mode_with_replicas_and_aof() -> None:
    versions = _versions()
    assert versions["REDIS_CHART"].endswith("/bitnamicharts/redis-cluster")
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["REDIS_CHART_VERSION"])  # pinned, exact
    values = yaml.safe_load((DEPLOY / "redis" / "values.yaml").read_text())
    cluster = values["cluster"]
    assert cluster["replicas"] >= 1
    assert cluster["nodes"] >= 3 * (1 + cluster["replicas"])  # at least three masters
    assert cluster["nodes"] % (1 + cluster["replicas"]) == 0
    assert values["redis"]["useAOFPersistence"] == "yes"
    config = values["redis"]["configmap"]
    assert re.search(r"^cluster-require-full-coverage no$", config, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", config, re.M)
    assert values["persistence"]["enabled"] is True
    # The local cluster's values change sizes only: the same settings, maxmemory under its limit.
    local = yaml.safe_load((DEPLOY / "redis" / "values-local.yaml").read_text())
    assert set(local) <= {"redis", "persistence"}
    assert set(local["redis"]) <= {"podAntiAffinityPreset", "resources", "configmap"}
    unsized = {line for line in config.splitlines() if not line.startswith("maxmemory ")}
    assert unsized - {line for line in config.splitlines() if line.startswith("#")} <= set(
        local["redis"]["configmap"].splitlines()
    )
    assert (
        "-f deploy/redis/values.yaml -f deploy/redis/values-local.yaml"
        in (DEPLOY / "local-up.sh").read_text()
    )

    objects = render("production")
    env = _environment(objects)
    # The service reaches the chart's Service, with the password from the chart's Secret.
    assert re.search(rf"@{values['fullnameOverride']}:6379$", str(env["FACESVC_REDIS_URL"]))
    password = next(i for i in container(objects)["env"] if i["name"] == "REDIS_PASSWORD")
    ref = password["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (
        values["existingSecret"],
        values["existingSecretPasswordKey"],
    )
    # The NetworkPolicy lets the pods out to the chart's pods (its standard labels).
    policy = one(objects, "NetworkPolicy")
    egress_peers = [
        peer["podSelector"]["matchLabels"]
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "namespaceSelector" not in peer
    ]
    chart_pod = {
        "app.kubernetes.io/name": "redis-cluster",
        "app.kubernetes.io/instance": versions["REDIS_RELEASE"],
    }
    assert any(selects(peer, chart_pod) for peer in egress_peers)


def test_the_autoscalers_custom_metric_is_the_one_the_adapter_serves() -> None:
    hpa = one(render("production"), "HorizontalPodAutoscaler")
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"Resource", "Pods"}
    (pods,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert pods["pods"]["metric"]["name"] in served
    (rule,) = adapter["rules"]["custom"]
    assert "facesvc_grpc_in_flight_calls" in rule["seriesQuery"]  # a metric the service exports
    assert "facesvc_grpc_in_flight_calls" in (REPO / "facesvc" / "metrics.py").read_text()
