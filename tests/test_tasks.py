"""Tables against brute force, and the split's sizes, disjointness and seed."""

from __future__ import annotations

import itertools

import pytest
import torch

from grokstudy.config import DataConfig, TaskConfig, TrainConfig, TrialConfig
from grokstudy.tasks import OPERATIONS, build_dataset, build_table, permutations
from grokstudy.train import init_state

P = 7
BRUTE = {
    "x+y": lambda x, y: (x + y) % P,
    "x-y": lambda x, y: (x - y) % P,
    "x*y": lambda x, y: (x * y) % P,
    "x/y": lambda x, y: next(c for c in range(P) if (c * y) % P == x),
    "x^2+y^2": lambda x, y: (x**2 + y**2) % P,
    "x^2+xy+y^2": lambda x, y: (x**2 + x * y + y**2) % P,
    "x^3+xy": lambda x, y: (x**3 + x * y) % P,
}


def as_dict(op: str, **task: int) -> dict[tuple[int, int], int]:
    table = build_table(TaskConfig(op=op, **task))
    return {(a, b): c for (a, b), c in zip(table.inputs.tolist(), table.labels.tolist(), strict=True)}


@pytest.mark.parametrize("op", list(BRUTE))
def test_every_modular_table_matches_brute_force(op: str) -> None:
    pairs = [(x, y) for x in range(P) for y in range(P) if op != "x/y" or y != 0]
    assert as_dict(op, p=P) == {(x, y): BRUTE[op](x, y) for x, y in pairs}


def test_every_registered_operation_is_checked_here() -> None:
    assert set(OPERATIONS) == set(BRUTE) | {"perm"}


@pytest.mark.parametrize("n", [3, 4])
def test_perm_table_is_composition_in_s_n(n: int) -> None:
    elements = list(itertools.permutations(range(n)))
    expected = {
        (i, j): elements.index(tuple(a[b[k]] for k in range(n)))
        for (i, a), (j, b) in itertools.product(enumerate(elements), repeat=2)
    }
    assert as_dict("perm", n=n) == expected
    assert permutations(n)[0].tolist() == list(range(n))  # index 0 is the identity


def test_table_sizes_and_vocabularies() -> None:
    assert build_table(TaskConfig(op="x+y", p=97)).labels.shape == (97 * 97,)
    assert build_table(TaskConfig(op="x/y", p=97)).labels.shape == (97 * 96,)
    s5 = build_table(TaskConfig(op="perm", n=5))
    assert (s5.labels.shape[0], s5.n_tokens, s5.n_classes) == (14_400, 120, 120)


def test_split_sizes_are_disjoint_and_cover_the_table() -> None:
    data = build_dataset(TaskConfig(op="x-y", p=11), DataConfig(fraction=0.3, split_seed=4))
    assert (data.train_x.shape, data.val_x.shape) == ((36, 2), (85, 2))  # round(0.3 * 121) = 36
    train = {tuple(r) for r in data.train_x.tolist()}
    val = {tuple(r) for r in data.val_x.tolist()}
    assert not train & val
    assert train | val == {(x, y) for x in range(11) for y in range(11)}
    assert data.train_y.tolist() == [(x - y) % 11 for x, y in data.train_x.tolist()]
    assert (data.n_tokens, data.n_classes) == (11, 11)


def test_split_depends_on_split_seed_and_not_on_the_init_seed() -> None:
    task = TaskConfig(op="x+y", p=13)
    a = build_dataset(task, DataConfig(fraction=0.5, split_seed=0))
    b = build_dataset(task, DataConfig(fraction=0.5, split_seed=0))
    c = build_dataset(task, DataConfig(fraction=0.5, split_seed=1))
    assert torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.train_x, c.train_x)
    states = [
        init_state(
            TrialConfig(task=task, data=DataConfig(fraction=0.5), train=TrainConfig(seed=s, device="cpu"))
        )
        for s in (0, 7)
    ]
    assert torch.equal(states[0].data.train_x, states[1].data.train_x)
    assert torch.equal(states[0].data.train_x, a.train_x)
    assert not torch.equal(states[0].model.embed.weight, states[1].model.embed.weight)
