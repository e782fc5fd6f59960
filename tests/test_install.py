"""What a non-editable install ships: every module, the configs, the console script and every dependency.

An editable install (``pip install -e``) reads the checkout and hides a package left out of the wheel;
these tests build the wheel itself. .ci/run then installs it outside the checkout and runs it.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("redheart_tune",)
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def source_files(pattern: str, *folders: str) -> set[str]:
    return {
        p.relative_to(REPO).as_posix()
        for folder in folders
        for p in (REPO / folder).rglob(pattern)
        if "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (setuptools builds in the tree: a stale build/ in the
    checkout could ship a deleted module)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "run.py"):
        shutil.copy2(REPO / name, src / name)
    for folder in PACKAGES:  # the configs ship inside the package (configs/ at the root links to them)
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    done = subprocess.run(
        [sys.executable, "-m", "pip", *build],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("redheart_tune-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def test_the_wheel_ships_every_module_and_config(wheel):
    names = set(wheel.namelist())
    missing = (source_files("*.py", *PACKAGES) | source_files("*.yaml", *PACKAGES)) - names
    assert not missing, f"left out of the wheel: {sorted(missing)}"
    assert "redheart_tune/engine/memory/__init__.py" in names  # the package a hand-written list once forgot
    assert "redheart_tune/configs/default.yaml" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"redheart_tune"}, f"the wheel installs more than one top-level name: {sorted(tops)}"


def test_the_wheel_declares_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text and "redheart-tune = redheart_tune.cli:main" in text


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


OPTIONAL = {"pynvml": ["nvidia-ml-py"]}
"""Modules of optional extras (not installed here), by the distribution that provides them."""


def test_every_third_party_import_is_a_declared_dependency():
    """scipy was imported (redheart_tune/analysis/uncertainty.py) but not declared: an install without it failed."""
    import ast

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    declared = {normalized(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in requirements}
    first_party = {*PACKAGES, "benchmarks", "tests"}
    imported: dict[str, str] = {}
    for rel in sorted(source_files("*.py", *PACKAGES) | {"run.py"}):
        for node in ast.walk(ast.parse((REPO / rel).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in first_party:
                    imported.setdefault(top, rel)
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: where
        for module, where in imported.items()
        if not declared & {normalized(d) for d in distributions.get(module) or OPTIONAL.get(module, [module])}
    }
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
