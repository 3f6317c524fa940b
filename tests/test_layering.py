"""The layers of STYLE.md, enforced: the core knows nothing of Ray, Optuna or MLflow; each
external system is touched by exactly one module; only the CLI drives the runner."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grokstudy"
CORE_MODULES = [
    "grokstudy.config",
    "grokstudy.records",
    "grokstudy.tasks",
    "grokstudy.models",
    "grokstudy.optim",
    "grokstudy.measures",
    "grokstudy.train",
    "grokstudy.packed",
    "grokstudy.phases",
    "grokstudy.refine",
    "grokstudy.results",
    "grokstudy.figures",
    "grokstudy.study",
    "grokstudy.storage",
]
EXTERNAL_SYSTEMS = ("ray", "mlflow", "optuna")
OWNERS = {
    "ray": {"runner"},
    "mlflow": {"tracking"},
    "optuna": {"search"},
    "matplotlib": {"figures"},
    "grokstudy.runner": {"cli"},
    "grokstudy.cli": {"__main__"},
}
"""Who may import what: an external system, or one of the package's top-level drivers."""


def imports(source: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports in functions included)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "grokstudy":
                names.update(f"grokstudy.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_external_system(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {EXTERNAL_SYSTEMS!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("imported", sorted(OWNERS))
def test_each_external_system_and_driver_is_imported_by_its_one_owner(imported: str) -> None:
    for source in PACKAGE.glob("*.py"):
        found = {name for name in imports(source) if name == imported or name.startswith(imported + ".")}
        assert not found or source.stem in OWNERS[imported], f"{source.name} imports {imported}"


def test_the_training_core_imports_nothing_above_it() -> None:
    above = {"runner", "search", "tracking", "study", "results", "figures", "cli", "storage"}
    for core in (
        "tasks",
        "models",
        "optim",
        "measures",
        "train",
        "packed",
        "phases",
        "refine",
        "records",
        "config",
    ):
        found = {n.removeprefix("grokstudy.") for n in imports(PACKAGE / f"{core}.py")} & above
        assert not found, f"{core}.py imports {found}"
