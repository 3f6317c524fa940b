"""The core knows nothing of Ray, Optuna or MLflow (STYLE.md, principle 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE_MODULES = [
    "grokstudy.config",
    "grokstudy.tasks",
    "grokstudy.models",
    "grokstudy.optim",
    "grokstudy.measures",
    "grokstudy.train",
    "grokstudy.phases",
    "grokstudy.results",
    "grokstudy.figures",
    "grokstudy.study",
]
EXTERNAL_SYSTEMS = ("ray", "mlflow", "optuna")


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_external_system(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {EXTERNAL_SYSTEMS!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in: {out.stdout.strip()}"


def test_only_the_runner_imports_ray_and_only_tracking_imports_mlflow() -> None:
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "grokstudy"
    owners = {"ray": {"runner.py"}, "mlflow": {"tracking.py"}, "optuna": {"search.py"}}
    for source in package.glob("*.py"):
        text = source.read_text()
        for system, allowed in owners.items():
            imports = f"import {system}" in text or f"from {system}" in text
            assert not imports or source.name in allowed, f"{source.name} imports {system}"
