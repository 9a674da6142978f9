"""`deploy/k8s/` is valid by the Kubernetes API's schemas (`kubernetes-validate`, strict:
unknown fields fail) and by KEDA's CRDs, and hangs together: one image, environments
the code reads that reach the backing services, probes, ports, selectors, resources,
a locked-down security context, and a worker that scales on the depth of every lane
queue.

The CRDs are vendored in `deploy/schemas/` (see its README), so nothing is fetched;
where `kubectl` is installed, it renders the kustomization as well.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from conveyor.bus.broker import DEAD_LETTER_QUEUE, lane_queue, tenant_lane_queue
from conveyor.core.config import LANES
from tests.unit.deploy_files import (
    CONVEYOR_IMAGE,
    GRPC_PORT_FIELDS,
    HEALTHCHECK_IN_IMAGE,
    K8S,
    MODULES,
    SCHEMAS,
    SERVICES,
    command_module,
    configmap_data,
    container_env,
    containers,
    conveyor_deployments,
    image_name,
    k8s_get,
    k8s_kind,
    k8s_objects,
    known_env_names,
    load_yaml,
    runnable,
    schema_errors,
    secret_data,
    settings_from,
    simulator_from,
    the_container,
    workloads,
)

NAMESPACE = "conveyor"
MIN_KUBERNETES = (1, 27)  # native gRPC probes are GA from 1.27 on


def strict(schema: Any) -> Any:
    """An OpenAPI schema that, like the API server's strict field validation, refuses
    fields it does not declare (except where it says unknown fields are kept)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(crd_file: str, version: str) -> jsonschema.Draft7Validator:
    crd = load_yaml(SCHEMAS / crd_file)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


def service_ports(name: str) -> list[int]:
    return [int(p["port"]) for p in k8s_get("Service", name)["spec"]["ports"]]


def test_the_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    assert len(listed) == len(set(listed))


def test_every_object_has_a_kind_a_name_and_the_namespace() -> None:
    seen = set()
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind"), obj
        name = obj["metadata"]["name"]
        assert (obj["kind"], name) not in seen, f"{obj['kind']}/{name} twice"
        seen.add((obj["kind"], name))
        if obj["kind"] == "Namespace":
            assert name == NAMESPACE
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, f"{obj['kind']}/{name}"


def kubernetes_versions() -> list[str]:
    """The oldest Kubernetes release the manifests support that has schemas here, and the newest."""
    shipped = sorted(
        kubernetes_validate.utils.all_versions(),
        key=lambda v: tuple(int(n) for n in v.split(".")[:2]),
    )
    supported = [v for v in shipped if tuple(int(n) for n in v.split(".")[:2]) >= MIN_KUBERNETES]
    return sorted({supported[0], supported[-1]})


@pytest.mark.parametrize("version", kubernetes_versions())
def test_builtin_objects_are_valid_by_the_kubernetes_api_schemas(version: str) -> None:
    errors = []
    for obj in k8s_objects():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert errors == []


def test_keda_objects_are_valid_by_the_keda_crds() -> None:
    validators = {
        "ScaledObject": crd_validator("keda.sh_scaledobjects.yaml", "v1alpha1"),
        "TriggerAuthentication": crd_validator("keda.sh_triggerauthentications.yaml", "v1alpha1"),
    }
    keda = [obj for obj in k8s_objects() if obj["apiVersion"].startswith("keda.sh/")]
    assert {obj["kind"] for obj in keda} == set(validators)
    for obj in keda:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert schema_errors(validators[obj["kind"]], obj) == [], obj["kind"]


def test_the_strict_crd_check_refuses_a_misspelt_field() -> None:
    validator = crd_validator("keda.sh_scaledobjects.yaml", "v1alpha1")
    scaled = k8s_get("ScaledObject", "worker")
    misspelt = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}
    assert any("maxReplicas" in error for error in schema_errors(validator, misspelt))


def test_the_worker_scales_on_the_depth_of_every_lane() -> None:
    scaled = k8s_get("ScaledObject", "worker")["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "worker",
    }
    assert "replicas" not in k8s_get("Deployment", "worker")["spec"], "KEDA owns the count"
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    triggers = scaled["triggers"]
    # One trigger per lane, summing the lane's queues: the shared one and every tenant's.
    assert len(triggers) == len(LANES)
    for lane in LANES:
        (trigger,) = [
            t for t in triggers if re.fullmatch(t["metadata"]["queueName"], lane_queue(lane))
        ]
        pattern = trigger["metadata"]["queueName"]
        assert trigger["metadata"]["useRegex"] == "true"
        assert trigger["metadata"]["operation"] == "sum"
        assert re.fullmatch(pattern, tenant_lane_queue(lane, "acme"))
        others = [tenant_lane_queue(o, "acme") for o in LANES if o != lane]
        assert not any(re.fullmatch(pattern, q) for q in others + [DEAD_LETTER_QUEUE])
    concurrency = configmap_data("conveyor-config")["CONVEYOR_WORKER_CONCURRENCY"]
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        # Over HTTP the length counts unacked (running) jobs too, not only waiting ones.
        assert trigger["metadata"]["protocol"] == "http"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["value"] == concurrency, "one replica per prefetch window"
        k8s_get("TriggerAuthentication", trigger["authenticationRef"]["name"])


def test_keda_reads_the_management_api_with_the_brokers_credentials() -> None:
    auth = k8s_get("TriggerAuthentication", "rabbitmq-management")["spec"]
    refs = {ref["parameter"]: ref for ref in auth["secretTargetRef"]}
    assert set(refs) == {"host", "username", "password"}
    values = {}
    for parameter, ref in refs.items():
        data = secret_data(ref["name"])
        assert ref["key"] in data, f"{parameter}: secret {ref['name']} has no key {ref['key']}"
        values[parameter] = data[ref["key"]]
    # The operator runs in its own namespace: the host must be fully qualified.
    host = urlsplit(values["host"])
    assert host.scheme == "http" and host.hostname == f"rabbitmq.{NAMESPACE}.svc.cluster.local"
    assert host.port in service_ports("rabbitmq")
    broker = container_env(the_container(k8s_get("StatefulSet", "rabbitmq")))
    assert (values["username"], values["password"]) == (
        broker["RABBITMQ_DEFAULT_USER"],
        broker["RABBITMQ_DEFAULT_PASS"],
    )


def test_conveyor_runs_as_deployments_of_one_image() -> None:
    assert sorted(d["metadata"]["name"] for d in conveyor_deployments()) == sorted(MODULES)
    for deployment in conveyor_deployments():
        name = deployment["metadata"]["name"]
        container = the_container(deployment)
        assert image_name(container["image"]) == CONVEYOR_IMAGE
        module = command_module(container["command"])
        assert module == MODULES[name] and runnable(module), name


@pytest.mark.parametrize("name", list(MODULES))
def test_deployment_environment_names_are_variables_the_code_reads(name: str) -> None:
    env = container_env(the_container(k8s_get("Deployment", name)))
    unknown = set(env) - known_env_names(name)
    assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", SERVICES)
def test_deployment_environment_is_valid_configuration_reaching_the_backing_services(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(the_container(k8s_get("Deployment", name)))
    settings = settings_from(env, monkeypatch)
    assert env.get("OTEL_SERVICE_NAME") == f"conveyor-{name}"
    assert (env.get("CONVEYOR_MIGRATE_ON_START") == "true") == (name == "gateway")
    assert settings.anthropic_api_key is None, "no key until the conveyor-anthropic secret exists"

    amqp = urlsplit(settings.amqp_url.get_secret_value())
    broker = container_env(the_container(k8s_get("StatefulSet", "rabbitmq")))
    assert amqp.hostname == "rabbitmq" and amqp.port in service_ports("rabbitmq")
    assert (amqp.username, amqp.password) == (
        broker["RABBITMQ_DEFAULT_USER"],
        broker["RABBITMQ_DEFAULT_PASS"],
    )
    database = urlsplit(settings.database_url.get_secret_value())
    postgres = container_env(the_container(k8s_get("StatefulSet", "postgres")))
    assert database.hostname == "postgres" and database.port in service_ports("postgres")
    assert (database.username, database.password, database.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        f"/{postgres['POSTGRES_DB']}",
    )
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"] or "")
    assert otlp.hostname == "jaeger" and otlp.port in service_ports("jaeger")

    if name == "worker":
        simulator = simulator_from(container_env(the_container(k8s_get("Deployment", "simulator"))))
        assert simulator.host == "0.0.0.0"
        assert settings.simulator_host == "simulator"
        assert settings.simulator_port == simulator.port and simulator.port in service_ports(
            "simulator"
        )


@pytest.mark.parametrize("name", list(GRPC_PORT_FIELDS))
def test_grpc_services_are_probed_with_native_grpc_probes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = the_container(k8s_get("Deployment", name))
    settings = settings_from(container_env(container), monkeypatch)
    port = getattr(settings, GRPC_PORT_FIELDS[name])
    assert (settings.gateway_host if name == "gateway" else settings.notifier_host) == "0.0.0.0"
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_exposes_its_prometheus_endpoint(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = k8s_get("Deployment", name)
    container = the_container(deployment)
    settings = settings_from(container_env(container), monkeypatch)
    port = settings.metrics_port(name)
    assert settings.metrics_host == "0.0.0.0" and port > 0
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)


def test_worker_and_dispatcher_are_ready_when_connected_to_the_broker() -> None:
    for name in ("worker", "dispatcher"):
        probe = the_container(k8s_get("Deployment", name))["readinessProbe"]
        assert probe["exec"]["command"] == ["python", HEALTHCHECK_IN_IMAGE, "amqp"]


def test_services_select_pods_and_ports_that_exist() -> None:
    for service in k8s_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [
            w
            for w in workloads()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)}"
        ports = [p for c in containers(targets[0]) for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                service["metadata"]["name"],
                target,
            )


def test_workload_selectors_match_their_pod_labels() -> None:
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_no_service_name_makes_kubernetes_inject_conveyor_variables() -> None:
    # A Service `conveyor-gateway` would give every pod CONVEYOR_GATEWAY_PORT=tcp://...
    for service in k8s_kind("Service"):
        injected = service["metadata"]["name"].upper().replace("-", "_") + "_"
        assert not injected.startswith(("CONVEYOR_", "SIM_", "OTEL_", "ANTHROPIC_"))
    for workload in workloads():
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_every_container_has_resource_requests_and_limits() -> None:
    for workload in workloads():
        for container in containers(workload):
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (container["name"], kind)


def test_conveyor_containers_run_locked_down() -> None:
    for deployment in conveyor_deployments():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = the_container(deployment)
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }


def test_the_worker_has_time_to_hand_back_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = k8s_get("Deployment", "worker")
    settings = settings_from(container_env(the_container(worker)), monkeypatch)
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.worker_shutdown_grace_s


def test_the_secret_holds_placeholders_only() -> None:
    data = secret_data("conveyor-secrets")
    for key in ("rabbitmq-password", "postgres-password"):
        assert data[key] == "change-me", key
    assert not any("api-key" in key or "anthropic" in key for key in data)
    assert "data" not in k8s_get("Secret", "conveyor-secrets"), "readable stringData only"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_renders_the_kustomization() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    names = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in k8s_objects())
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "conveyor"
