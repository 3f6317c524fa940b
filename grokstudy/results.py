"""A study's results as two Parquet tables: one row per trial, one row per eval point.

- `trials.parquet` (`TRIALS_SCHEMA`): who the trial is (`study`, `trial_id`,
  `point_id`, `run_id`), every hyperparameter of `TrialConfig` as a typed
  column named by its dotted path (`optimizer.weight_decay`, derived from the
  dataclasses, with the doc and unit of its `config.setting` rule, so a new
  config field becomes a column without touching this file), which keys were
  searched, the phase verdict of `phases.classify_records` and how the trial ended.
- `curves.parquet` (`CURVES_SCHEMA`): `study`, `trial_id`, `step`, one float64
  column per `records.CURVE_KEYS` key (`val/acc`, ..., `time/elapsed_s`; null
  where a measure does not apply).

`build_tables(study, histories)` is the one builder of both, whatever the
histories were read from (the runner's checkpoints, a Ray Tune experiment,
MLflow). Every field carries `description` (and, where it has one, `unit`)
metadata, and each table says which table it is, which grokstudy wrote it and,
for trials, the study's sampler and the scale of each searched axis, so the
files explain themselves to plain pyarrow or pandas and `figures` needs no
guessing. Pure: pyarrow, numpy and the core's stdlib modules.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grokstudy import __version__, storage
from grokstudy.config import LATTICE_SAMPLERS, Study, TrialConfig, flatten, plain, value_key
from grokstudy.errors import UsageError
from grokstudy.phases import PhaseResult, classify_records
from grokstudy.points import point_id
from grokstudy.records import CURVE_KEYS, ELAPSED_KEY, STOP_REASONS, EvalRecord, TrialHistory

TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
SAMPLER_META = "grokstudy.sampler"
"""Trials-table metadata: the study's sampler (figures draw a grid as cells, a sample as points)."""
AXES_META = "grokstudy.axes"
"""Trials-table metadata: JSON {searched key: "log" | "linear" | "category"} (`SearchDim.is_log`)."""
DIAGRAM_META = "grokstudy.diagram"
"""Trials-table metadata: JSON {"x": key, "y": key, "facet": key or null, "labels": {key: label}
(only when the study sets diagram.labels)}, the study's diagram."""


def _field(name: str, type_: pa.DataType, description: str, unit: str | None = None, nullable=False):
    meta = {"description": description} | ({"unit": unit} if unit else {})
    return pa.field(name, type_, nullable=nullable, metadata=meta)


# ---- hyperparameter columns, derived from the config dataclasses ------------------------


def _arrow_type(hint: Any, path: str) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) of a config field's type hint."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return _arrow_type(inner[0], path)[0], True
    elif typing.get_origin(hint) in (tuple, list) and args:
        element = _arrow_type(args[0], path)[0]
        if all(a in (args[0], Ellipsis) for a in args):
            return _list(element), False
    elif hint in _SCALARS:
        return _SCALARS[hint], False
    raise TypeError(f"config field {path}: no Parquet column type for {hint!r}; extend results._arrow_type")


def _list(element: pa.DataType) -> pa.DataType:
    # Parquet's list element is named "element"; naming it so keeps round trips exact.
    return pa.list_(pa.field("element", element))


_SCALARS = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def hyperparameter_fields(trial_cls: type = TrialConfig) -> list[pa.Field]:
    """One typed, documented column per leaf of the (nested) config dataclass, by dotted path.

    Columns come in `config.flatten` order; `Optional` fields are nullable,
    tuples are lists; doc and unit come from each field's `config.setting` rule.
    Raises TypeError for a field type with no column type.
    """
    out: list[pa.Field] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path, hint = prefix + f.name, hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, path + ".")
                continue
            type_, nullable = _arrow_type(hint, path)
            spec = f.metadata.get("spec")
            doc = spec.doc if spec is not None else f"hyperparameter {path}"
            out.append(_field(path, type_, doc, spec.unit if spec is not None else None, nullable))

    walk(trial_cls, "")
    return out


# ---- schemas ---------------------------------------------------------------------------------


def _metadata(kind: str) -> dict[str, str]:
    return {
        "grokstudy.table": kind,
        "grokstudy.version": __version__,
        "grokstudy.description": {
            "trials": "one row per trial: hyperparameters by dotted path, phase verdict, how it ended",
            "curves": "one row per (trial, eval step): the values of records.CURVE_KEYS",
            "cells": "one row per point of a grid study's grid: its phase, measured or inferred",
        }[kind],
    }


# Long on purpose: one documented field per column, in table order.
def trials_schema(trial_cls: type = TrialConfig) -> pa.Schema:
    """The trials table's schema for a TrialConfig-shaped dataclass (`TRIALS_SCHEMA` for the real one)."""
    steps = "steps"
    head = [
        _field("study", pa.string(), "study name (also the MLflow experiment and Ray Tune experiment)"),
        _field("trial_id", pa.string(), "<point_id>-s<train.seed>: the trial, unique within the study"),
        _field(
            "point_id",
            pa.string(),
            "hash of the searched hyperparameters; the same for every seed of a point",
        ),
        _field("run_id", pa.string(), "MLflow run id of the trial's child run", nullable=True),
        _field(
            "weights_uri",
            pa.string(),
            "the finished trial's final weights (grokstudy.load_model reads them): a path or URI on "
            "the study's storage, or runs:/<run_id>/weights/<trial_id>.pt; null: none kept",
            nullable=True,
        ),
    ]
    tail = [
        _field(
            "optimizer.weight_decay_form",
            pa.string(),
            "how weight decay enters the update: decoupled | coupled_l2, to zero | to init",
        ),
        _field("searched", _list(pa.string()), "dotted keys the study searched (train.seed excluded)"),
        _field(
            "phase",
            pa.string(),
            "comprehension | grokking | memorization | confusion | unstable | diverged (phases.py); "
            "null: failed before its first eval point was saved",
            nullable=True,
        ),
        _field("t_train", pa.int64(), "first eval step with train/acc >= threshold", steps, nullable=True),
        _field(
            "t_val", pa.int64(), "first eval step from which val/acc holds >= threshold", steps, nullable=True
        ),
        _field("delay", pa.int64(), "t_val - t_train (negative: validation first)", steps, nullable=True),
        _field(
            "t_val_loss",
            pa.int64(),
            "first step from which val/loss holds below phases.loss_threshold (Nanda et al.'s measure)",
            steps,
            nullable=True,
        ),
        _field(
            "t_circuit",
            pa.int64(),
            "first step from which the restricted loss (the key-frequency part of the logits, Nanda "
            "et al. 2023) holds below phases.loss_threshold: the circuit was there (phases.circuit_time)",
            steps,
            nullable=True,
        ),
        _field("final_train_acc", pa.float64(), "train/acc at the last eval point", "fraction correct", True),
        _field("final_val_acc", pa.float64(), "val/acc at the last eval point", "fraction correct", True),
        _field(
            "final_train_loss",
            pa.float64(),
            "mean train/loss at the last eval point (the train.loss function)",
            nullable=True,
        ),
        _field(
            "final_val_loss",
            pa.float64(),
            "mean val/loss at the last eval point (the train.loss function)",
            nullable=True,
        ),
        _field("best_val_acc", pa.float64(), "highest val/acc at any eval point", "fraction correct", True),
        _field(
            "val_acc_at_fit",
            pa.float64(),
            "val/acc at t_train (interpolated): near chance for a run that sat on a plateau before it "
            "grokked, well above it for one already generalizing as it fit",
            "fraction correct",
            nullable=True,
        ),
        _field(
            "censored",
            pa.bool_(),
            "it spent its step budget without a holding t_val: its memorization or confusion means "
            "'not within max_steps', not 'never' (budget_decay_times says how short the budget was)",
            nullable=True,
        ),
        _field(
            "budget_decay_times",
            pa.float64(),
            "max_steps * lr * weight_decay: the budget in weight-decay time constants 1/(lr*wd), over "
            "which decoupled decay (AdamW; SGD's L2 too) shrinks what the loss does not hold by 1/e; "
            "grokking driven by decay needs a few; nominal only for coupled L2 under Adam; null at wd 0",
            nullable=True,
        ),
        _field("steps", pa.int64(), "last eval step taken into account (steps run)", steps),
        _field("max_steps", pa.int64(), "step budget the phase was judged against", steps),
        _field(
            "stop_reason",
            pa.string(),
            " | ".join(STOP_REASONS) + " (records.STOP_REASONS); null while it runs",
            nullable=True,
        ),
        _field(
            "wall_s",
            pa.float64(),
            "wall-clock seconds the trial spent training: its curve's last time/elapsed_s "
            "(a packed trial's is its pack's)",
            "seconds",
        ),
        _field("node", pa.string(), "cluster node the trial last ran on", nullable=True),
        _field(
            "status",
            pa.string(),
            "TERMINATED; ERROR when it failed beyond run.max_failures retries; RUNNING in a table "
            "written while the study runs (no phase yet)",
        ),
        _field("error", pa.string(), "why it failed (status ERROR)", nullable=True),
    ]
    return pa.schema(head + hyperparameter_fields(trial_cls) + tail, metadata=_metadata("trials"))


def _curve_field(key: str) -> pa.Field:
    if key == ELAPSED_KEY:
        return _field(key, pa.float64(), "wall-clock training seconds up to this step", "seconds")
    unit = "fraction correct" if key.endswith("/acc") else None
    return _field(key, pa.float64(), f"metric {key} at this eval point (null: does not apply)", unit, True)


CURVES_SCHEMA = pa.schema(
    [
        _field("study", pa.string(), "study name"),
        _field("trial_id", pa.string(), "trial identifier; joins trials.trial_id"),
        _field("step", pa.int64(), "optimizer steps taken before this evaluation (0: at init)", "steps"),
        *(_curve_field(k) for k in CURVE_KEYS),
    ],
    metadata=_metadata("curves"),
)


TRIALS_SCHEMA = trials_schema()


# ---- the one table builder -----------------------------------------------------------------------


def build_tables(study: Study, histories: Iterable[TrialHistory]) -> tuple[pa.Table, pa.Table]:
    """(trials, curves) of a study's trials, phases classified afresh with the study's rule.

    Afresh on purpose, not read from `TrialHistory.outcome`: the tables hold every timing of
    `phases.PhaseResult` (delay, best accuracy), and a study exported from MLflow or a Tune
    experiment by a later grokstudy is judged by the rule it names today. For a study this
    grokstudy ran, the verdict equals the outcome its trial judged (`member.judge`).

    The trials table's metadata names the study's sampler, the scale of each
    searched axis and the diagram axes (`SAMPLER_META`, `AXES_META`, `DIAGRAM_META`).
    """
    searched = tuple(d.key for d in study.search.space)
    trial_rows, curve_rows = [], []
    for history in histories:
        trial_rows.append(_trial_row(study.name, history, searched, study))
        curve_rows.extend(_curve_rows(study.name, history.trial_id, history.records))
    trials = trials_table(trial_rows)
    trials = trials.replace_schema_metadata(trials.schema.metadata | study_metadata(study))
    return trials, curves_table(curve_rows)


def study_metadata(study: Study) -> dict[bytes, bytes]:
    """What figures need to know of a study, as trials-table schema metadata."""
    axes = {d.key: _scale(d) for d in study.search.space}
    diagram = {"x": study.diagram.x, "y": study.diagram.y, "facet": study.diagram.facet}
    if study.diagram.labels:
        diagram["labels"] = study.diagram.labels
    return {
        SAMPLER_META.encode(): study.search.sampler.encode(),
        AXES_META.encode(): json.dumps(axes).encode(),
        DIAGRAM_META.encode(): json.dumps(diagram).encode(),
    }


def _scale(dim: Any) -> str:
    if dim.choice is not None:
        return "category"
    return "log" if dim.is_log else "linear"


def table_info(trials: pa.Table) -> tuple[str | None, dict[str, str], dict[str, str | None]]:
    """(sampler, {axis: scale}, diagram) from a trials table's metadata; (None, {}, {}) when absent."""
    meta = trials.schema.metadata or {}
    sampler = meta.get(SAMPLER_META.encode())
    axes = meta.get(AXES_META.encode())
    diagram = meta.get(DIAGRAM_META.encode())
    return (
        sampler.decode() if sampler else None,
        json.loads(axes) if axes else {},
        json.loads(diagram) if diagram else {},
    )


def _trial_row(study: str, h: TrialHistory, searched: Sequence[str], config: Study) -> dict[str, Any]:
    """One trials-table row: the trial's identity, its full config, its verdict."""
    if h.stop_reason not in STOP_REASONS and not h.running:
        raise ValueError(f"stop_reason {h.stop_reason!r} is not one of {', '.join(STOP_REASONS)}")
    if h.records:
        verdict = dataclasses.asdict(classify_records(h.records, config.phases, h.cfg.train.max_steps))
    else:
        verdict = dict.fromkeys(f.name for f in dataclasses.fields(PhaseResult)) | {"steps": 0}
    if h.running:  # no verdict until it ends: a phase or t_val now could change
        verdict |= dict.fromkeys(("phase", "t_val", "delay", "t_val_loss", "t_circuit", "censored"))
    last = h.records[-1] if h.records else None
    hyper = plain(flatten(h.cfg))
    return {
        "study": study,
        "trial_id": h.trial_id,
        "point_id": point_id(h.point),
        "run_id": h.run_id,
        "weights_uri": h.weights_uri,
        **hyper,
        "optimizer.weight_decay_form": h.cfg.optimizer.weight_decay_form,
        "searched": list(searched),
        **verdict,  # phase, t_train, t_val, delay, t_val_loss, steps, final/best accuracies
        "final_train_loss": _finite_or_none(last.train_loss) if last else None,
        "final_val_loss": _finite_or_none(last.val_loss) if last else None,
        "max_steps": h.cfg.train.max_steps,
        "budget_decay_times": _decay_times(h.cfg),
        "stop_reason": h.stop_reason,
        "wall_s": float(last.elapsed_s) if last else 0.0,
        "node": h.node,
        "status": "RUNNING" if h.running else "ERROR" if h.stop_reason == "error" else "TERMINATED",
        "error": h.error,
    }


def _decay_times(cfg: Any) -> float | None:
    """The step budget in weight-decay time constants 1/(lr*wd). Omnigrok (Liu, Michaud, Tegmark
    2023) finds the delay scales as 1/wd, and arXiv 2603.13331 bounds it for SGD as
    T_grok - T_mem = Θ(log(|θ_mem|² / |θ_post|²) / (lr*wd)): a budget of a few time constants or
    less cannot tell "memorizes" from "groks later"."""
    o = cfg.optimizer
    return cfg.train.max_steps * o.lr * o.weight_decay if o.weight_decay > 0 else None


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _curve_rows(study: str, trial_id: str, records: Iterable[EvalRecord]) -> list[dict[str, Any]]:
    """One curves-table row per eval record; a value that does not apply (NaN) is null."""
    return [
        {
            "study": study,
            "trial_id": trial_id,
            "step": r.step,
            **{k: (None if np.isnan(v) else v) for k, v in r.values().items()},
        }
        for r in records
    ]


# ---- tables ----------------------------------------------------------------------------------


def trials_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows → a table with exactly `TRIALS_SCHEMA`; ValueError names a bad row and column."""
    return _table(rows, TRIALS_SCHEMA, "trials")


def curves_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows → a table with exactly `CURVES_SCHEMA`; ValueError names a bad row and column."""
    return _table(rows, CURVES_SCHEMA, "curves")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _accepts(type_: pa.DataType) -> Callable[[Any], bool]:
    """The per-value check behind an error message (the slow path)."""
    if pa.types.is_list(type_):
        element = _accepts(type_.value_type)
        return lambda v: isinstance(v, (list, tuple)) and all(element(x) for x in v)
    return {
        pa.int64(): _is_int,
        pa.float64(): _is_float,
        pa.string(): lambda v: isinstance(v, str),
        pa.bool_(): lambda v: isinstance(v, (bool, np.bool_)),
    }[type_]


def _inferred_fits(inferred: pa.DataType, target: pa.DataType) -> bool:
    # Cast from pyarrow's own type inference rather than converting straight to
    # the target: pyarrow 25.0.1 converts 1.5 into an int64 column as 1 and True
    # into a float64 column as 1.0 without a word.
    if pa.types.is_null(inferred):
        return True
    if pa.types.is_list(target):
        return pa.types.is_list(inferred) and _inferred_fits(inferred.value_type, target.value_type)
    if pa.types.is_floating(target):
        return pa.types.is_floating(inferred) or pa.types.is_integer(inferred)
    if pa.types.is_integer(target):
        return pa.types.is_integer(inferred)
    return inferred == target


def _column(values: list[Any], field: pa.Field, kind: str) -> pa.Array:
    try:
        arr = pa.array(values)
        fits = _inferred_fits(arr.type, field.type)
    except (pa.ArrowException, TypeError, ValueError):
        fits = False
    if fits and (field.nullable or arr.null_count == 0):
        return arr.cast(field.type)
    ok = _accepts(field.type)
    i, v = next((i, v) for i, v in enumerate(values) if not ((v is None and field.nullable) or ok(v)))
    raise ValueError(
        f"{kind} row {i}, column {field.name!r}: expected {field.type}"
        f"{'' if field.nullable else ' (not null)'}, got {v!r}"
    )


def _table(rows: Sequence[dict[str, Any]], schema: pa.Schema, kind: str) -> pa.Table:
    names = set(schema.names)
    for i, row in enumerate(rows):
        if row.keys() != names:
            missing, extra = sorted(names - row.keys()), sorted(row.keys() - names)
            problems = [f"missing column(s) {', '.join(missing)}"] if missing else []
            problems += [f"unknown column(s) {', '.join(extra)}"] if extra else []
            raise ValueError(f"{kind} row {i}: {'; '.join(problems)}")
    arrays = [_column([row[f.name] for row in rows], f, kind) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# ---- files -----------------------------------------------------------------------------------


def write_tables(trials: pa.Table, curves: pa.Table, out_dir: Path) -> tuple[Path, Path]:
    """Write `trials.parquet` and `curves.parquet` (zstd) into out_dir; returns both paths.

    Each file is written beside its final name and renamed into place, so a
    reader never sees half a file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(trials, out_dir / TRIALS_FILE), _write(curves, out_dir / CURVES_FILE)


def _write(table: pa.Table, path: Path) -> Path:
    with storage.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_trials(path: Path) -> pa.Table:
    """A trials table written by `write_tables` (any grokstudy version)."""
    return _read(Path(path), "trials", ("study", "trial_id", "phase"))


def read_curves(path: Path) -> pa.Table:
    """A curves table written by `write_tables` (any grokstudy version)."""
    return _read(Path(path), "curves", ("trial_id", "step", "train/acc", "val/acc"))


def _read(path: Path, kind: str, required: tuple[str, ...]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise UsageError("SOURCE", f"cannot read {path} as Parquet: {e}") from None
    meta = table.schema.metadata or {}
    written_as = meta.get(b"grokstudy.table", b"").decode()
    if written_as and written_as != kind:
        raise UsageError("SOURCE", f"{path} is a {written_as} table, not a {kind} table")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise UsageError("SOURCE", f"{path} is not a grokstudy {kind} table: no column {', '.join(missing)}")
    return table


def load_source(path: Path) -> tuple[pa.Table, pa.Table | None]:
    """(trials, curves or None) from a directory holding the two files, or from a trials.parquet.

    Curves are read from `curves.parquet` beside the trials file when it exists.
    """
    path = Path(path)
    if path.is_dir():
        trials_path = path / TRIALS_FILE
        if not trials_path.exists():
            raise UsageError("SOURCE", f"{path} holds no {TRIALS_FILE}")
    elif path.is_file():
        trials_path = path
    else:
        raise UsageError("SOURCE", f"{path} does not exist")
    trials = read_trials(trials_path)
    curves_path = trials_path.with_name(CURVES_FILE)
    curves = read_curves(curves_path) if curves_path.exists() and curves_path != trials_path else None
    return trials, curves


# ---- the full grid of a lattice study ------------------------------------------------------------

CELLS_FILE = "cells.parquet"


def cells_schema(searched: Sequence[pa.Field]) -> pa.Schema:
    return pa.schema(
        [
            _field("study", pa.string(), "study name"),
            *searched,
            _field(
                "phase",
                pa.string(),
                "majority phase of the cell's seeds, or the inferred phase; null while a seed of "
                "the cell still trains (a table written while the study runs)",
                nullable=True,
            ),
            _field(
                "measured", pa.bool_(), "True: trained; False: inferred from the measured cells around it"
            ),
            _field(
                "confidence",
                pa.float64(),
                "measured: share of seeds in the majority phase; inferred: the lowest confidence it "
                "was inferred from (refine.infer)",
                "fraction",
            ),
            _field("seeds", pa.int64(), "finished seeds of a measured cell (0: inferred)"),
        ],
        metadata=_metadata("cells"),
    )


def build_cells(study: Study, trials: pa.Table) -> pa.Table | None:
    """Every point of a grid study's grid with its phase, measured or inferred (`refine.infer`),
    or None when the study has no grid (sobol, random, tpe). Failed trials are left out."""
    from grokstudy import refine

    if study.search.sampler not in LATTICE_SAMPLERS or not study.search.space:
        return None
    dims = study.search.space
    lattice = refine.lattice_of(dims)
    index = [{value_key(v): i for i, v in enumerate(d.grid)} for d in dims]
    observed: dict[tuple[int, ...], list[str]] = {}
    running: set[tuple[int, ...]] = set()
    for row in trials.to_pylist():
        cell = tuple(index[a].get(value_key(row[d.key])) for a, d in enumerate(dims))
        if None in cell:
            continue
        if row["status"] == "RUNNING":
            running.add(cell)
        elif row["phase"] is not None and row["stop_reason"] != "error":
            observed.setdefault(cell, []).append(row["phase"])
    observed = {c: v for c, v in observed.items() if c not in running}
    inferred = refine.infer(lattice, observed)
    hyper = {f.name: f for f in hyperparameter_fields()}
    rows = []
    for cell in lattice.cells():
        rows.append(
            {
                "study": study.name,
                **{d.key: plain(d.grid[i]) for d, i in zip(dims, cell, strict=True)},
                "phase": None if cell in running else inferred.phase[cell],
                "measured": bool(inferred.measured[cell]),
                "confidence": 0.0 if cell in running else float(inferred.confidence[cell]),
                "seeds": len(observed.get(cell, ())),
            }
        )
    schema = cells_schema([hyper[d.key] for d in dims])
    table = _table(rows, schema, "cells")
    return table.replace_schema_metadata(table.schema.metadata | study_metadata(study))


def read_cells(path: Path) -> pa.Table:
    """A cells table written by `write_cells`."""
    return _read(Path(path), "cells", ("phase", "measured", "confidence"))


def write_cells(cells: pa.Table, out_dir: Path) -> Path:
    return _write(cells, Path(out_dir) / CELLS_FILE)
