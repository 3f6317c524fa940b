"""One trial's eval curve → timings (t_train, t_val, delay) and a phase label.

The rule follows Liu et al. 2022, "Towards Understanding Grokking: An Effective
Theory of Representation Learning" (NeurIPS 2022, arXiv 2205.10343): their
code (ejmichaud/grokking-squared, `toy/Figure5.ipynb`) records the first step
at which train and test accuracy reach a threshold and splits runs into
comprehension, grokking, memorization and confusion by whether each was
reached within the budget and by the gap between them. Two changes, both
because our curves are noisier than their toy model's: generalization must
*hold*, and the gap is relative as well as absolute (a fixed gap of Liu et al.'s
toy model, 1,000 steps, would call a run that fits at step 5,000 and
generalizes at 6,000 grokking).
This docstring is the reference the docs quote.

Definitions, with θ = `PhaseConfig.threshold`, m = `margin`, F =
`grok_delay_factor`, D = `min_delay`, C = `confirm_steps`, L =
`loss_threshold`, and only eval points with step ≤ `max_steps` (the budget B
of Liu et al.) taken into account:

- **Crossings are interpolated.** The step at which a curve first reaches a
  level is estimated linearly between the two eval points around it (in
  log-loss for losses), rounded to a step; so t_train does not jump with the
  eval grid (an eval every 100 steps would otherwise put a fit at step 51 at
  step 100, and move the grokking cut F·t_train by hundreds of steps).
- **t_train**: the first step with train accuracy ≥ θ, or None.
- **t_val**: the first step with validation accuracy ≥ θ *that holds*: after
  it validation accuracy never falls below θ − m, except for dips that recover
  (back to ≥ θ) within C steps, which are noise, not a collapse. None if no
  crossing holds.
- **t_val_loss**: the same for the validation loss falling below L and staying
  below 10·L (dips shorter than C forgiven): Nanda et al. 2023's measure of
  generalization (test loss < 1e-2), which accuracy saturates long before.
- **delay** = t_val − t_train when both exist, else None.

Phases, exactly one per curve (`PHASES`):

- **comprehension**: t_val exists and the run is not grokking. This includes
  delay < 0 (validation crossed θ before training did, which a tiny or easy
  validation set allows) and t_val without any t_train (validation holds ≥ θ
  while training accuracy stays just under it, e.g. a few hard training pairs).
- **grokking**: t_train and t_val exist, t_val ≥ F·max(t_train, 1) and
  delay ≥ D. Fitting at step 0 counts as t_train = 0, and max(·, 1) keeps the
  relative test meaningful there: grokking then needs t_val ≥ max(F, D).
  With P = `plateau_max` set (off by default), grokking also needs the
  validation accuracy at t_train (`val_acc_at_fit`, interpolated like t_train)
  ≤ P: validation sat near chance when the training set was fitted, the
  plateau-then-jump of Power et al. 2022, not a slow steady rise that merely
  ends late. A run that passes the delay tests but fails this one is
  comprehension.
- **memorization**: t_train exists, no holding t_val, and validation never
  reached θ. A budget that ends in the middle of the jump (validation rising
  but still < θ at the last eval) is memorization too: the label says what
  happened within the budget; `best_val_acc` shows how close it came.
- **confusion**: t_train does not exist (the model never fits within the curve)
  and validation never reached θ.
- **unstable**: validation reached θ but collapsed below θ − m for C steps or
  more (or until the end of the curve) and never re-generalized. Named honestly
  rather than forced into memorization. A collapse followed by a later
  recovery that holds is *not* unstable: t_val is the recovery.
- **diverged**: the training loss became non-finite (NaN or ±inf) at an eval
  point (`classify_records` checks; a learning rate far too large, say). The
  timings are those of the curve before it; the trial stops there.

Rules (`PhaseConfig.rule`): `default` is the above with θ = 0.99, F = 5,
D = 500, m = 0.05. `liu2022` is Liu et al.'s own: accuracy threshold 0.9,
grokking when validation comes more than 1,000 steps after training
(F = 1, D = 1001, no ratio), no hold required (m = 0.9: any fall stays above
θ − m = 0). Neither sets P. Each study says which rule it used (MLflow tags
`phases.rule.*`).

Further decisions:

- A training fit that is lost later (train accuracy falls back under θ) does
  not move t_train: it is the first fit, as in Liu et al.
- Holding is judged within the curve seen so far, so a t_val at the very last
  eval point has held for zero steps. `generalization_confirmed` is the
  stricter test used to stop a trial early: it needs C steps of hold. A dip
  still open at the end of the curve is a collapse (it has not recovered).

Pure numpy; knows nothing of Ray, MLflow or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grokstudy.config import PhaseConfig
from grokstudy.records import EvalRecord

PHASES: tuple[str, ...] = ("comprehension", "grokking", "memorization", "confusion", "unstable", "diverged")
"""Every label `classify` returns, in the display order of legends and tables."""

PHASE_DEFINITIONS: dict[str, str] = {
    "comprehension": "generalizes soon after (or before) it fits the training set",
    "grokking": "fits, then generalizes only after a long delay",
    "memorization": "fits the training set, never generalizes within the budget",
    "confusion": "never fits the training set within the budget",
    "unstable": "generalized, then collapsed and never recovered",
    "diverged": "the training loss became non-finite",
}
"""One line per phase, for figure legends and docs; the module docstring has the exact rule."""

TIE = "tie"
"""The verdict of a cell whose seeds tie for the most votes: not a phase, and drawn as one."""


@dataclass(frozen=True, slots=True)
class Vote:
    """The phase of a cell from its seeds' phases (`vote`)."""

    phase: str
    """The phase most seeds share, or TIE when several share the most votes (or there are none)."""
    count: int
    """Seeds voting for the winner (each tied phase has this many)."""
    share: float
    """count / seeds (0 with no seeds)."""
    tied: tuple[str, ...]
    """The phases with the most votes, in PHASES order (one, unless seeds tie)."""


def vote(labels: Sequence[str]) -> Vote:
    """The seeds' majority phase: the one rule for cells, in the boundary sampler, the cells
    table and the figures. A tie is a tie: never broken by phase order or by chance."""
    if not labels:
        return Vote(TIE, 0, 0.0, ())
    counts = Counter(labels)
    top = max(counts.values())
    tied = tuple(sorted((p for p, n in counts.items() if n == top), key=phase_order))
    return Vote(tied[0] if len(tied) == 1 else TIE, top, top / len(labels), tied)


def phase_order(phase: str) -> tuple[int, str]:
    """Sort key: PHASES order, unknown labels after them by name."""
    return (PHASES.index(phase) if phase in PHASES else len(PHASES), phase)


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """The verdict on one curve; timings in steps, interpolated between eval points (None: never reached)."""

    phase: str
    t_train: int | None
    t_val: int | None
    delay: int | None
    """t_val − t_train; negative when validation crossed θ first."""
    steps: int
    """Last eval step taken into account (≤ max_steps)."""
    final_train_acc: float
    final_val_acc: float
    best_val_acc: float
    """Highest validation accuracy seen: how close a memorizing run came."""
    t_val_loss: int | None = None
    """First step with validation loss < loss_threshold that holds (Nanda et al.'s measure)."""
    val_acc_at_fit: float | None = None
    """Validation accuracy at t_train (interpolated like it): near chance for a grokking run
    that sat on a plateau, well above it for one that was already generalizing as it fit."""
    censored: bool = False
    """It reached its step budget without a holding t_val: its memorization (or confusion) is
    "not within the budget", not "never"; it could still generalize later."""
    t_circuit: int | None = None
    """First step from which the restricted loss (the key-frequency part of the logits alone,
    Nanda et al. 2023) holds below loss_threshold: when the circuit was there (`circuit_time`)."""


def classify(
    steps: Sequence[int],
    train_acc: Sequence[float],
    val_acc: Sequence[float],
    cfg: PhaseConfig,
    max_steps: int,
    val_loss: Sequence[float] | None = None,
) -> PhaseResult:
    """Label one curve by the rule in the module docstring.

    `steps`, `train_acc` and `val_acc` (and `val_loss`, for t_val_loss) have
    equal, non-zero length and `steps` increases; eval points after
    `max_steps` are ignored.
    """
    s, tr, va = _arrays(steps, train_acc, val_acc)
    within = s <= max_steps
    if not within.any():
        raise ValueError(f"no eval point at or before max_steps={max_steps} (first is {s[0]})")
    s, tr, va = s[within], tr[within], va[within]

    t_train = _crossing(s, tr, cfg.threshold, 0)
    t_val = _holding(s, va, cfg.threshold, cfg.threshold - cfg.margin, cfg.confirm_steps)
    t_val_loss = None if val_loss is None else _loss_holding(s, np.asarray(val_loss)[within], cfg)
    delay = t_val - t_train if t_val is not None and t_train is not None else None
    val_acc_at_fit = None if t_train is None else float(np.interp(t_train, s, va))

    if t_val is not None:
        grokked = (
            t_train is not None
            and t_val >= cfg.grok_delay_factor * max(t_train, 1)
            and t_val - t_train >= cfg.min_delay
            and (cfg.plateau_max is None or val_acc_at_fit <= cfg.plateau_max)
        )
        phase = "grokking" if grokked else "comprehension"
    elif (va >= cfg.threshold).any():
        phase = "unstable"
    elif t_train is not None:
        phase = "memorization"
    else:
        phase = "confusion"

    return PhaseResult(
        phase=phase,
        t_train=t_train,
        t_val=t_val,
        delay=delay,
        steps=int(s[-1]),
        final_train_acc=float(tr[-1]),
        final_val_acc=float(va[-1]),
        best_val_acc=float(va.max()),
        t_val_loss=t_val_loss,
        val_acc_at_fit=val_acc_at_fit,
        censored=t_val is None and int(s[-1]) >= max_steps,
    )


def generalization_confirmed(
    steps: Sequence[int],
    train_acc: Sequence[float],
    val_acc: Sequence[float],
    cfg: PhaseConfig,
    val_loss: Sequence[float] | None = None,
) -> bool:
    """True once the training set has been fitted and validation accuracy has held.

    Held means: a holding t_val exists and the last eval step is ≥ t_val +
    `confirm_steps`; with `early_stop: accuracy_and_loss` the same for
    t_val_loss (`val_loss` is then required), so a study measured by loss is
    not stopped before its loss gets there. The runner calls this at every eval
    to stop a trial early; after it turns True, more training can only change
    the label if validation later collapses for good, which is the bet that
    stopping makes. Never true on a plateau (grokking is a plateau), nor with
    `early_stop: never`.
    """
    if len(steps) == 0 or cfg.early_stop == "never":
        return False
    s, tr, va = _arrays(steps, train_acc, val_acc)
    if _crossing(s, tr, cfg.threshold, 0) is None:
        return False
    t_val = _holding(s, va, cfg.threshold, cfg.threshold - cfg.margin, cfg.confirm_steps)
    if t_val is None or int(s[-1]) - t_val < cfg.confirm_steps:
        return False
    if cfg.early_stop == "accuracy":
        return True
    if val_loss is None:
        raise ValueError("early_stop: accuracy_and_loss needs the validation loss curve")
    t_val_loss = _loss_holding(s, val_loss, cfg)
    return t_val_loss is not None and int(s[-1]) - t_val_loss >= cfg.confirm_steps


def _loss_holding(s: np.ndarray, val_loss: Sequence[float] | np.ndarray, cfg: PhaseConfig) -> int | None:
    # Losses fall: hold the negated log loss above -log(L) (and above -log(10 L)).
    neg = -np.log(np.maximum(np.asarray(val_loss, dtype=np.float64), 1e-300))
    return _holding(
        s, neg, -math.log(cfg.loss_threshold), -math.log(10 * cfg.loss_threshold), cfg.confirm_steps
    )


def classify_records(records: Sequence[EvalRecord], cfg: PhaseConfig, max_steps: int) -> PhaseResult:
    """`classify` on a trial's `EvalRecord`s, with divergence: a non-finite train/loss at
    an eval point within the budget makes the phase "diverged" (timings from the curve before it)."""
    within = [r for r in records if r.step <= max_steps]
    bad = next((i for i, r in enumerate(within) if diverged(r)), None)
    kept = within if bad is None else within[: max(bad, 1)]
    result = classify(
        [r.step for r in kept],
        [r.train_acc for r in kept],
        [r.val_acc for r in kept],
        cfg,
        max_steps,
        val_loss=[r.val_loss for r in kept],
    )
    result = dataclasses.replace(result, t_circuit=circuit_time(kept, cfg))
    if bad is None:
        return result
    return dataclasses.replace(result, phase="diverged", steps=within[bad].step, censored=False)


def circuit_time(records: Sequence[EvalRecord], cfg: PhaseConfig) -> int | None:
    """t_circuit: the first step (interpolated, in log-loss) from which the restricted loss holds
    below `loss_threshold`, as t_val_loss holds for the validation loss; None when it never does
    or the curve has no progress measures.

    Why this: the restricted loss is the loss of the network's key-frequency terms alone, so
    t_circuit is when the Fourier circuit by itself would pass the same test (Nanda et al.
    2023's generalization criterion, test loss < 1e-2) that t_val_loss applies to the whole
    network. In their runs it comes thousands of steps before the test loss falls: the
    circuit forms on the plateau, and the clean-up phase that removes the memorizing terms
    comes after. (The excluded loss's peak marks the same turn from formation to clean-up,
    but a peak on a curve sampled every few evaluations is a poorer-defined step than a
    crossing.) Only evaluations that took the measures count (`train.measures_every`)."""
    measured = [r for r in records if math.isfinite(r.restricted_loss)]
    if not measured:
        return None
    steps = np.asarray([r.step for r in measured], dtype=np.int64)
    return _loss_holding(steps, [r.restricted_loss for r in measured], cfg)


def val_acc_at(records: Sequence[EvalRecord], step: int | None) -> float | None:
    """Validation accuracy at `step` (an interpolated timing such as t_train), read off the curve
    as `classify` reads it; None without a step or a curve."""
    if step is None or not records:
        return None
    return float(np.interp(step, [r.step for r in records], [r.val_acc for r in records]))


def diverged(record: EvalRecord) -> bool:
    """True when a record's training loss is non-finite: the trial should stop."""
    return not math.isfinite(record.train_loss)


def rules(cfg: PhaseConfig) -> dict[str, str]:
    """{name: the rule with this config's numbers}, for MLflow tags and reports."""
    th, lo = f"{cfg.threshold:g}", f"{cfg.threshold - cfg.margin:g}"
    dips = f"(dips recovering within {cfg.confirm_steps} steps forgiven)"
    plateau = "" if cfg.plateau_max is None else f" and val/acc at t_train <= {cfg.plateau_max:g}"
    return {
        "rule": cfg.rule,
        "t_train": f"first step (interpolated) with train/acc >= {th}",
        "t_val": f"first step (interpolated) with val/acc >= {th} after which val/acc stays >= {lo} {dips}",
        "t_val_loss": f"first step with val/loss < {cfg.loss_threshold:g} after which it stays < "
        f"{10 * cfg.loss_threshold:g} {dips}",
        "comprehension": "t_val exists and not grokking",
        "grokking": (
            f"t_val >= {cfg.grok_delay_factor:g} * max(t_train, 1) and t_val - t_train >= {cfg.min_delay}"
            f"{plateau}"
        ),
        "memorization": f"t_train exists; val/acc never reached {th}",
        "confusion": f"no t_train and no t_val; val/acc never reached {th}",
        "unstable": f"val/acc reached {th}, then fell below {lo} for {cfg.confirm_steps} steps or more and never recovered",
        "diverged": "train/loss non-finite at an eval point",
    }


# ---- helpers -----------------------------------------------------------------------


def _arrays(
    steps: Sequence[int], train_acc: Sequence[float], val_acc: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64)
    tr = np.asarray(train_acc, dtype=np.float64)
    va = np.asarray(val_acc, dtype=np.float64)
    if not (s.ndim == tr.ndim == va.ndim == 1 and len(s) == len(tr) == len(va)):
        raise ValueError(f"curve lengths differ: steps {len(s)}, train_acc {len(tr)}, val_acc {len(va)}")
    if len(s) == 0:
        raise ValueError("empty curve: classify needs at least one eval point")
    if (np.diff(s) <= 0).any():
        raise ValueError("steps must increase strictly")
    return s, tr, va


def _crossing(s: np.ndarray, a: np.ndarray, level: float, start: int) -> int | None:
    """The step at which `a` first reaches `level` at or after index `start`, interpolated
    linearly from the eval point before (which is below `level`), rounded to a step."""
    hits = np.flatnonzero(a[start:] >= level)
    if not len(hits):
        return None
    i = start + int(hits[0])
    if i == 0 or not np.isfinite(a[i - 1]) or a[i - 1] >= level:
        return int(s[i])
    frac = (level - a[i - 1]) / (a[i] - a[i - 1])
    return int(s[i - 1] + max(1, round(frac * (s[i] - s[i - 1]))))


def _holding(s: np.ndarray, a: np.ndarray, level: float, floor: float, forgive: int) -> int | None:
    """The interpolated first crossing of `level` after which `a` never stays below `floor`
    for `forgive` steps or more, nor is below it at the end (the module docstring's hold)."""
    # NaN compares False on both sides: neither a crossing nor a fall.
    recoveries = np.append(np.flatnonzero(a >= level), len(a))  # len(a): never
    start = j = 0
    for i in np.flatnonzero(a < floor):
        if i < j:
            continue  # inside the dip that began at an earlier fall
        j = int(recoveries[np.searchsorted(recoveries, i)])  # the fall at i recovers at j, or never
        if j == len(a) or s[j] - s[i] >= forgive:
            start = j  # a real collapse: only a crossing after it can hold
    return _crossing(s, a, level, start) if start < len(a) else None
