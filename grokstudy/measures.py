"""Progress measures read off the weights: parameter norm and Fourier sparsity of the embedding.

Each measure has a tensor form (`*_tensor`, stays on the device, no sync; the
training loop batches them into one transfer per evaluation) and a float form.
"""

from __future__ import annotations

import functools
import math

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
