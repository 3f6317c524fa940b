"""Each optimizer, filter and loss against torch or a hand-computed reference."""

from __future__ import annotations

import copy
import io
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from grokstudy.config import ModelConfig, OptimConfig
from grokstudy.models import build_model, decay_groups
from grokstudy.optim import (
    LOSSES,
    GrokfastEMA,
    GrokfastMA,
    build_optimizer,
    cross_entropy,
    mse,
    orthogonalize_,
    stablemax,
    stablemax_cross_entropy,
)

X = torch.tensor([[0, 1], [2, 3], [4, 4], [1, 3], [3, 0]])
Y = torch.tensor([1, 0, 3, 4, 3])


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(embed_dim=4, width=8), 5, 5)


def backward(model: torch.nn.Module) -> None:
    F.cross_entropy(model(X), Y).backward()


def two_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny()
    return model, copy.deepcopy(model)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_adamw_path_equals_torch_adamw_with_decay_on_matrices_only() -> None:
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.5, warmup_steps=0)
    ours_model, ref_model = two_models()
    ours = build_optimizer(cfg, ours_model)
    decay, free = decay_groups(ref_model)
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.5}, {"params": free, "weight_decay": 0.0}],
        lr=1e-2,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=ours.base.defaults["fused"],
    )
    for step in range(3):
        backward(ours_model)
        ours.step(step)
        ours.zero_grad()
        backward(ref_model)
        ref.step()
        ref.zero_grad()
    assert_same_params(ours_model, ref_model)


def test_coupled_adam_equals_adam_plus_manual_l2_gradient() -> None:
    cfg = OptimConfig(name="adam", lr=1e-2, weight_decay=0.5, warmup_steps=0)
    ours_model, ref_model = two_models()
    ours = build_optimizer(cfg, ours_model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, betas=cfg.betas, eps=cfg.eps)
    decay, _ = decay_groups(ref_model)
    for step in range(3):
        backward(ours_model)
        ours.step(step)
        ours.zero_grad()
        backward(ref_model)
        for p in decay:
            p.grad += 0.5 * p.detach()
        ref.step()
        ref.zero_grad()
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sgd_nesterov_first_step_matches_the_hand_formula() -> None:
    lr, m, wd = 0.1, 0.9, 0.3
    model = tiny()
    opt = build_optimizer(
        OptimConfig(name="sgd", lr=lr, momentum=m, nesterov=True, weight_decay=wd, warmup_steps=0), model
    )
    backward(model)
    decay, _ = decay_groups(model)
    decayed = {id(p) for p in decay}
    expected = [
        p.detach() - lr * (1 + m) * (p.grad + (wd * p.detach() if id(p) in decayed else 0))
        for p in model.parameters()
    ]  # buf = g' on the first step; nesterov update = g' + m * buf
    opt.step(0)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)


def test_rmsprop_first_step_matches_the_hand_formula_with_betas1_as_alpha() -> None:
    lr, wd = 0.01, 0.2
    cfg = OptimConfig(name="rmsprop", lr=lr, weight_decay=wd, betas=(0.9, 0.95), warmup_steps=0)
    model = tiny()
    opt = build_optimizer(cfg, model)
    backward(model)
    decayed = {id(p) for p in decay_groups(model)[0]}
    expected = []
    for p in model.parameters():
        g = p.grad + (wd * p.detach() if id(p) in decayed else 0)
        expected.append(p.detach() - lr * g / (((1 - 0.95) * g * g).sqrt() + cfg.eps))
    opt.step(0)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_to_init_pulls_toward_the_initial_weights_not_zero(name: str) -> None:
    # Zero gradients isolate the decay: AdamW's Adam update is 0/(0+eps) = 0, SGD's is 0.
    lr, wd = 0.1, 2.0
    model = tiny()
    opt = build_optimizer(
        OptimConfig(name=name, lr=lr, weight_decay=wd, decay_to="init", warmup_steps=0), model
    )
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(0)
    decayed = {id(p) for p in decay_groups(model)[0]}
    for p, init in zip(model.parameters(), w0, strict=True):
        shrink = 1 - lr * wd if id(p) in decayed else 1.0  # both forms: w0 + (w - w0)(1 - lr*wd)
        torch.testing.assert_close(p.detach(), init + 1.0 * shrink)


def test_decay_to_init_leaves_weights_at_init_alone_while_decay_to_zero_shrinks_them() -> None:
    results = {}
    for decay_to in ("init", "zero"):
        model = tiny()
        opt = build_optimizer(OptimConfig(lr=0.1, weight_decay=1.0, decay_to=decay_to, warmup_steps=0), model)
        before = model.embed.weight.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(0)
        results[decay_to] = (before, model.embed.weight.detach())
    assert torch.equal(*results["init"])
    torch.testing.assert_close(results["zero"][1], results["zero"][0] * 0.9)


def test_linear_warmup_reaches_lr_after_warmup_steps() -> None:
    opt = build_optimizer(OptimConfig(lr=1e-3, warmup_steps=10), tiny())
    assert [opt.lr_at(s) for s in (0, 4, 9, 10, 1000)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert build_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), tiny()).lr_at(0) == 1e-3


def test_grokfast_ema_equals_the_formula_with_mu_starting_at_the_first_gradient() -> None:
    torch.manual_seed(0)
    alpha, lamb = 0.9, 2.0
    stream = [[torch.randn(3, 4), torch.randn(5)] for _ in range(4)]
    filt = GrokfastEMA(alpha, lamb)
    mu = None
    for grads in stream:
        raw = [g.clone() for g in grads]
        mu = [g.clone() for g in raw] if mu is None else mu
        mu = [alpha * m + (1 - alpha) * g for m, g in zip(mu, raw, strict=True)]
        filt.apply(grads)
        for got, g, m in zip(grads, raw, mu, strict=True):
            torch.testing.assert_close(got, g + lamb * m)


def test_grokfast_ma_adds_the_window_mean_once_the_window_is_full() -> None:
    torch.manual_seed(0)
    window, lamb = 3, 5.0
    filt = GrokfastMA(window, lamb)
    recent: deque[torch.Tensor] = deque(maxlen=window)
    for k in range(7):
        g = torch.randn(4, 2)
        raw = g.clone()
        recent.append(raw)
        filt.apply([g])
        expected = raw if k < window - 1 else raw + lamb * sum(recent) / window
        torch.testing.assert_close(g, expected)


def test_orthograd_output_is_orthogonal_to_the_weights_with_the_same_norm() -> None:
    torch.manual_seed(0)
    w, g = torch.randn(6, 5), torch.randn(6, 5)
    zero_w, g2 = torch.zeros(3), torch.randn(3)
    out, out2 = g.clone(), g2.clone()
    orthogonalize_([w, zero_w], [out, out2])
    assert abs(float((w * out).sum())) < 1e-5
    torch.testing.assert_close(out.norm(), g.norm())
    torch.testing.assert_close(out2, g2)  # nothing to project out of a zero tensor


def test_orthograd_in_the_optimizer_moves_orthogonally_to_each_tensor() -> None:
    model = tiny()
    opt = build_optimizer(
        OptimConfig(name="sgd", lr=1.0, weight_decay=0.0, orthograd=True, warmup_steps=0), model
    )
    before = [p.detach().clone() for p in model.parameters()]
    backward(model)
    opt.step(0)
    for p, w in zip(model.parameters(), before, strict=True):
        if w.norm() > 0:
            assert abs(float(((p.detach() - w) * w).sum())) < 1e-4


def test_cross_entropy_is_float64_and_matches_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    targets = torch.randint(0, 5, (6,))
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(logits.double(), targets))
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.float32


def test_stablemax_probabilities_sum_to_one_and_follow_s() -> None:
    probs = stablemax(torch.tensor([[0.0, 1.0, -1.0], [3.0, -5.0, 0.5]]))
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) / 3.5)
    logits = torch.tensor([[2.0, -3.0, 0.0]], requires_grad=True)
    loss = stablemax_cross_entropy(logits, torch.tensor([1]))
    torch.testing.assert_close(loss, -stablemax(logits)[0, 1].log())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_mse_is_against_one_hot_targets() -> None:
    logits = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    expected = ((0.5 - 0) ** 2 + (0 - 1) ** 2 + (1 - 1) ** 2 + (2 - 0) ** 2) / 4
    assert float(mse(logits, torch.tensor([1, 0]))) == pytest.approx(expected)
    assert set(LOSSES) == {"cross_entropy", "mse", "stablemax", "cross_entropy_float32"}


def test_float32_cross_entropy_collapses_where_float64_does_not() -> None:
    """Prieto et al. 2025's softmax collapse: at large logits float32 rounds the gradient of a
    confidently right sample to exactly 0; the float64 default keeps it."""
    from grokstudy.optim import cross_entropy, cross_entropy_float32

    grads = {}
    for name, fn in (("float32", cross_entropy_float32), ("float64", cross_entropy)):
        logits = torch.tensor([[20.0, 0.0, 0.0]], requires_grad=True)  # e^-20 < float32 eps
        fn(logits, torch.tensor([0])).backward()
        grads[name] = logits.grad[0, 0].item()  # the right class's gradient, 1 - p
    assert grads["float32"] == 0.0 and grads["float64"] < 0.0


def test_warm_up_starts_at_lr_over_steps_or_at_zero_like_nanda() -> None:
    from grokstudy.optim import lr_at

    power = OptimConfig(lr=1.0, warmup_steps=10)
    nanda = OptimConfig(lr=1.0, warmup_steps=10, warmup_start="zero")
    assert [lr_at(power, s) for s in (0, 4, 9, 10)] == [0.1, 0.5, 1.0, 1.0]
    assert [lr_at(nanda, s) for s in (0, 5, 10, 11)] == [0.0, 0.5, 1.0, 1.0]


def test_decay_biases_decays_every_tensor() -> None:
    model = build_model(ModelConfig(kind="mlp", embed_dim=4, width=8), 7, 7)
    decay, free = decay_groups(model, everything=True)
    assert len(decay) == len(list(model.parameters())) and free == []


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="adamw", grokfast="ema", decay_to="init"),
        OptimConfig(name="adam", grokfast="ma", grokfast_window=2, orthograd=True),
        OptimConfig(name="sgd", momentum=0.9, decay_to="init"),
        OptimConfig(name="rmsprop", momentum=0.5),
    ],
    ids=["adamw-ema-init", "adam-ma-ortho", "sgd-init", "rmsprop"],
)
def test_optimizer_state_round_trips_through_a_weights_only_load(cfg: OptimConfig) -> None:
    model = tiny()
    opt = build_optimizer(cfg, model)
    for step in range(3):
        backward(model)
        opt.step(step)
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = tiny(seed=1)
    twin.load_state_dict(saved["model"])
    twin_opt = build_optimizer(cfg, twin)
    twin_opt.load_state_dict(saved["opt"])
    for step in range(3, 5):
        for m, o in ((model, opt), (twin, twin_opt)):
            backward(m)
            o.step(step)
            o.zero_grad()
    assert_same_params(model, twin)
