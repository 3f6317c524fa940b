"""Weight norm and the Fourier progress measure on embeddings with known spectra."""

from __future__ import annotations

import math

import torch

from grokstudy.config import ModelConfig, TaskConfig
from grokstudy.measures import fourier_top_k_share, weights_norm
from grokstudy.models import build_model

P = 31


def with_embedding(kind: str, table: torch.Tensor) -> torch.nn.Module:
    """A model whose operand embedding (gromov: both halves of the first layer) is `table` [P, d]."""
    model = build_model(ModelConfig(kind=kind, embed_dim=table.shape[1], width=table.shape[1]), P, P)
    with torch.no_grad():
        if kind == "gromov":
            model.w_in.copy_(torch.cat([table, table]))
        else:
            model.embed.weight[:P] = table
    return model


def waves(freqs: list[int], index: torch.Tensor, period: int) -> torch.Tensor:
    """Column j is cos(2π f_j index / period + j): one frequency per column."""
    cols = [torch.cos(2 * math.pi * f * index / period + j) for j, f in enumerate(freqs)]
    return torch.stack(cols, dim=1).float()


def test_weights_norm_is_the_l2_norm_of_all_parameters() -> None:
    model = build_model(ModelConfig(embed_dim=4, width=8), 5, 5)
    expected = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
    assert math.isclose(weights_norm(model), expected, rel_tol=1e-12)


def test_an_embedding_made_of_few_frequencies_has_all_its_power_in_the_top_k() -> None:
    table = waves([3, 7, 3, 11, 7, 3, 2, 9], torch.arange(P), P)  # 5 distinct frequencies
    model = with_embedding("mlp", table)
    assert math.isclose(fourier_top_k_share(model, TaskConfig(op="x+y", p=P)), 1.0, rel_tol=1e-6)
    assert fourier_top_k_share(model, TaskConfig(op="x+y", p=P), k=3) < 0.9


def test_a_random_embedding_spreads_its_power() -> None:
    torch.manual_seed(0)
    model = with_embedding("mlp", torch.randn(P, 64))
    share = fourier_top_k_share(model, TaskConfig(op="x-y", p=P))
    assert 5 / 15 * 0.8 < share < 0.5  # about k / ((p-1)/2) = 5/15


def test_gromov_counts_each_neurons_own_frequencies() -> None:
    # Every neuron periodic, neurons spread over all 15 frequencies: Gromov's solution.
    table = waves([1 + j % 15 for j in range(60)], torch.arange(P), P)
    gromov = with_embedding("gromov", table)
    assert math.isclose(fourier_top_k_share(gromov, TaskConfig(op="x+y", p=P)), 1.0, rel_tol=1e-6)
    summed = with_embedding("mlp", table)  # the same table read as one embedding is spread out
    assert fourier_top_k_share(summed, TaskConfig(op="x+y", p=P)) < 0.5


def test_multiplication_is_measured_in_the_discrete_log_basis() -> None:
    g = 3  # a primitive root mod 31
    log = torch.zeros(P, dtype=torch.long)
    for j in range(P - 1):
        log[pow(g, j, P)] = j
    table = waves([2, 5, 2, 5], log, P - 1)  # periodic in log_g(a); row 0 (a = 0) is not used
    model = with_embedding("mlp", table)
    assert math.isclose(fourier_top_k_share(model, TaskConfig(op="x*y", p=P)), 1.0, rel_tol=1e-6)
    assert fourier_top_k_share(model, TaskConfig(op="x+y", p=P)) < 0.9


def test_the_measure_is_nan_where_no_fourier_basis_applies() -> None:
    model = build_model(ModelConfig(embed_dim=4, width=8), P, P)
    for task in (TaskConfig(op="perm", n=3), TaskConfig(op="x^2+y^2", p=P), TaskConfig(op="x/y", p=30)):
        assert math.isnan(fourier_top_k_share(model, task))
