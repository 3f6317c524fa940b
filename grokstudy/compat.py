"""Every private API of Ray, Optuna and MLflow that grokstudy touches, the versions it was checked
against, and the start-of-run check (`check`) that refuses anything else in one line.

Private means not promised by the library: an underscored attribute, an internal module, a file
layout, an environment knob read by internal code. Each is used through a function here, never
elsewhere (tests/test_layering.py looks), and each has a probe that `check` runs at the start of
every study, so an upgrade that moves one fails at once, by name, and never halfway through a
resume. The supported ranges are those of pyproject.toml (a test keeps them equal); a version
outside them is refused unless GROKSTUDY_ALLOW_UNTESTED_VERSIONS=1, and a missing private API
is refused always.

Checked against ray 2.60.0, optuna 5.0.0, mlflow 3.17.2:

- Ray Tune writes its experiment snapshots as `experiment_state-<session>.json` in the experiment
  directory (`TuneController.CKPT_FILE_TMPL`); a driver killed before the first one leaves only
  `tuner.pkl`, which `Tuner.can_restore` accepts but a restore cannot use (`has_experiment_snapshot`).
- Tune's `SearchGenerator` saves whether its searcher once said FINISHED (`_finished`, in
  `search_gen_state-*`), and a restored one never asks the searcher again: a searcher with work
  for a restored study (`--retry-failed`) would never be asked for it. `reopening_search` wraps
  the searcher in a `SearchGenerator` that clears that flag when restored; the searcher says
  FINISHED again at once when it has nothing.
- `TUNE_MAX_PENDING_TRIALS_PG` (how many trials Tune starts at once with a searcher; it keeps one
  pending otherwise), `RAY_AIR_NEW_OUTPUT=0` (the legacy reporter, silent at verbose=0; the new
  one prints its own table) and `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1` (only the loggers the run
  config names: Tune would add a TensorBoard one, whose tensorboardX imports torch into the
  driver): environment knobs Tune reads internally (`ENV_KNOBS`).
- Optuna has no public setter for a trial's system attribute from a sampler's `before_trial`, nor
  for a finished (frozen) trial's user attribute: `study._storage` and `trial._trial_id`, as
  Optuna's own GridSampler does (`set_system_attr`, `set_user_attr`, `storage_of`).
- MLflow builds a new sqlite store's schema in `mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore`
  (`create_sqlite_store`); a fresh store holds one row, the Default experiment (id 0) in table
  `experiments`, whose `artifact_location` names the store's artifact root: a copy of an empty
  store is a new store once that row is pointed at the copy's root.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from pathlib import Path
from typing import Any

from grokstudy.errors import UsageError

SUPPORTED = {"ray": ">=2.59,<2.61", "optuna": ">=4.0,<5.1", "mlflow": ">=3.7,<3.18"}
"""Version ranges grokstudy runs studies with: pyproject.toml's (tests/test_compat.py)."""
ALLOW_UNTESTED = "GROKSTUDY_ALLOW_UNTESTED_VERSIONS"
EXPERIMENT_SNAPSHOT = ("experiment_state-", ".json")
ENV_KNOBS = {"TUNE_MAX_PENDING_TRIALS_PG": "ray.tune.constants:TUNE_ENV_VARS",
             "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "ray.tune.constants:TUNE_ENV_VARS",
             "RAY_AIR_NEW_OUTPUT": "ray.air.constants:AIR_ENV_VARS"}  # fmt: skip
"""Environment variables Ray reads internally, and the set that lists each in the version checked."""


# ---- Ray ---------------------------------------------------------------------------------------


def has_experiment_snapshot(experiment_path: str) -> bool:
    """Has Tune saved a snapshot of this experiment (something a restore can continue)?"""
    from grokstudy import storage

    return storage.has_file(experiment_path, *EXPERIMENT_SNAPSHOT)


def reopening_search(searcher: Any) -> Any:
    """Tune's search algorithm around `searcher`, asking it again after every restore."""
    return _reopening_class()(searcher)


@functools.cache
def _reopening_class() -> type:
    from ray.tune.search import SearchGenerator

    class ReopeningSearchGenerator(SearchGenerator):
        def set_state(self, state: dict) -> None:
            super().set_state(state)
            self._finished = False  # private: SearchGenerator._finished

    # Pickled with the Tuner (tuner.pkl): found again through this module's __getattr__.
    ReopeningSearchGenerator.__module__ = __name__
    ReopeningSearchGenerator.__qualname__ = ReopeningSearchGenerator.__name__
    return ReopeningSearchGenerator


def __getattr__(name: str) -> Any:
    if name == "ReopeningSearchGenerator":  # unpickling a restored Tuner (ray is imported then)
        return _reopening_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- Optuna ------------------------------------------------------------------------------------


def set_system_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """Set a system attribute of a live or frozen trial of `study`."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def set_user_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """Set a user attribute of a trial of `study`, frozen ones (from `get_trials`) included."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def storage_of(study: Any) -> Any:
    """The storage an Optuna study lives in (for `optuna.copy_study`)."""
    return study._storage


# ---- MLflow ------------------------------------------------------------------------------------


STORE_TEMPLATE_DIR = "GROKSTUDY_CACHE_DIR"
"""Environment variable: where the empty-store template lives (default
$XDG_CACHE_HOME/grokstudy or ~/.cache/grokstudy); an unwritable one means no template."""


def create_sqlite_store(db: Path, artifacts: Path) -> None:
    """A new, empty MLflow sqlite store at `db` (which must not exist), its Default experiment's
    artifacts under `artifacts`.

    MLflow builds a store's schema through ~60 Alembic migrations, 2-3 s of CPU: every study
    paid it, and so did every test that runs one. So the schema is built once per installed
    MLflow/SQLAlchemy/Alembic into a template beside the user's caches, and each new store is a
    copy of it with the Default experiment (the one row a fresh store holds; its artifact
    location and times are the only store-specific values) pointed at `artifacts`."""
    import shutil
    import sqlite3
    import time

    template = _store_template()
    if template is None:
        _build_sqlite_store(db, artifacts)
        return
    shutil.copyfile(template, db)
    now_ms = int(time.time() * 1000)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
            "WHERE experiment_id = 0",
            ((artifacts / "0").as_posix(), now_ms, now_ms),
        )
    conn.close()


def _build_sqlite_store(db: Path, artifacts: Path) -> None:
    """Build MLflow's schema in a new sqlite file `db` (all its migrations), then close it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{db}", str(artifacts))
    store.engine.dispose()


def _store_template() -> Path | None:
    """The empty store for the installed versions, built on first use (atomically: processes
    racing build their own and the last rename wins, every one whole); None where the cache
    cannot be written."""
    import tempfile

    versions = "-".join(importlib.metadata.version(p) for p in ("mlflow", "sqlalchemy", "alembic"))
    root = os.environ.get(STORE_TEMPLATE_DIR) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "grokstudy"
    )
    template = Path(root) / f"mlflow-store-{versions}.db"
    if template.is_file():
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
            built = Path(scratch) / template.name
            _build_sqlite_store(built, Path(scratch) / "mlartifacts")
            os.replace(built, template)
    except OSError:
        return None
    return template


# ---- the check -----------------------------------------------------------------------------------


def check() -> None:
    """Refuse, in one line (UsageError, exit 2), installed versions outside `SUPPORTED` and any
    private API above that is not where this module expects it."""
    from packaging.specifiers import SpecifierSet

    problems = []
    for package, spec in SUPPORTED.items():
        installed = importlib.metadata.version(package)
        if installed not in SpecifierSet(spec) and os.environ.get(ALLOW_UNTESTED) != "1":
            problems.append(f"{package} {installed} is installed; grokstudy is tested with {package}{spec}")
    missing = [name for name, probe in PROBES.items() if not _passes(probe)]
    if missing:
        versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in SUPPORTED)
        problems.append(f"with {versions}, private APIs grokstudy needs are gone: {', '.join(missing)}")
    if problems:
        fix = f"install the versions of pyproject.toml ({', '.join(f'{p}{s}' for p, s in SUPPORTED.items())})"
        allow = "" if missing else f", or set {ALLOW_UNTESTED}=1 to try an untested version"
        raise UsageError("versions", f"{'; '.join(problems)}; {fix}{allow}")


def _passes(probe: Any) -> bool:
    try:
        return bool(probe())
    except Exception:
        return False


def _tune_snapshot_name() -> bool:
    from ray.tune.execution.tune_controller import TuneController

    prefix, suffix = EXPERIMENT_SNAPSHOT
    return TuneController.CKPT_FILE_TMPL == f"{prefix}{{}}{suffix}"


def _search_generator_reopens() -> bool:
    from ray.tune.search import Searcher

    generator = reopening_search(Searcher())
    state = generator.get_state() | {"finished": True}
    generator.set_state(state)
    return generator._finished is False


def _env_knobs() -> bool:
    for name, where in ENV_KNOBS.items():
        module, attribute = where.split(":")
        if name not in getattr(importlib.import_module(module), attribute):
            return False
    return True


def _optuna_storage() -> bool:
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    try:
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    finally:
        optuna.logging.set_verbosity(verbosity)
    set_system_attr(study, study.ask(), "grokstudy.probe", 1)
    set_user_attr(study, study.get_trials(deepcopy=False)[0], "grokstudy.probe", 2)  # frozen, running
    [trial] = study.trials
    return (trial.system_attrs, trial.user_attrs) == ({"grokstudy.probe": 1}, {"grokstudy.probe": 2})


def _mlflow_sqlite_store() -> bool:
    import contextlib
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template = _store_template()
    if template is not None:
        with contextlib.closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as conn:
            [(n,)] = conn.execute(
                "SELECT count(*) FROM experiments WHERE experiment_id = 0 AND artifact_location "
                "IS NOT NULL AND creation_time IS NOT NULL AND last_update_time IS NOT NULL"
            ).fetchall()
        if n != 1:
            return False
    return hasattr(SqlAlchemyStore, "__init__")


PROBES = {
    "ray.tune TuneController.CKPT_FILE_TMPL": _tune_snapshot_name,
    "ray.tune SearchGenerator._finished": _search_generator_reopens,
    f"ray's environment knobs {', '.join(ENV_KNOBS)}": _env_knobs,
    "optuna Study._storage / Trial._trial_id": _optuna_storage,
    "mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore": _mlflow_sqlite_store,
}
"""Each private API above, by name, with a call that fails if it is gone."""
