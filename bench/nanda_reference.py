"""Nanda et al.'s modular-addition transformer, re-implemented, against grokstudy's: time to generalize over seeds.

Issue 13: `grokstudy train` with the transformer seemed to generalize about twice as
soon as a bare re-implementation of Nanda et al. 2023 ("Progress measures for grokking
via mechanistic interpretability", repo mechanistic-interpretability-grokking/
progress-measures-paper, `transformers.py`). This script trains both on the same seeds
(seed s: the split and the init both come from s) and compares the distributions.

    .venv/bin/python bench/nanda_reference.py [--device auto] [--p 113] [--fraction 0.5]
        [--seeds 0-7] [--max-steps 3000] [--eval-every 25]
        [--impl both|nanda|grokstudy] [--variants swap|single|all|NAME,...]
        [--jobs 1] [--threads N] [--budget-s S] [--json out.json] [--check]

The two implementations
- `nanda`: `NandaTransformer` below and `train_nanda`, written from Nanda's code (not
  copied): `Embed`/`PosEmbed`/`Attention`/`MLP`/`Unembed` with its shapes, its init
  (randn / sqrt(d_model), W_U / sqrt(d_vocab), zero biases, drawn in its order from
  torch.manual_seed(s)), d_vocab = p + 1 and the loss over all p + 1 logits at the last
  position (`full_loss`), AdamW(lr 1e-3, wd 1, betas (0.9, 0.98)) on every parameter,
  LambdaLR(min(step/10, 1)) (lr 0 on the first update), full batch, the split of
  `gen_train_test` (all (i, j, p) triples, random.seed(s), random.shuffle, the first
  int(frac * p^2) train), the log-softmax in float64.
- `grokstudy`: `grokstudy.train.init_state` + `grokstudy.train.run` on a TrialConfig with
  task x+y mod p, fraction F, split_seed s, the transformer (128, 4 heads, 512, 1 block,
  ReLU, no LayerNorm), AdamW (1e-3, (0.9, 0.98), wd 1, 10 warm-up steps), train.seed s.

Every difference between them (what the variants switch one at a time):
  classes  Nanda's loss and accuracy use all p + 1 logits (the "=" class too; only his
           metrics slice [:-1]); grokstudy has p output classes.      variant gs+p1
  W_U std  1/sqrt(p + 1) vs 1/sqrt(p) (follows the class count).      (with gs+p1)
  decay    Nanda decays every tensor (b_in, b_out too); grokstudy dim >= 2 only.
                                                                       variant gs+decay_all
  warm-up  Nanda: lr * min(k/10, 1) for update k (0 on the first, Adam's moments and step
           count still advance); grokstudy: lr * min((k+1)/10, 1).   variant gs+warmup0
  split    random.shuffle of the (i, j) list, int(); torch.randperm(Generator(s)), round()
           (same size at 0.5: 6,384; 3,830 vs 3,831 at 0.3).          variant gs+split
  init     same distributions for every tensor, different draws (Nanda's order and
           layout: W_E (d, p+1), W_pos, W_K, W_Q, W_V (heads, d_head, d), W_O, W_in, b_in,
           W_out, b_out, W_U; grokstudy's fused qkv (3d, d)). Nanda's code never seeds
           torch itself; here his init is drawn from torch.manual_seed(s). variant gs+init
  AdamW    torch's default (non-fused) implementation vs grokstudy's fused kernel.
                                                                       variant gs+foreach
  loss     both float64 here (Nanda's comment and paper); his stored `helpers.py` casts
           to float32.                                                 variant nanda+f32
  same     attention scale 1/sqrt(d_head), causal mask (-1e10 after tril vs SDPA's -inf:
           both exactly 0 after the softmax), no attention biases, W_in/W_out std
           1/sqrt(d_model) (not 1/sqrt(d_mlp)), zero MLP biases, no LayerNorm (Nanda's
           LayerNorm modules are commented out), "=" token p, read at the last position.
  no effect  Nanda unembeds all three positions and computes the test loss with autograd
           every step; grokstudy evaluates under no_grad at its eval steps.
Variants `gs+nanda` (grokstudy's module and loop with every Nanda choice above: p + 1
classes, his split, his initial weights copied in, warm-up 0, decay all, for-each AdamW)
and `nanda+gs` (the re-implementation with every grokstudy choice, grokstudy's initial
weights copied in) swap the model code alone: each should track its counterpart seed by
seed if the two models compute the same function.

Measures per run (first eval step from which the condition holds to the run's end):
t_train (train acc >= 0.99), t_val_acc (val acc >= 0.99), t_val_loss (val loss < 1e-2,
grokstudy's phases.loss_threshold after Nanda's test-loss criterion). A run stops early once all three have held for --stop-after
steps (then "to the end" means to that stop). Runs that never get there count as
max_steps + eval_every in the medians and the Mann-Whitney U test (shown as ">N").
Both sides evaluate at grokstudy's eval steps (0, 1, 2, 5, 10, 20 below eval_every, then
every eval_every) with one host sync per evaluation, in processes set up alike
(grokstudy.train.configure_process, so denormals flush on the CPU; no TF32 on CUDA). The last line is the figure:
median t_val_loss of nanda vs grokstudy per fraction, their ratio and the two-sided
Mann-Whitney p-value.

Nanda's own stored runs (saved_runs/mod_addition_frac_train_sweep.pth: one run per
fraction, each stopped at test loss ~3e-6) reach test loss < 1e-2 at step 1,109 for
fraction 0.5 and 8,258 for 0.3; their first two losses are equal (lr 0 on update 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grokstudy import train as gtrain
from grokstudy.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    TrialConfig,
    validate_trial,
)
from grokstudy.models import build_model
from grokstudy.optim import build_loss, build_optimizer
from grokstudy.tasks import Dataset, build_dataset

replace = dataclasses.replace

ACC = 0.99
LOSS = 1e-2
D_MODEL, HEADS, D_MLP, N_CTX = 128, 4, 512, 3

# ---- the re-implementation ------------------------------------------------------------------


class NandaTransformer(nn.Module):
    """One block, no LayerNorm, d_vocab = p + 1; parameters created (and drawn) in Nanda's order."""

    def __init__(self, p: int, d_model: int = D_MODEL, heads: int = HEADS, d_mlp: int = D_MLP) -> None:
        super().__init__()
        d_vocab = p + 1
        self.heads, self.d_head = heads, d_model // heads
        s = math.sqrt(d_model)
        self.W_E = nn.Parameter(torch.randn(d_model, d_vocab) / s)
        self.W_pos = nn.Parameter(torch.randn(N_CTX, d_model) / s)
        self.W_K = nn.Parameter(torch.randn(heads, self.d_head, d_model) / s)
        self.W_Q = nn.Parameter(torch.randn(heads, self.d_head, d_model) / s)
        self.W_V = nn.Parameter(torch.randn(heads, self.d_head, d_model) / s)
        self.W_O = nn.Parameter(torch.randn(d_model, heads * self.d_head) / s)
        self.W_in = nn.Parameter(torch.randn(d_mlp, d_model) / s)
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_model, d_mlp) / s)  # 1/sqrt(d_model), as Nanda's
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.W_U = nn.Parameter(torch.randn(d_model, d_vocab) / math.sqrt(d_vocab))
        self.register_buffer("causal", torch.tril(torch.ones(N_CTX, N_CTX)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        k = torch.einsum("nhd,btd->bnth", self.W_K, x)  # (B, heads, key pos, d_head)
        q = torch.einsum("nhd,btd->bnth", self.W_Q, x)
        v = torch.einsum("nhd,btd->bnth", self.W_V, x)
        scores = torch.einsum("bnkh,bnqh->bnqk", k, q)  # (B, heads, query, key)
        keep = self.causal[:t, :t]
        scores = torch.tril(scores) - 1e10 * (1 - keep)  # Nanda's mask: a large negative, not -inf
        pattern = F.softmax(scores / math.sqrt(self.d_head), dim=-1)
        z = torch.einsum("bnkh,bnqk->bnqh", v, pattern)  # (B, heads, query, d_head)
        z = z.permute(0, 2, 1, 3).reshape(b, t, self.heads * self.d_head)  # heads outer, as (i h)
        return torch.einsum("df,btf->btd", self.W_O, z)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(torch.einsum("md,btd->btm", self.W_in, x) + self.b_in)
        return torch.einsum("dm,btm->btd", self.W_out, h) + self.b_out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 3) -> logits (B, 3, p + 1), every position unembedded as in Nanda's code."""
        x = self.W_E.T[tokens] + self.W_pos[: tokens.shape[1]]  # W_E[:, x] rearranged
        x = x + self.attention(x)
        x = x + self.mlp(x)
        return x @ self.W_U


def nanda_init(p: int, seed: int) -> NandaTransformer:
    """The re-implementation's initial model for `seed` (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NandaTransformer(p)


def nanda_split(p: int, fraction: float, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`gen_train_test`: every (i, j) with i outer, random.seed(seed), shuffle, first int(frac * p^2) train."""
    pairs = [(i, j) for i in range(p) for j in range(p)]
    rng = random.Random(seed)  # the same stream as random.seed(seed); random.shuffle
    rng.shuffle(pairs)
    cut = int(fraction * len(pairs))
    return pairs[:cut], pairs[cut:]


def nanda_dataset(p: int, fraction: float, seed: int) -> Dataset:
    """Nanda's split as a grokstudy Dataset (operands (a, b), label (a + b) mod p)."""
    tr, va = nanda_split(p, fraction, seed)
    tx, vx = torch.tensor(tr), torch.tensor(va)
    return Dataset(tx, (tx[:, 0] + tx[:, 1]) % p, vx, (vx[:, 0] + vx[:, 1]) % p, p, p)


def high_precision_ce(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`cross_entropy_high_precision`: -mean log_softmax(logits)[label], the log-softmax in `dtype`."""
    logprobs = F.log_softmax(logits.to(dtype), dim=-1)
    return -logprobs.gather(-1, labels[:, None]).mean()


# ---- weights between the two layouts ----------------------------------------------------------


@torch.no_grad()
def gs_layout(ref: NandaTransformer, grad: bool = False) -> dict[str, torch.Tensor]:
    """The re-implementation's parameters (or gradients) under grokstudy's names and shapes.

    The unembedding keeps all p + 1 rows: slice it to grokstudy's class count.
    """

    def get(t: torch.Tensor) -> torch.Tensor:
        return t.grad if grad else t

    d = ref.W_E.shape[0]
    return {
        "embed.weight": get(ref.W_E).T,
        "pos": get(ref.W_pos),
        "blocks.0.attn.qkv.weight": torch.cat(
            [get(ref.W_Q).reshape(d, d), get(ref.W_K).reshape(d, d), get(ref.W_V).reshape(d, d)]
        ),
        "blocks.0.attn.out.weight": get(ref.W_O),
        "blocks.0.mlp_in.weight": get(ref.W_in),
        "blocks.0.mlp_in.bias": get(ref.b_in),
        "blocks.0.mlp_out.weight": get(ref.W_out),
        "blocks.0.mlp_out.bias": get(ref.b_out),
        "unembed.weight": get(ref.W_U).T,
    }


@torch.no_grad()
def copy_nanda_to_gs(ref: NandaTransformer, gs: nn.Module) -> None:
    """grokstudy's Transformer takes the re-implementation's weights (the first C unembedding rows)."""
    src = gs_layout(ref)
    for name, p in gs.named_parameters():
        p.copy_(src[name][: p.shape[0]])


@torch.no_grad()
def copy_gs_to_nanda(gs: nn.Module, ref: NandaTransformer) -> None:
    """The re-implementation takes grokstudy's weights; with C = p classes W_U's last column stays."""
    w = dict(gs.named_parameters())
    d, heads = ref.W_E.shape[0], ref.heads
    ref.W_E.copy_(w["embed.weight"].T)
    ref.W_pos.copy_(w["pos"])
    q, k, v = w["blocks.0.attn.qkv.weight"].split(d)
    ref.W_Q.copy_(q.reshape(heads, d // heads, d))
    ref.W_K.copy_(k.reshape(heads, d // heads, d))
    ref.W_V.copy_(v.reshape(heads, d // heads, d))
    ref.W_O.copy_(w["blocks.0.attn.out.weight"])
    ref.W_in.copy_(w["blocks.0.mlp_in.weight"])
    ref.b_in.copy_(w["blocks.0.mlp_in.bias"])
    ref.W_out.copy_(w["blocks.0.mlp_out.weight"])
    ref.b_out.copy_(w["blocks.0.mlp_out.bias"])
    u = w["unembed.weight"]
    ref.W_U[:, : u.shape[0]].copy_(u.T)


# ---- one run ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The choices of a re-implementation run: Nanda's by default."""

    classes: str = "p+1"  # p+1: loss/accuracy over all d_vocab logits (Nanda) | p: logits[:, :p]
    decay: str = "all"  # all (Nanda) | matrices: dim >= 2 (grokstudy)
    warmup: str = "zero"  # zero: lr*min(k/10, 1) (Nanda) | lr/steps: lr*min((k+1)/10, 1) (grokstudy)
    split: str = "nanda"  # nanda: random.shuffle, int() | grokstudy: build_dataset
    init: str = "nanda"  # nanda: own draw from manual_seed(s) | grokstudy: grokstudy's initial weights
    loss_dtype: str = "float64"  # float64 (paper, comment) | float32 (the stored helpers.py)
    adam: str = "default"  # default: torch's AdamW as Nanda calls it | fused (grokstudy)


NANDA = Recipe()
NANDA_WITH_GS = Recipe(
    classes="p", decay="matrices", warmup="lr/steps", split="grokstudy", init="grokstudy", adam="fused"
)

GS_VARIANTS: dict[str, dict[str, Any]] = {
    # grokstudy's module and loop (train.run) with Nanda's choices switched on.
    "gs+warmup0": {"warmup0": True},
    "gs+decay_all": {"decay_all": True},
    "gs+p1": {"p1": True},
    "gs+split": {"split": True},
    "gs+init": {"init": True},
    "gs+foreach": {"foreach": True},
    "gs+nanda": {
        "warmup0": True,
        "decay_all": True,
        "p1": True,
        "split": True,
        "init": True,
        "foreach": True,
    },
}
NANDA_VARIANTS: dict[str, Recipe] = {
    "nanda+gs": NANDA_WITH_GS,
    "nanda+f32": replace(NANDA, loss_dtype="float32"),
}
VARIANT_GROUPS = {
    "swap": ["gs+nanda", "nanda+gs"],
    "single": ["gs+warmup0", "gs+decay_all", "gs+p1", "gs+split", "gs+init", "gs+foreach"],
    "all": [*GS_VARIANTS, *NANDA_VARIANTS],
}


def trial_config(
    p: int, fraction: float, seed: int, max_steps: int, eval_every: int, device: str
) -> TrialConfig:
    return TrialConfig(
        task=TaskConfig(op="x+y", p=p),
        data=DataConfig(fraction=fraction, split_seed=seed),
        model=ModelConfig(
            kind="transformer",
            embed_dim=D_MODEL,
            width=D_MLP,
            depth=1,
            heads=HEADS,
            activation="relu",
            layer_norm=False,
        ),
        optimizer=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0, warmup_steps=10),
        train=TrainConfig(
            max_steps=max_steps,
            eval_every=eval_every,
            checkpoint_every=eval_every,
            loss="cross_entropy",
            seed=seed,
            device=device,
        ),
    )


Point = tuple[int, float, float, float, float]  # step, train loss, train acc, val loss, val acc


def train_nanda(cfg: TrialConfig, recipe: Recipe, device: torch.device) -> Iterator[Point]:
    """The re-implementation's loop: full batch, LambdaLR, AdamW; yields at grokstudy's eval steps."""
    p, fraction, seed = cfg.task.p, cfg.data.fraction, cfg.train.seed
    if recipe.split == "nanda":
        data = nanda_dataset(p, fraction, seed)
    else:
        data = build_dataset(cfg.task, cfg.data)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.full_like(x[:, :1], p)], dim=1).to(device)  # (N, 3): a, b, "="

    tx, ty, vx, vy = tokens(data.train_x), data.train_y.to(device), tokens(data.val_x), data.val_y.to(device)
    model = nanda_init(p, seed)
    if recipe.init == "grokstudy":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            copy_gs_to_nanda(build_model(cfg.model, p, p), model)
    model.to(device)
    width = p + 1 if recipe.classes == "p+1" else p
    dtype = torch.float64 if recipe.loss_dtype == "float64" else torch.float32
    params = list(model.parameters())
    if recipe.decay == "all":
        groups = [{"params": params, "weight_decay": 1.0}]
    else:
        groups = [
            {"params": [q for q in params if q.dim() >= 2], "weight_decay": 1.0},
            {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
        ]
    extra = {"fused": True} if recipe.adam == "fused" else {}
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), **extra)
    shift = 0 if recipe.warmup == "zero" else 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + shift) / 10, 1))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)[:, -1, :width]
        return high_precision_ce(logits, y, dtype).double(), (logits.argmax(-1) == y).double().mean()

    step = 0
    for target in gtrain.eval_steps(cfg.train):
        while step < target:
            loss, _ = loss_of(tx, ty)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        with torch.no_grad():
            values = torch.stack([*loss_of(tx, ty), *loss_of(vx, vy)]).double().tolist()  # one sync
        yield (step, *values)


def gs_state(cfg: TrialConfig, flags: dict[str, Any]) -> gtrain.TrainState:
    """`init_state` with Nanda's choices switched on; nothing in grokstudy is edited."""
    p = cfg.task.p
    opt_cfg = cfg.optimizer
    if flags.get("warmup0"):
        opt_cfg = replace(opt_cfg, warmup_start="zero")
    if flags.get("decay_all"):
        opt_cfg = replace(opt_cfg, decay_biases=True)
    cfg = replace(cfg, optimizer=opt_cfg)
    validate_trial(cfg)
    device = gtrain.resolve_device(cfg.train.device)
    if flags.get("split"):
        data = nanda_dataset(p, cfg.data.fraction, cfg.data.split_seed)
    else:
        data = build_dataset(cfg.task, cfg.data)
    n_classes = p + 1 if flags.get("p1") else p
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, p, n_classes)
    if flags.get("init"):
        copy_nanda_to_gs(nanda_init(p, cfg.train.seed), model)
    model.to(device)
    opt = build_optimizer(cfg.optimizer, model)
    if flags.get("foreach"):
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.base.param_groups]
        opt.base = torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps)
    return gtrain.TrainState(cfg, model, opt, data.to(device), device)


def train_gs(cfg: TrialConfig, flags: dict[str, Any]) -> Iterator[Point]:
    state = gtrain.init_state(cfg) if not flags else gs_state(cfg, flags)
    for r in gtrain.run(state.cfg, state):
        yield (r.step, r.train_loss, r.train_acc, r.val_loss, r.val_acc)


def holding(curve: list[Point], ok: Callable[[Point], bool]) -> int | None:
    """First eval step from which `ok` holds at every later eval (None: not at the last one)."""
    t = None
    for point in curve:
        if ok(point):
            t = point[0] if t is None else t
        else:
            t = None
    return t


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (impl, fraction, seed) run to max_steps or the early stop; a JSON-ready result."""
    impl, device = job["impl"], torch.device(job["device"])
    cfg = trial_config(
        job["p"], job["fraction"], job["seed"], job["max_steps"], job["eval_every"], job["device"]
    )
    if impl == "grokstudy":
        points = train_gs(cfg, {})
    elif impl in GS_VARIANTS:
        points = train_gs(cfg, GS_VARIANTS[impl])
    else:
        points = train_nanda(cfg, NANDA if impl == "nanda" else NANDA_VARIANTS[impl], device)
    start = time.perf_counter()
    curve: list[Point] = []
    since, stopped = None, False
    for point in points:
        curve.append(point)
        step, _, tr_acc, va_loss, va_acc = point
        done = tr_acc >= ACC and va_acc >= ACC and va_loss < LOSS
        since = (step if since is None else since) if done else None
        if job["stop_after"] > 0 and since is not None and step - since >= job["stop_after"]:
            stopped = step < job["max_steps"]
            break
    points.close()
    wall = time.perf_counter() - start
    last = curve[-1]
    return {
        "impl": impl,
        "p": job["p"],
        "fraction": job["fraction"],
        "seed": job["seed"],
        "t_train": holding(curve, lambda q: q[2] >= ACC),
        "t_val_acc": holding(curve, lambda q: q[4] >= ACC),
        "t_val_loss": holding(curve, lambda q: q[3] < LOSS),
        "final_train_acc": last[2],
        "final_val_acc": last[4],
        "final_val_loss": last[3],
        "steps": last[0],
        "stopped_early": stopped,
        "wall_s": round(wall, 2),
        "ms_per_step": round(1e3 * wall / max(last[0], 1), 3),
        "device": str(device),
        "curve": [[q[0], *(round(v, 7) for v in q[1:])] for q in curve],
    }


# ---- the process ----------------------------------------------------------------------------------


def setup_worker(threads: int | None, device: str) -> None:
    """Process settings for both sides alike: grokstudy's configure_process, fp32 matmuls (no TF32)."""
    if threads:
        torch.set_num_threads(threads)
    gtrain.configure_process()  # flush denormals (CPU), malloc tuning: applies to both implementations
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if device == "cuda":  # warm the kernels and cuBLAS so the first timed run is not charged for them
        for impl in ("nanda", "grokstudy"):
            run_job(
                dict(
                    impl=impl,
                    device=device,
                    p=23,
                    fraction=0.5,
                    seed=0,
                    max_steps=3,
                    eval_every=3,
                    stop_after=0,
                )
            )


def check(p: int, seed: int, device: torch.device, steps: int) -> None:
    """Same weights, same function? And the same trajectory for the same choices?"""
    cfg = trial_config(p, 0.5, seed, 10, 10, device.type)
    state = gtrain.init_state(cfg)
    gs, data = state.model, state.data
    ref = nanda_init(p, seed).to(device)
    n_ref = sum(q.numel() for q in ref.parameters())
    n_gs = sum(q.numel() for q in gs.parameters())
    print(f"parameters: re-implementation {n_ref:,} (Nanda's checkpoints: 226,816), grokstudy {n_gs:,}")
    print("init std per tensor (grokstudy's draw vs Nanda's draw, in grokstudy's layout):")
    mine = gs_layout(ref)
    for name, q in gs.named_parameters():
        print(f"  {name:28s} {q.std().item() if q.numel() > 1 else 0:.5f}  {mine[name].std().item():.5f}")
    copy_gs_to_nanda(gs, ref)
    x = torch.cat([data.train_x, data.val_x])
    tok = torch.cat([x, torch.full_like(x[:, :1], p)], dim=1)
    a = gs(x)
    b = ref(tok)[:, -1, :p]
    print(
        f"forward, grokstudy's weights in both: max |logit diff| {(a - b).abs().max().item():.3g} (logit scale {a.abs().max().item():.3g})"
    )
    loss_fn = build_loss("cross_entropy")
    la = loss_fn(gs(data.train_x), data.train_y)
    lb = high_precision_ce(
        ref(torch.cat([data.train_x, torch.full_like(data.train_x[:, :1], p)], 1))[:, -1, :p],
        data.train_y,
        torch.float64,
    )
    la.backward()
    lb.backward()
    grads = gs_layout(ref, grad=True)
    worst = max(
        ((q.grad - grads[n][: q.shape[0]]).norm() / q.grad.norm().clamp_min(1e-30)).item()
        for n, q in gs.named_parameters()
    )
    print(
        f"loss {la.item():.10f} vs {lb.item():.10f}; gradients: max relative difference per tensor {worst:.3g}"
    )
    # Trajectory: Nanda's recipe in both codes (gs+nanda vs nanda) from the same weights.
    cfg = trial_config(p, 0.5, seed, steps, 1, device.type)
    ours = train_nanda(cfg, NANDA, device)
    theirs = train_gs(cfg, GS_VARIANTS["gs+nanda"])
    print(
        f"{steps} steps of Nanda's recipe in both codes (same weights, split, schedule), step: train loss a / b, val loss a / b"
    )
    for pa, pb in zip(ours, theirs, strict=True):
        assert pa[0] == pb[0]
        if pa[0] in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500) or pa[0] == steps:
            print(f"  {pa[0]:4d}: {pa[1]:.7f} / {pb[1]:.7f}   {pa[3]:.7f} / {pb[3]:.7f}")


# ---- summary ----------------------------------------------------------------------------------------


def fmt_t(t: int | None) -> str:
    return "never" if t is None else str(t)


def censored(values: list[int | None], cap: int) -> list[int]:
    return [cap if v is None else v for v in values]


def median_text(values: list[int | None], cap: int) -> str:
    m = statistics.median(censored(values, cap))
    return f">{cap - 1}" if m >= cap else f"{m:g}"


def mann_whitney(a: list[int], b: list[int]) -> float:
    from scipy.stats import mannwhitneyu

    if len(a) < 1 or len(b) < 1 or len(set(a) | set(b)) < 2:
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'impl':13s} {'frac':>5s} {'seed':>4s} {'t_train':>7s} {'t_val_acc':>9s} {'t_val_loss':>10s} {'tr_acc':>6s} {'val_acc':>7s} {'val_loss':>9s} {'steps':>6s} {'stop':>4s} {'wall_s':>7s} {'ms/step':>7s}"
    print(head)
    for r in sorted(results, key=lambda r: (r["fraction"], r["impl"], r["seed"])):
        print(
            f"{r['impl']:13s} {r['fraction']:5g} {r['seed']:4d} {fmt_t(r['t_train']):>7s} {fmt_t(r['t_val_acc']):>9s} "
            f"{fmt_t(r['t_val_loss']):>10s} {r['final_train_acc']:6.4f} {r['final_val_acc']:7.4f} {r['final_val_loss']:9.2e} {r['steps']:6d} "
            f"{'yes' if r['stopped_early'] else 'no':>4s} {r['wall_s']:7.1f} {r['ms_per_step']:7.1f}"
        )


def summarize(results: list[dict[str, Any]], fractions: list[float], cap: int) -> list[str]:
    """Per fraction and implementation: median/min/max; p-values against nanda and grokstudy. Returns the figure parts."""
    figure = []
    for f in fractions:
        rows = [r for r in results if r["fraction"] == f]
        impls = sorted({r["impl"] for r in rows}, key=lambda i: (i not in ("nanda", "grokstudy"), i))
        by = {i: sorted((r for r in rows if r["impl"] == i), key=lambda r: r["seed"]) for i in impls}
        print(f"\nfraction {f:g} (never = beyond the budget, counted as {cap} steps):")
        print(
            f"  {'impl':13s} {'n':>2s}  {'t_val_acc med [min, max]':26s} {'t_val_loss med [min, max]':26s} t_val_loss: p vs nanda, p vs grokstudy"
        )
        for i in impls:
            rs = by[i]
            cols = []
            for key in ("t_val_acc", "t_val_loss"):
                vals = [r[key] for r in rs]
                c = censored(vals, cap)
                cols.append(
                    f"{median_text(vals, cap):>6s} [{fmt_t(min(c) if min(c) < cap else None)}, {fmt_t(max(c) if max(c) < cap else None)}]"
                )
            ps = []
            for other in ("nanda", "grokstudy"):
                if other in by and other != i:
                    ps.append(
                        f"{mann_whitney(censored([r['t_val_loss'] for r in rs], cap), censored([r['t_val_loss'] for r in by[other]], cap)):.3g}"
                    )
                else:
                    ps.append("-")
            print(f"  {i:13s} {len(rs):2d}  {cols[0]:26s} {cols[1]:26s} {ps[0]:>22s}  {ps[1]:>13s}")
        # Seed by seed: do the model-code swaps track their counterparts?
        for a, b in (("nanda", "gs+nanda"), ("grokstudy", "nanda+gs")):
            if a in by and b in by:
                pairs = [
                    (x["t_val_loss"], y["t_val_loss"]) for x in by[a] for y in by[b] if x["seed"] == y["seed"]
                ]
                print(
                    f"  seed by seed t_val_loss, {a} / {b}: "
                    + ", ".join(f"{fmt_t(u)}/{fmt_t(v)}" for u, v in pairs)
                )
        if "nanda" in by and "grokstudy" in by:
            n = [r["t_val_loss"] for r in by["nanda"]]
            g = [r["t_val_loss"] for r in by["grokstudy"]]
            mn, mg = statistics.median(censored(n, cap)), statistics.median(censored(g, cap))
            pv = mann_whitney(censored(n, cap), censored(g, cap))
            na = statistics.median(censored([r["t_val_acc"] for r in by["nanda"]], cap))
            ga = statistics.median(censored([r["t_val_acc"] for r in by["grokstudy"]], cap))
            pa = mann_whitney(
                censored([r["t_val_acc"] for r in by["nanda"]], cap),
                censored([r["t_val_acc"] for r in by["grokstudy"]], cap),
            )
            word = "differ" if pv < 0.05 else "no significant difference"
            print(
                f"  verdict at {f:g}: t_val_loss medians {mn:g} vs {mg:g} (p={pv:.3g}), t_val_acc medians {na:g} vs {ga:g} (p={pa:.3g}): {word}"
            )
            sizes = f"{len(n)} seeds each" if len(n) == len(g) else f"{len(n)} vs {len(g)} seeds"
            figure.append(
                f"frac {f:g}: median t_val_loss {median_text(n, cap)} vs {median_text(g, cap)} steps "
                f"(ratio {mn / mg:.2f}, Mann-Whitney p={pv:.3g}, {word}, {sizes})"
            )
    return figure


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    """`0,1,5` or `0-11` (inclusive) or both: `0-3,8`."""
    out: list[int] = []
    for part in (v for v in text.split(",") if v):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--fraction", type=floats, default=[0.5], help="one or more, comma-separated")
    ap.add_argument("--seeds", type=ints, default=list(range(8)))
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--impl", choices=("both", "nanda", "grokstudy"), default="both")
    ap.add_argument(
        "--variants",
        default="",
        help="swap | single | all | comma-separated names: " + ", ".join(VARIANT_GROUPS["all"]),
    )
    ap.add_argument(
        "--stop-after",
        type=int,
        default=300,
        help="stop once val loss < 1e-2 (and both accs >= 0.99) held this many steps; 0: never",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new run after this many seconds; summarize what finished",
    )
    ap.add_argument(
        "--json", default=None, help="write every result (with curves) here, rewritten after each run"
    )
    ap.add_argument(
        "--check", action="store_true", help="forward/gradient/trajectory consistency check, then exit"
    )
    ap.add_argument("--check-steps", type=int, default=20)
    args = ap.parse_args()

    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    if args.check:
        setup_worker(args.threads, "cpu")
        check(args.p, args.seeds[0], torch.device(device), args.check_steps)
        return

    impls = ["nanda", "grokstudy"] if args.impl == "both" else [args.impl]
    for name in [v for v in args.variants.split(",") if v]:
        for v in VARIANT_GROUPS.get(name, [name]):
            if v not in GS_VARIANTS and v not in NANDA_VARIANTS:
                sys.exit(f"unknown variant {v!r}; known: {', '.join(VARIANT_GROUPS['all'])}")
            impls += [v] if v not in impls else []
    # nanda and grokstudy first, then the variants; within each, seed-major with the impls
    # interleaved: a budget cut leaves balanced sides and the main comparison complete.
    tiers = [impls[:2] if args.impl == "both" else impls[:1], impls[2:] if args.impl == "both" else impls[1:]]
    jobs = [
        dict(
            impl=i,
            device=device,
            p=args.p,
            fraction=f,
            seed=s,
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            stop_after=args.stop_after,
        )
        for tier in tiers
        for f in args.fraction
        for s in args.seeds
        for i in tier
    ]
    print(
        f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} {'' if device == 'cuda' else 'CPUs'}), torch {torch.__version__}, "
        f"p {args.p}, fractions {args.fraction}, seeds {args.seeds}, max_steps {args.max_steps}, eval_every {args.eval_every}, "
        f"impls {impls}, jobs {args.jobs}, threads {args.threads or torch.get_num_threads()}; early stop "
        + (
            f"once val loss < {LOSS:g} and accs >= {ACC} held {args.stop_after} steps"
            if args.stop_after
            else "off"
        ),
        flush=True,
    )
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        results.append(r)
        print(
            f"  {r['impl']:13s} frac {r['fraction']:g} seed {r['seed']}: t_train {fmt_t(r['t_train'])}, t_val_acc {fmt_t(r['t_val_acc'])}, "
            f"t_val_loss {fmt_t(r['t_val_loss'])}, val acc {r['final_val_acc']:.4f}, {r['steps']} steps"
            f"{' (stopped early)' if r['stopped_early'] else ''}, {r['wall_s']:.1f} s [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "device": device, "results": results}, indent=1) + "\n"
            )

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - t0 > args.budget_s

    skipped = 0
    if args.jobs <= 1:
        setup_worker(args.threads, device)
        for j in jobs:
            if over_budget():
                skipped += 1
                continue
            done(run_job(j))
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=ctx, initializer=setup_worker, initargs=(args.threads, device)
        ) as pool:
            pending = list(jobs)
            running = {}
            while pending or running:
                while pending and len(running) < args.jobs and not over_budget():
                    j = pending.pop(0)
                    running[pool.submit(run_job, j)] = j
                if not running:
                    skipped = len(pending)
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fu in finished:
                    running.pop(fu)
                    done(fu.result())
    if skipped:
        print(f"budget of {args.budget_s:g} s spent: {skipped} runs not started")
    print()
    print_table(results)
    cap = args.max_steps + args.eval_every
    figure = summarize(results, args.fraction, cap)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print("nanda vs grokstudy: " + ("; ".join(figure) if figure else "no pair of implementations to compare"))


if __name__ == "__main__":
    main()
