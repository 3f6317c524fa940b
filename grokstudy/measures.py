"""Progress measures: the parameter norm, the embedding's Fourier sparsity (top-k share, Gini),
and Nanda et al. 2023's restricted and excluded losses with the key frequencies.

Each measure has a tensor form (`*_tensor`, stays on the device, no sync; the
training loop batches them into one transfer per evaluation) and a float form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grokstudy.config import TaskConfig, is_prime

FOURIER_BASIS: dict[str, str] = {
    "x+y": "additive",
    "x-y": "additive",
    "x*y": "multiplicative",
    "x/y": "multiplicative",
}
"""Ops whose table is a group law the embedding can diagonalise. Additive: Z_p itself
(Nanda et al. 2023). Multiplicative: Z_p^* = Z_{p-1} via the discrete log, so rows
1..p-1 are reordered by log_g and transformed over Z_{p-1}. Polynomials and perm: NaN."""


@torch.no_grad()
def weights_norm_tensor(model: nn.Module) -> torch.Tensor:
    """L2 norm of all parameters together, as a 0-d float64 tensor on the model's device."""
    return torch.stack([p.detach().double().pow(2).sum() for p in model.parameters()]).sum().sqrt()


def weights_norm(model: nn.Module) -> float:
    """L2 norm of all parameters together."""
    return float(weights_norm_tensor(model))


def fourier_applies(task: TaskConfig) -> bool:
    return task.op in FOURIER_BASIS and (
        FOURIER_BASIS[task.op] == "additive" or _primitive_root(task.p) is not None
    )


@torch.no_grad()
def fourier_top_k_share_tensor(model: nn.Module, task: TaskConfig, k: int = 5) -> torch.Tensor:
    """Share of the operand embedding's (non-constant) Fourier power in its top-k frequencies.

    Nanda et al. 2023 (arXiv 2301.05217) find that the generalizing circuit for
    modular addition uses about 5 key frequencies, so this share rises from its
    random-init level (about k/((p-1)/2)) toward 1 as the circuit forms.
    Frequencies f and p-f are one real frequency; the constant (f = 0) is left out.

    Two readings, chosen by the model (`model.fourier_per_column`):
    - embedding models (mlp, transformer): the power spectrum summed over embedding
      dimensions, then its top k: Nanda's key frequencies of the table as a whole;
    - gromov: each hidden neuron's own top k, as the sum over neurons of their
      top-k power over the total power. Gromov 2023's solution gives every neuron
      one frequency but spreads neurons over all of them, so the summed spectrum
      stays flat while each neuron becomes periodic (Doshi et al. 2024 measure the
      same with a per-neuron IPR). Its random-init level is higher (about 0.5 at p=47).
    Values are comparable along a run and across runs of one model kind, not
    across kinds. Power is summed over the operand embeddings the model has
    (`model.operand_embeddings()`: the shared table of the MLP/transformer, the
    two halves of gromov's first layer). NaN where no basis applies (see FOURIER_BASIS).
    """
    if not fourier_applies(task) or not hasattr(model, "operand_embeddings"):
        return torch.tensor(math.nan, dtype=torch.float64, device=next(model.parameters()).device)
    powers = _powers(model, task)
    total = sum(power.sum() for power in powers)
    if getattr(model, "fourier_per_column", False):
        top = sum(power.topk(min(k, power.shape[0]), dim=0).values.sum() for power in powers)
    else:
        spectrum = sum(power.sum(1) for power in powers)  # (m//2,)
        top = spectrum.topk(min(k, spectrum.numel())).values.sum()
    return (top / total.clamp_min(1e-300)).clamp(max=1.0)  # rounding can give 1 + 1e-16


@torch.no_grad()
def fourier_spectrum(model: nn.Module, task: TaskConfig) -> torch.Tensor:
    """The operand embedding's Fourier power at frequencies 1..m//2 (m = p, or p-1 for the
    multiplicative ops), summed over embedding dimensions: float64 [m//2], on the model's device.
    A model that grokked puts nearly all of it in a few key frequencies (Nanda et al. 2023).
    ValueError where no basis applies (see FOURIER_BASIS)."""
    if not fourier_applies(task) or not hasattr(model, "operand_embeddings"):
        raise ValueError(f"no Fourier basis for task {task.op} with this model")
    return sum(power.sum(1) for power in _powers(model, task))


def _powers(model: nn.Module, task: TaskConfig) -> list[torch.Tensor]:
    """Per operand embedding, its power at frequencies 1..m//2 per dimension: (m//2, d) each."""
    powers = []
    for emb in model.operand_embeddings():
        rows = emb.detach().double()  # (p, d)
        if FOURIER_BASIS[task.op] == "multiplicative":
            rows = rows[_log_order(task.p, rows.device)]  # (p-1, d): row j is the embedding of g^j
        # rfft folds f and m-f into one bin; the Nyquist bin (m even) has no twin, which barely moves ranks.
        powers.append(torch.fft.rfft(rows, dim=0).abs().pow(2)[1:])  # (m//2, d): frequencies 1..m//2
    return powers


def fourier_top_k_share(model: nn.Module, task: TaskConfig, k: int = 5) -> float:
    """`fourier_top_k_share_tensor` as a float (NaN where it does not apply)."""
    return float(fourier_top_k_share_tensor(model, task, k))


@functools.cache
def _primitive_root(p: int) -> int | None:
    """The smallest generator of Z_p^* (None when p is not prime, or 2)."""
    if p < 3 or not is_prime(p):
        return None
    factors = [q for q in range(2, p) if (p - 1) % q == 0 and is_prime(q)]  # of p-1
    return next(g for g in range(2, p) if all(pow(g, (p - 1) // q, p) != 1 for q in factors))


@functools.cache
def _log_order(p: int, device: torch.device) -> torch.Tensor:
    """[g^0, g^1, ..., g^(p-2)] mod p: indexing rows by it makes multiplication a shift."""
    g = _primitive_root(p)
    assert g is not None
    return torch.tensor([pow(g, j, p) for j in range(p - 1)], device=device)


# ---- progress measures (Nanda et al. 2023) -------------------------------------------------------
#
# Nanda et al. 2023 ("Progress measures for grokking via mechanistic interpretability", arXiv
# 2301.05217) show that a transformer trained on x+y mod p computes logits
# L(a, b, c) ~ sum over a few key frequencies w of cos(w (a + b - c)), and track the circuit
# through training with two losses. Their code (mechanistic-interpretability-grokking/
# progress-measures-paper, transformers.py `calculate_trig_loss`, `calculate_excluded_loss`;
# helpers.py `get_component_cos_xpy`, `test_logits`):
# - restricted loss: the logits projected, for each output c, onto the directions cos(w (a+b))
#   and sin(w (a+b)) over all p^2 inputs for the key w, plus the mean logits over inputs (their
#   "bias correction"), cross-entropy on every pair (mode 'all');
# - excluded loss: the logits minus those key-frequency components, on the training pairs.
#   Their code removes one frequency at a time; the paper (section 5.1) removes all key
#   frequencies at once, which is what we do.
# The span of cos(w s), sin(w s) over the inputs is the span of functions of s = a + b mod p at
# frequency w, so the projection is a 1-D DFT of the anti-diagonal means
# A(s, c) = mean over {a + b = s} of L(a, b, c): O(p^2 C) to gather and O(p C log p) to transform,
# instead of Nanda's p x p^2 basis matrices. Differences from their code: our key frequencies
# are read off the logits (`key_frequencies`), not off the MLP neurons' best frequencies, so the
# measure works for every model; and the cross-entropy is float64 whatever train.loss is.

KEY_FREQ_FLOOR_RATIO = 3.0
"""A key frequency holds at least this many times the median frequency's energy in the logits'
(a+b)-structured part. At initialisation every frequency's energy is a sum of about 2C squared
Gaussian terms (C classes), within +-40% of the median even at p = 23, so none passes. A
transformer's circuit frequencies stand thousands of times above the median; a ReLU MLP
spreads its (a+b) structure over harmonics and sums of its frequencies, which lifts the
median, so its circuit's frequencies stand only a few to a few tens of times above it; a higher
ratio would leave part of the MLP's circuit out of the key set (docs/reproductions.md, "On the
MLP, the order differs")."""
KEY_FREQ_MIN_SHARE = 0.01
"""...and at least this share of the strongest frequency's energy: after weight decay has
cleaned the other frequencies up (Nanda et al.'s third phase) the median energy is near zero,
and without this floor rounding noise would count."""


@dataclass(frozen=True, slots=True)
class CyclicTable:
    """A task's table rows laid on the cyclic group Z_m of its operation: the label of row
    (a, b) is a function of one group element s (x+y: s = a + b mod p; x-y: a - b; x*y and
    x/y: log a +- log b mod p-1 through a primitive root, so Z_p^* becomes Z_{p-1}).
    Rows with a zero operand of x*y or x/y are not on the group and sit out of the measures."""

    m: int
    rows: torch.Tensor
    """LongTensor [n]: the table rows on the group."""
    element: torch.Tensor
    """LongTensor [n]: each such row's s in [0, m)."""
    label_of: torch.Tensor
    """LongTensor [m]: the label of every row whose element is s."""


def cyclic_table(task: TaskConfig, inputs: torch.Tensor, labels: torch.Tensor) -> CyclicTable | None:
    """The rows of a table (`inputs` [N, 2], `labels` [N]) on their group, or None where the
    task has none (polynomials, S_n: see FOURIER_BASIS) or the table is not the full one
    (every element must have the same number of rows for the projection to be a mean)."""
    if not fourier_applies(task):
        return None
    a, b = inputs[:, 0], inputs[:, 1]
    sign = -1 if task.op in ("x-y", "x/y") else 1
    if FOURIER_BASIS[task.op] == "additive":
        m, rows = task.p, torch.arange(inputs.shape[0], device=inputs.device)
        element = (a + sign * b) % m
    else:
        m = task.p - 1
        rows = torch.nonzero((a != 0) & (b != 0)).squeeze(1)
        log = torch.empty(task.p, dtype=torch.long, device=inputs.device)
        log[_log_order(task.p, inputs.device)] = torch.arange(m, device=inputs.device)
        element = (log[a[rows]] + sign * log[b[rows]]) % m
    counts = torch.bincount(element, minlength=m)
    if rows.numel() == 0 or bool((counts != counts[0]).any()):
        return None
    label_of = torch.empty(m, dtype=torch.long, device=inputs.device)
    label_of[element] = labels[rows]
    if bool((label_of[element] != labels[rows]).any()):
        raise ValueError(f"{task.op}: labels are not a function of the group element")
    return CyclicTable(m, rows, element, label_of)


PROGRESS_MEASURES = ("restricted_loss", "excluded_loss", "key_frequencies")
"""What `progress_tensor` returns per member, in order."""


@torch.no_grad()
def progress_tensor(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    table: CyclicTable,
    inputs: torch.Tensor,
    train_mask: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Restricted loss, excluded loss and the number of key frequencies of R models at once:
    float64 [R, 3] on the models' device, no host sync.

    `logits_of(x)` maps rows `x` [n, 2] of the table `inputs` to logits [R, n, C] (R models: one
    lone model, or a pack's members); `train_mask` [R, N] marks each model's training rows.
    Two forward passes over the table's group rows, `chunk` rows at a time: the first
    gathers the anti-diagonal sums, the second the excluded loss.
    """
    device = inputs.device
    n_rows = table.rows.numel()
    sums = None
    for i in range(0, n_rows, chunk):
        rows = table.rows[i : i + chunk]
        logits = logits_of(inputs[rows]).double()  # [R, n, C]
        if sums is None:
            sums = logits.new_zeros(logits.shape[0], table.m, logits.shape[2])
        sums.index_add_(1, table.element[i : i + chunk], logits)
    assert sums is not None, "a CyclicTable has rows"
    means = sums / (n_rows // table.m)  # A(s, c) [R, m, C]
    spectrum = torch.fft.rfft(means, dim=1)  # [R, m//2 + 1, C]
    key = key_frequencies(spectrum.abs().pow(2).sum(2))  # [R, m//2 + 1], False at 0
    restricted = torch.fft.irfft(spectrum * (key | _constant(key)).unsqueeze(2), n=table.m, dim=1)
    restricted_loss = _cross_entropy(restricted, table.label_of.expand(restricted.shape[0], -1)).mean(1)
    key_part = torch.fft.irfft(spectrum * key.unsqueeze(2), n=table.m, dim=1)  # [R, m, C]
    excluded_sum = torch.zeros(key.shape[0], dtype=torch.float64, device=device)
    in_train = train_mask[:, table.rows]  # [R, n_rows]
    for i in range(0, n_rows, chunk):
        rows, element = table.rows[i : i + chunk], table.element[i : i + chunk]
        logits = logits_of(inputs[rows]).double() - key_part[:, element]
        losses = _cross_entropy(logits, table.label_of[element].expand(logits.shape[0], -1))
        excluded_sum += torch.where(in_train[:, i : i + chunk], losses, 0.0).sum(1)
    excluded_loss = excluded_sum / in_train.sum(1).clamp_min(1)
    return torch.stack([restricted_loss, excluded_loss, key.sum(1).double()], dim=1)


def progress(model: nn.Module, task: TaskConfig, data: Any) -> dict[str, float]:
    """`model_progress_tensor` as floats by PROGRESS_MEASURES name (NaN where the task has no
    cyclic group): for a notebook, e.g. `measures.progress(model, model.config.task, model.data)`
    on `grokstudy.load(...).model(trial_id)`."""
    values = model_progress_tensor(model, task, data, 1 << 16)
    if values is None:
        return dict.fromkeys(PROGRESS_MEASURES, math.nan)
    return dict(zip(PROGRESS_MEASURES, values.tolist(), strict=True))


@torch.no_grad()
def model_progress_tensor(model: nn.Module, task: TaskConfig, data: Any, chunk: int) -> torch.Tensor | None:
    """`progress_tensor` of one model on its split (`data`, a `tasks.Dataset`): float64 [3] on
    its device, no host sync; None where the task has no cyclic group."""
    inputs = torch.cat([data.train_x, data.val_x])
    table = cyclic_table(task, inputs, torch.cat([data.train_y, data.val_y]))
    if table is None:
        return None
    in_train = torch.arange(inputs.shape[0], device=inputs.device) < data.train_x.shape[0]
    return progress_tensor(lambda x: model(x).unsqueeze(0), table, inputs, in_train.unsqueeze(0), chunk)[0]


def key_frequencies(energy: torch.Tensor) -> torch.Tensor:
    """Bool [R, F]: which frequencies 1..F-1 of `energy` [R, F] (per frequency, index 0 the
    constant) are key (KEY_FREQ_FLOOR_RATIO, KEY_FREQ_MIN_SHARE); index 0 is never key."""
    waves = energy[:, 1:]
    floor = torch.maximum(
        KEY_FREQ_FLOOR_RATIO * waves.median(1, keepdim=True).values,
        KEY_FREQ_MIN_SHARE * waves.max(1, keepdim=True).values,
    )
    key = (waves >= floor) & (waves > 0)
    return torch.cat([torch.zeros_like(key[:, :1]), key], dim=1)


def _constant(key: torch.Tensor) -> torch.Tensor:
    """Bool like `key`, True at frequency 0 only: the mean logits, Nanda's bias correction."""
    constant = torch.zeros_like(key)
    constant[:, 0] = True
    return constant


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row float64 cross-entropy of logits [R, n, C] against labels [R, n]."""
    return -logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def fourier_gini_tensor(model: nn.Module, task: TaskConfig) -> torch.Tensor:
    """Gini coefficient of the operand embedding's Fourier component norms, a 0-d float64 tensor:
    Nanda et al. 2023's sparsity measure (their Figure 7 tracks it for W_E rising as the
    circuit forms). Components are cos and sin of frequencies 1..m//2 taken apart (as their
    Fourier basis does), each one's norm over the embedding dimensions, the operand embeddings
    summed in power; 0 when all are equal, near 1 when a few hold everything. For gromov
    (`fourier_per_column`) the mean over hidden neurons of each neuron's own Gini.
    NaN where no basis applies (see FOURIER_BASIS)."""
    if not fourier_applies(task) or not hasattr(model, "operand_embeddings"):
        return torch.tensor(math.nan, dtype=torch.float64, device=next(model.parameters()).device)
    components = _components(model, task)  # (2 * (m//2), d): power of each cos/sin component
    if getattr(model, "fourier_per_column", False):
        return gini(components.sqrt().T).mean()
    return gini(components.sum(1).sqrt())


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values along the last dimension (0: all equal; (n-1)/n:
    one holds everything); 0 for an all-zero row."""
    n = values.shape[-1]
    ranked = values.sort(-1).values
    ranks = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    total = ranked.sum(-1)
    weighted = (ranks * ranked).sum(-1)
    return torch.where(total > 0, 2 * weighted / (n * total.clamp_min(1e-300)) - (n + 1) / n, 0.0)


def _components(model: nn.Module, task: TaskConfig) -> torch.Tensor:
    """Power of each cos and each sin component (frequencies 1..m//2; the Nyquist sin of an even
    m, identically zero, left out) per embedding dimension, operand embeddings summed: (K, d)."""
    total = None
    for emb in model.operand_embeddings():
        rows = emb.detach().double()
        if FOURIER_BASIS[task.op] == "multiplicative":
            rows = rows[_log_order(task.p, rows.device)]
        m = rows.shape[0]
        coefficients = torch.fft.rfft(rows, dim=0)[1:]  # (m//2, d)
        parts = [coefficients.real.pow(2), coefficients.imag.pow(2)]
        if m % 2 == 0:
            parts[1] = parts[1][:-1]
        power = torch.cat(parts)
        total = power if total is None else total + power
    assert total is not None
    return total
