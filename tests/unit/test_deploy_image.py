"""`deploy/Dockerfile` builds one non-root image for every process: the locked runtime
dependencies, then `pip install --no-deps .`, from a build context that leaves local
state out. Checked without a Docker engine.
"""

from __future__ import annotations

import fnmatch
import re

import yaml

from tests.unit.deploy_files import (
    DOCKERFILE,
    HEALTHCHECK_IN_IMAGE,
    ROOT,
    command_module,
    conveyor_deployments,
)


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
