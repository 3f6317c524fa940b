"""Algorithmic datasets: the full table of a binary operation and a seeded split.

The operations follow Power et al. 2022 ("Grokking: generalization beyond
overfitting", arXiv 2201.02177): modular arithmetic over Z_p and composition in
the symmetric group S_n. An input is a pair of operand indices; the model builds
its own token sequence from it. The split shuffles every pair of the table with
its own seed (`data.split_seed`), so replicates that differ in `train.seed` see
the same training set.

A new operation is one function `(TaskConfig) -> Table` plus an entry in
`OPERATIONS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grokstudy.config import DataConfig, TaskConfig, is_prime


@dataclass(frozen=True, slots=True)
class Table:
    """Every equation of an operation: `inputs[i] = (a, b)` and `labels[i] = a ∘ b`."""

    inputs: torch.Tensor
    """LongTensor [N, 2] of operand indices in [0, n_tokens)."""
    labels: torch.Tensor
    """LongTensor [N] of results in [0, n_classes)."""
    n_tokens: int
    n_classes: int


@dataclass(frozen=True, slots=True)
class Dataset:
    """A table split into training pairs and their complement (validation)."""

    train_x: torch.Tensor
    """LongTensor [N_train, 2]."""
    train_y: torch.Tensor
    """LongTensor [N_train]."""
    val_x: torch.Tensor
    """LongTensor [N_val, 2]."""
    val_y: torch.Tensor
    """LongTensor [N_val]."""
    n_tokens: int
    """Operand vocabulary size (p for Z_p, n! for S_n)."""
    n_classes: int

    def to(self, device: torch.device | str) -> Dataset:
        """The same split with every tensor on `device`."""
        return Dataset(
            self.train_x.to(device),
            self.train_y.to(device),
            self.val_x.to(device),
            self.val_y.to(device),
            self.n_tokens,
            self.n_classes,
        )


# ---- modular arithmetic over Z_p ---------------------------------------------------


def _modular(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> Callable[[TaskConfig], Table]:
    """All p*p pairs (x, y) with label fn(x, y, p) in [0, p)."""

    def table(task: TaskConfig) -> Table:
        p = task.p
        x, y = _all_pairs(p, p)
        return Table(torch.stack([x, y], dim=1), fn(x, y, p) % p, p, p)

    return table


def _divide(task: TaskConfig) -> Table:
    """x / y = x * y^-1 mod p over the p*(p-1) pairs with y != 0; needs p prime (Z_p a field)."""
    p = task.p
    assert is_prime(p), "config.validate_trial admits x/y only with a prime p"
    x, y = _all_pairs(p, p)
    keep = y != 0
    x, y = x[keep], y[keep]
    inverse = torch.tensor([0] + [pow(v, -1, p) for v in range(1, p)])
    return Table(torch.stack([x, y], dim=1), (x * inverse[y]) % p, p, p)


def _all_pairs(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(a).repeat_interleave(b)  # (a*b,) 0,0,..,1,1,..
    y = torch.arange(b).repeat(a)  # (a*b,) 0,1,..,0,1,..
    return x, y


# ---- the symmetric group S_n --------------------------------------------------------


def permutations(n: int) -> torch.Tensor:
    """LongTensor [n!, n]: the elements of S_n in lexicographic order (index 0 is the identity)."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)


def _compose(task: TaskConfig) -> Table:
    """a ∘ b for all pairs in S_n, with (a ∘ b)(i) = a(b(i)) (apply b first)."""
    n = task.n
    perms = permutations(n)  # (m, n)
    m = perms.shape[0]
    a, b = _all_pairs(m, m)
    composed = torch.gather(perms[a], 1, perms[b])  # (m*m, n): row i is a[b[i]]
    # Each permutation as a base-n number, looked up to its lexicographic index.
    weights = n ** torch.arange(n - 1, -1, -1)
    index_of = torch.full((n**n,), -1, dtype=torch.long)
    index_of[perms @ weights] = torch.arange(m)
    return Table(torch.stack([a, b], dim=1), index_of[composed @ weights], m, m)


OPERATIONS: dict[str, Callable[[TaskConfig], Table]] = {
    "x+y": _modular(lambda x, y, p: x + y),
    "x-y": _modular(lambda x, y, p: x - y),
    "x*y": _modular(lambda x, y, p: x * y),
    "x/y": _divide,
    "x^2+y^2": _modular(lambda x, y, p: x * x % p + y * y % p),
    "x^2+xy+y^2": _modular(lambda x, y, p: x * x % p + x * y % p + y * y % p),
    "x^3+xy": _modular(lambda x, y, p: x * x % p * x % p + x * y % p),
    "perm": _compose,
}
"""op name -> full table builder. Terms are reduced mod p as they go, so int64 never overflows."""


def build_table(task: TaskConfig) -> Table:
    """The full table of `task.op` (a task `config.validate_trial` admitted)."""
    return OPERATIONS[task.op](task)


def build_dataset(task: TaskConfig, data: DataConfig) -> Dataset:
    """The table split by `data.fraction`, shuffled by `data.split_seed` alone.

    The first round(fraction * N) pairs of a seeded permutation train; the rest
    (the complement) validate; `config.validate_trial` keeps both non-empty.
    """
    table = build_table(task)
    n = table.labels.shape[0]
    n_train = round(data.fraction * n)
    generator = torch.Generator().manual_seed(data.split_seed)
    order = torch.randperm(n, generator=generator)
    train, val = order[:n_train], order[n_train:]
    return Dataset(
        table.inputs[train],
        table.labels[train],
        table.inputs[val],
        table.labels[val],
        table.n_tokens,
        table.n_classes,
    )
