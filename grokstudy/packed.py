"""Packed training: K trials of one model shape trained as one batched model, one
`EvalRecord` stream per member, as K separate `train.run`s would yield them.

    state = init_pack(cfgs)                  # or load_pack(cfgs, path)
    for i, record in run_pack(state):        # state.step == record.step at each yield
        ...                                  # state.retire(i), save_pack(state, path) here

Torch and core modules only, like train.py.

Who shares a pack (`config.pack_key`): members with the same task (table), model kind and
shape, loss, batch size, eval_every, device and optimizer structure (name, nesterov,
decay_to, decay_biases, orthograd, Grokfast mode and MA window). Everything else is per
member, in [K] tensors: data.fraction and split_seed, train.seed (init and minibatch
order), train.max_steps, model.init_scale, and lr, betas, eps, momentum, weight_decay,
warmup_steps, warmup_start, grokfast_alpha and grokfast_lamb.

Design (each choice measured with bench/packing.py --designs; the figures are in bench/README.md):
- Weights: member k's parameters are row k of one [K, P] float32 tensor, decayed
  tensors (`models.decay_groups`) first. The forward sees [K, *shape] views of it; the
  whole update is about twenty tensor ops on [K, P], per-member numbers as [K, 1]
  columns, whatever the model. It follows torch's fused kernels term by term, so on CPU
  it reproduces `optim.Optimizer` bit for bit but for ⊥Grad's dot products and the
  scalar tail of each tensor in the fused kernels (1 ulp).
- Forward: batched weights with bmm/baddbmm and one index_select gather (`BATCHED_FORWARDS`)
  rather than torch.func.vmap of `functional_call` (the fallback for other model kinds):
  vmap loops over members for the transformer on CPU (no batching rule for flash
  attention) and fails outright for attention on CUDA, where the pack computes attention
  itself (`_causal_attention`).
- Data: each member's training rows, padded to the longest with weight-0 rows
  (minibatches are drawn into the same shape), rather than masks on the full table:
  faster on CPU, about even on the GPU, and minibatches need index sets anyway. Mixed
  fractions cost up to longest/mean.
- Retiring compacts the stack (one index_select per tensor, before the next step)
  rather than masking it, so a pack speeds up as members leave.
- No host sync inside a step (checked on CUDA with torch.cuda.set_sync_debug_mode); one
  per evaluation, whose blocks depend on the table alone, so a member's figures do not
  change when others leave.
- Speed: packs pay on GPUs, where one small model leaves the device idle; on a CPU a pack
  is slower than its trials one by one (compute-bound, padding costs compute, batched
  activations outgrow the caches), so packing is off there by default.

Exactness. On CPU a member's forward pass is bit for bit its lone run's; so are its
gradients when its training set is as long as the pack's longest (no padding), except
LayerNorm's gain and bias. Padding changes the float32 summation order of weight
gradients, and the update differs as said above: 1 ulp per step at most. Training
amplifies 1 ulp as it amplifies any (tests/test_packed.py nudges one weight of a lone
transformer by 1 ulp and its curve leaves the tolerance below), so the contract is
rtol 1e-4 / atol 1e-5 on every metric at every eval step in smooth regimes, and identical
verdicts (phase, t_train, t_val): in every test, the grokking run included, and on CUDA
for the eleven test configs checked there. Restore, retiring and a diverging member are exact:
pack against pack, bit for bit on CPU.

A member whose training loss is non-finite is marked `failed` and keeps training, as
its lone run would; its pack-mates' records do not change. `elapsed_s` is the pack's
training clock, shared by its members.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from grokstudy import measures, tasks, train
from grokstudy.config import (
    ModelConfig,
    TaskConfig,
    TrialConfig,
    batch_rows,
    pack_key,
    to_dict,
    validate_trial,
)
from grokstudy.models import ACTIVATIONS, build_model, decay_groups
from grokstudy.optim import LOSSES, LossFn
from grokstudy.records import EvalRecord
from grokstudy.tasks import build_table
from grokstudy.train import EVAL_CHUNK, eval_steps, resolve_device

PACK_FORMAT = 1

# ---- the state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each parameter lives in a member's flat row: decayed tensors (`decay_groups`) first."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    n_decay: int
    """Columns [0, n_decay) are the tensors weight decay touches."""

    @staticmethod
    def of(model: nn.Module, decay_biases: bool) -> _Layout:
        name_of = {id(p): n for n, p in model.named_parameters()}
        decay, free = decay_groups(model, decay_biases)
        params = decay + free
        offsets = tuple(itertools.accumulate((p.numel() for p in params[:-1]), initial=0))
        names = tuple(name_of[id(p)] for p in params)
        return _Layout(names, tuple(p.shape for p in params), offsets, sum(p.numel() for p in decay))

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """[P]: the model's parameters in this layout."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: [R, *shape]} views into `flat` [R, P]."""
        return {
            name: flat[:, off : off + shape.numel()].view(flat.shape[0], *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True)
        }


@dataclass
class PackState:
    """Everything a pack needs to continue: `save_pack` writes it, `load_pack` reads it back.

    Per-member tensors are stacked along dim 0 over `members` (the members still stacked,
    ascending); retiring a member marks it, and the next step compacts the stack.
    """

    cfgs: tuple[TrialConfig, ...]
    """The K members, in order; member index = position."""
    device: torch.device
    step: int = 0
    """Optimizer steps the pack has taken."""
    elapsed_s: float = 0.0
    """Wall-clock seconds spent training, evaluation excluded."""
    active: list[bool] = field(default_factory=list)
    """active[i]: member i still trains (and yields records)."""
    last_eval: list[int] = field(default_factory=list)
    """Step of member i's last yielded record (-1: none yet); never yielded twice."""
    failed: list[bool] = field(default_factory=list)
    """failed[i]: member i's training loss was non-finite at an evaluation. It keeps training,
    as a lone `train.run` would, until its budget or until the caller retires it."""
    members: list[int] = field(default_factory=list, repr=False)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Stacked over `members`: "params" [R, P]; "opt.*", "grokfast.*" (optimizer and filter
    state, saved); "hyper.*" [R] float64 and "data.*" (rebuilt from the configs on load)."""
    layout: _Layout | None = field(default=None, repr=False)
    template: nn.Module | None = field(default=None, repr=False)
    """One member's module: shapes, names and the `functional_call` target; its own weights are unused."""
    inputs: torch.Tensor | None = field(default=None, repr=False)
    """The full table: LongTensor [N, 2] and labels [N]."""
    labels: torch.Tensor | None = field(default=None, repr=False)
    n_tokens: int = field(default=0, repr=False)
    train_rows: list[torch.Tensor] = field(default_factory=list, repr=False)
    """Per member: the table rows of its training split, in `tasks.build_dataset`'s order."""
    views: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def retire(self, i: int) -> None:
        """Member i trains no more and yields no more records; takes effect before the next step."""
        self.active[i] = False


# ---- building a pack -------------------------------------------------------------------------


def init_pack(cfgs: Sequence[TrialConfig]) -> PackState:
    """A fresh pack: each member as `train.init_state(cfg)` would build it (same split, same
    initial weights), stacked on the members' device.

    Raises `StudyError` for a config the rules do not admit, `ValueError` when the members'
    `pack_key`s differ.
    """
    cfgs = tuple(cfgs)
    if not cfgs:
        raise ValueError("a pack needs at least one member")
    for cfg in cfgs:
        validate_trial(cfg)
    first = pack_key(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        if (key := pack_key(cfg)) != first:
            path, value = next((k, v) for k, v in key if (k, v) not in first)
            raise ValueError(
                f"member {i} cannot share a pack with member 0: {path} is {value!r}, "
                f"not {dict(first).get(path)!r}"
            )
    device = resolve_device(cfgs[0].train.device)
    train.set_matmul_precision(cfgs[0].train)
    table = build_table(cfgs[0].task)
    models = []
    for cfg in cfgs:
        with torch.random.fork_rng(devices=[]):  # exactly train.init_state's draw
            torch.manual_seed(cfg.train.seed)
            models.append(build_model(cfg.model, table.n_tokens, table.n_classes))
    template = models[0].to(device)
    layout = _Layout.of(template, cfgs[0].optimizer.decay_biases)
    state = PackState(
        cfgs,
        device,
        active=[True] * len(cfgs),
        last_eval=[-1] * len(cfgs),
        failed=[False] * len(cfgs),
        members=list(range(len(cfgs))),
        layout=layout,
        template=template,
        inputs=table.inputs.to(device),
        labels=table.labels.to(device),
        n_tokens=table.n_tokens,
    )
    params = torch.stack([layout.flatten(m).to(device) for m in models])  # [K, P]
    state.tensors = {"params": params, **_optimizer_state(cfgs[0], params, layout)}
    state.tensors |= _hyper(cfgs, device)
    state.tensors |= _data(state, table.labels.shape[0])
    state.views = _bind(state)
    return state


def _data(state: PackState, n: int) -> dict[str, torch.Tensor]:
    """Per member: its training rows (padded to the longest, weight 0 on pads) and its split mask."""
    device, cfgs = state.device, state.cfgs
    splits = [tasks.split(n, cfg.data)[0] for cfg in cfgs]  # `tasks.build_dataset`'s split, to the row
    state.train_rows = [rows.to(device) for rows in splits]
    sizes = [batch_rows(c.train, len(r)) for c, r in zip(cfgs, splits, strict=True)]
    weight = torch.zeros(len(cfgs), max(sizes), dtype=torch.float64)
    padded = torch.zeros(len(cfgs), max(sizes), dtype=torch.long)
    mask = torch.zeros(len(cfgs), n, dtype=torch.bool)
    for k, (size, rows) in enumerate(zip(sizes, splits, strict=True)):
        weight[k, :size] = 1.0 / size  # a mean over the member's own batch, as F.cross_entropy's
        padded[k, :size] = rows[:size]
        mask[k, rows] = True
    n_train = torch.tensor([len(r) for r in splits], dtype=torch.float64)
    return {
        "data.rows": padded.to(device),  # full batch: the rows themselves; minibatches: redrawn per step
        "data.weight": weight.to(device),
        "data.train_mask": mask.to(device),
        "data.n_train": n_train.to(device),
        "data.n_val": (n - n_train).to(device),
    }


def _hyper(cfgs: Sequence[TrialConfig], device: torch.device) -> dict[str, torch.Tensor]:
    """Every per-member number of the update as a float64 [K] tensor."""
    columns = {
        "lr": [c.optimizer.lr for c in cfgs],
        "warmup": [float(c.optimizer.warmup_steps) for c in cfgs],
        "warmup_done": [1.0 if c.optimizer.warmup_start == "lr/steps" else 0.0 for c in cfgs],
        "beta1": [c.optimizer.betas[0] for c in cfgs],
        "beta2": [c.optimizer.betas[1] for c in cfgs],
        "eps": [c.optimizer.eps for c in cfgs],
        "momentum": [c.optimizer.momentum for c in cfgs],
        "weight_decay": [c.optimizer.weight_decay for c in cfgs],
        "grokfast_alpha": [c.optimizer.grokfast_alpha for c in cfgs],
        "grokfast_lamb": [c.optimizer.grokfast_lamb for c in cfgs],
    }
    return {f"hyper.{k}": torch.tensor(v, dtype=torch.float64, device=device) for k, v in columns.items()}


def _optimizer_state(cfg: TrialConfig, params: torch.Tensor, layout: _Layout) -> dict[str, torch.Tensor]:
    """Zeroed optimizer and filter state (the Grokfast-EMA mean starts as the first gradient)."""
    o = cfg.optimizer
    state = {}
    if o.name in ("adamw", "adam"):
        state["opt.exp_avg"] = torch.zeros_like(params)
        state["opt.exp_avg_sq"] = torch.zeros_like(params)
    if o.name == "rmsprop":
        state["opt.square_avg"] = torch.zeros_like(params)
    if o.name in ("sgd", "rmsprop"):
        # One buffer for all members: with momentum 0 it holds g itself, which is torch's update.
        state["opt.momentum_buffer"] = torch.zeros_like(params)
    if o.decay_to == "init":
        state["opt.init"] = params[:, : layout.n_decay].clone()
    if o.grokfast == "ma":
        state["grokfast.ring"] = params.new_zeros(params.shape[0], o.grokfast_window, params.shape[1])
        state["grokfast.total"] = torch.zeros_like(params, dtype=torch.float64)
    return state


def _bind(state: PackState) -> dict[str, torch.Tensor]:
    """Leaf views of `params` that autograd differentiates; in-place updates of `params` show through."""
    return {k: v.requires_grad_() for k, v in state.layout.views(state.tensors["params"]).items()}


def _compact(state: PackState) -> None:
    """Drop retired members from the stack (one index_select per tensor)."""
    keep = [r for r, i in enumerate(state.members) if state.active[i]]
    if len(keep) == len(state.members):
        return
    index = torch.tensor(keep, device=state.device)
    state.tensors = {k: v.index_select(0, index) for k, v in state.tensors.items()}
    state.members = [state.members[r] for r in keep]
    state.views = _bind(state)


# ---- the loop --------------------------------------------------------------------------------


def run_pack(state: PackState) -> Iterator[tuple[int, EvalRecord]]:
    """Train the pack to its largest active member's `train.max_steps`, yielding `(i, record)`
    at each step of member i's `train.eval_steps`, members in order.

    Mutates `state`; at each yield `state.step == record.step`, so the caller may `save_pack`
    there, or `state.retire(i)` any member (it yields nothing more and trains no more). A
    member's final record comes at its own max_steps, and it is retired just before that
    yield. Steps already yielded (`state.last_eval`) are not yielded again.
    """
    cfgs = state.cfgs
    schedules = [eval_steps(c.train) for c in cfgs]
    points = [set(s) for s in schedules]
    row_loss = functools.partial(LOSSES[cfgs[0].train.loss], reduction="none")
    while True:
        for i in range(len(cfgs)):  # a restored pack may hold a finished member
            if state.active[i] and state.last_eval[i] >= cfgs[i].train.max_steps:
                state.retire(i)
        live = [i for i in range(len(cfgs)) if state.active[i]]
        if not live:
            return
        target = min(schedules[i][bisect.bisect_right(schedules[i], state.last_eval[i])] for i in live)
        assert target >= state.step, (target, state.step)  # every live member yielded every step so far
        _advance(state, target, row_loss)
        values = dict(zip(state.members, _evaluate(state, row_loss), strict=True))
        for i in live:
            state.failed[i] |= not math.isfinite(values[i][0])
        for i in live:
            if not state.active[i] or state.last_eval[i] >= target or target not in points[i]:
                continue  # retired by the caller meanwhile, already yielded, or not on its schedule
            state.last_eval[i] = target
            if target >= cfgs[i].train.max_steps:
                state.retire(i)
            yield i, EvalRecord(target, *values[i], elapsed_s=state.elapsed_s)


def _advance(state: PackState, target: int, row_loss: LossFn) -> None:
    """Steps of every active member up to `target`, on the training clock."""
    if state.step >= target:
        return
    _compact(state)
    with train.training_clock(state):
        while state.step < target:
            _train_step(state, row_loss)
            state.step += 1


def seconds_per_step(cfgs: Sequence[TrialConfig], steps: int, warmup: int = 2) -> float:
    """Wall-clock seconds of one step of a fresh pack of `cfgs`, over `steps` steps after `warmup`
    untimed ones (`packsize`)."""
    state = init_pack(cfgs)
    row_loss = functools.partial(LOSSES[cfgs[0].train.loss], reduction="none")
    _advance(state, warmup, row_loss)
    state.elapsed_s = 0.0
    _advance(state, warmup + steps, row_loss)
    return state.elapsed_s / steps


def _train_step(state: PackState, row_loss: LossFn) -> None:
    """One optimizer step of every stacked member: a batched forward and backward, then `_update`."""
    rows = _rows(state)
    x, y = state.inputs[rows], state.labels[rows]  # (R, L, 2), (R, L)
    logits = _forward(state, state.views, x)  # (R, L, C) float32
    loss = (row_loss(logits, y) * state.tensors["data.weight"]).sum()  # float64; each member's own mean
    grads = torch.autograd.grad(loss, list(state.views.values()))
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)  # (R, P) in layout order
    _update(state, flat)


def _rows(state: PackState) -> torch.Tensor:
    """(R, L) table rows of this step's batches: fixed for full batches; minibatch k of member i is
    `train._batches`' draw for (seed_i, k), so a restore needs no RNG state."""
    rows, generator = state.tensors["data.rows"], None
    for r, i in enumerate(state.members):
        cfg, member_rows = state.cfgs[i], state.train_rows[i]
        if train.full_batch(cfg.train, member_rows.shape[0]):
            continue
        if generator is None:
            rows, generator = rows.clone(), torch.Generator(device=state.device)
        idx = train.minibatch(cfg.train, member_rows.shape[0], state.step, generator)
        rows[r, : idx.shape[0]] = member_rows[idx]
    return rows


# ---- the update ------------------------------------------------------------------------------


def _col(x: torch.Tensor) -> torch.Tensor:
    """A per-member float64 [R] number as a float32 [R, 1] column: the scalar torch's kernels use."""
    return x.to(torch.float32).unsqueeze(1)


# Long on purpose: torch's fused kernels term by term, in their order, so a member's update
# stays bit for bit its lone run's; split up, the order would hide.
@torch.no_grad()
def _update(state: PackState, g: torch.Tensor) -> None:
    """`optim.Optimizer.step` for every member at once, from the flat gradients g [R, P].

    Follows torch's fused AdamW/Adam/SGD and foreach RMSprop kernels term by term, with the
    per-member numbers as [R, 1] columns: warm-up, Grokfast, ⊥Grad, decay toward init, step.
    Weight decay touches columns [0, n_decay) only: `models.decay_groups(model)[0]`.
    """
    o = state.cfgs[0].optimizer
    t, h = state.tensors, {k[6:]: v for k, v in state.tensors.items() if k.startswith("hyper.")}
    w, d = t["params"], state.layout.n_decay
    warmup, done = h["warmup"], state.step + h["warmup_done"]  # steps done at the update: optim.lr_at
    lr = h["lr"] * torch.where(warmup > 0, (done / warmup.clamp_min(1.0)).clamp(max=1.0), 1.0)
    wd = h["weight_decay"]

    if o.grokfast == "ema":
        mu = t.get("grokfast.mu")
        if mu is None:
            mu = t["grokfast.mu"] = g.clone()
        alpha = h["grokfast_alpha"]
        mu.mul_(_col(alpha)).addcmul_(g, _col(1 - alpha))
        g.addcmul_(mu, _col(h["grokfast_lamb"]))
    elif o.grokfast == "ma":
        ring, total = t["grokfast.ring"], t["grokfast.total"]
        window, count = ring.shape[1], state.step
        oldest = ring[:, count % window]
        if count >= window:
            total.sub_(oldest.double())
        total.add_(g.double())
        oldest.copy_(g)
        if count + 1 >= window:
            g.addcmul_((total / window).to(g.dtype), _col(h["grokfast_lamb"]))

    if o.orthograd:
        for off, shape in zip(state.layout.offsets, state.layout.shapes, strict=True):
            wv, gv = w[:, off : off + shape.numel()], g[:, off : off + shape.numel()]
            proj = (wv * gv).sum(1, keepdim=True) / ((wv * wv).sum(1, keepdim=True) + 1e-30)
            orth = gv - proj * wv
            gv.copy_(orth * (gv.norm(dim=1, keepdim=True) / (orth.norm(dim=1, keepdim=True) + 1e-30)))

    # Below, a.addcmul_(b, c) is a + b*c in one rounding: torch's kernels and `add_(b, alpha=c)`
    # compile to a fused multiply-add on CPU, and matching them keeps a pack bitwise on a lone run.
    offset = w[:, :d] - t["opt.init"] if o.decay_to == "init" else w[:, :d]
    if o.name != "adamw":  # coupled L2: g <- g + wd * offset
        g[:, :d].addcmul_(offset, _col(wd))
    elif o.decay_to == "init":  # decoupled, with w0 as the origin
        w[:, :d].addcmul_(offset, _col(-lr * wd))
    else:
        w[:, :d].mul_(_col(1 - lr * wd))

    if o.name in ("adamw", "adam"):
        step = state.step + 1
        beta1, beta2 = h["beta1"], h["beta2"]
        exp_avg, exp_avg_sq = t["opt.exp_avg"], t["opt.exp_avg_sq"]
        exp_avg.lerp_(g, _col(1 - beta1))
        exp_avg_sq.mul_(_col(beta2)).addcmul_(g * _col(1 - beta2), g)
        # The fused kernel's sqrt is correctly rounded; float32 torch.sqrt may be 1 ulp off, float64's is not.
        denom = exp_avg_sq.double().sqrt().float().div_(_col((1 - beta2**step).sqrt())).add_(_col(h["eps"]))
        w.add_(_col(-lr / (1 - beta1**step)).mul(exp_avg).div_(denom))
    elif o.name == "sgd":
        momentum, buf = h["momentum"], t["opt.momentum_buffer"]
        buf.mul_(_col(momentum)).add_(g)
        if o.nesterov:
            g.addcmul_(buf, _col(momentum))
        else:
            g = buf
        w.addcmul_(g, _col(-lr))
    elif o.name == "rmsprop":
        alpha = h["beta2"]
        square_avg, buf = t["opt.square_avg"], t["opt.momentum_buffer"]
        square_avg.mul_(_col(alpha)).addcmul_(g * _col(1 - alpha), g)
        avg = square_avg.sqrt().add_(_col(h["eps"]))
        buf.mul_(_col(h["momentum"])).add_(g / avg)
        w.addcmul_(buf, _col(-lr))
    else:
        raise AssertionError(o.name)


# ---- forward passes --------------------------------------------------------------------------


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nn.Linear per member: h (R, B, in), weight (R, out, in), bias (R, out) -> (R, B, out)."""
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _embed(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """F.embedding per member: weight (R, V, E), index (R, ...) -> (R, ..., E), one gather for all.

    index_select rather than F.embedding: its backward is one index_add_ in index order, where
    embedding's CPU backward switches to a much slower sort-based path above 3,072 indices.
    """
    r, v = weight.shape[:2]
    offset = (torch.arange(r, device=index.device) * v).view(r, *[1] * (index.dim() - 1))
    rows = weight.reshape(r * v, weight.shape[-1]).index_select(0, (index + offset).reshape(-1))
    return rows.view(*index.shape, weight.shape[-1])


def _layer_norm(h: torch.Tensor, p: dict[str, torch.Tensor], name: str, model: ModelConfig) -> torch.Tensor:
    if not model.layer_norm:
        return h
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]  # (R, C)
    shape = (w.shape[0],) + (1,) * (h.dim() - 2) + (w.shape[1],)
    # nn.LayerNorm's CPU kernel ends in normed * gamma + beta, one fused multiply-add.
    return torch.addcmul(b.view(shape), F.layer_norm(h, (h.shape[-1],)), w.view(shape))


def _mlp(model: ModelConfig, p: dict[str, torch.Tensor], x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """models.MLP with every weight batched over members."""
    act = ACTIVATIONS[model.activation]
    first = 0
    if model.inputs == "onehot":  # models.MLP's two lookups of the first layer's weight
        offset = torch.tensor([0, n_tokens], device=x.device)
        h = _embed(p["hidden.0.weight"].transpose(1, 2), x + offset).sum(2)  # (R, B, width)
        bias = p.get("hidden.0.bias")
        h, first = act(h if bias is None else h + bias.unsqueeze(1)), 1
    else:
        h = _embed(p["embed.weight"], x).flatten(2)  # (R, B, 2E)
    for i in range(first, model.depth):
        h = act(_linear(h, p[f"hidden.{i}.weight"], p.get(f"hidden.{i}.bias")))  # (R, B, width)
    return _linear(h, p["unembed.weight"], p.get("unembed.bias"))  # (R, B, C)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, is_causal=True) on (N, nh, T, hs).

    CUDA's fused attention kernels tile 64 tokens, so with T = 3 nearly all their work is
    padding (most of a Nanda-transformer pack's step; bench/README.md). There the pack does
    the arithmetic itself; on CPU it calls SDPA as models.py does.
    """
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, nh, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def _transformer(
    model: ModelConfig, p: dict[str, torch.Tensor], x: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """models.Transformer with every weight batched over members; attention runs on (R*B) sequences."""
    r, b, _ = x.shape
    d, heads, act = model.embed_dim, model.heads, ACTIVATIONS[model.activation]
    tokens = torch.cat([x, torch.full_like(x[..., :1], n_tokens)], dim=-1)  # (R, B, 3): [a, b, =]
    h = (_embed(p["embed.weight"], tokens) + p["pos"].unsqueeze(1)).view(r, b * 3, d)  # (R, B*3, C)
    for i in range(model.depth):
        pre = f"blocks.{i}."
        qkv = _linear(_layer_norm(h, p, pre + "ln_attn", model), p[pre + "attn.qkv.weight"])
        q, k, v = (
            t.reshape(r * b, 3, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=2)
        )  # (R*B, nh, 3, hs)
        y = _causal_attention(q, k, v).transpose(1, 2).reshape(r, b * 3, d)
        h = h + _linear(y, p[pre + "attn.out.weight"])
        m = _layer_norm(h, p, pre + "ln_mlp", model)
        m = act(_linear(m, p[pre + "mlp_in.weight"], p.get(pre + "mlp_in.bias")))
        h = h + _linear(m, p[pre + "mlp_out.weight"], p.get(pre + "mlp_out.bias"))
    last = _layer_norm(h.view(r, b, 3, d)[:, :, -1], p, "ln_final", model)  # (R, B, C), read at "="
    return _linear(last, p["unembed.weight"])


def _gromov(model: ModelConfig, p: dict[str, torch.Tensor], x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """models.Gromov with both weights batched over members."""
    # b indexes the second half of w_in; two gathers and an add are F.embedding(...).sum(1) to the bit.
    h = _embed(p["w_in"], x[..., 0]) + _embed(p["w_in"], x[..., 1] + n_tokens)  # (R, B, width)
    return _linear(h.square(), p["w_out.weight"])


BATCHED_FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "mlp": _mlp,
    "transformer": _transformer,
    "gromov": _gromov,
}
"""model.kind -> fn(ModelConfig, {name: (R, *shape)}, x (R, B, 2), n_tokens) -> logits (R, B, C).
A kind without an entry runs through torch.func.vmap over `functional_call` instead."""


def _forward(state: PackState, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = state.cfgs[0].model
    batched = BATCHED_FORWARDS.get(model.kind)
    if batched is not None:
        return batched(model, params, x, state.n_tokens)
    return torch.func.vmap(lambda p, xs: torch.func.functional_call(state.template, p, (xs,)))(params, x)


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def _evaluate(state: PackState, row_loss: LossFn) -> list[list[float]]:
    """Per stacked member: the values of its `EvalRecord` (train loss, train acc, val loss, val
    acc, weights norm, Fourier share and Gini, progress measures) over its own split, as
    `train.evaluate` computes them; one host sync.

    Forwards the full table once per member (its split is a mask), in blocks of at most
    `train.EVAL_CHUNK` member-rows that depend on the table alone (see the module docstring).
    """
    t = state.tensors
    n, r = state.labels.shape[0], len(state.members)
    rows_per = min(n, EVAL_CHUNK)
    members_per = max(1, EVAL_CHUNK // rows_per)
    sums = torch.zeros(4, r, dtype=torch.float64, device=state.device)
    for m in range(0, r, members_per):
        block = slice(m, m + members_per)
        params = {k: v[block] for k, v in state.views.items()}
        size = len(state.members[block])
        for i in range(0, n, rows_per):
            x, y = state.inputs[i : i + rows_per], state.labels[i : i + rows_per]
            logits = _forward(state, params, x.expand(size, -1, -1))  # (size, rows, C)
            loss = row_loss(logits, y.expand(size, -1))
            correct = logits.argmax(-1) == y
            in_train = t["data.train_mask"][block, i : i + rows_per]
            zero = loss.new_zeros(())
            # where, not *: a val row's inf stays out
            sums[0, block] += torch.where(in_train, loss, zero).sum(1)
            sums[1, block] += (correct & in_train).sum(1)
            sums[2, block] += torch.where(in_train, zero, loss).sum(1)
            sums[3, block] += (correct & ~in_train).sum(1)
    n_train, n_val = t["data.n_train"], t["data.n_val"]
    values = [sums[0] / n_train, sums[1] / n_train, sums[2] / n_val, sums[3] / n_val]
    values += [_weights_norm(state), *_fourier(state).unbind(1)]
    return torch.cat([torch.stack(values, dim=1), _progress(state, rows_per, members_per)], dim=1).tolist()


def _progress(state: PackState, rows_per: int, members_per: int) -> torch.Tensor:
    """`measures.progress_tensor` per stacked member [R, 3], in the same member blocks as
    `_evaluate`; NaN rows for members whose schedule does not take them at this step."""
    r = len(state.members)
    out = torch.full((r, len(measures.PROGRESS_MEASURES)), math.nan, dtype=torch.float64, device=state.device)
    due = [train.measures_due(state.cfgs[i].train, state.step) for i in state.members]
    table = measures.cyclic_table(state.cfgs[0].task, state.inputs, state.labels) if any(due) else None
    if table is None:
        return out
    for m in range(0, r, members_per):
        block = slice(m, m + members_per)
        params = {k: v[block] for k, v in state.views.items()}
        size = len(state.members[block])
        out[block] = measures.progress_tensor(
            lambda x: _forward(state, params, x.expand(size, -1, -1)),  # noqa: B023 (used at once)
            table,
            state.inputs,
            state.tensors["data.train_mask"][block],
            rows_per,
        )
    return torch.where(torch.tensor(due, device=state.device).unsqueeze(1), out, math.nan)


def _weights_norm(state: PackState) -> torch.Tensor:
    """measures.weights_norm_tensor per member [R]: per-tensor float64 sums, in the model's order."""
    sums = [state.views[n].double().pow(2).flatten(1).sum(1) for n, _ in state.template.named_parameters()]
    return torch.stack(sums, dim=1).sum(1).sqrt()


class _Fourier(nn.Module):
    """`measures.fourier_top_k_share_tensor` and `fourier_gini_tensor` as a forward, so
    `functional_call` can bind weights."""

    def __init__(self, model: nn.Module, task: TaskConfig) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self) -> torch.Tensor:
        return torch.stack(
            [
                measures.fourier_top_k_share_tensor(self.model, self.task),
                measures.fourier_gini_tensor(self.model, self.task),
            ]
        )


def _fourier(state: PackState) -> torch.Tensor:
    """[top-k share, Gini] per member [R, 2], vmapped over the stack (NaN where they do not apply)."""
    template, task = state.template, state.cfgs[0].task
    if not measures.fourier_applies(task) or not hasattr(template, "operand_embeddings"):
        return torch.full((len(state.members), 2), math.nan, dtype=torch.float64, device=state.device)
    wrapper = _Fourier(template, task)
    params = {f"model.{k}": v.detach() for k, v in state.views.items()}
    return torch.func.vmap(lambda p: torch.func.functional_call(wrapper, p, ()))(params)


# ---- checkpoints -----------------------------------------------------------------------------


def member_state_dict(state: PackState, i: int) -> dict[str, torch.Tensor]:
    """Member i's weights as its lone `nn.Module`'s `state_dict()`, on CPU: what `load_state_dict`
    of `models.build_model(cfg.model, ...)` takes. Member i must still be stacked (it is until the
    step after it retires)."""
    row = state.members.index(i)
    own = {name: view[row].detach().cpu().clone() for name, view in state.views.items()}
    return {
        k: own[k] if k in own else v.detach().cpu().clone() for k, v in state.template.state_dict().items()
    }


_SAVED = ("params", "opt.", "grokfast.")
"""State tensors a checkpoint holds; hyper.* and data.* are rebuilt from the configs."""


def save_pack(state: PackState, path: str | Path) -> None:
    """One `torch.save` file of the pack (weights_only-loadable): the members still active, their
    parameters, optimizer and filter state, the step, the clock, and every member's configuration."""
    keep = [r for r, i in enumerate(state.members) if state.active[i]]
    index = torch.tensor(keep, dtype=torch.long, device=state.device)
    tensors = {k: v.index_select(0, index) for k, v in state.tensors.items() if k.startswith(_SAVED)}
    payload = {
        "format": PACK_FORMAT,
        "configs": json.dumps([to_dict(c) for c in state.cfgs]),
        "step": state.step,
        "elapsed_s": state.elapsed_s,
        "active": list(state.active),
        "last_eval": list(state.last_eval),
        "failed": list(state.failed),
        "members": [state.members[r] for r in keep],
        "tensors": tensors,
    }
    torch.save(payload, Path(path))


def load_pack(cfgs: Sequence[TrialConfig], path: str | Path) -> PackState:
    """The pack `save_pack` wrote, for the same members, on their device; `run_pack` continues
    it bit-for-bit (on CPU)."""
    state = init_pack(cfgs)
    payload = torch.load(Path(path), map_location=state.device, weights_only=True)
    if payload.get("format") != PACK_FORMAT:
        raise ValueError(f"{path}: unknown pack format {payload.get('format')!r}")
    ours = json.loads(json.dumps([to_dict(c) for c in state.cfgs]))
    if json.loads(payload["configs"]) != ours:
        raise ValueError(f"{path}: saved for other members than the {len(state.cfgs)} given")
    members = [int(i) for i in payload["members"]]
    index = torch.tensor(members, dtype=torch.long, device=state.device)
    rebuilt = {k: v.index_select(0, index) for k, v in state.tensors.items() if not k.startswith(_SAVED)}
    state.tensors = {**payload["tensors"], **rebuilt}
    state.members = members
    state.step = int(payload["step"])
    state.elapsed_s = float(payload["elapsed_s"])
    state.active = [bool(a) for a in payload["active"]]
    state.last_eval = [int(s) for s in payload["last_eval"]]
    state.failed = [bool(f) for f in payload["failed"]]
    state.views = _bind(state)
    return state
