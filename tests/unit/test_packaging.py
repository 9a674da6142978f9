"""What the wheel installs: the library and the services under `conveyor`, nothing else.

The services' folders sit at the top of the repository (services/<name>/) and install as
`conveyor.services.<name>`, so a project that also has a `services` package is not
shadowed; the development tools (devtools/) are not shipped.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def python_packages(folder: Path, prefix: str) -> set[str]:
    """Dotted names of the folders below `folder` (itself included) that hold Python files."""
    found = set()
    for path in folder.rglob("*.py"):
        parts = path.parent.relative_to(folder).parts
        if "__pycache__" not in parts:
            found.add(".".join((prefix, *parts)))
    return found


def test_every_package_folder_is_in_the_wheel_and_nothing_else() -> None:
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    expected = python_packages(ROOT / "conveyor", "conveyor") | python_packages(
        ROOT / "services", "conveyor.services"
    )
    assert listed == expected


def test_the_wheel_has_one_top_level_package_and_no_dev_tools() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"conveyor"}
    assert setuptools["package-dir"] == {"conveyor.services": "services"}
    assert not any(name.startswith("devtools") for name in setuptools["packages"])


def test_the_console_scripts_run_installed_modules() -> None:
    scripts = pyproject()["project"]["scripts"]
    for name, target in scripts.items():
        module = target.split(":")[0]
        assert module.startswith("conveyor."), (name, target)
        if name.startswith("conveyor-"):
            assert module == f"conveyor.services.{name.removeprefix('conveyor-')}.__main__"


def test_shipped_code_imports_neither_the_dev_tools_nor_another_service() -> None:
    """A service imports its own modules relatively and the library absolutely; the
    library never imports a service or a development tool (the wheel has neither name)."""
    for folder in (ROOT / "conveyor", ROOT / "services"):
        for path in folder.rglob("*.py"):
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) >= 2 and words[0] in ("from", "import"):
                    assert not words[1].startswith(("services", "devtools")), (path, line)
