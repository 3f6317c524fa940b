"""Which cells an auto step budget relabels, and what it costs, against the study's fixed budget.

`train.max_steps: {auto: {per_decay_time: K, min: A, max: B}}` (config.DecayTimeBudget) gives
each point K weight-decay time constants 1/(lr * weight_decay) of steps. This trains every trial
of a grid study twice with bare `train.run` calls (no Ray, no MLflow), one single-threaded
process per trial, `--workers` at a time: at the study's own fixed `train.max_steps` (the
baseline) and with the auto budget. Each trial stops where the runner's would (`member.judge`:
generalization confirmed, diverged, or its budget spent); cells are voted over seeds
(`phases.vote`). Prints each cell's phase under both budgets, then the cells that changed and the
model-steps each spent (steps actually trained, early stops included); the last line is the
figure:

    .venv/bin/python bench/auto_budget.py studies/quickstart.yaml \\
        --auto '{per_decay_time: 10, min: 1000, max: 20000}'

Progress measures are off in both runs (`train.measures_every=0`): they cost two forward
passes over the table per evaluation and no phase reads them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections import defaultdict
from typing import Any

from grokstudy.config import PhaseConfig, TrialConfig
from grokstudy.study import load_study


def train_one(job: tuple[str, str, TrialConfig, PhaseConfig]) -> dict[str, Any]:
    """One trial to its outcome, stopped as the runner stops it."""
    import torch

    from grokstudy import member, train

    torch.set_num_threads(1)
    train.configure_process()
    budget, trial_id, cfg, rule = job
    start = time.perf_counter()
    curve = []
    outcome = None
    for record in train.run(cfg, train.init_state(cfg)):
        curve.append(record)
        if (outcome := member.judge(curve, cfg, rule)) is not None:
            break
    assert outcome is not None, f"{trial_id} ended without an outcome"
    return {
        "budget": budget,
        "trial_id": trial_id,
        "weight_decay": cfg.optimizer.weight_decay,
        "fraction": cfg.data.fraction,
        "seed": cfg.train.seed,
        "max_steps": cfg.train.max_steps,
        "steps": curve[-1].step,
        "phase": outcome.phase,
        "t_train": outcome.t_train,
        "t_val": outcome.t_val,
        "stop_reason": outcome.stop_reason,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "study", help="a grid study with a fixed train.max_steps, e.g. studies/quickstart.yaml"
    )
    parser.add_argument(
        "--auto", required=True, help="the auto form's mapping, e.g. '{per_decay_time: 10, ...}'"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE for both runs"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jsonl", default=None, help="also append one JSON line per trial here")
    args = parser.parse_args()

    from grokstudy import phases, search  # optuna: the study's own points, in its sampler's order

    common = [*args.overrides, "train.measures_every=0", "train.device=cpu"]
    studies = {
        "fixed": load_study(args.study, common),
        "auto": load_study(args.study, [*common, f"train.max_steps={{auto: {args.auto}}}"]),
    }
    assert studies["fixed"].auto_max_steps is None, "the baseline needs a fixed train.max_steps"
    from grokstudy.points import trial_id

    jobs = [
        (name, trial_id(point), study.trial(point), study.phases)
        for name, study in studies.items()
        for point in search.dry_run(study)
    ]
    jobs.sort(key=lambda j: -j[2].train.max_steps)  # the longest first: the pool ends together
    fixed_steps = studies["fixed"].base.train.max_steps
    print(
        f"# {args.study}: fixed max_steps {fixed_steps} against auto {args.auto}; {len(jobs)} trials",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(train_one, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row | {"auto": args.auto, "study": args.study}) + "\n")
    wall = time.perf_counter() - start

    seeds: dict[tuple[str, float, float], list[str]] = defaultdict(list)
    for r in rows:
        seeds[(r["budget"], r["weight_decay"], r["fraction"])].append(r["phase"])
    cells = sorted({(wd, f) for _, wd, f in seeds})
    label = {key: phases.vote(labels).phase for key, labels in seeds.items()}
    changed = [(wd, f) for wd, f in cells if label[("fixed", wd, f)] != label[("auto", wd, f)]]
    budgets = {r["weight_decay"]: r["max_steps"] for r in rows if r["budget"] == "auto"}
    print(
        f"\nweight_decay (auto budget) x fraction: fixed {fixed_steps} -> auto ({len(rows) // 2} trials each)"
    )
    fractions = sorted({f for _, f in cells})
    print("wd (steps) \\ fraction | " + " | ".join(f"{f:g}" for f in fractions))
    for wd in sorted({wd for wd, _ in cells}):
        shown = []
        for f in fractions:
            before, after = label[("fixed", wd, f)], label[("auto", wd, f)]
            shown.append(before if before == after else f"{before} -> {after}")
        print(f"{wd:g} ({budgets[wd]}) | " + " | ".join(shown))
    spent = {name: sum(r["steps"] for r in rows if r["budget"] == name) for name in studies}
    allowed = {name: sum(r["max_steps"] for r in rows if r["budget"] == name) for name in studies}
    trials_changed = sum(
        1
        for r in rows
        if r["budget"] == "auto"
        and next(b["phase"] for b in rows if b["budget"] == "fixed" and b["trial_id"] == r["trial_id"])
        != r["phase"]
    )
    print(f"trials whose phase changed: {trials_changed} of {len(rows) // 2}")
    print(f"model-steps trained: fixed {spent['fixed']:,}, auto {spent['auto']:,} "
          f"(budgets: fixed {allowed['fixed']:,}, auto {allowed['auto']:,}); wall {wall:.0f} s")  # fmt: skip
    print(
        f"cells changed: {len(changed)} of {len(cells)} "
        f"({', '.join(f'wd {wd:g} frac {f:g}' for wd, f in changed) or 'none'}); "
        f"model-steps auto/fixed: {spent['auto'] / spent['fixed']:.2f}x"
    )


if __name__ == "__main__":
    main()
