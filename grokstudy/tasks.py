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
    """A table split into training pairs and their complement (validation): `*_x` are
    LongTensors [N_train or N_val, 2], `*_y` LongTensors [N_train or N_val]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    n_tokens: int
    """Operand vocabulary size (p for Z_p, n! for S_n)."""
    n_classes: int

    def to(self, device: torch.device | str) -> Dataset:
        """The same split with every tensor on `device`."""
        tensors = (self.train_x, self.train_y, self.val_x, self.val_y)
        return Dataset(*(t.to(device) for t in tensors), self.n_tokens, self.n_classes)


# ---- modular arithmetic over Z_p ---------------------------------------------------


def _modular(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> Callable[[TaskConfig], Table]:
    """All p*p pairs (x, y) with label fn(x, y, p) in [0, p)."""

    def table(task: TaskConfig) -> Table:
        p = task.p
        pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))  # (p*p, 2): (0,0), (0,1), ..
        return Table(pairs, fn(*pairs.unbind(1), p) % p, p, p)

    return table


def _divide(task: TaskConfig) -> Table:
    """x / y = x * y^-1 mod p over the p*(p-1) pairs with y != 0; needs p prime (Z_p a field)."""
    p = task.p
    assert is_prime(p), "config.validate_trial admits x/y only with a prime p"
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(1, p))  # (p*(p-1), 2)
    x, y = pairs.unbind(1)
    inverse = torch.tensor([0] + [pow(v, -1, p) for v in range(1, p)])
    return Table(pairs, (x * inverse[y]) % p, p, p)


# ---- the symmetric group S_n --------------------------------------------------------


def permutations(n: int) -> torch.Tensor:
    """LongTensor [n!, n]: the elements of S_n in lexicographic order (index 0 is the identity)."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)


def _compose(task: TaskConfig) -> Table:
    """a ∘ b for all pairs in S_n, with (a ∘ b)(i) = a(b(i)) (apply b first)."""
    n = task.n
    perms = permutations(n)  # (m, n)
    m = perms.shape[0]
    pairs = torch.cartesian_prod(torch.arange(m), torch.arange(m))  # (m*m, 2)
    composed = torch.gather(perms[pairs[:, 0]], 1, perms[pairs[:, 1]])  # (m*m, n): row i is a[b[i]]
    # Each permutation as a base-n number: lexicographic order is numeric order, so searchsorted indexes it.
    weights = n ** torch.arange(n - 1, -1, -1)
    return Table(pairs, torch.searchsorted(perms @ weights, composed @ weights), m, m)


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
    train, val = split(table.labels.shape[0], data)
    x, y = table.inputs, table.labels
    return Dataset(x[train], y[train], x[val], y[val], table.n_tokens, table.n_classes)


def split(n: int, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of a table of n pairs: the first round(fraction * n) of a
    permutation seeded by `data.split_seed` alone, and the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed))
    n_train = round(data.fraction * n)
    return order[:n_train], order[n_train:]
