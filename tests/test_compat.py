"""The start-of-run check: installed Ray, Optuna and MLflow inside pyproject.toml's ranges, every
private API grokstudy touches where `compat` expects it; anything else is one line and exit 2."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from grokstudy import compat
from grokstudy.cli import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "studies" / "smoke.yaml"


def test_pyproject_caps_ray_optuna_and_mlflow_at_the_ranges_the_check_enforces() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name: str(Requirement(r).specifier) for r in project["dependencies"]}
    for package, spec in compat.SUPPORTED.items():
        declared = ranges[package]
        assert sorted(declared.split(",")) == sorted(spec.split(",")), package
        assert any(s.startswith("<") for s in declared.split(",")), f"{package} has no upper bound"


def test_the_installed_versions_and_every_private_api_pass() -> None:
    compat.check()
    assert all(probe() for probe in compat.PROBES.values())


def fake_version(monkeypatch: pytest.MonkeyPatch, package: str, version: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        compat.importlib.metadata, "version", lambda name: version if name == package else real(name)
    )


def test_an_unsupported_version_stops_a_run_in_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_version(monkeypatch, "ray", "2.99.0")
    monkeypatch.delenv(compat.ALLOW_UNTESTED, raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["run", str(SMOKE), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("grokstudy run: error: versions: ray 2.99.0 is installed")
    assert "ray>=2.59,<2.61" in err and compat.ALLOW_UNTESTED in err
    assert not out.exists()
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")  # at the user's own risk: the private APIs still pass
    compat.check()


def test_a_private_api_that_moved_is_refused_even_when_untested_versions_are_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def gone() -> bool:
        raise AttributeError("'Study' object has no attribute '_storage'")

    monkeypatch.setitem(compat.PROBES, "optuna Study._storage / Trial._trial_id", gone)
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")
    with pytest.raises(compat.UsageError) as exc:
        compat.check()
    message = str(exc.value)
    assert "private APIs grokstudy needs are gone: optuna Study._storage / Trial._trial_id" in message
    assert f"optuna {importlib.metadata.version('optuna')}" in message and "\n" not in message
    assert compat.ALLOW_UNTESTED not in message  # no way around a missing API


def test_an_experiment_snapshot_is_recognised_by_tunes_file_name(tmp_path: Path) -> None:
    assert not compat.has_experiment_snapshot(str(tmp_path))
    (tmp_path / "tuner.pkl").write_bytes(b"")  # what a driver killed before its first snapshot leaves
    assert not compat.has_experiment_snapshot(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-07_03-00-00.json").write_text("{}")
    assert compat.has_experiment_snapshot(str(tmp_path))


def test_new_sqlite_stores_are_copies_of_one_template_each_its_own_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    cache = tmp_path / "cache"
    monkeypatch.setenv(compat.STORE_TEMPLATE_DIR, str(cache))
    stores = {}
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        compat.create_sqlite_store(root / "mlflow.db", root / "mlartifacts")
        stores[name] = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert len(list(cache.glob("mlflow-store-*.db"))) == 1  # built once, copied twice
    # Each copy's Default experiment points at its own artifact root; what one logs, the other lacks.
    for name, client in stores.items():
        assert (
            client.get_experiment("0").artifact_location == (tmp_path / name / "mlartifacts" / "0").as_posix()
        )
    run = stores["a"].create_run(stores["a"].create_experiment("x")).info.run_id
    stores["a"].log_metric(run, "loss", 0.5)
    assert stores["a"].get_run(run).data.metrics == {"loss": 0.5}
    assert [e.name for e in stores["b"].search_experiments()] == ["Default"]
    # A cache that cannot be written: the store is built in place, as before the template.
    monkeypatch.setenv(compat.STORE_TEMPLATE_DIR, str(tmp_path / "a" / "mlflow.db" / "not-a-dir"))
    root = tmp_path / "c"
    root.mkdir()
    compat.create_sqlite_store(root / "mlflow.db", root / "mlartifacts")
    assert MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_experiment("0").name == "Default"
