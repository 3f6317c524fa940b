"""Map phases over weight decay x training fraction with bare `train.run` calls (no Ray, no MLflow).

One single-threaded process per grid point, `--workers` at a time. Prints t_train,
t_val (eval-grid steps, θ = 0.99) and the phase label of `grokstudy.phases`
for each point, then a compact table. Used to choose the README demo and the
quickstart study's grid; the figures are quoted in docs, so keep the command
with them:

    .venv/bin/python bench/phase_grid.py --model gromov --p 47 --width 256 --lr 1e-2
        --weight-decay 0,0.1,0.3,1,3,10 --fraction 0.2,0.3,0.4,0.5,0.7 --seeds 2 --max-steps 4000
        (one command line)

A point stops once generalization has held 500 steps (the rest tells nothing new).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time

from grokstudy.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    PhaseConfig,
    TaskConfig,
    TrainConfig,
    TrialConfig,
)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def trial(args: argparse.Namespace, wd: float, fraction: float, seed: int) -> TrialConfig:
    return TrialConfig(
        task=TaskConfig(op=args.op, p=args.p),
        data=DataConfig(fraction=fraction),
        model=ModelConfig(
            kind=args.model,
            embed_dim=args.embed_dim,
            width=args.width,
            activation=args.activation,
            init_scale=args.init_scale,
        ),
        optimizer=OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=wd, betas=(0.9, args.beta2)),
        train=TrainConfig(
            max_steps=args.max_steps, eval_every=args.eval_every, seed=seed, loss=args.loss, device="cpu"
        ),
    )


def one_point(job: tuple[TrialConfig, float, float, int]) -> dict:
    import torch

    from grokstudy import phases, train

    torch.set_num_threads(1)
    train.configure_process()
    cfg, wd, fraction, seed = job
    start = time.perf_counter()
    records = []
    for record in train.run(cfg, train.init_state(cfg)):
        records.append(record)
        # Stop once generalization has held 500 steps: the rest of the budget tells nothing new.
        t_val = phases.classify_records(records, PhaseConfig(), cfg.train.max_steps).t_val
        if t_val is not None and record.step - t_val >= 500:
            break
    verdict = phases.classify_records(records, PhaseConfig(), cfg.train.max_steps)
    last = records[-1]
    return {
        "weight_decay": wd,
        "fraction": fraction,
        "seed": seed,
        "phase": verdict.phase,
        "t_train": verdict.t_train,
        "t_val": verdict.t_val,
        "best_val_acc": round(verdict.best_val_acc, 4),
        "steps": last.step,
        "ms_per_step": round(1e3 * last.elapsed_s / max(last.step, 1), 2),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--op", default="x+y")
    parser.add_argument("--p", type=int, default=47)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--init-scale", type=float, default=1.0)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta2", type=float, default=0.98)
    parser.add_argument("--loss", default="cross_entropy")
    parser.add_argument("--weight-decay", type=floats, default=[0.0, 0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--fraction", type=floats, default=[0.3, 0.5, 0.7])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jsonl", default=None, help="also append one JSON line per point here")
    args = parser.parse_args()

    points = list(itertools.product(args.weight_decay, args.fraction, range(args.seeds)))
    jobs = [(trial(args, wd, f, s), wd, f, s) for wd, f, s in points]
    print(f"# {vars(args)}", flush=True)
    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(one_point, jobs):
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps({**row, "config": {k: str(v) for k, v in vars(args).items()}}) + "\n")

    print("\nweight_decay x fraction: phase (t_train/t_val), seed 0")
    print("wd \\ frac | " + " | ".join(f"{f:g}" for f in args.fraction))
    for wd in args.weight_decay:
        cells = []
        for f in args.fraction:
            r = next(r for r in results if r["weight_decay"] == wd and r["fraction"] == f and r["seed"] == 0)
            cells.append(f"{r['phase'][:4]} {r['t_train']}/{r['t_val']}")
        print(f"{wd:g} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
