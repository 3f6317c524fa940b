"""What Nanda et al.'s progress measures cost: a trial with them at every evaluation against
the same trial without (`train.measures_every: 1` against `0`), as a share of its time.

Trains each study's base trial through `train.run` (evaluation included, as a study runs
it), the two settings alternating round by round so a shared, noisy machine slows both
alike, best of rounds each. Studies: the quickstart (MLP, x+y mod 47) and Nanda et al.'s
model at the `nanda2023-cpu` shapes (transformer, d_model 64, p = 47), both at their own
eval_every; `--full` adds the paper's size (p = 113, d_model 128), which is slow on a CPU.

    .venv/bin/python bench/progress_cost.py [--steps 600] [--rounds 3] [--threads 1] [--full]

Target: <= 10% of training time for both (issue "See the circuit form"). Each measured
evaluation runs two forward passes over the table's group rows (the anti-diagonal sums,
then the excluded loss on the training rows); the FFTs are O(p C log p).
The closing line is the larger of the two shares.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from grokstudy import train
from grokstudy.config import TrialConfig, with_overrides
from grokstudy.study import load_study

STUDIES = Path(__file__).resolve().parent.parent / "studies"
CASES = {"quickstart MLP": "quickstart.yaml", "Nanda transformer (cpu shapes)": "papers/nanda2023-cpu.yaml"}


def base_trial(path: Path, steps: int) -> TrialConfig:
    """The study's base trial on the CPU, trained `steps` steps and never stopped early."""
    return with_overrides(load_study(path).base, {"train.max_steps": steps, "train.device": "cpu"})


def seconds(cfg: TrialConfig) -> float:
    start = time.perf_counter()
    for _ in train.run(cfg):
        pass
    return time.perf_counter() - start


def cost(cfg: TrialConfig, rounds: int) -> tuple[float, float, int]:
    """(seconds without, seconds with, evaluations that took the measures): best of `rounds`."""
    without = with_overrides(cfg, {"train.measures_every": 0})
    measured = with_overrides(cfg, {"train.measures_every": 1})
    seconds(without)  # warm-up: allocator, kernels
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        times[0].append(seconds(without))
        times[1].append(seconds(measured))
    evals = sum(train.measures_due(measured.train, s) for s in train.eval_steps(measured.train))
    return min(times[0]), min(times[1]), evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray trial's: 1)")
    parser.add_argument("--full", action="store_true", help="also Nanda et al.'s size (p 113, d_model 128)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.configure_process()
    cases = {name: base_trial(STUDIES / file, args.steps) for name, file in CASES.items()}
    if args.full:
        cases["Nanda transformer (paper size)"] = base_trial(STUDIES / "papers/nanda2023.yaml", args.steps)
    shares = []
    print(
        f"{'case':32} {'eval_every':>10} {'without s':>10} {'with s':>8} {'measured evals':>15} {'cost':>7}"
    )
    for name, cfg in cases.items():
        without, measured, evals = cost(cfg, args.rounds)
        share = (measured - without) / without
        shares.append(share)
        print(
            f"{name:32} {cfg.train.eval_every:>10} {without:>10.2f} {measured:>8.2f} {evals:>15} {share:>7.1%}"
        )
    print(
        f"progress measures at every evaluation cost {max(shares):.1%} of a trial's time (worst case above)"
    )


if __name__ == "__main__":
    main()
