"""The deployment files in deploy/, checked without a Docker engine or a cluster.

- `deploy/Dockerfile` builds one non-root image for every process: the locked runtime
  dependencies, then `pip install --no-deps .`.
- `deploy/docker-compose.yml` is valid by the Compose Specification's JSON schema and
  hangs together: dependencies, health checks, the modules its commands run, the
  settings its variables set, the URLs that join the services, limits and volumes.
- `deploy/k8s/` is valid by the Kubernetes API's schemas (`kubernetes-validate`,
  strict: unknown fields fail) and by KEDA's CRDs, and hangs together the same way,
  plus: the worker scales on the depth of every lane queue.
- `deploy/healthcheck.py` tells a healthy service from an unhealthy one.

Where `docker compose` or `kubectl` is installed, they check the files as well.
Schemas are vendored in `deploy/schemas/` (see its README), so nothing is fetched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import grpc
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import opentelemetry.sdk.environment_variables as otel_env
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import AliasChoices

from conveyor.bus.broker import DEAD_LETTER_QUEUE, lane_queue, tenant_lane_queue
from conveyor.core.config import LANES, Settings
from devtools.simulator.app import SimulatorConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"

HEALTHCHECK_IN_IMAGE = "/opt/conveyor/healthcheck.py"
NAMESPACE = "conveyor"
MIN_KUBERNETES = (1, 27)  # native gRPC probes are GA from 1.27 on
CONVEYOR_IMAGE = "conveyor"

MODULES = {
    "gateway": "conveyor.services.gateway",
    "notifier": "conveyor.services.notifier",
    "worker": "conveyor.services.worker",
    "dispatcher": "conveyor.services.dispatcher",
    "simulator": "devtools.simulator",
    "http": "conveyor.services.http",
}
"""Each Conveyor process, by its compose service / Deployment name, and what it runs."""
SERVICES = ("gateway", "notifier", "worker", "dispatcher")
"""The four services (the simulator is a stand-in for the Messages API, not one of them)."""
GRPC_PORT_FIELDS = {"gateway": "gateway_port", "notifier": "notifier_port"}


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@functools.cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"][name]
    return service


COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def compose_env(name: str, shell: dict[str, str] | None = None) -> dict[str, str | None]:
    """A compose service's environment as a dict (either syntax); None is value-less.

    `${VAR:-default}` is interpolated as compose does, from `shell` (empty by default).
    """
    env = compose_service(name).get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        raw = {key: (value if sep else None) for key, sep, value in pairs}
    else:
        raw = {str(k): None if v is None else str(v) for k, v in env.items()}

    def interpolate(match: re.Match[str]) -> str:
        return (shell or {}).get(match.group(1)) or match.group(2) or ""

    return {k: None if v is None else COMPOSE_VARIABLE.sub(interpolate, v) for k, v in raw.items()}


@functools.cache
def k8s_objects() -> tuple[dict[str, Any], ...]:
    """Every object of the manifests kustomization.yaml lists, in order."""
    objects: list[dict[str, Any]] = []
    for resource in load_yaml(K8S / "kustomization.yaml")["resources"]:
        objects.extend(doc for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc)
    return tuple(objects)


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == kind]


def k8s_get(kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in k8s_kind(kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name}, found {len(matches)}"
    return matches[0]


def workloads() -> list[dict[str, Any]]:
    return k8s_kind("Deployment") + k8s_kind("StatefulSet")


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def conveyor_deployments() -> list[dict[str, Any]]:
    """The Deployments that run the Conveyor image."""
    return [
        d
        for d in k8s_kind("Deployment")
        if any(image_name(c["image"]) == CONVEYOR_IMAGE for c in containers(d))
    ]


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def image_name(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def secret_data(name: str) -> dict[str, str]:
    secret = k8s_get("Secret", name)
    return {str(k): str(v) for k, v in (secret.get("stringData") or {}).items()}


def configmap_data(name: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in (k8s_get("ConfigMap", name).get("data") or {}).items()}


def container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """What a container's environment resolves to from the manifests.

    ConfigMap entries first, then `env`; secret references read the placeholder Secret
    (an optional reference to a Secret the manifests do not hold is left unset, None).
    Fails when a reference names a ConfigMap, Secret or key that does not exist.
    """
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(configmap_data(source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        held = {s["metadata"]["name"] for s in k8s_kind("Secret")}
        if ref.get("optional") and ref["name"] not in held:
            env[var["name"]] = None
            continue
        data = secret_data(ref["name"])
        assert ref["key"] in data, f"{var['name']}: secret {ref['name']} has no key {ref['key']}"
        env[var["name"]] = data[ref["key"]]
    return env


def command_module(command: list[str]) -> str:
    """The module a command runs: `python -m MODULE`, or one of the package's console scripts."""
    if len(command) == 1:
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        target: str = scripts[command[0]]
        return target.split(":")[0].removesuffix(".__main__")
    assert command[:2] == ["python", "-m"] and len(command) == 3, command
    return command[2]


def runnable(module: str) -> bool:
    """Whether `python -m module` finds something to run."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return True


def settings_env_names() -> set[str]:
    """Every variable Settings reads: CONVEYOR_<FIELD>, or a field's own aliases."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def simulator_env_names() -> set[str]:
    return {f"SIM_{f.name.upper()}" for f in dataclasses.fields(SimulatorConfig)}


def otel_env_names() -> set[str]:
    """The standard OTEL_* variables the OpenTelemetry SDK knows."""
    values = (getattr(otel_env, name) for name in dir(otel_env) if name.startswith("OTEL_"))
    return {value for value in values if isinstance(value, str)}


def known_env_names(process: str) -> set[str]:
    """The simulator is configured by SIM_* variables; the services by Settings and OTEL_*."""
    if process == "simulator":
        return simulator_env_names()
    return settings_env_names() | otel_env_names()


def settings_from(env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process with exactly this environment (for Conveyor's names) gets."""
    for name in list(os.environ):
        if name.startswith(("CONVEYOR_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None and name in settings_env_names():
            monkeypatch.setenv(name, value)
    return Settings()


def simulator_from(env: dict[str, str | None]) -> SimulatorConfig:
    return SimulatorConfig.from_env({k: v for k, v in env.items() if v is not None})


GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


def seconds(duration: str) -> float:
    """A compose duration ("1m30s", "45s") in seconds."""
    assert re.fullmatch(f"(?:{GO_DURATION.pattern})+", duration), duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[unit] for n, unit in GO_DURATION.findall(duration))


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


def schema_errors(validator: Any, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the root) out of the build context."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:  # the last pattern that matches decides; `!` re-includes
        glob = pattern.removeprefix("!")
        if glob.startswith("**/"):  # at any depth
            globs = [glob.removeprefix("**/"), "*/" + glob.removeprefix("**/")]
        else:  # anchored at the root of the context
            globs = [glob]
        if any(fnmatch.fnmatch(c, g) for c in candidates for g in globs):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_image_is_built_in_stages_from_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
    assert all(args.startswith("${PYTHON_IMAGE}") for args in froms)


def test_the_image_installs_the_project_without_dev_dependencies() -> None:
    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN"]
    assert "pip install --require-hashes --no-deps -r requirements.lock" in runs
    assert "pip install --no-deps . && pip check" in runs
    assert not any("[dev]" in run or "pip install -e" in run for run in runs)
    assert not any(ins == "RUN" and "pip" in args for ins, args in final_stage()), (
        "the runtime stage copies the venv; it installs nothing"
    )


def test_the_image_runs_as_a_non_root_user() -> None:
    stage = final_stage()
    args = dict(a.partition("=")[::2] for ins, a in stage if ins == "ARG")
    users = [a for ins, a in stage if ins == "USER"]
    assert users, "the runtime stage sets a USER"
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert uid not in ("root", "0")
    # The Kubernetes pods say the same uid, so runAsNonRoot can check it.
    for deployment in conveyor_deployments():
        pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert str(pod_security["runAsUser"]) == uid


def test_the_image_carries_the_healthcheck_script_and_defaults_to_the_gateway() -> None:
    copies = [args.split() for ins, args in final_stage() if ins == "COPY"]
    assert ["deploy/healthcheck.py", HEALTHCHECK_IN_IMAGE] in copies
    (cmd,) = [args for ins, args in final_stage() if ins == "CMD"]
    assert command_module(yaml.safe_load(cmd)) == "conveyor.services.gateway"


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY" or args.startswith("--from"):
            continue
        *sources, _destination = args.split()
        for source in sources:
            if source.endswith("*"):  # optional (README.md*): may match nothing
                continue
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_the_build_context_leaves_out_local_state() -> None:
    for path in (".git", ".venv", "node_modules", "tests", "run", ".env", "deploy/k8s"):
        assert dockerignored(path), path


# --------------------------------------------------------------------------- compose


def test_compose_file_is_valid_by_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert schema_errors(validator, compose()) == []
    assert "version" not in compose(), "the top-level version is obsolete"


def test_compose_runs_the_backing_services_and_every_conveyor_process() -> None:
    services = compose()["services"]
    assert set(services) == {"rabbitmq", "postgres", "jaeger", *MODULES}
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert services["postgres"]["image"] == "postgres:16"
    assert image_name(services["jaeger"]["image"]) == "jaegertracing/all-in-one"
    assert compose_env("jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"


def test_conveyor_processes_share_one_image_built_from_the_dockerfile() -> None:
    images = set()
    for name in MODULES:
        service = compose_service(name)
        images.add(service["image"])
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == ROOT, "the build context is the repository root"
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert len(images) == 1


@pytest.mark.parametrize("name", list(MODULES))
def test_compose_commands_run_real_modules(name: str) -> None:
    module = command_module(compose_service(name)["command"])
    assert module == MODULES[name]
    assert runnable(module), f"python -m {module} would not start"


def test_dependencies_name_services_and_wait_for_health_where_it_is_checked() -> None:
    services = compose()["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on with conditions"
        for dependency, how in depends_on.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"

    def reaches(start: str, target: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services[start].get("depends_on", {})
        return any(d == target or (d not in seen and reaches(d, target, seen | {d})) for d in deps)

    assert not [name for name in services if reaches(name, name)], "a dependency cycle"


def test_conveyor_services_start_once_the_broker_and_the_database_are_healthy() -> None:
    for name in SERVICES:
        depends_on = compose_service(name)["depends_on"]
        for backing in ("rabbitmq", "postgres"):
            assert depends_on[backing]["condition"] == "service_healthy", (name, backing)
    assert compose_service("worker")["depends_on"]["simulator"]["condition"] == "service_healthy"


def test_the_gateway_alone_migrates_and_the_others_wait_for_it() -> None:
    for name in SERVICES:
        migrates = compose_env(name).get("CONVEYOR_MIGRATE_ON_START") == "true"
        assert migrates == (name == "gateway"), name
        if name != "gateway":
            assert compose_service(name)["depends_on"]["gateway"]["condition"] == (
                "service_healthy"
            )


def test_every_service_has_a_healthcheck() -> None:
    for name, service in compose()["services"].items():
        check = service.get("healthcheck")
        assert check and check["test"][0] == "CMD", name
        for key in ("interval", "timeout", "start_period"):
            assert seconds(check[key]) > 0, (name, key)


@pytest.mark.parametrize("name", list(MODULES))
def test_conveyor_healthchecks_use_the_image_script_on_the_service_port(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    test = compose_service(name)["healthcheck"]["test"]
    assert test[1:3] == ["python", HEALTHCHECK_IN_IMAGE]
    kind, *target = test[3:]
    if name in GRPC_PORT_FIELDS:
        settings = settings_from(compose_env(name), monkeypatch)
        assert [kind, *target] == ["grpc", f"127.0.0.1:{getattr(settings, GRPC_PORT_FIELDS[name])}"]
    elif name == "simulator":
        port = simulator_from(compose_env(name)).port
        assert [kind, *target] == ["http", f"http://127.0.0.1:{port}/healthz"]
    elif name == "http":
        port = settings_from(compose_env(name), monkeypatch).http_port
        assert [kind, *target] == ["http", f"http://127.0.0.1:{port}/healthz"]
    else:  # the worker and the dispatcher listen on nothing: they must hold the broker
        assert [kind, *target] == ["amqp"]


@pytest.mark.parametrize("name", list(MODULES))
def test_compose_environment_names_are_variables_the_code_reads(name: str) -> None:
    unknown = set(compose_env(name)) - known_env_names(name)
    assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", SERVICES)
def test_compose_environment_is_valid_configuration(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(compose_env(name), monkeypatch)
    assert settings.anthropic_api_key is None, "no key unless the shell has one"
    assert settings.metrics_host == "0.0.0.0", "/metrics reachable from the compose network"
    if name in GRPC_PORT_FIELDS:
        host = settings.gateway_host if name == "gateway" else settings.notifier_host
        port = getattr(settings, GRPC_PORT_FIELDS[name])
        assert host == "0.0.0.0", "reachable from outside its container"
        assert compose_service(name)["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_the_worker_calls_the_real_api_unless_the_shell_asks_for_the_simulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from(compose_env("worker"), monkeypatch)
    assert settings.provider == "anthropic"
    assert settings.provider_base_url == "https://api.anthropic.com"
    # The key passes through from the shell only (never written in the file).
    assert compose_env("worker")["ANTHROPIC_API_KEY"] is None
    assert all("ANTHROPIC_API_KEY" not in compose_env(n) for n in MODULES if n != "worker")

    simulated = compose_env("worker", shell={"CONVEYOR_PROVIDER": "simulator"})
    settings = settings_from(simulated, monkeypatch)
    simulator = simulator_from(compose_env("simulator"))
    assert simulator.host == "0.0.0.0"
    assert settings.provider_base_url == f"http://simulator:{simulator.port}"


def anonymous_problem(settings: Settings, name: str) -> str | None:
    """Why a service with these settings would refuse to start over its anonymous tenant."""
    from conveyor.core.config import ConfigError
    from conveyor.server.runtime import check_anonymous

    host = getattr(settings, f"{name}_host", None)
    if host is None:
        return None
    try:
        check_anonymous(settings, host, name, warn=False)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", SERVICES)
def test_no_deployed_service_takes_key_less_calls_on_the_network(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in (compose_env(name), container_env(the_container(k8s_get("Deployment", name)))):
        settings = settings_from(env, monkeypatch)
        assert settings.anonymous_tenant is None, "every call needs an API key"
        assert not settings.allow_anonymous_on_network
        assert anonymous_problem(settings, name) is None


@pytest.mark.parametrize("name", list(GRPC_PORT_FIELDS))
def test_an_anonymous_tenant_on_a_deployed_listener_would_refuse_to_start(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**compose_env(name), "CONVEYOR_ANONYMOUS_TENANT": "default"}
    problem = anonymous_problem(settings_from(env, monkeypatch), name)
    assert problem is not None and "0.0.0.0" in problem


def test_deployed_workers_call_the_real_api(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = settings_from(container_env(the_container(k8s_get("Deployment", "worker"))), monkeypatch)
    assert k8s.provider == "anthropic"
    assert settings_from(compose_env("worker"), monkeypatch).provider == "anthropic"


@pytest.mark.parametrize("name", SERVICES)
def test_compose_urls_reach_the_backing_services_with_their_credentials(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(compose_env(name), monkeypatch)
    amqp = urlsplit(settings.amqp_url.get_secret_value())
    rabbitmq = compose_env("rabbitmq")
    assert (amqp.hostname, amqp.port) == ("rabbitmq", 5672)
    assert (amqp.username, amqp.password) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"],
        rabbitmq["RABBITMQ_DEFAULT_PASS"],
    )
    database = urlsplit(settings.database_url.get_secret_value())
    postgres = compose_env("postgres")
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password, database.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        f"/{postgres['POSTGRES_DB']}",
    )
    otlp = urlsplit(compose_env(name)["OTEL_EXPORTER_OTLP_ENDPOINT"] or "")
    assert (otlp.scheme, otlp.hostname, otlp.port) == ("http", "jaeger", 4317)


def test_each_service_names_itself_to_opentelemetry() -> None:
    names = [compose_env(name).get("OTEL_SERVICE_NAME") for name in SERVICES]
    assert names == [f"conveyor-{name}" for name in SERVICES]


def test_every_service_has_cpu_and_memory_limits() -> None:
    for name, service in compose()["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert re.fullmatch(r"\d+[MG]", limits["memory"]), name


def test_broker_and_database_data_live_in_named_volumes() -> None:
    declared = set(compose()["volumes"])
    mounts = {
        name: [v.split(":")[0] for v in service.get("volumes", [])]
        for name, service in compose()["services"].items()
    }
    assert mounts["rabbitmq"] == ["rabbitmq-data"] and mounts["postgres"] == ["postgres-data"]
    assert declared == {source for sources in mounts.values() for source in sources}
    # RabbitMQ keeps its data under its node name, which follows the host name.
    assert compose_service("rabbitmq")["hostname"] == "rabbitmq"


def test_published_ports_are_bound_to_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_the_worker_scales_out_and_has_time_to_hand_back_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = compose_service("worker")
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` works"
    grace = settings_from(compose_env("worker"), monkeypatch).worker_shutdown_grace_s
    assert seconds(worker["stop_grace_period"]) > grace


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed",
)
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- Kubernetes


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


def service_ports(name: str) -> list[int]:
    return [int(p["port"]) for p in k8s_get("Service", name)["spec"]["ports"]]


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


# --------------------------------------------------------------------------- healthcheck.py


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    return load_healthcheck()


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_healthcheck_grpc_is_healthy_only_while_serving(
    healthcheck: ModuleType, health_server: tuple[str, health.HealthServicer]
) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", address]) == 1


def test_healthcheck_grpc_is_unhealthy_when_nothing_listens(healthcheck: ModuleType) -> None:
    assert not healthcheck.grpc_serving("127.0.0.1:1", timeout_s=1.0)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_healthcheck_http_is_healthy_only_on_200(healthcheck: ModuleType) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main(["http", f"{base}/healthz"]) == 0
        assert healthcheck.main(["http", f"{base}/elsewhere"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["http", f"{base}/healthz"]) == 1


TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001
   1: 0200A8C0:D431 0300A8C0:1628 01 00000000:00000000 00:00000000 00000000 10001
   2: 0200A8C0:D432 0400A8C0:1538 06 00000000:00000000 00:00000000 00000000 10001
"""


def test_healthcheck_amqp_looks_for_an_established_connection_to_the_broker_port(
    healthcheck: ModuleType,
) -> None:
    assert healthcheck.established_to(5672, [TCP_TABLE])  # 0x1628, state 01
    assert not healthcheck.established_to(5432, [TCP_TABLE])  # 0x1538 is TIME_WAIT (06)
    assert not healthcheck.established_to(8080, [TCP_TABLE])  # 0x1F90 is only listening
    assert healthcheck.amqp_port("amqp://u:p@rabbitmq:5673/") == 5673
    assert healthcheck.amqp_port("amqp://u:p@rabbitmq/") == 5672
    assert healthcheck.amqp_port("amqps://u:p@rabbitmq/") == 5671


def test_healthcheck_refuses_an_unknown_check(healthcheck: ModuleType) -> None:
    assert healthcheck.main([]) == 2
    assert healthcheck.main(["tcp", "127.0.0.1:1"]) == 2


# ------------------------------------------------------------------ webhook signing secrets

WEBHOOK_KEY_HOLDERS = ("gateway", "notifier")
"""The notifier signs; the gateway's container is where operators run
`conveyor webhooks secret rotate` (it seals with the same key). Nothing else needs it."""


def stack_webhook_keys(
    envs: dict[str, dict[str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str | None]:
    keys: dict[str, str | None] = {}
    for name, env in envs.items():
        key = settings_from(env, monkeypatch).webhook_secrets_key
        keys[name] = key.get_secret_value() if key is not None else None
    return keys


def assert_webhooks_can_be_signed(keys: dict[str, str | None]) -> None:
    """A secret made where the CLI runs opens in the notifier, which can then sign."""
    from conveyor.server.webhooks import SecretBox, new_secret, signed_headers, verify_signature

    made, signer = keys["gateway"], keys["notifier"]
    assert made is not None and signer is not None, "without the key no webhook is sent"
    secret = new_secret()
    sealed = SecretBox(made).seal("acme", "id-1", secret)
    opened = SecretBox(signer).open("acme", "id-1", sealed)
    headers = signed_headers([opened], b"{}", "d1", "job.succeeded")
    assert verify_signature(secret, b"{}", headers)
    assert all(keys[n] is None for n in SERVICES if n not in WEBHOOK_KEY_HOLDERS), (
        "only the services that need it hold the key"
    )


def test_compose_gives_the_notifier_and_the_cli_one_key_for_webhook_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = stack_webhook_keys({n: compose_env(n) for n in SERVICES}, monkeypatch)
    assert_webhooks_can_be_signed(keys)


def test_kubernetes_gives_the_notifier_and_the_cli_one_key_for_webhook_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    envs = {n: container_env(the_container(k8s_get("Deployment", n))) for n in SERVICES}
    keys = stack_webhook_keys(envs, monkeypatch)
    assert_webhooks_can_be_signed(keys)
