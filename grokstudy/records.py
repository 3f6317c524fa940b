"""What the training core emits: one `EvalRecord` per evaluation point.

Metric keys are the same in MLflow, Parquet and figures (STYLE.md, principle 13).
Standard library only, so phases/results/figures can use it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

METRIC_KEYS: tuple[str, ...] = (
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "weights/norm",
    "fourier/top_k_share",
)
"""Every metric a curve may carry, in display order. Accuracies are in [0, 1]."""


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
    elapsed_s: float = 0.0
    """Wall-clock seconds spent training (not evaluating) up to this step."""

    def metrics(self) -> dict[str, float]:
        """{metric key: value}, skipping NaNs (the measure does not apply)."""
        values = {
            "train/loss": self.train_loss,
            "train/acc": self.train_acc,
            "val/loss": self.val_loss,
            "val/acc": self.val_acc,
            "weights/norm": self.weights_norm,
            "fourier/top_k_share": self.fourier_top_k_share,
        }
        return {k: float(v) for k, v in values.items() if not math.isnan(v)}
