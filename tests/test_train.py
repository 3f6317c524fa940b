"""The training loop: schedule, determinism, restore-equals-uninterrupted, and a real grokking run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from grokstudy.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TaskConfig,
    TrainConfig,
    TrialConfig,
    to_dict,
    trial_from_dict,
)
from grokstudy.errors import StudyError
from grokstudy.records import EvalRecord
from grokstudy.train import eval_steps, init_state, load_state, run, save_state

SMALL = TrialConfig(
    task=TaskConfig(op="x+y", p=11),
    data=DataConfig(fraction=0.5),
    model=ModelConfig(embed_dim=8, width=32),
    optimizer=OptimConfig(lr=1e-2, weight_decay=0.5),
    train=TrainConfig(max_steps=40, eval_every=10, device="cpu"),
)

RESUMABLE = {
    "full-batch-adamw": SMALL,
    "minibatch-adam-grokfast-ema-decay-to-init": dataclasses.replace(
        SMALL,
        optimizer=OptimConfig(name="adam", lr=1e-2, grokfast="ema", decay_to="init"),
        train=dataclasses.replace(SMALL.train, batch_size=16),
    ),
    "transformer-sgd-grokfast-ma-orthograd": dataclasses.replace(
        SMALL,
        model=ModelConfig(kind="transformer", embed_dim=8, width=16, heads=2),
        optimizer=OptimConfig(
            name="sgd", lr=0.1, momentum=0.9, grokfast="ma", grokfast_window=4, orthograd=True
        ),
        train=dataclasses.replace(SMALL.train, batch_size=16, loss="stablemax"),
    ),
    "gromov-mse": dataclasses.replace(
        SMALL, model=ModelConfig(kind="gromov", width=32), train=dataclasses.replace(SMALL.train, loss="mse")
    ),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def without_time(records: list[EvalRecord]) -> list[EvalRecord]:
    return [dataclasses.replace(r, elapsed_s=0.0) for r in records]


def test_eval_schedule_has_step_zero_early_log_steps_every_eval_every_and_the_end() -> None:
    assert eval_steps(TrainConfig(max_steps=450, eval_every=100)) == [
        0,
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        300,
        400,
        450,
    ]
    assert eval_steps(TrainConfig(max_steps=30, eval_every=10)) == [0, 1, 2, 5, 10, 20, 30]
    assert eval_steps(TrainConfig(max_steps=3, eval_every=1)) == [0, 1, 2, 3]
    assert len(eval_steps(TrainConfig())) == 107  # the default: 10,000 steps, every 100


def test_each_record_is_yielded_with_the_state_at_that_step() -> None:
    state = init_state(SMALL)
    steps = []
    for record in run(SMALL, state):
        assert state.step == record.step
        steps.append(record.step)
    assert steps == eval_steps(SMALL.train)
    assert all(0.0 <= r.train_acc <= 1.0 and 0.0 <= r.val_acc <= 1.0 for r in list(run(SMALL)))


def test_records_carry_every_measure() -> None:
    first, *_, last = list(run(SMALL))
    assert first.step == 0 and first.elapsed_s == 0.0
    assert last.elapsed_s > 0.0
    assert math.isfinite(last.train_loss) and math.isfinite(last.val_loss)
    assert 0.0 < last.fourier_top_k_share <= 1.0
    expected_norm = math.sqrt(
        sum(float((p.detach().double() ** 2).sum()) for p in init_state(SMALL).model.parameters())
    )
    assert first.weights_norm == pytest.approx(expected_norm)
    perm = dataclasses.replace(SMALL, task=TaskConfig(op="perm", n=3), data=DataConfig(fraction=0.5))
    assert math.isnan(list(run(perm))[-1].fourier_top_k_share)


def test_a_run_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    a, b = init_state(SMALL), init_state(SMALL)
    records_a, records_b = list(run(SMALL, a)), list(run(SMALL, b))
    assert without_time(records_a) == without_time(records_b)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    other = dataclasses.replace(SMALL, train=dataclasses.replace(SMALL.train, seed=1))
    assert without_time(list(run(other))) != without_time(records_a)


@pytest.mark.parametrize("cfg", RESUMABLE.values(), ids=RESUMABLE.keys())
@pytest.mark.parametrize("stop_at", [0, 5, 20])
def test_restored_run_continues_bit_for_bit(cfg: TrialConfig, stop_at: int, tmp_path: Path) -> None:
    whole = init_state(cfg)
    uninterrupted = list(run(cfg, whole))

    first = init_state(cfg)
    before = []
    for record in run(cfg, first):
        before.append(record)
        if record.step == stop_at:
            save_state(first, tmp_path / "state.pt")
            break
    resumed = load_state(cfg, tmp_path / "state.pt")
    after = list(run(cfg, resumed))

    assert after[0].step > stop_at  # the saved step is not yielded again
    assert without_time(before + after) == without_time(uninterrupted)
    assert resumed.step == whole.step == cfg.train.max_steps
    for p, q in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_is_one_weights_only_file_with_config_json_beside_it(tmp_path: Path) -> None:
    state = init_state(SMALL)
    for _ in run(SMALL, state):
        if state.step == 10:
            break
    save_state(state, tmp_path / "state.pt")
    payload = torch.load(tmp_path / "state.pt", weights_only=True)
    assert payload["step"] == 10 and payload["last_eval"] == 10
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == to_dict(SMALL)
    assert trial_from_dict(saved) == SMALL


def test_matmul_precision_is_set_per_run_and_packs_never_mix_it() -> None:
    from grokstudy import packed
    from grokstudy.config import pack_key, with_overrides
    from grokstudy.train import seconds_per_step

    tf32 = with_overrides(SMALL, {"train.matmul_precision": "high"})
    try:
        init_state(tf32)
        assert torch.get_float32_matmul_precision() == "high"
        init_state(SMALL)
        assert torch.get_float32_matmul_precision() == "highest"
        packed.init_pack([tf32, with_overrides(tf32, {"train.seed": 1})])
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert pack_key(tf32) != pack_key(SMALL)
    with pytest.raises(ValueError, match="train.matmul_precision"):
        packed.init_pack([SMALL, tf32])
    # On a CPU `high` changes nothing: the same run, bit for bit.
    for a, b in zip(run(tf32), run(SMALL), strict=True):
        assert dataclasses.replace(a, elapsed_s=0) == dataclasses.replace(b, elapsed_s=0)
    assert seconds_per_step(SMALL, steps=3) > 0


def test_bad_train_values_raise_study_error_at_their_path() -> None:
    for key, value in (("eval_every", 0), ("batch_size", 0), ("device", "tpu"), ("loss", "hinge")):
        cfg = dataclasses.replace(SMALL, train=dataclasses.replace(SMALL.train, **{key: value}))
        with pytest.raises(StudyError) as err:
            init_state(cfg)
        assert err.value.path == f"train.{key}"


# ---- a real grokking run -----------------------------------------------------------------

# Gromov's quadratic MLP on x+y mod 47 with 30% of pairs (the README demo). Measured with
# bench/phase_grid.py: fits by step 50 and generalizes at step 1,100-1,200 in 12 of 12 seeds;
# with weight decay 0 it stays at validation accuracy <= 0.03 for 4,000 steps (4 of 4 seeds).
# About 5 s of one CPU thread per run.
GROKS = TrialConfig(
    task=TaskConfig(op="x+y", p=47),
    data=DataConfig(fraction=0.3),
    model=ModelConfig(kind="gromov", width=256),
    optimizer=OptimConfig(name="adamw", lr=1e-2, weight_decay=1.0),
    train=TrainConfig(max_steps=1600, eval_every=50, device="cpu"),
)


def first_step(records: list[EvalRecord], key: str, threshold: float = 0.99) -> int | None:
    return next((r.step for r in records if getattr(r, key) >= threshold), None)


@pytest.mark.slow
def test_model_memorizes_first_and_generalizes_much_later_only_with_weight_decay() -> None:
    records = list(run(GROKS))
    t_train, t_val = first_step(records, "train_acc"), first_step(records, "val_acc")
    assert t_train is not None and t_val is not None, (t_train, t_val)
    assert t_val >= 5 * t_train and t_val - t_train >= 500, (t_train, t_val)
    assert records[-1].val_acc >= 0.99
    # The Fourier measure tracks the circuit (Nanda et al. 2023): sparse after grokking, not before.
    at_fit = next(r for r in records if r.step == t_train)
    assert records[-1].fourier_top_k_share > at_fit.fourier_top_k_share + 0.25

    control = dataclasses.replace(GROKS, optimizer=dataclasses.replace(GROKS.optimizer, weight_decay=0.0))
    records = list(run(control))
    assert first_step(records, "train_acc") is not None
    assert max(r.val_acc for r in records) < 0.5
