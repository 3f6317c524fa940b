"""A finished study read again under another phase rule (`grokstudy plot DIR --rule NAME`,
`relabel`): how much of its diagram is the rule's doing.

A phase is a reading of a curve, not part of it (`results.build_tables` classifies afresh on
purpose), so no trial trains again: each one is reclassified from its stored curve
(curves.parquet) against its own step budget (`max_steps`), its cell is voted again, and every
cell whose phase changed is listed. The named rule sets every key it governs as
`phases: {rule: NAME}` in a study file would (`config.PHASE_RULES` over the defaults:
threshold, grok_delay_factor, min_delay, margin, and plateau_max off); the study's
confirm_steps, loss_threshold and early_stop stay, since they say how its trials were run
and stopped, which no reading can change.

Computes only: `cli` draws and prints. Tables in, tables out (pyarrow), like `results`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from grokstudy.config import PHASE_RULES, PhaseConfig, Study, did_you_mean, value_key
from grokstudy.errors import UsageError
from grokstudy.phases import PhaseResult, classify_records, vote
from grokstudy.records import from_dicts

RULE_META = "grokstudy.relabelled_rule"
"""Trials-table metadata of a table relabelled here: the rule its phases were read by (figure
titles name it, so a redraw is never mistaken for the study's own figures)."""
KEPT_FROM_STUDY = ("confirm_steps", "loss_threshold", "early_stop")
"""Phase settings that say how the trials were run and stopped: the study's, under any rule."""
VERDICT_COLUMNS = tuple(f.name for f in dataclasses.fields(PhaseResult))
"""The trials-table columns a rule decides (phase, t_train, t_val, delay, censored, ...)."""


@dataclass(frozen=True, slots=True)
class CellChange:
    """One cell (a point of the study, its seeds pooled) whose majority phase the rule changed."""

    point: tuple[tuple[str, Any], ...]
    """(searched key, value) of the cell, in the study's axis order (the seed left out)."""
    before: str
    """Its seeds' verdict (`phases.vote`: a phase, or tie) under the study's own rule."""
    after: str
    """The same under the other rule."""

    def describe(self) -> str:
        where = ", ".join(f"{key}={value}" for key, value in self.point)
        return f"{where}: {self.before} -> {self.after}"


@dataclass(frozen=True, slots=True)
class Relabelled:
    """A study's tables under another rule, and what changed."""

    phases: PhaseConfig
    """The rule's settings the trials were read by."""
    trials: pa.Table
    """The trials table, every verdict column recomputed; `RULE_META` in its metadata."""
    cells: pa.Table | None
    """The grid's cells voted again, inferred cells included (`results.build_cells`); None
    without the study (or for a sampled study)."""
    changed_trials: int
    """Finished trials whose phase changed."""
    finished_trials: int
    changes: tuple[CellChange, ...]
    """Every cell whose verdict changed, in the trials table's order."""
    n_cells: int
    """Cells with a finished trial."""


def rule_phases(rule: str, study_phases: PhaseConfig | None = None) -> PhaseConfig:
    """The settings of the named rule; `study_phases` gives the ones it keeps (KEPT_FROM_STUDY).
    UsageError("--rule", ...) for a name not in `config.PHASE_RULES`."""
    if rule not in PHASE_RULES:
        hint = did_you_mean(rule, tuple(PHASE_RULES))
        choices = ", ".join(PHASE_RULES)
        raise UsageError("--rule", f"unknown phase rule {rule!r}{hint or ';'} choose from: {choices}")
    kept = {} if study_phases is None else {k: getattr(study_phases, k) for k in KEPT_FROM_STUDY}
    return PhaseConfig(**{**kept, **PHASE_RULES[rule], "rule": rule})


def relabel(trials: pa.Table, curves: pa.Table | None, rule: str, study: Study | None = None) -> Relabelled:
    """`trials` (with its `curves`) read by the named rule; `study` (its study file, when known)
    supplies the settings a rule keeps and the grid for the cells table."""
    from grokstudy import results  # the cells table (and refine) only when asked for

    phases = rule_phases(rule, study.phases if study is not None else None)
    if curves is None:
        raise UsageError("--rule", "the study has no curves table (curves.parquet) to read its trials from")
    after = reclassify(trials, curves, phases)
    before_phase, after_phase = _finished_phases(trials), _finished_phases(after)
    changes, n_cells = changed_cells(trials, after)
    return Relabelled(
        phases=phases,
        trials=after,
        cells=results.build_cells(study, after) if study is not None else None,
        changed_trials=sum(before_phase[t] != after_phase.get(t) for t in before_phase),
        finished_trials=len(before_phase),
        changes=tuple(changes),
        n_cells=n_cells,
    )


def reclassify(trials: pa.Table, curves: pa.Table, phases: PhaseConfig) -> pa.Table:
    """The trials table with every verdict column `classify_records` gives recomputed by
    `phases` from each trial's curve; a trial still running (no verdict yet) or without a curve
    keeps its row as it was."""
    by_trial: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in curves.to_pylist():
        by_trial[row["trial_id"]].append(row)
    rows = trials.to_pylist()
    for row in rows:
        records = from_dicts(by_trial.get(row["trial_id"], ()))
        if not records or row.get("status") == "RUNNING":
            continue
        budget = row.get("max_steps") or row["train.max_steps"]
        row.update(dataclasses.asdict(classify_records(records, phases, budget)))
    out = trials
    for name in VERDICT_COLUMNS:
        if name in trials.column_names:
            column = pa.array([r[name] for r in rows], type=trials.schema.field(name).type)
            out = out.set_column(out.schema.get_field_index(name), trials.schema.field(name), column)
    meta = dict(trials.schema.metadata or {}) | {RULE_META.encode(): phases.rule.encode()}
    return out.replace_schema_metadata(meta)


def changed_cells(before: pa.Table, after: pa.Table) -> tuple[list[CellChange], int]:
    """(the cells whose verdict differs between two readings of one study, cells with a
    finished trial). A cell is a point of every searched key but the seed."""
    axes = _axes(before)
    old, new = _cell_votes(before, axes), _cell_votes(after, axes)
    changes = [CellChange(point, old[point], new[point]) for point in old if old[point] != new.get(point)]
    return changes, len(old)


def study_beside(source: str) -> Study | None:
    """The study file a study directory (or its trials.parquet) keeps beside its tables
    (`study.yaml`); None for another kind of source, or a file this grokstudy cannot read (then
    the rule's defaults stand for the settings it keeps, and a boundary study's inferred cells
    are not redrawn)."""
    from pathlib import Path

    from grokstudy.errors import StudyError
    from grokstudy.report import STUDY_FILE
    from grokstudy.study import load_study

    path = Path(source)
    study_file = (path if path.is_dir() else path.parent) / STUDY_FILE
    try:
        return load_study(study_file) if study_file.is_file() else None
    except StudyError:
        return None


def rule_of(trials: pa.Table) -> str | None:
    """The rule a relabelled trials table was read by; None for a study's own table."""
    value = (trials.schema.metadata or {}).get(RULE_META.encode())
    return value.decode() if value else None


# ---- helpers ---------------------------------------------------------------------------------


def _axes(trials: pa.Table) -> list[str]:
    searched = trials.column("searched").to_pylist() if "searched" in trials.column_names else []
    return [k for k in dict.fromkeys(k for s in searched for k in s or ()) if k != "train.seed"]


def _finished(row: dict[str, Any]) -> bool:
    """Ended with a verdict: drawn as a phase (as `figures` and `results.build_cells` count)."""
    ended = row.get("status") not in ("RUNNING", "ERROR") and row.get("stop_reason") != "error"
    return ended and row["phase"] is not None


def _finished_phases(trials: pa.Table) -> dict[str, str]:
    return {r["trial_id"]: r["phase"] for r in trials.to_pylist() if _finished(r)}


def _cell_votes(trials: pa.Table, axes: Sequence[str]) -> dict[tuple[tuple[str, Any], ...], str]:
    """{cell: its seeds' verdict} over the finished trials, cells in the table's order."""
    seeds: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for row in trials.to_pylist():
        if _finished(row):
            point = tuple((k, value_key(row[k])) for k in axes)
            seeds.setdefault(point, []).append(row["phase"])
    return {point: vote(labels).phase for point, labels in seeds.items()}
