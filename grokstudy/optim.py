"""The update rule of one step: a torch optimizer plus everything grokking studies turn.

`Optimizer.step` runs, in order, between `loss.backward()` and the next
`zero_grad`:
1. linear learning-rate warm-up;
2. a Grokfast gradient filter (Lee et al. 2024), if any;
3. ⊥Grad (Prieto et al. 2025), if on: the update sees a gradient orthogonal to the weights;
4. weight decay toward the initial weights (`decay_to: init`), in the optimizer's own form;
5. the torch optimizer's step (which applies decay toward zero itself).
Every piece of state is a tensor or a number, so `state_dict()` saves with
`torch.save` and loads with `torch.load(weights_only=True)`.

Losses live here too (`LOSSES`): the logits stay float32, the loss is float64; each is written
once, for a batch's mean (`train`) and per target (`packed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from grokstudy.config import OptimConfig
from grokstudy.models import decay_groups

# ---- losses -------------------------------------------------------------------------

LossFn = Callable[..., torch.Tensor]
"""(logits [..., C], targets [...], reduction="mean" | "none") -> float64: the mean over every
target, or one loss per target (what `packed` weighs per member)."""


def _over_rows(
    loss: Callable[..., torch.Tensor], x: torch.Tensor, targets: torch.Tensor, reduction: str
) -> torch.Tensor:
    """torch's `loss` over the last axis of x, any leading axes flattened: the mean (the same
    kernel call as on a plain [B, C] batch) or one value per target, shaped like `targets`."""
    out = loss(x.flatten(0, -2), targets.flatten(), reduction=reduction)
    return out if reduction == "mean" else out.view(targets.shape)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with the log-softmax in float64.

    Float32 softmax rounds the gradient of confidently right samples to exactly 0
    ("softmax collapse"), which stalls low-weight-decay runs (Prieto et al. 2025,
    arXiv 2501.04697); Nanda et al.'s code casts to float64 for the same reason.
    """
    return _over_rows(F.cross_entropy, logits.double(), targets, reduction)


def mse(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared error against one-hot targets: the mean over all elements (torch's MSELoss), or per
    target the mean over classes."""
    one_hot = F.one_hot(targets, logits.shape[-1]).double()
    if reduction == "mean":
        return F.mse_loss(logits.double(), one_hot)
    return (logits.double() - one_hot).pow(2).mean(-1)


def _stablemax_s(x: torch.Tensor) -> torch.Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) below; the clamp keeps the unused branch finite for autograd.
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def stablemax(logits: torch.Tensor) -> torch.Tensor:
    """StableMax probabilities s(x_i) / sum_j s(x_j) in float64 (Prieto et al. 2025)."""
    s = _stablemax_s(logits.double())
    return s / s.sum(-1, keepdim=True)


def stablemax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """-log stablemax(logits)[target], float64: grokking without weight decay (Prieto et al. 2025)."""
    s = _stablemax_s(logits.double())
    log_probs = s.log() - s.sum(-1, keepdim=True).log()
    return _over_rows(F.nll_loss, log_probs, targets, reduction)


def cross_entropy_float32(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy with a float32 log-softmax, returned as float64.

    Only to reproduce softmax collapse (Prieto et al. 2025): without weight decay
    the logits of fitted pairs grow until float32 rounds their gradient to 0 and
    learning stalls, which looks like memorization. Never the default.
    """
    return _over_rows(F.cross_entropy, logits.float(), targets, reduction).double()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "cross_entropy_float32": cross_entropy_float32,
    "mse": mse,
    "stablemax": stablemax_cross_entropy,
}
"""train.loss -> fn(logits float32, targets long, reduction) -> float64."""


def build_loss(name: str) -> LossFn:
    return LOSSES[name]


# ---- torch optimizers -----------------------------------------------------------------


def _fast_path(params: list[torch.Tensor]) -> dict[str, bool]:
    # Fused kernels (CPU since torch 2.4, CUDA) need floating tensors on one supported device.
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


_OptimizerFactory = Callable[[list[dict[str, Any]], OptimConfig, dict[str, bool]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, _OptimizerFactory] = {
    "adamw": lambda groups, c, fast: torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps, **fast),
    # Coupled L2: torch's Adam adds weight_decay * w to the gradient (what Grokfast's runs used).
    "adam": lambda groups, c, fast: torch.optim.Adam(groups, lr=c.lr, betas=c.betas, eps=c.eps, **fast),
    "sgd": lambda groups, c, fast: torch.optim.SGD(
        groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, **fast
    ),
    # RMSprop's smoothing constant is betas[1]; torch 2.13 has no fused RMSprop, foreach is the fast path.
    "rmsprop": lambda groups, c, fast: torch.optim.RMSprop(
        groups, lr=c.lr, alpha=c.betas[1], eps=c.eps, momentum=c.momentum, foreach=True
    ),
}
"""optimizer.name -> fn(param groups with their weight_decay set, cfg, `_fast_path` kwargs) -> torch
optimizer. Only adamw decouples its decay (`OptimConfig.weight_decay_form`)."""


# ---- gradient filters -----------------------------------------------------------------


class GradFilter(Protocol):
    def apply(self, grads: list[torch.Tensor]) -> None:
        """Rewrite `grads` in place."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GrokfastEMA:
    """mu <- alpha * mu + (1 - alpha) * g;  g <- g + lamb * mu; mu starts as the first gradient.

    Lee et al. 2024, "Grokfast" (arXiv 2405.20233), `gradfilter_ema` in ironjr/grokfast.
    """

    def __init__(self, alpha: float, lamb: float) -> None:
        self.alpha, self.lamb = alpha, lamb
        self.mu: list[torch.Tensor] = []

    def apply(self, grads: list[torch.Tensor]) -> None:
        if not self.mu:
            self.mu = [g.detach().clone() for g in grads]
        torch._foreach_mul_(self.mu, self.alpha)
        torch._foreach_add_(self.mu, grads, alpha=1 - self.alpha)
        torch._foreach_add_(grads, self.mu, alpha=self.lamb)

    def state_dict(self) -> dict[str, Any]:
        return {"mu": list(self.mu)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mu = list(state["mu"])


class GrokfastMA:
    """g <- g + lamb * mean(last `window` gradients), and no filtering until the window is full.

    Lee et al. 2024, `gradfilter_ma` with warmup=True. The window is a ring buffer
    with a float64 running sum, so a step costs O(params), not O(window * params).
    """

    def __init__(self, window: int, lamb: float) -> None:
        self.window, self.lamb = window, lamb
        self.count = 0
        self.ring: list[torch.Tensor] = []  # each (window, *shape)
        self.total: list[torch.Tensor] = []  # float64 sums of the ring

    def apply(self, grads: list[torch.Tensor]) -> None:
        if not self.ring:
            self.ring = [g.new_zeros((self.window, *g.shape)) for g in grads]
            self.total = [g.new_zeros(g.shape, dtype=torch.float64) for g in grads]
        slot = self.count % self.window
        oldest = [r[slot] for r in self.ring]
        if self.count >= self.window:
            torch._foreach_sub_(self.total, [o.double() for o in oldest])
        torch._foreach_add_(self.total, [g.double() for g in grads])
        torch._foreach_copy_(oldest, grads)
        self.count += 1
        if self.count >= self.window:
            mean = torch._foreach_div(self.total, self.window)
            torch._foreach_add_(
                grads, [m.to(g.dtype) for m, g in zip(mean, grads, strict=True)], alpha=self.lamb
            )

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ring": list(self.ring), "total": list(self.total)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.ring, self.total = list(state["ring"]), list(state["total"])


FILTERS: dict[str, Callable[[OptimConfig], GradFilter | None]] = {
    "none": lambda cfg: None,
    "ema": lambda cfg: GrokfastEMA(cfg.grokfast_alpha, cfg.grokfast_lamb),
    "ma": lambda cfg: GrokfastMA(cfg.grokfast_window, cfg.grokfast_lamb),
}
"""optimizer.grokfast -> filter (None: no filter)."""


@torch.no_grad()
def orthogonalize_(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """⊥Grad in place: per tensor g <- (g - (w·g)/(w·w) w) rescaled to ||g|| (Prieto et al. 2025).

    Removes the component that only scales the weights (the "naive loss
    minimization" direction that delays generalization). Zero tensors keep g.
    """
    for w, g in zip(params, grads, strict=True):
        wv, gv = w.reshape(-1), g.reshape(-1)
        proj = torch.dot(wv, gv) / (torch.dot(wv, wv) + 1e-30)
        g_orth = gv - proj * wv
        g.copy_((g_orth * (gv.norm() / (g_orth.norm() + 1e-30))).view_as(g))


# ---- the whole update -------------------------------------------------------------------


class Optimizer:
    """A torch optimizer with warm-up, decay toward init, Grokfast and ⊥Grad; one state_dict.

    Weight decay touches only `models.decay_groups(model)[0]`. With
    `decay_to: zero` the torch optimizer applies it (decoupled for adamw, coupled
    L2 otherwise). With `decay_to: init` the torch optimizer's weight_decay is 0
    and `step` applies the same form to (w - w0) itself.
    """

    def __init__(self, cfg: OptimConfig, model: nn.Module) -> None:
        self.cfg = cfg
        decay, free = decay_groups(model, cfg.decay_biases)
        self.params = decay + free
        self.decay_params = decay
        to_init = cfg.decay_to == "init" and cfg.weight_decay != 0
        groups = [
            {"params": decay, "weight_decay": 0.0 if to_init else cfg.weight_decay},
            {"params": free, "weight_decay": 0.0},
        ]
        self.base = OPTIMIZERS[cfg.name]([g for g in groups if g["params"]], cfg, _fast_path(self.params))
        self.decoupled = cfg.weight_decay_form.startswith("decoupled")
        self.init: list[torch.Tensor] = [p.detach().clone() for p in decay] if to_init else []
        self._offset = [torch.empty_like(p) for p in self.init]
        self.grad_filter = FILTERS[cfg.grokfast](cfg)

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that takes `step` steps to `step + 1`: linear warm-up, then flat.

        warmup_start lr/steps: lr * min(1, (step + 1) / W); zero: lr * min(1, step / W) (Nanda's).
        """
        return lr_at(self.cfg, step)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Apply one update from the current `.grad`s; `step` = steps taken so far."""
        lr = self.lr_at(step)
        for group in self.base.param_groups:
            group["lr"] = lr
        if self.grad_filter is not None or self.cfg.orthograd:
            grads = [p.grad for p in self.params]
            if self.grad_filter is not None:
                self.grad_filter.apply(grads)
            if self.cfg.orthograd:
                orthogonalize_(self.params, grads)
        if self.init:
            # (w - w0) into a reused buffer: exact at w0, and no rounding drift of w*(1-c) + c*w0.
            torch._foreach_copy_(self._offset, self.decay_params)
            torch._foreach_sub_(self._offset, self.init)
            wd = self.cfg.weight_decay
            if self.decoupled:
                # AdamW's own form with w0 as the origin: w <- w - lr*wd*(w - w0), before the Adam update.
                torch._foreach_add_(self.decay_params, self._offset, alpha=-lr * wd)
            else:
                # Coupled L2 toward w0: g <- g + wd*(w - w0), as torch adds wd*w for decay toward zero.
                torch._foreach_add_([p.grad for p in self.decay_params], self._offset, alpha=wd)
        self.base.step()

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "filter": self.grad_filter.state_dict() if self.grad_filter is not None else {},
            "init": list(self.init),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        if self.grad_filter is not None:
            self.grad_filter.load_state_dict(state["filter"])
        device = self.params[0].device if self.params else None
        self.init = [t.to(device) for t in state["init"]]


def lr_at(cfg: OptimConfig, step: int) -> float:
    """The warm-up schedule (see `Optimizer.lr_at`); one rule for the single and the packed trainer."""
    warmup = cfg.warmup_steps
    if warmup <= 0:
        return cfg.lr
    done = step + 1 if cfg.warmup_start == "lr/steps" else step
    return cfg.lr * min(1.0, done / warmup)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    """The full update rule for `model` (see `Optimizer`)."""
    return Optimizer(cfg, model)
