"""`deploy/docker-compose.yml` is valid by the Compose Specification's JSON schema and
hangs together: dependencies, health checks, the modules its commands run, the settings
its variables set, the URLs that join the services, limits and volumes.

The schema is vendored in `deploy/schemas/` (see its README), so nothing is fetched;
where `docker compose` is installed, it checks the file as well.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import urlsplit

import jsonschema
import pytest

from tests.unit.deploy_files import (
    COMPOSE_FILE,
    DOCKERFILE,
    GRPC_PORT_FIELDS,
    HEALTHCHECK_IN_IMAGE,
    MODULES,
    ROOT,
    SCHEMAS,
    SERVICES,
    command_module,
    compose,
    compose_env,
    compose_service,
    container_env,
    image_name,
    k8s_get,
    known_env_names,
    runnable,
    schema_errors,
    settings_from,
    simulator_from,
    the_container,
)

GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")


def seconds(duration: str) -> float:
    """A compose duration ("1m30s", "45s") in seconds."""
    assert re.fullmatch(f"(?:{GO_DURATION.pattern})+", duration), duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[unit] for n, unit in GO_DURATION.findall(duration))


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
