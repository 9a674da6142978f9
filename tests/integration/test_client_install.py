"""The base install is the client: a clean venv gets Conveyor from this checkout with
only the client's dependencies (grpcio, grpcio-status, googleapis-common-protos,
protobuf, click, rich), none of the server's; the blocking client and the `conveyor`
command then work against the stack, and an operator command asks for the server
install.

Slow (a venv and a wheel build, about a minute): marked `slow` as well as integration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("sqlalchemy", "aio_pika", "asyncpg", "anthropic", "pydantic_settings", "orjson")


def _run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _client_requirements() -> list[str]:
    """The base requirements of pyproject.toml (not the extras), pinned to the versions
    this venv has (it is installed from the lock), so the install makes no choices."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [f"{r.name}=={version(r.name)}" for r in map(Requirement, project["dependencies"])]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with Conveyor's base install only; its python."""
    where = tmp_path_factory.mktemp("client-install")
    src = where / "src"  # a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")
    for package in ("conveyor", "services"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    # The wheel is built with this venv's setuptools (no isolated build env to fetch).
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", where / "dist", src)  # fmt: skip
    [wheel] = (where / "dist").glob("conveyor-*.whl")
    venv = where / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    _run(*pip, "--no-deps", wheel)
    _run(*pip, *_client_requirements())  # and what those need, from the same index
    return python


def test_the_base_install_has_no_server_dependency(client_venv: Path) -> None:
    requirements = {Requirement(r).name for r in _client_requirements()}
    assert requirements == {
        "grpcio",
        "grpcio-status",
        "googleapis-common-protos",
        "protobuf",
        "click",
        "rich",
    }
    probe = f"import importlib.util as u; print([m for m in {SERVER_ONLY!r} if u.find_spec(m)])"
    assert _run(client_venv, "-c", probe).strip() == "[]"


def test_the_sync_client_and_the_cli_work_from_the_client_install(
    client_venv: Path, stack: Stack, api_key: str
) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        from conveyor.client.sync import SyncConveyorClient
        from conveyor.client import NotFound
        with SyncConveyorClient({stack.gateway!r}, {stack.notifier!r}, api_key={api_key!r}) as c:
            job = c.submit("claude-sonnet-4-5", "Hi from a clean venv", max_tokens=16,
                           labels={{"x-sim-latency-ms": "0", "x-sim-tokens": "3"}})
            final = c.wait(job.id, timeout=60)
            try:
                c.get("00000000-0000-0000-0000-000000000000")
            except NotFound:
                missing = True
        server = [m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r}]
        print(json.dumps({{"id": job.id, "status": final.status, "missing": missing,
                          "server": server}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = client_venv.parents[1]  # not the checkout: the installed package is imported
    result = json.loads(_run(client_venv, "-c", script, cwd=outside, env=env))
    assert result["status"] == 4 and result["missing"] and result["server"] == []

    cli = client_venv.parent / "conveyor"
    env["CONVEYOR_API_KEY"] = api_key
    got = json.loads(
        _run(cli, "--gateway", stack.gateway, "get", result["id"], "--json", cwd=outside, env=env)
    )
    assert got["id"] == result["id"] and got["status"] == "JOB_STATUS_SUCCEEDED"

    operator = subprocess.run(
        [cli, "keys", "list"], cwd=outside, env=env, capture_output=True, text=True, timeout=60
    )
    assert operator.returncode == 2 and "conveyor[server]" in operator.stderr
