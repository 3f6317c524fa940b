"""Shared test setup: loopback-only Ray, quiet telemetry, one MLflow server for the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

# Ray advertises the machine's network address by default; tests stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# One torch thread per test process: tests run in parallel (make test), and torch's threads
# spin-wait for each other when the cores are shared, slowing training several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _one_ray_token() -> None:
    """Make sure ~/.ray/auth_token exists before any test starts a Ray: two embedded Rays
    starting at once (tests run in parallel) would each write their own, and later processes of
    one cluster read the other's. The runner's own rule, run once up front."""
    from grokstudy.runner import ensure_ray_token

    ensure_ray_token()


_one_ray_token()

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.MlflowServer]:
    """One real `mlflow server` (sqlite store, local artifacts) for every test that needs one and
    not one of its own; tests keep apart by experiment (study) name."""
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (screenshots, figures)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


SLOWEST_FIRST = (
    "test_grow.py",
    "test_runner.py",
    "test_resume_mlflow.py",
    "test_local_cluster.py",
    "test_resume.py",
    "test_resume_workers.py",
    "test_resume_checkpoints.py",
    "test_watch.py",
    "test_cli.py",
    "test_api.py",
    "test_export.py",
    "test_slurm.py",
    "test_reproductions.py",
    "test_tracking.py",
    "test_figures.py",
    "test_packed.py",
)
"""Test files that take a minute or more (`pytest --durations`), slowest first."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slowest files first: `make test` hands whole files to its test processes in this
    order (pytest-xdist, --dist loadfile), and they finish together only if the long ones start
    early."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
