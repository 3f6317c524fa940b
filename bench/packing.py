"""Packing: model-steps per second of one pack of K trials against the same trials run one by one.

For each model and K, times K trials as one `packed.run_pack` and, in the same process,
the same trials one after another through `train.run` (a spread sample of up to
--sequential of them: one trial's speed does not depend on K). Both read the training
clock the records carry (`elapsed_s`, evaluation excluded), over the same step count.

    .venv/bin/python bench/packing.py [--device auto] [--steps 30,2] [--ks 1,4,16,64]
                                      [--models mlp,transformer] [--designs]

Models: the quickstart MLP (studies/quickstart.yaml: x+y mod 47, embedding 64, width 256;
members spread over its weight-decay and fraction axes, so shorter training sets are
padded) and Nanda et al.'s transformer (x+y mod 113, d_model 128, 4 heads, MLP 512, one
block, 30% of pairs; members differ in weight decay and seed). --designs also times the
choices packed.py documents: batched bmm forward vs torch.func.vmap, padded index sets vs
masks over the full table, compacting a retired member's rows vs masking them.
Each row also counts the pack's FLOPs per member-step analytically (forward + backward:
`step_efficiency.step_flops`, each member at its own training-set size) and reports the
achieved FLOP/s as a fraction of this device's own fp32 matmul rate, measured in the same run
(a large square `torch.mm`: the limit a step made of GEMMs could reach).
The closing line is the headline: the largest K of the last model, its pack/sequential ratio
and its fraction of the matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch
from step_efficiency import mm_rate, step_flops

from grokstudy import footprint, packed, packsize, train
from grokstudy.config import DataConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig, TrialConfig
from grokstudy.optim import LOSSES
from grokstudy.tasks import build_dataset

replace = dataclasses.replace

MODELS: dict[str, TrialConfig] = {
    "mlp": TrialConfig(
        task=TaskConfig(op="x+y", p=47),
        data=DataConfig(fraction=0.5),
        model=ModelConfig(kind="mlp", embed_dim=64, width=256, depth=1),
        optimizer=OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.98), weight_decay=1.0, warmup_steps=10),
        train=TrainConfig(eval_every=50),
    ),
    "transformer": TrialConfig(
        task=TaskConfig(op="x+y", p=113),
        data=DataConfig(fraction=0.3),
        model=ModelConfig(kind="transformer", embed_dim=128, width=512, depth=1, heads=4),
        optimizer=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0, warmup_steps=10),
        train=TrainConfig(eval_every=100),
    ),
}
QUICKSTART_FRACTIONS = (0.3, 0.45, 0.6, 0.8)


def members(
    name: str, base: TrialConfig, k: int, steps: int, device: str, precision: str = "highest"
) -> list[TrialConfig]:
    """K points of a weight decay (x fraction, for the MLP) grid, one seed each, `steps` long."""
    out = []
    for i in range(k):
        wd = 10 ** (-2 + 3 * (i % 5) / 4)  # quickstart's log axis 0.01..10, 5 points
        data = base.data
        if name == "mlp":
            data = replace(data, fraction=QUICKSTART_FRACTIONS[(i // 5) % 4])
        out.append(
            replace(
                base,
                data=data,
                optimizer=replace(base.optimizer, weight_decay=wd),
                train=replace(
                    base.train,
                    max_steps=steps,
                    eval_every=steps,
                    checkpoint_every=steps,
                    seed=i,
                    device=device,
                    matmul_precision=precision,
                ),
            )
        )
    return out


def sequential_rate(cfgs: list[TrialConfig], sample: int) -> float:
    """Model-steps/s of lone runs: a spread sample of the members, one after another."""
    picks = sorted({round(j * (len(cfgs) - 1) / max(sample - 1, 1)) for j in range(min(sample, len(cfgs)))})
    steps = seconds = 0.0
    for j in picks:
        last = list(train.run(cfgs[j]))[-1]
        steps, seconds = steps + last.step, seconds + last.elapsed_s
    return steps / seconds


def flops_per_member_step(cfgs: list[TrialConfig]) -> float:
    """Mean analytic FLOPs of one member's training step (forward + backward), each member at its
    own training-set size (full batch, or its minibatch)."""
    total = 0.0
    for cfg in cfgs:
        data = build_dataset(cfg.task, cfg.data)
        n = (
            data.train_x.shape[0]
            if cfg.train.batch_size is None
            else min(cfg.train.batch_size, data.train_x.shape[0])
        )
        total += step_flops(cfg, n, data.n_classes)
    return total / len(cfgs)


def pack_rate(cfgs: list[TrialConfig]) -> float:
    state = packed.init_pack(cfgs)
    for _ in packed.run_pack(state):
        pass
    return len(cfgs) * state.step / state.elapsed_s


def timed_steps(state: packed.PackState, steps: int) -> float:
    """Seconds per `_train_step` of the pack as it stands (after 2 warm-up steps)."""
    row_loss = functools.partial(LOSSES[state.cfgs[0].train.loss], reduction="none")

    def sync() -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)

    for _ in range(2):
        packed._train_step(state, row_loss)
        state.step += 1
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        packed._train_step(state, row_loss)
        state.step += 1
    sync()
    return (time.perf_counter() - start) / steps


def designs(names: list[str], device: str, k: int, steps: dict[str, int]) -> None:
    """The measurements behind packed.py's design choices, each a ratio within this run."""
    print(f"== designs (K={k}, {device})")
    for name in names:
        cfgs = members(name, MODELS[name], k, 10**6, device)
        n = max(3, steps[name] // 4)
        bmm = timed_steps(packed.init_pack(cfgs), n)
        saved = packed.BATCHED_FORWARDS
        packed.BATCHED_FORWARDS = {}
        try:
            vmapped = timed_steps(packed.init_pack(cfgs), n)
        except RuntimeError as err:  # torch 2.11's vmap of CUDA attention fails (see packed.py)
            print(
                f"   {name}: step {1e3 * bmm:.2f} ms batched bmm; torch.func.vmap failed: {str(err).splitlines()[0]}"
            )
            continue
        finally:
            packed.BATCHED_FORWARDS = saved
        print(
            f"   {name}: step {1e3 * bmm:.2f} ms batched bmm, {1e3 * vmapped:.2f} ms torch.func.vmap "
            f"-> bmm {vmapped / bmm:.2f}x faster"
        )

    # Members of different fractions: padded index sets (packed.py) vs masks over the full table.
    cfgs = [
        replace(c, data=replace(c.data, fraction=QUICKSTART_FRACTIONS[i % 4]))
        for i, c in enumerate(members("mlp", MODELS["mlp"], k, 10**6, device))
    ]
    n = max(3, steps["mlp"] // 4)
    padded = timed_steps(packed.init_pack(cfgs), n)
    state = packed.init_pack(cfgs)
    t = state.tensors
    table = state.labels.shape[0]
    t["data.rows"] = torch.arange(table, device=state.device).expand(len(cfgs), -1).contiguous()
    t["data.weight"] = t["data.train_mask"].double() / t["data.n_train"].unsqueeze(1)
    masked = timed_steps(state, n)
    print(
        f"   mlp fractions 0.3-0.8: step {1e3 * padded:.2f} ms padded index sets, {1e3 * masked:.2f} ms masks over the table -> padded {masked / padded:.2f}x faster"
    )

    # Half the members retired: compact the stack (packed.py) vs keep computing their rows.
    state = packed.init_pack(cfgs)
    full = timed_steps(state, n)
    for i in range(0, len(cfgs), 2):
        state.retire(i)
    start = time.perf_counter()
    packed._compact(state)
    compact_s = time.perf_counter() - start
    half = timed_steps(state, n)
    print(
        f"   mlp, {k // 2} of {k} retired: step {1e3 * half:.2f} ms compacted vs {1e3 * full:.2f} ms masked (all rows computed); compaction once {1e3 * compact_s:.2f} ms -> compact {full / half:.2f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--steps",
        default=None,
        help="steps per timed run: N, or MLP,TRANSFORMER (CPU default 30,2; GPU 300,100)",
    )
    parser.add_argument("--ks", default=None, help="pack sizes (default 1,4,16,64; 1,4,16,64,256 on a GPU)")
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (a Ray trial with cpu: 1 has one)"
    )
    parser.add_argument(
        "--sequential", type=int, default=None, help="lone runs timed per row, a spread sample (CPU 2, GPU 4)"
    )
    parser.add_argument(
        "--designs", action="store_true", help="also time the design choices (vmap, masks, compaction)"
    )
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high"),
        default="highest",
        help="train.matmul_precision of every run (high: TF32 on a GPU); the matmul rate the "
        "fractions are of stays true fp32",
    )
    parser.add_argument(
        "--auto",
        action="store_true",
        help="also print the pack size resources.pack: auto would choose for each model (packsize.py)",
    )
    args = parser.parse_args()
    train.configure_process()
    torch.set_num_threads(args.threads)
    device = train.resolve_device(args.device).type
    gpu = device == "cuda"
    ks = [int(k) for k in (args.ks or ("1,4,16,64,256" if gpu else "1,4,16,64")).split(",")]
    names = args.models.split(",")
    counts = [int(s) for s in (args.steps or ("300,100" if gpu else "30,2")).split(",")]
    steps = dict(zip(("mlp", "transformer"), counts * 2 if len(counts) == 1 else counts, strict=False))
    what = (
        torch.cuda.get_device_name()
        if gpu
        else f"{torch.get_num_threads()} thread(s), {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"torch {torch.__version__}, {device} ({what})")

    # Warm-up: allocator, kernels, cuBLAS handles, so the first timed row is not charged for them.
    for name in names:
        warm = members(name, MODELS[name], 2, 3, device, args.matmul_precision)
        sequential_rate(warm[:1], 1)
        pack_rate(warm)

    size = 8192 if gpu else 1024
    torch.set_float32_matmul_precision("highest")  # the limit is true fp32 whatever the runs use
    limit = mm_rate(size, size, size, device=device)
    print(f"fp32 matmul rate of this device: {limit / 1e9:.1f} GFLOP/s (torch.mm {size}^3, best of 3)")
    print(
        f"{'model':<16}{'K':>5}{'steps':>7}{'sequential':>14}{'pack':>14}{'pack/seq':>10}"
        f"{'GFLOP/s':>10}{'of mm':>8}   (model-steps/s)"
    )
    headline = ""
    for name in names:
        base = MODELS[name]
        label = f"{name} p={base.task.p}"
        if args.auto:
            cfg = members(name, base, 1, steps[name], device, args.matmul_precision)[0]
            memory = torch.cuda.mem_get_info()[0] if gpu else footprint.machine_bytes()
            print(
                f"{label}: resources.pack: auto -> {packsize.auto(cfg, max(ks), memory, device).describe()}"
            )
        for k in ks:
            cfgs = members(name, base, k, steps[name], device, args.matmul_precision)
            seq = sequential_rate(cfgs, args.sequential or (4 if gpu else 2))
            pack = pack_rate(cfgs)
            achieved = pack * flops_per_member_step(cfgs)
            print(
                f"{label:<16}{k:>5}{steps[name]:>7}{seq:>14.1f}{pack:>14.1f}{pack / seq:>9.2f}x"
                f"{achieved / 1e9:>10.1f}{achieved / limit:>8.1%}",
                flush=True,
            )
            headline = (
                f"packing ({args.matmul_precision}): {label} K={k} pack/sequential model-steps/s = {pack / seq:.2f}x, "
                f"{achieved / limit:.1%} of the fp32 matmul rate"
            )
        if gpu:
            torch.cuda.empty_cache()
    if args.designs:
        designs(names, device, 64 if gpu else 16, steps)
    print(headline)


if __name__ == "__main__":
    main()
