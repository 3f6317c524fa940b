"""The numbers of docs/reproductions.md: per study run by `make papers`, per searched point,
the phases of its seeds and the median steps to fit, to generalize and to a validation loss
below the study's threshold, each with its 95 % bootstrap interval (a seed that never got
there counts as infinitely late: a median or bound that is not finite shows as "never");
then, for a study whose claim is a difference, each difference with its two-sided test.

    .venv/bin/python studies/papers/summarize.py runs/papers > docs/reproductions/numbers.md
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from grokstudy import relabel
from grokstudy.config import PHASE_RULES
from grokstudy.stats import Comparison, Median, compare, sign_test

MEASURES = ("t_train", "t_val", "t_val_loss")
# Fewer a side cannot carry a claim: at 3 a side the smallest p is 0.1 (Mann-Whitney), 0.25 (sign test).
MIN_SEEDS = 5
FEW_SEEDS = f"n < {MIN_SEEDS}: not enough for a claim"

FRACTION, WD, INIT = "data.fraction", "optimizer.weight_decay", "model.init_scale"
FILTER, LOSS, ORTHOGRAD, OP = "optimizer.grokfast", "train.loss", "optimizer.orthograd", "task.op"


@dataclass(frozen=True)
class Contrast:
    """One claimed difference in `measure` between the trials of arm `a` and of arm `b`, each
    arm {searched key: value}. Paired: each seed against the same seed (its own init and split)
    under the other arm, at the same values of the searched keys the arms leave free (sign
    test); otherwise the arms are independent groups (Mann-Whitney)."""

    measure: str
    a: dict[str, Any]
    b: dict[str, Any]
    paired: bool = False

    def label(self) -> str:
        """`t_val: optimizer.grokfast ema vs none, at optimizer.weight_decay 0.005`."""
        differ = [k for k in self.a if self.a[k] != self.b[k]]
        same = ", ".join(f"{k} {v}" for k, v in self.a.items() if k not in differ)
        sides = [", ".join(f"{k} {arm[k]}" for k in differ) for arm in (self.a, self.b)]
        if len(differ) == 1:
            sides[1] = str(self.b[differ[0]])
        return f"{self.measure}: {sides[0]} vs {sides[1]}" + (f", at {same}" if same else "")


def adjacent(
    measure: str, key: str, values: list[Any], at: dict[str, Any] | None = None, paired: bool = False
) -> list[Contrast]:
    """Each value of `key` against the next one up: independent groups, or `paired` (each seed
    against itself at the same values of the other searched keys)."""
    at = at or {}
    return [Contrast(measure, {**at, key: lo}, {**at, key: hi}, paired) for lo, hi in pairwise(values)]


PLAIN_FLOAT32 = {LOSS: "cross_entropy_float32", ORTHOGRAD: False}

# What each study claims is a difference (docs/reproductions.md), keyed by study name without
# "-cpu"; given each searched key's values in the study. Studies whose claim is no difference
# (liu2022: four phases in one diagram; gromov2023: generalizes within a budget) have none.
CLAIMS: dict[str, Callable[[dict[str, list[Any]]], list[Contrast]]] = {
    # time to generalize (loss) rises steeply as the fraction falls
    "nanda2023": lambda v: adjacent("t_val_loss", FRACTION, v[FRACTION]),
    # the same in accuracy, every operation at once (each seed of each operation against itself
    # at the next fraction: more pairs than one operation's seeds); harder operations need more
    # (same seed and fraction)
    "power2022": lambda v: [
        *adjacent("t_val", FRACTION, v[FRACTION], paired=True),
        *(Contrast("t_val", {OP: op}, {OP: "x+y"}, paired=True) for op in v[OP] if op != "x+y"),
    ],
    # weight decay is the strongest lever: the largest against each smaller, same seed and fraction
    "power2022-wd": lambda v: [
        Contrast("t_val", {WD: max(v[WD])}, {WD: wd}, paired=True) for wd in v[WD] if wd < max(v[WD])
    ],
    # a large init generalizes later: the standard init against each larger, same seed and decay
    "omnigrok2023": lambda v: [
        Contrast("t_val", {INIT: 1.0}, {INIT: s}, paired=True) for s in v[INIT] if s > 1.0
    ],
    # the EMA filter generalizes sooner, at each weight decay, same seed
    "grokfast2024": lambda v: [
        Contrast("t_val", {FILTER: "ema", WD: wd}, {FILTER: "none", WD: wd}, paired=True) for wd in v[WD]
    ],
    # at wd 0, ⊥Grad or StableMax recover generalization where plain float32 softmax collapses
    "prieto2025": lambda v: [
        Contrast("t_val", {**PLAIN_FLOAT32, ORTHOGRAD: True}, PLAIN_FLOAT32, paired=True),
        Contrast("t_val", {**PLAIN_FLOAT32, LOSS: "stablemax"}, PLAIN_FLOAT32, paired=True),
    ],
}


def matching(rows: list[dict[str, Any]], arm: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in arm.items())]


def test(contrast: Contrast, rows: list[dict[str, Any]], searched: list[str]) -> Comparison | None:
    """The contrast's comparison on the study's trials; None where an arm has no trial (or no pair)."""
    a, b = matching(rows, contrast.a), matching(rows, contrast.b)
    if contrast.paired:
        free = [k for k in searched if k not in contrast.a] + ["train.seed"]
        b_of = {tuple(r[k] for k in free): r for r in b}
        partners = [(r, b_of.get(tuple(r[k] for k in free))) for r in a]
        pairs = [(r[contrast.measure], s[contrast.measure]) for r, s in partners if s is not None]
        return sign_test(pairs) if pairs else None
    return compare([r[contrast.measure] for r in a], [r[contrast.measure] for r in b]) if a and b else None


def claims(name: str, rows: list[dict[str, Any]], searched: list[str]) -> None:
    contrasts = CLAIMS.get(name.removesuffix("-cpu"))
    if contrasts is None:
        return
    values = {k: sorted({r[k] for r in rows}) for k in searched}
    print("\nClaims tested (two-sided: Mann-Whitney between groups, the sign test between the same seeds):\n")
    for contrast in contrasts(values):
        result = test(contrast, rows, searched)
        if result is None:
            print(f"- {contrast.label()}: no trials in one arm")
            continue
        print(f"- {contrast.label()}: {result.text()}")
        if min(result.a.n, result.b.n) < MIN_SEEDS:
            print(f"  - {FEW_SEEDS}")


PLATEAU_SHARE = 2.0
"""A grokking trial sat on a near-chance plateau when its validation accuracy at t_train was at
most this many times chance (1 / classes): the plateau-then-jump of Power et al. 2022."""


def plateaus(rows: list[dict[str, Any]]) -> None:
    """Which grokking trials sat near chance when they fitted (`val_acc_at_fit`)."""
    grokking = [r for r in rows if r["phase"] == "grokking" and r.get("val_acc_at_fit") is not None]
    if not grokking:
        return
    near = [r for r in grokking if r["val_acc_at_fit"] <= PLATEAU_SHARE / chance_classes(r)]
    shown = ", ".join(
        f"{r['val_acc_at_fit']:.2f}" for r in sorted(grokking, key=lambda r: r["val_acc_at_fit"])
    )
    print(
        f"\nPlateau: {len(near)} of {len(grokking)} grokking trials had validation accuracy at most "
        f"{PLATEAU_SHARE:g}x chance when they fitted (val_acc_at_fit: {shown})."
    )


def chance_classes(row: dict[str, Any]) -> int:
    """Classes of a trial's task: p for modular arithmetic, n! for S_n."""
    return math.factorial(row["task.n"]) if row["task.op"] == "perm" else row["task.p"]


def rule_sensitivity(study: Path) -> None:
    """How many cells change phase when the study is read by each other named rule."""
    trials = pq.read_table(study / "trials.parquet")
    curves = pq.read_table(study / "curves.parquet") if (study / "curves.parquet").exists() else None
    config = relabel.study_beside(str(study))
    own = config.phases.rule if config is not None else "default"
    for rule in (r for r in PHASE_RULES if r != own):
        after = relabel.relabel(trials, curves, rule, config)
        changes = "; ".join(c.describe() for c in after.changes) or "none"
        print(
            f"\nUnder the {rule} rule (`grokstudy plot {study.name} --rule {rule}`): {len(after.changes)} of "
            f"{after.n_cells} cells change phase ({changes})."
        )


def main(root: Path) -> None:
    print(
        "Per point: its seeds (n), their phases, and the median step over seeds with its 95 % "
        "bootstrap interval\n(a seed that never got there counts as infinitely late: never).\n"
    )
    for study in sorted(p for p in root.iterdir() if (p / "trials.parquet").exists()):
        every = pq.read_table(study / "trials.parquet").to_pylist()
        rows = [r for r in every if r.get("status", "TERMINATED") == "TERMINATED"]
        searched = [k for k in every[0]["searched"] if k != "train.seed"]
        print(f"### {study.name}\n")
        print(f"| {' | '.join(searched)} | n | phases | {' | '.join(MEASURES)} |")
        print("|" + " --- |" * (len(searched) + 2 + len(MEASURES)))
        points = defaultdict(list)
        for r in rows:
            points[tuple(str(r[k]) for k in searched)].append(r)
        for point, members in sorted(points.items()):
            phases = ", ".join(f"{p} {n}" for p, n in Counter(m["phase"] for m in members).most_common())
            cells = [Median.of(m[k] for m in members).text() for k in MEASURES]
            print(f"| {' | '.join(point)} | {len(members)} | {phases} | {' | '.join(cells)} |")
        claims(study.name, rows, searched)
        plateaus(rows)
        rule_sensitivity(study)
        wall = sum(r["wall_s"] for r in every)
        left_out = (
            f" ({len(every) - len(rows)} failed or unfinished, left out)" if len(rows) < len(every) else ""
        )
        print(f"\n{len(every)} trials{left_out}, {wall / 60:.1f} min of training in all.\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/papers"))
