"""The rules on config fields: one source for study files, `--set` and the training core."""

from __future__ import annotations

import dataclasses

import pytest

from grokstudy.config import (
    STUDY_SECTIONS,
    TRIAL_SECTIONS,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    TrialConfig,
    is_prime,
    nearest_primes,
    show,
    validate_trial,
)
from grokstudy.errors import StudyError, StudyErrors

# (a trial that breaks one rule, the dotted path named, a fragment of the line)
BAD_TRIALS = {
    "unknown op": (TrialConfig(task=TaskConfig(op="x**y")), "task.op", "allowed: x+y, x-y"),
    "modulus too small": (TrialConfig(task=TaskConfig(p=1)), "task.p", "2 <= p <= 4096"),
    "modulus too large": (TrialConfig(task=TaskConfig(p=5000)), "task.p", "2 <= p <= 4096"),
    "S_7 is too big": (TrialConfig(task=TaskConfig(op="perm", n=7)), "task.n", "2 <= n <= 6"),
    "division by a non-prime": (TrialConfig(task=TaskConfig(op="x/y", p=96)), "task.p", "e.g. 89 or 97"),
    "fraction 1": (TrialConfig(data=DataConfig(fraction=1.0)), "data.fraction", "0 < fraction < 1"),
    "empty training set": (
        TrialConfig(task=TaskConfig(p=7), data=DataConfig(fraction=0.001)),
        "data.fraction",
        "empty training set",
    ),
    "empty validation set": (
        TrialConfig(task=TaskConfig(p=7), data=DataConfig(fraction=0.999)),
        "data.fraction",
        "empty validation set",
    ),
    "split seed beyond 32 bits": (
        TrialConfig(data=DataConfig(split_seed=2**64)),
        "data.split_seed",
        "2**32 - 1",
    ),
    "unknown model": (
        TrialConfig(model=ModelConfig(kind="cnn")),
        "model.kind",
        "allowed: mlp, transformer, gromov",
    ),
    "unknown activation": (
        TrialConfig(model=ModelConfig(activation="tanh")),
        "model.activation",
        "allowed: relu, gelu, quadratic",
    ),
    "heads do not divide": (
        TrialConfig(model=ModelConfig(kind="transformer", embed_dim=30, heads=4)),
        "model.embed_dim",
        "not a multiple of model.heads",
    ),
    "zero width": (TrialConfig(model=ModelConfig(width=0)), "model.width", "1 <= width"),
    "unknown optimizer": (
        TrialConfig(optimizer=OptimConfig(name="lion")),
        "optimizer.name",
        "allowed: adamw, adam, sgd, rmsprop",
    ),
    "unknown filter": (
        TrialConfig(optimizer=OptimConfig(grokfast="fft")),
        "optimizer.grokfast",
        "none, ema, ma",
    ),
    "unknown decay target": (
        TrialConfig(optimizer=OptimConfig(decay_to="one")),
        "optimizer.decay_to",
        "zero, init",
    ),
    "nesterov without momentum": (
        TrialConfig(optimizer=OptimConfig(name="sgd", nesterov=True)),
        "optimizer.nesterov",
        "momentum > 0",
    ),
    "empty Grokfast window": (
        TrialConfig(optimizer=OptimConfig(grokfast="ma", grokfast_window=0)),
        "optimizer.grokfast_window",
        "1 <= grokfast_window",
    ),
    "beta of 1": (
        TrialConfig(optimizer=OptimConfig(betas=(0.9, 1.0))),
        "optimizer.betas",
        "two numbers in [0, 1)",
    ),
    "no steps": (TrialConfig(train=TrainConfig(max_steps=0)), "train.max_steps", "1 <= max_steps"),
    "a budget of 1e20 steps": (TrialConfig(train=TrainConfig(max_steps=10**20)), "train.max_steps", "<= 1e9"),
    "too many eval points": (
        TrialConfig(train=TrainConfig(max_steps=10**9, eval_every=1, checkpoint_every=1)),
        "train.eval_every",
        "at most 100,000",
    ),
    "a batch of 1e30": (TrialConfig(train=TrainConfig(batch_size=10**30)), "train.batch_size", "or full"),
    "unknown loss": (TrialConfig(train=TrainConfig(loss="hinge")), "train.loss", "allowed: cross_entropy"),
    "unknown device": (TrialConfig(train=TrainConfig(device="tpu")), "train.device", "auto, cpu, cuda"),
    "checkpoint between evals": (
        TrialConfig(train=TrainConfig(eval_every=100, checkpoint_every=150)),
        "train.checkpoint_every",
        "not a multiple of train.eval_every",
    ),
}


@pytest.mark.parametrize(("cfg", "path", "fragment"), BAD_TRIALS.values(), ids=BAD_TRIALS.keys())
def test_validate_trial_names_the_one_broken_rule_by_its_dotted_path(
    cfg: TrialConfig, path: str, fragment: str
):
    with pytest.raises(StudyError) as err:
        validate_trial(cfg)
    assert not isinstance(err.value, StudyErrors), str(err.value)
    assert err.value.path == path
    assert fragment in err.value.msg, err.value.msg
    assert "\n" not in str(err.value)


def test_validate_trial_reports_every_problem_together() -> None:
    cfg = TrialConfig(task=TaskConfig(p=1), optimizer=OptimConfig(lr=0.0), train=TrainConfig(loss="hinge"))
    with pytest.raises(StudyErrors) as err:
        validate_trial(cfg)
    assert [e.path for e in err.value.errors] == ["task.p", "optimizer.lr", "train.loss"]


def test_the_default_trial_is_valid() -> None:
    validate_trial(TrialConfig())


def test_every_trial_field_has_a_documented_rule() -> None:
    for section, cls in STUDY_SECTIONS.items():
        for f in dataclasses.fields(cls):
            if section in ("diagram",) or f.name == "space":
                continue
            spec = f.metadata.get("spec")
            assert spec is not None and len(spec.doc) > 10, f"{section}.{f.name} has no rule or doc"
    assert set(TRIAL_SECTIONS) == {"task", "data", "model", "optimizer", "train"}


def test_primes() -> None:
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert nearest_primes(96) == (89, 97)
    assert nearest_primes(2) == (None, 3)


def test_shown_values_stay_short_however_big_the_value() -> None:
    bomb: list = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9**9 leaves, shared as a YAML alias bomb would be
    assert len(show(bomb)) <= 80
    assert show(1e-3) == "0.001" and show(None) == "null" and show(True) == "true" and show("a") == "'a'"
