"""The Python front door, for notebooks: a study's results as data frames and figures, a study run
from Python, a trial's trained model back as a module.

    import grokstudy
    res = grokstudy.load("runs/quickstart")          # a study directory, or an MLflow experiment
    res.trials, res.curves, res.cells                # pandas DataFrames (pyarrow-backed)
    res.phase_diagram()                              # a matplotlib Figure (Jupyter shows it)
    res.relabel("liu2022").phase_diagram()           # the same curves read by another phase rule
    grokking = res.select(where='phase == "grokking"')
    res.learning_curves(grokking[:3])                # loss, accuracy, weight norm, Fourier share
    model = res.model(grokking[0])                   # torch.nn.Module, eval mode, on CPU
    model.data.val_x, model.data.val_y               # its own split; model.config its TrialConfig

    res = grokstudy.run("studies/quickstart.yaml", search__seeds=1)   # a progress bar, then Results

`load_tables` is the one reader of every kind of source (the CLI's `plot`, `export` and `report`
use it too). Light at import: pandas, matplotlib, torch and Ray load when a function needs them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grokstudy import results
from grokstudy.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from torch import nn

    from grokstudy.config import Study
    from grokstudy.figures import Figure


@dataclass(frozen=True)
class Results:
    """A study's results: its tables as pyarrow (`*_table`) and as pandas data frames, and the
    figures and models they lead to."""

    trials_table: pa.Table
    curves_table: pa.Table | None
    cells_table: pa.Table | None = None
    source: str = ""
    """The study directory, trials.parquet, Tune experiment or MLflow experiment it was read from."""
    tracking_uri: str | None = None
    """Where `runs:/` weights are fetched from (an MLflow source's, else the study's own store)."""
    _frames: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- data ----------------------------------------------------------------------------------

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial: its hyperparameters by dotted name, phase, timings, weights_uri."""
        return self._frame("trials", self.trials_table)

    @property
    def curves(self) -> pd.DataFrame:
        """One row per (trial, eval step): losses, accuracies, weight norm, Fourier share."""
        return self._frame("curves", self.curves_table)

    @property
    def cells(self) -> pd.DataFrame | None:
        """A grid study's every grid point with its phase, measured or inferred; None otherwise."""
        return None if self.cells_table is None else self._frame("cells", self.cells_table)

    def _frame(self, name: str, table: pa.Table | None) -> pd.DataFrame:
        if table is None:
            raise UsageError(name, f"{self.source} has no {name} table")
        if name not in self._frames:
            import pandas as pd

            self._frames[name] = table.to_pandas(types_mapper=pd.ArrowDtype)
        return self._frames[name]

    def select(self, trial_ids: Sequence[str] | None = None, where: str | None = None) -> list[str]:
        """Trial ids: those given (checked), or those whose row matches `where`, a pandas query
        over the trials table ('phase == "grokking"', '`optimizer.weight_decay` >= 1'); every
        trial when neither is given. UsageError for an unknown id or a query pandas refuses."""
        from grokstudy.figures import select_trials

        return select_trials(self.trials_table, trial_ids, where, limit=None, allow_empty=True)

    def relabel(self, rule: str) -> Results:
        """This study with every trial read again by the named phase rule (`config.PHASE_RULES`:
        default, liu2022) from its curve: phases, timings and cells under that rule, and figures
        titled with it (`grokstudy.relabel`). Nothing trains; these results stay as they are.
        `relabel.changed_cells(res.trials_table, other.trials_table)` lists what changed."""
        from grokstudy import relabel

        study = relabel.study_beside(self.source) if self.source else None
        done = relabel.relabel(self.trials_table, self.curves_table, rule, study)
        return replace(self, trials_table=done.trials, cells_table=done.cells, _frames={})

    def curves_for(self, trial_ids: Sequence[str] | None = None, where: str | None = None) -> pd.DataFrame:
        """The curves of the selected trials (`select`)."""
        ids = self.select(trial_ids, where)
        frame = self.curves
        return frame[frame["trial_id"].isin(ids)].reset_index(drop=True)

    # -- figures -------------------------------------------------------------------------------

    def phase_diagram(self, **options: Any) -> Figure:
        """`figures.phase_diagram` of this study; x, y and facet default to its diagram axes.
        Options: x, y, facet, log_x, log_y, labels ({dotted key: axis label}), ax."""
        from grokstudy import figures

        diagram = results.table_info(self.trials_table)[2]
        options.setdefault("x", diagram.get("x") or "data.fraction")
        options.setdefault("y", diagram.get("y") or "optimizer.weight_decay")
        options.setdefault("facet", diagram.get("facet"))
        options.setdefault("cells", self.cells_table)
        return figures.phase_diagram(self.trials_table, **options)

    def learning_curves(
        self, trial_ids: Sequence[str] | None = None, where: str | None = None, **options: Any
    ) -> Figure:
        """`figures.learning_curves` of the selected trials (default: one per phase)."""
        from grokstudy import figures

        chosen = None
        if trial_ids is not None or where is not None:
            chosen = figures.select_trials(self.trials_table, trial_ids, where)  # at most a figure's worth
        return figures.learning_curves(self.trials_table, self._curves_table(), trial_ids=chosen, **options)

    def _curves_table(self) -> pa.Table:
        if self.curves_table is None:
            raise UsageError("curves", f"{self.source} has no curves table")
        return self.curves_table

    # -- models --------------------------------------------------------------------------------

    def model(self, trial_id: str, device: str = "cpu") -> nn.Module:
        """The trial's final model (`load_model`)."""
        rows = self.trials_table.filter(_equals(self.trials_table, "trial_id", trial_id)).to_pylist()
        if not rows:
            raise UsageError("trial_id", f"no trial {trial_id!r} in {self.source}")
        uri = rows[0].get("weights_uri")
        if not uri:
            raise UsageError(
                "trial_id",
                f"trial {trial_id!r} kept no weights (it did not finish, or its study ran with "
                "run.save_weights: none or before grokstudy kept weights)",
            )
        return model_from_weights(self._moved(uri), device=device, tracking_uri=self.tracking_uri)

    def _moved(self, uri: str) -> str:
        """A local weights path that no longer exists, found again under this study directory
        (it was moved: `grokstudy run --fresh` archives, a copied `runs/NAME`)."""
        if "://" in uri or uri.startswith("runs:/") or Path(uri).exists() or not Path(self.source).is_dir():
            return uri
        from grokstudy.weights import DIRECTORY

        name = Path(uri).name  # an export keeps weights in <dir>/weights, a run beside its Tune experiment
        found = [
            p
            for where in (DIRECTORY, f"ray/*/{DIRECTORY}")
            for p in sorted(Path(self.source).glob(f"{where}/{name}"))
        ]
        return str(found[0]) if found else uri


def load(source: str | os.PathLike[str], tracking_uri: str | None = None) -> Results:
    """A study's results from a study directory (runs/NAME), a trials.parquet, a Ray Tune
    experiment directory, or an MLflow experiment name or id (with `tracking_uri`, or
    MLFLOW_TRACKING_URI)."""
    trials, curves, _ = load_tables(str(source), tracking_uri)
    path = Path(source)
    cells_file = (path if path.is_dir() else path.parent) / results.CELLS_FILE
    cells = results.read_cells(cells_file) if path.exists() and cells_file.exists() else None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if path.is_dir() and uri is None and (path / "mlflow.db").exists():
        uri = f"sqlite:///{(path / 'mlflow.db').resolve()}"
    return Results(trials, curves, cells, source=str(source), tracking_uri=uri)


def load_model(study_dir: str | os.PathLike[str], trial_id: str, device: str = "cpu") -> nn.Module:
    """A finished trial's model in eval mode on `device`, with `.config` (its TrialConfig),
    `.data` (its task table split as it trained: train_x/train_y/val_x/val_y) and `.trial_id`."""
    return load(study_dir).model(trial_id, device=device)


def model_from_weights(uri: str, device: str = "cpu", tracking_uri: str | None = None) -> nn.Module:
    """The model a weights file holds (`grokstudy.weights`), as `load_model` returns it."""
    from grokstudy import weights
    from grokstudy.models import build_model
    from grokstudy.tasks import build_dataset

    cfg, state_dict, meta = weights.load(uri, tracking_uri)
    data = build_dataset(cfg.task, cfg.data)
    model = build_model(cfg.model, data.n_tokens, data.n_classes)
    model.load_state_dict(state_dict)
    model.to(device).eval()
    model.config, model.data, model.trial_id, model.step = (
        cfg,
        data.to(device),
        meta["trial_id"],
        meta["step"],
    )
    return model


def run(
    study: str | os.PathLike[str] | Study,
    out: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    formats: Sequence[str] = ("png",),
    progress: bool = True,
    retry_failed: bool = False,
    fresh: bool = False,
    **overrides: Any,
) -> Results:
    """Run, resume or grow a study and return its results (`fresh`: start over, archiving the
    earlier results, as `grokstudy run --fresh`). `study`: a study file or a `Study`;
    `overrides`: study keys with `__` for the dots (`search__seeds=1`, `train__max_steps=500`), as
    `--set` gives them. `progress` shows a bar (a widget in Jupyter, tqdm.auto). Raises what
    `grokstudy run` reports (StudyError, UsageError, runner.Interrupted, ...)."""
    from grokstudy.study import load_study, parse_study, study_to_dict

    sets = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(study, (str, os.PathLike)):
        loaded = load_study(Path(study), sets)
    else:
        loaded = parse_study(study_to_dict(study), f"<study {study.name}>", sets) if sets else study
    out_dir = Path(out or loaded.run.out or Path("runs") / loaded.name)
    prepare_embedded_ray(address)
    from grokstudy import console, runner

    view = console.NotebookProgress(loaded.search.n_trials) if progress else None
    try:
        outcome = runner.run_study(
            loaded, out_dir=out_dir, address=address, tracking_uri=tracking_uri, formats=tuple(formats),
            progress=view, num_cpus=num_cpus, retry_failed=retry_failed, quiet_libraries=True,
            fresh=fresh,
        )  # fmt: skip
    finally:
        if view is not None:
            view.close()
    return load(outcome.out_dir, outcome.tracking_uri)


def prepare_embedded_ray(address: str | None) -> None:
    """Before Ray is first imported: an embedded Ray (no address) advertises 127.0.0.1, not the
    machine's outward IP (ray 2.60 reads this once, at import). Never for a cluster, whose
    driver must be reachable from other hosts."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def load_tables(source: str, tracking_uri: str | None, prefer_rebuild: bool = False) -> tuple[Any, Any, Path]:
    """(trials, curves, default figure directory) from any kind of source: a study output
    directory, a trials.parquet, a Ray Tune experiment directory or URI (`s3://`, `gs://`,
    `file://`: `run.storage/<name>`), or an MLflow experiment.
    `prefer_rebuild`: rebuild a study directory's tables from its checkpoints."""
    path = Path(source)
    if is_uri(source):  # Path() would fold its `//`; pyarrow.fs reads it
        study, histories = read_tune_experiment(source)
        trials, curves = results.build_tables(study, histories)
        return trials, curves, Path("runs") / study.name / "figures"
    if path.exists():
        if path.is_dir() and (path / results.TRIALS_FILE).exists() and not prefer_rebuild:
            trials, curves = results.load_source(path)
            return trials, curves, path / "figures"
        if path.suffix == ".parquet":
            trials, curves = results.load_source(path)
            return trials, curves, path.parent / "figures"
        if path.is_dir():
            study, histories = read_tune_experiment(source)
            trials, curves = results.build_tables(study, histories)
            return trials, curves, path / "figures"
        raise UsageError(
            "SOURCE", f"{source!r} is neither a study directory, a trials.parquet nor a Ray Tune experiment"
        )
    from grokstudy import tracking

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError(
            "SOURCE",
            f"{source!r} is not a file or directory; to read an MLflow experiment pass --tracking-uri "
            "(or set MLFLOW_TRACKING_URI)",
        )
    study, histories = tracking.fetch_histories(uri, source)
    trials, curves = results.build_tables(study, histories)
    return trials, curves, Path("runs") / source / "figures"


def is_uri(source: str) -> bool:
    """Is `source` a `scheme://` URI (not a path, not an MLflow experiment name)?"""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.isidentifier()


def read_tune_experiment(source: str) -> tuple[Study, list[Any]]:
    """(the study, its trial histories) of a grokstudy Ray Tune experiment: a directory, or a URI
    pyarrow.fs opens (`uris.STORAGE_SCHEMES`); a one-line UsageError for another scheme."""
    from grokstudy.uris import STORAGE_SCHEMES, redact

    scheme = source.partition("://")[0] if is_uri(source) else ""
    if scheme and scheme not in STORAGE_SCHEMES:
        raise UsageError(
            "SOURCE", f"{redact(source)}: a URI SOURCE is a Ray Tune experiment on "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}; an MLflow experiment goes by name "
            "(with --tracking-uri)",
        )  # fmt: skip
    from grokstudy import runner

    return runner.histories_from_tune_dir(source)  # type: ignore[arg-type]  # a str: it reads str(path)


def _equals(table: pa.Table, column: str, value: str) -> Any:
    import pyarrow.compute as pc

    return pc.equal(table.column(column), value)
