"""Weight norm and the Fourier progress measures on embeddings with known spectra; Nanda et al.'s
restricted and excluded losses against their own projection on a tiny p; their ordering on a
real grokking run."""

from __future__ import annotations

import math

import pytest
import torch

from grokstudy import measures, phases, tasks, train
from grokstudy.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    PhaseConfig,
    TaskConfig,
    TrainConfig,
    TrialConfig,
)
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


# ---- restricted and excluded loss (Nanda et al. 2023) ------------------------------------------


def nanda_losses(
    logits: torch.Tensor,
    element: torch.Tensor,
    m: int,
    key: list[int],
    labels: torch.Tensor,
    in_train: torch.Tensor,
) -> tuple[float, float]:
    """Their definitions, computed as their code does (helpers.get_component_cos_xpy,
    test_logits): project each output's logits over the inputs onto the unit vectors
    cos(2π w s/m) and sin(2π w s/m) of each key w; restricted = that projection plus the mean
    logits over inputs (bias correction), cross-entropy on every row; excluded = the logits
    minus it, on the training rows."""
    directions = []
    for w in key:
        for wave in (torch.cos, torch.sin):
            v = wave(2 * math.pi * w * element.double() / m)
            directions.append(v / v.norm())
    basis = torch.stack(directions)  # [2k, n]
    trig = basis.T @ (basis @ logits)
    restricted = trig + (logits - trig).mean(0, keepdim=True)
    ce = torch.nn.functional.cross_entropy
    return float(ce(restricted, labels)), float(ce((logits - trig)[in_train], labels[in_train]))


@pytest.mark.parametrize("op", ["x+y", "x-y", "x*y", "x/y"])
def test_restricted_and_excluded_loss_are_nandas_projections(op: str) -> None:
    p = 7
    task = TaskConfig(op=op, p=p)
    table = tasks.build_table(task)
    cyclic = measures.cyclic_table(task, table.inputs, table.labels)
    assert cyclic is not None
    m, rows, s = cyclic.m, cyclic.rows, cyclic.element
    assert m == (p if op in ("x+y", "x-y") else p - 1)
    assert torch.equal(cyclic.label_of[s], table.labels[rows])  # the label is a function of s
    # A planted circuit on frequency 2 (which must be the one key frequency), plus noise and a
    # per-class bias that only the bias correction restores.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(table.labels.shape[0], p, generator=generator, dtype=torch.float64) * 0.3
    label_element = torch.full((p,), -1)
    label_element[cyclic.label_of] = torch.arange(m)  # s of each class (x*y, x/y: log c; 0 has none)
    wave = torch.cos(2 * math.pi * 2 * (s[:, None] - label_element[None, :]) / m)
    logits[rows] += 5 * torch.where(label_element >= 0, wave, 0.0) + torch.arange(p) * 0.2
    in_train = torch.rand(table.labels.shape[0], generator=generator) < 0.5
    got = measures.progress_tensor(
        lambda x: logits[(x[:, 0] * p + x[:, 1]) if op != "x/y" else (x[:, 0] * (p - 1) + x[:, 1] - 1)][None],
        cyclic,
        table.inputs,
        in_train[None],
        chunk=10,  # several chunks: the sums must add up across them
    )[0].tolist()
    want = nanda_losses(logits[rows], s, m, [2], table.labels[rows], in_train[rows])
    assert got[2] == 1.0  # key frequencies: just the planted one
    assert math.isclose(got[0], want[0], rel_tol=1e-9) and math.isclose(got[1], want[1], rel_tol=1e-9)
    assert got[0] < 1.0 and got[1] > 0.8 * math.log(p)  # the circuit alone classifies; without it, ~chance


def test_random_logits_have_no_key_frequency_and_a_circuit_has_exactly_its_own() -> None:
    p = 23
    task = TaskConfig(op="x+y", p=p)
    table = tasks.build_table(task)
    cyclic = measures.cyclic_table(task, table.inputs, table.labels)
    assert cyclic is not None
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3, p * p, p, generator=generator, dtype=torch.float64)
    s = cyclic.element.double()
    c = torch.arange(p).double()
    circuit = sum(torch.cos(2 * math.pi * w * (s[:, None] - c[None, :]) / p) for w in (3, 8, 10))
    logits = noise + torch.stack([0 * circuit, 6 * circuit, 0.2 * circuit])  # none, strong, faint
    values = measures.progress_tensor(
        lambda x: logits, cyclic, table.inputs, torch.ones(3, p * p, dtype=torch.bool), p * p
    )
    assert values[:, 2].tolist() == [0.0, 3.0, 3.0]
    assert values[0, 0] > math.log(p) - 0.1  # no key frequency: the mean logits alone, near chance
    assert values[1, 0] < 0.01 < values[2, 0] < values[0, 0]


def test_tasks_without_a_cyclic_group_have_no_table() -> None:
    for task in (TaskConfig(op="x^2+y^2", p=7), TaskConfig(op="perm", n=3)):
        table = tasks.build_table(task)
        assert measures.cyclic_table(task, table.inputs, table.labels) is None


def test_gini_of_hand_made_values() -> None:
    values = torch.tensor(
        [[1.0, 0, 0, 0], [2.0, 2, 2, 2], [0.0, 0, 0, 0], [1.0, 2, 3, 4]], dtype=torch.float64
    )
    # sum |xi - xj| over ordered pairs / (2 n^2 mean): the last is 20 / (2 * 16 * 2.5) = 0.25
    assert measures.gini(values).tolist() == pytest.approx([0.75, 0.0, 0.0, 0.25])


def test_fourier_gini_is_high_for_one_wave_and_low_for_noise() -> None:
    one = with_embedding(
        "mlp", torch.cos(2 * math.pi * 4 * torch.arange(P)[:, None] / P).repeat(1, 8).float()
    )
    components = 2 * (P // 2)  # cos and sin of 1..15: one holds everything
    gini_one = float(measures.fourier_gini_tensor(one, TaskConfig(op="x+y", p=P)))
    assert math.isclose(gini_one, (components - 1) / components, rel_tol=1e-5)  # float32 weights
    torch.manual_seed(0)
    noise = with_embedding("mlp", torch.randn(P, 64))
    assert float(measures.fourier_gini_tensor(noise, TaskConfig(op="x+y", p=P))) < 0.3
    assert math.isnan(float(measures.fourier_gini_tensor(noise, TaskConfig(op="x^2+y^2", p=P))))


# ---- the science on a real run ----------------------------------------------------------------

GROKKING_TRANSFORMER = TrialConfig(
    task=TaskConfig(op="x+y", p=31),
    data=DataConfig(fraction=0.6),
    model=ModelConfig(kind="transformer", embed_dim=32, width=128, heads=4),
    optimizer=OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.98), weight_decay=1.0, warmup_steps=10),
    train=TrainConfig(max_steps=1200, eval_every=50, device="cpu"),
)
"""Nanda et al. 2023's transformer, small enough to grok in seconds on one CPU core."""


def test_the_circuit_forms_before_validation_generalizes_and_the_excluded_loss_peaks_between() -> None:
    """Nanda et al. 2023's three phases on a real run: memorization (train loss falls), circuit
    formation (restricted loss falls, excluded loss rises, validation still low), clean-up
    (validation generalizes, excluded loss falls back); a few key frequencies at the end."""
    train.configure_process()
    records = list(train.run(GROKKING_TRANSFORMER))
    verdict = phases.classify_records(records, PhaseConfig(min_delay=200, confirm_steps=300), 1200)
    assert verdict.phase == "grokking", verdict
    assert verdict.t_circuit is not None and verdict.t_val is not None and verdict.t_val_loss is not None
    assert verdict.t_train < verdict.t_circuit < verdict.t_val < verdict.t_val_loss
    at_circuit = min(records, key=lambda r: abs(r.step - verdict.t_circuit))
    assert at_circuit.val_acc < 0.9  # the circuit is there while validation has not generalized
    peak = max(records, key=lambda r: r.excluded_loss)
    assert verdict.t_train < peak.step < verdict.t_val_loss
    assert peak.excluded_loss > records[-1].excluded_loss > records[0].excluded_loss
    assert 1 <= records[-1].key_frequencies <= 8
    assert records[-1].fourier_gini > 2 * records[0].fourier_gini
