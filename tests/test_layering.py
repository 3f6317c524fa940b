"""The layers, enforced (docs/architecture.md): the core knows nothing of Ray, Optuna or MLflow;
each external system is touched by its one owner module, and its private APIs by `compat` alone;
only the CLI drives the runner."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grokstudy"
NO_EXTERNALS = [  # the core, and the modules above it that need none of ray, optuna, mlflow
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
    "grokstudy.relabel",
    "grokstudy.stats",
    "grokstudy.figures",
    "grokstudy.study",
    "grokstudy.storage",
    "grokstudy.points",
    "grokstudy.checkpoints",
    "grokstudy.member",
    "grokstudy.collect",
    "grokstudy.progress",
    "grokstudy.footprint",
    "grokstudy.uris",
    "grokstudy.weights",
    "grokstudy.report",
    "grokstudy.api",
    "grokstudy.reference",
]
EXTERNAL_SYSTEMS = ("ray", "mlflow", "optuna")
OWNERS = {
    "ray": {"runner", "preflight", "compat"},
    "mlflow": {"tracking", "compat"},
    "optuna": {"search", "compat"},
    "matplotlib": {"figures"},
    "grokstudy.runner": {"cli", "api"},  # the two front doors: the command line and Python
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


# One interpreter imports what the core may use (torch, numpy, pyarrow: seconds), then forks a
# child per module, so each module is imported alone into a clean interpreter state.
PROBE = """
import json, os, sys
import numpy, pyarrow, torch
for module in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        __import__(module)
        found = [m for m in EXTERNALS if m in sys.modules]
        os.write(write, json.dumps([module, found]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        print(f.read(), flush=True)
    os.wait()
"""


@pytest.fixture(scope="module")
def pulled_in() -> dict[str, list[str]]:
    """{core module: the external systems importing it alone pulls in}."""
    code = f"EXTERNALS = {EXTERNAL_SYSTEMS!r}\n" + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code, *NO_EXTERNALS], capture_output=True, text=True, check=True
    )
    return dict(json.loads(line) for line in out.stdout.splitlines())


@pytest.mark.parametrize("module", NO_EXTERNALS)
def test_core_module_imports_no_external_system(module: str, pulled_in: dict[str, list[str]]) -> None:
    assert pulled_in[module] == [], f"{module} pulled in: {pulled_in[module]}"


@pytest.mark.parametrize("imported", sorted(OWNERS))
def test_each_external_system_and_driver_is_imported_by_its_one_owner(imported: str) -> None:
    for source in PACKAGE.glob("*.py"):
        found = {name for name in imports(source) if name == imported or name.startswith(imported + ".")}
        assert not found or source.stem in OWNERS[imported], f"{source.name} imports {imported}"


def test_the_training_core_imports_nothing_above_it() -> None:
    above = {"runner", "search", "tracking", "study", "results", "figures", "cli", "storage", "compat",
             "member", "collect", "checkpoints", "progress", "points", "preflight", "footprint"}  # fmt: skip
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


def _private_names_of_our_own() -> set[str]:
    """Underscored names grokstudy defines: functions, classes, module names and attributes it assigns."""
    names = set()
    for source in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
    return {n for n in names if n.startswith("_")}


def test_private_apis_of_ray_optuna_and_mlflow_are_touched_in_compat_alone() -> None:
    """An underscored attribute grokstudy does not define itself, or an internal module of an outside
    system, appears in `compat` and nowhere else (so its start-of-run check covers every one)."""
    ours = _private_names_of_our_own()
    internal = (
        "ray.tune.execution",
        "ray.train._internal",
        "ray._private",
        "mlflow.store",
        "optuna.storages._",
    )
    found = {}
    for source in PACKAGE.glob("*.py"):
        if source.stem == "compat":
            continue
        tree = ast.parse(source.read_text())
        foreign = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")}
        # Python's dunders, and torch's foreach kernels (torch._foreach_*: what torch's own optimizers
        # call; torch is the core's library, not an outside system).
        foreign = {n for n in foreign - ours if not n.endswith("__") and not n.startswith("_foreach_")}
        foreign |= {m for m in imports(source) if m.startswith(internal)}
        if foreign:
            found[source.name] = sorted(foreign)
    assert found == {}


def test_the_private_api_check_knows_every_private_api_compat_wraps() -> None:
    from grokstudy import compat

    source = (PACKAGE / "compat.py").read_text()
    wrapped = [
        n.name
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
    ]
    assert set(wrapped) == {"has_experiment_snapshot", "reopening_search", "set_system_attr", "set_user_attr",
                            "storage_of", "create_sqlite_store", "check"}  # fmt: skip
    assert len(compat.PROBES) == 5
