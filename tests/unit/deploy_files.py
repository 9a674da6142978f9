"""What the tests of deploy/ share: where the files are, what the compose file and the
Kubernetes manifests hold (environments resolved), and which variables the code reads.

The tests themselves: `test_deploy_image.py` (the Dockerfile and its build context),
`test_deploy_healthcheck.py`, `test_deploy_compose.py`, `test_deploy_kubernetes.py`
and `test_deploy_authentication.py` (keys and webhook signing secrets in both).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import opentelemetry.sdk.environment_variables as otel_env
import pytest
import yaml
from pydantic import AliasChoices

from conveyor.core.config import Settings
from devtools.simulator.app import SimulatorConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"

HEALTHCHECK_IN_IMAGE = "/opt/conveyor/healthcheck.py"


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


def schema_errors(validator: Any, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]
