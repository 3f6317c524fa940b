"""How close a training step gets to the machine's matmul rate, and what evaluation costs.

Trains the reference MLP (x+y mod 97, embedding 128, width 512, 30% of pairs,
full batch, AdamW) through `train.run`, and in the same process, between its
eval points, times `torch.mm` of the model's largest GEMM at the same thread
count. Both are best-of-rounds, so a shared, noisy machine affects them alike.

    .venv/bin/python bench/step_efficiency.py [--threads 1] [--steps 400]

FLOPs per full-batch step (N training pairs, E embedding, W width, C classes,
T = 3 tokens, d = d_model): every GEMM runs once forward and twice backward
(weight gradient and input gradient; the input gradient of the first layer
feeds the embedding), so a step is 3x the forward's 2 * N * sum(fan_in * fan_out):
  MLP:          6 * N * (2E*W + (depth-1)*W*W + W*C)
  transformer:  6 * N * (depth * (T*(4d^2 + 2dW) + 2*T^2*d) + d*C)   # qkv+out, MLP, scores+mix, unembed at "="
Not counted (all O(N*W) or O(params)): gathers, biases, activations, the
float64 log-softmax, the optimizer.

Targets: MLP achieved/peak >= 0.6; evaluation overhead of the default schedule
(`TrainConfig()`: every 100 of 10,000 steps plus early log-spaced steps) <= 10%.
The closing line is the headline ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from grokstudy import train
from grokstudy.config import DataConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig, TrialConfig
from grokstudy.optim import build_loss

REFERENCE = TrialConfig(
    task=TaskConfig(op="x+y", p=97),
    data=DataConfig(fraction=0.3),
    model=ModelConfig(kind="mlp", embed_dim=128, width=512, depth=1),
    optimizer=OptimConfig(name="adamw", lr=1e-3, weight_decay=1.0),
    train=TrainConfig(device="cpu"),
)
NANDA = dataclasses.replace(
    REFERENCE,
    task=TaskConfig(op="x+y", p=113),
    model=ModelConfig(kind="transformer", embed_dim=128, width=512, depth=1, heads=4),
)


def step_flops(cfg: TrialConfig, n: int, n_classes: int) -> float:
    m = cfg.model
    if m.kind == "mlp":
        return 6.0 * n * (2 * m.embed_dim * m.width + (m.depth - 1) * m.width**2 + m.width * n_classes)
    if m.kind == "transformer":
        d, t = m.embed_dim, 3
        per_block = t * (4 * d * d + 2 * d * m.width) + 2 * t * t * d
        return 6.0 * n * (m.depth * per_block + d * n_classes)
    raise ValueError(m.kind)


def mm_rate(rows: int, inner: int, cols: int, reps: int = 10, device: str = "cpu") -> float:
    """Best-of-3 fp32 GEMM rate (FLOP/s) of [rows, inner] @ [inner, cols] on `device` (at the
    process's float32 matmul precision: "highest", the default, is true fp32 on a GPU too)."""
    a, b = torch.randn(rows, inner, device=device), torch.randn(inner, cols, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * rows * inner * cols / best


def measure(name: str, cfg: TrialConfig, steps: int, interval: int) -> float:
    """Print the figures for one model; returns achieved/peak."""
    state = train.init_state(cfg)
    n, n_classes = state.data.train_x.shape[0], state.data.n_classes
    m = cfg.model
    gemm = (n, 2 * m.embed_dim, m.width) if m.kind == "mlp" else (3 * n, m.embed_dim, m.width)
    flops = step_flops(cfg, n, n_classes)

    # Training: per-interval times from the records' elapsed_s (evaluation excluded by
    # construction); the matmul peak is timed between intervals, outside elapsed_s.
    timed = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, max_steps=steps, eval_every=interval)
    )
    per_step, peaks, last = [], [], None
    for record in train.run(timed, state):
        if last is not None and record.step % interval == 0 and record.step > interval:  # skip warm-up
            per_step.append((record.elapsed_s - last.elapsed_s) / (record.step - last.step))
        last = record
        peaks.append(mm_rate(*gemm))
    step_s, peak = min(per_step), max(peaks)
    achieved = flops / step_s

    # Evaluation: the real `evaluate` on the full train and validation sets.
    loss_fn = build_loss(cfg.train.loss)
    evals = []
    for _ in range(5):
        start = time.perf_counter()
        train.evaluate(cfg, state, loss_fn)
        evals.append(time.perf_counter() - start)
    eval_s = min(evals)
    default = TrainConfig()
    overhead = len(train.eval_steps(default)) * eval_s / (default.max_steps * step_s)

    print(f"== {name}: {sum(p.numel() for p in state.model.parameters()):,} params, N={n} training pairs")
    print(
        f"   step: {flops / 1e9:.3f} GFLOP, best {1e3 * step_s:.2f} ms (median {1e3 * statistics.median(per_step):.2f})"
    )
    print(
        f"   achieved {achieved / 1e9:.1f} GFLOP/s; torch.mm {gemm[0]}x{gemm[1]}x{gemm[2]} peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"   achieved/peak = {achieved / peak:.2f}")
    print(
        f"   evaluation: {1e3 * eval_s:.2f} ms each ({eval_s / step_s:.2f} steps); default schedule "
        f"({len(train.eval_steps(default))} evals / {default.max_steps} steps) slows training by {100 * overhead:.1f}%"
    )
    return achieved / peak, overhead


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400, help="training steps per model (after 50 warm-up)")
    parser.add_argument("--skip-transformer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.configure_process()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {torch.backends.cpu.get_cpu_capability()}"
    )

    ratio, overhead = measure("reference MLP (x+y mod 97, E128, W512, 30%)", REFERENCE, args.steps + 50, 50)

    # A direct check of the overhead model: a real run with evals every 100 steps vs its training time.
    direct = dataclasses.replace(REFERENCE, train=dataclasses.replace(REFERENCE.train, max_steps=1000))
    state = train.init_state(direct)
    start = time.perf_counter()
    records = list(train.run(direct, state))
    wall = time.perf_counter() - start
    print(
        f"   direct: 1,000 steps with {len(records)} evals (eval_every 100, early steps included): "
        f"wall {wall:.1f} s vs training {records[-1].elapsed_s:.1f} s -> +{100 * (wall / records[-1].elapsed_s - 1):.1f}%"
    )
    if not args.skip_transformer:
        measure("1-layer transformer (Nanda et al.: x+y mod 113, d128, 4 heads, MLP 512, 30%)", NANDA, 60, 20)
    print(
        f"headline: reference MLP step at {ratio:.2f} of the fp32 matmul peak (target >= 0.6); "
        f"default eval schedule overhead {100 * overhead:.1f}% (target <= 10%)"
    )


if __name__ == "__main__":
    main()
