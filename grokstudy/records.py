"""What the training core emits, and the one shape of a trial's curve everywhere else.

- `EvalRecord`: one evaluation point; a curve is `list[EvalRecord]`, in flight
  and at rest. Its one serialisation is `to_dicts`/`from_dicts` (checkpoint
  metadata); MLflow and Parquet hold the same keys as columns or metrics.
- `Outcome`: how a trial ended (its phase and why it stopped), judged once.
- `TrialHistory`: a finished (or failed) trial as the table builder wants it,
  whichever source it was read from (the runner's checkpoints, a Ray Tune
  experiment, MLflow).

Metric keys are the same in MLflow, Parquet and figures.
Standard library only, so phases/results/figures can use it without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grokstudy.config import TrialConfig

METRIC_KEYS: tuple[str, ...] = (
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "weights/norm",
    "fourier/top_k_share",
    "fourier/gini",
    "progress/restricted_loss",
    "progress/excluded_loss",
    "progress/key_frequencies",
)
"""Every metric a curve may carry, in display order. Accuracies are in [0, 1]. The
progress/* measures (Nanda et al. 2023; `measures.progress_tensor`) are taken every
`train.measures_every`-th evaluation, NaN at the others."""
ELAPSED_KEY = "time/elapsed_s"
"""Wall-clock seconds spent training up to a step: the same key in MLflow and Parquet."""
CURVE_KEYS: tuple[str, ...] = (*METRIC_KEYS, ELAPSED_KEY)
"""Every value of a record but its step, under its metric key."""


@dataclass(frozen=True, slots=True)
class EvalRecord:
    step: int
    """Optimizer steps taken before this evaluation (0 = at initialisation)."""
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    weights_norm: float
    """L2 norm of all parameters together."""
    fourier_top_k_share: float = math.nan
    """Share of the embedding's Fourier power in its top-k frequencies (modular ops only; NaN otherwise)."""
    fourier_gini: float = math.nan
    """Gini coefficient of the embedding's Fourier component norms (modular ops only)."""
    restricted_loss: float = math.nan
    """Cross-entropy of the logits' key-frequency part alone, on every pair (Nanda et al. 2023)."""
    excluded_loss: float = math.nan
    """Training cross-entropy of the logits with the key frequencies removed (Nanda et al. 2023)."""
    key_frequencies: float = math.nan
    """How many frequencies are key (`measures.key_frequencies`)."""
    elapsed_s: float = 0.0
    """Wall-clock seconds spent training (not evaluating) up to this step; a packed
    member's is its pack's."""

    def metrics(self) -> dict[str, float]:
        """{metric key: value} of METRIC_KEYS, skipping NaNs (the measure does not apply)."""
        return {k: float(v) for k, v in self.values().items() if k != ELAPSED_KEY and not math.isnan(v)}

    def values(self) -> dict[str, float]:
        """{key: value} of CURVE_KEYS, NaN kept: the record as a row (without its step)."""
        return {k: getattr(self, a) for k, a in zip(CURVE_KEYS, _ATTRIBUTES, strict=True)}

    @classmethod
    def from_values(cls, step: int, values: Mapping[str, float]) -> EvalRecord:
        """Inverse of `values`; a key that is missing is NaN (0 for the elapsed time)."""
        fields = {a: float(values.get(k, math.nan)) for k, a in zip(CURVE_KEYS, _ATTRIBUTES, strict=True)}
        return cls(step=int(step), **fields | {"elapsed_s": float(values.get(ELAPSED_KEY, 0.0))})


_ATTRIBUTES = tuple(f.name for f in dataclasses.fields(EvalRecord) if f.name != "step")
"""The `EvalRecord` attribute of each of CURVE_KEYS, in the same order."""


def to_dicts(records: Iterable[EvalRecord]) -> list[dict[str, Any]]:
    """A curve as JSON-ready dicts `{"step": s, key: value, ...}`; NaN becomes None (strict JSON)."""
    return [
        {"step": r.step, **{k: (None if math.isnan(v) else v) for k, v in r.values().items()}}
        for r in records
    ]


def from_dicts(rows: Iterable[Mapping[str, Any]]) -> list[EvalRecord]:
    """Inverse of `to_dicts`: records sorted by step, one per step (a repeated step keeps its last)."""
    by_step: dict[int, EvalRecord] = {}
    for row in rows:
        values = {k: (math.nan if v is None else v) for k, v in row.items() if k != "step"}
        by_step[int(row["step"])] = EvalRecord.from_values(row["step"], values)
    return [by_step[s] for s in sorted(by_step)]


STOP_REASONS = ("generalized", "budget", "diverged", "error")
"""Why a trial stopped: its generalization held for phases.confirm_steps, its
step budget was spent, its loss went non-finite, or it failed (beyond retries)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a trial (one member of a pack) ended: judged once, where it trained (`member.judge`),
    and carried as this value to the report, the checkpoint, the MLflow run and the tables."""

    phase: str
    """One of phases.PHASES."""
    t_train: int | None
    t_val: int | None
    t_val_loss: int | None
    objective: float
    """What the sampler minimizes: t_val, or the step budget when it never generalized."""
    stop_reason: str
    """One of STOP_REASONS but "error" (a failed trial has no outcome)."""
    t_circuit: int | None = None
    """When the key-frequency circuit was there (`phases.circuit_time`); None without one."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Outcome:
        """Inverse of `to_dict`; keys of another grokstudy version are ignored."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class TrialHistory:
    """One trial of a study, as read back from any source: what the table builder takes."""

    trial_id: str
    """`<point_id>-s<seed>`: the trial's identity across retries, restores and packs."""
    point: dict[str, Any]
    """Its searched values and `train.seed` (`points.point_from_config`)."""
    cfg: TrialConfig
    records: tuple[EvalRecord, ...]
    """Its curve, by increasing step (empty when it failed before its first checkpoint)."""
    outcome: Outcome | None
    """How it ended; None when it failed (beyond retries)."""
    node: str | None = None
    run_id: str | None = None
    """The trial's MLflow run (None when untracked)."""
    error: str | None = None
    """Why it failed, when it has no outcome."""
    running: bool = False
    """Still training (a table written while the study runs): no outcome yet, and no phase."""
    weights_uri: str | None = None
    """Its final weights file (`grokstudy.weights`); None when it kept none."""

    @property
    def stop_reason(self) -> str | None:
        """One of STOP_REASONS; None while it runs."""
        if self.running:
            return None
        return self.outcome.stop_reason if self.outcome is not None else "error"
