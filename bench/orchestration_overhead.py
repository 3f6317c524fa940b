"""What Ray Tune + Optuna + MLflow cost on top of the bare training core.

The same 8 small trials run (a) directly with `train.run`, one process per core,
and (b) as a `grokstudy run` study on an embedded Ray (tracking to a local
sqlite MLflow store, checkpoints, Parquet tables, figures). Both run in this one
invocation on this machine, so the ratio is fair even on a noisy, shared box.

    .venv/bin/python bench/orchestration_overhead.py [--steps 1500] [--rounds 3]

(a) and (b) alternate `--rounds` times and the best of each is compared: on a shared machine a
neighbour's load only ever adds time. Target: b/a <= 1.15 with Ray start-up excluded. The
closing line is that ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

STUDY = """
name: bench-orchestration
task: {{op: "x+y", p: 47}}
data: {{fraction: 0.5}}
model: {{kind: mlp, embed_dim: 64, width: 256}}
train: {{max_steps: {steps}, eval_every: 100, checkpoint_every: 500}}
optimizer: {{name: adamw, lr: 3.0e-3, weight_decay: 0.0}}
search:
  sampler: grid
  space:
    data.fraction: {{values: [0.3, 0.4, 0.5, 0.6]}}
  seeds: 2
resources: {{cpu: 1}}
"""


def _direct_trial(cfg) -> int:
    import torch

    from grokstudy import train

    torch.set_num_threads(1)
    train.configure_process()
    state = train.init_state(cfg)
    records = list(train.run(cfg, state))
    return records[-1].step


def _direct(configs: list, cores: int) -> float:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(cores) as pool:
        pool.map(_direct_trial, configs)
    return time.perf_counter() - t0


def _study(study, out_dir: Path, cores: int, n_trials: int) -> tuple[float, float]:
    """(Ray start-up, the study after it) in seconds."""
    import ray

    from grokstudy import runner

    t0 = time.perf_counter()
    runner.init_ray(None, num_cpus=cores)
    startup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outcome = runner.run_study(study, out_dir=out_dir, formats=("png",))
    study_s = time.perf_counter() - t1
    ray.shutdown()
    assert outcome.n_trials == n_trials and not outcome.failed
    return startup_s, study_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=1500, help="steps per trial (weight decay 0: no early stop)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="(a) then (b), this many times; the best of each is compared"
    )
    args = parser.parse_args()

    from grokstudy import points
    from grokstudy.study import load_study

    workdir = Path(tempfile.mkdtemp(prefix="grokstudy-bench-"))
    study_file = workdir / "study.yaml"
    study_file.write_text(STUDY.format(steps=args.steps))
    study = load_study(study_file)
    configs = [
        study.trial(p | {"train.seed": s})
        for p in points.grid_points(study)
        for s in range(study.search.seeds)
    ]
    cores = os.cpu_count() or 1
    print(f"{len(configs)} trials x {args.steps} steps, {cores} cores, {args.rounds} rounds")
    direct, startup, studies = [], [], []
    for r in range(args.rounds):
        direct.append(_direct(configs, cores))
        up, run = _study(study, workdir / f"out-{r}", cores, len(configs))
        startup.append(up)
        studies.append(run)
        print(
            f"round {r + 1}: (a) training core, {cores} processes {direct[-1]:6.1f} s;"
            f" (b) grokstudy run on embedded Ray {run:6.1f} s (+ Ray start-up {up:.1f} s)"
        )
    a, b = min(direct), min(studies)
    print(f"best of {args.rounds}: (a) {a:.1f} s, (b) {b:.1f} s (+ Ray start-up {min(startup):.1f} s)")
    print(f"ratio b/a including start-up: {(b + min(startup)) / a:.3f}")
    print(f"ratio b/a excluding start-up: {b / a:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
