"""phases.py on synthetic curves: every phase, the edge cases, and the stopper's test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from grokstudy.config import PhaseConfig
from grokstudy.phases import (
    PHASE_DEFINITIONS,
    PHASES,
    classify,
    classify_records,
    generalization_confirmed,
    rules,
)
from grokstudy.records import EvalRecord

CFG = PhaseConfig(threshold=0.99, grok_delay_factor=5.0, min_delay=500, margin=0.05, confirm_steps=1000)
STEPS = list(range(0, 10_001, 100))  # 0, 100, ..., 10000
BUDGET = 10_000


def ramp(at: int | None, low: float = 0.05, high: float = 1.0) -> list[float]:
    """Accuracy `low` before step `at`, `high` from it on (never, if at is None)."""
    return [high if at is not None and s >= at else low for s in STEPS]


def test_fast_generalization_is_comprehension() -> None:
    r = classify(STEPS, ramp(300), ramp(500), CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay) == ("comprehension", 300, 500, 200)


def test_long_delay_after_fitting_is_grokking() -> None:
    r = classify(STEPS, ramp(300), ramp(6000), CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay) == ("grokking", 300, 6000, 5700)


def test_fitting_without_generalizing_is_memorization() -> None:
    r = classify(STEPS, ramp(300), ramp(None, low=0.3), CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay) == ("memorization", 300, None, None)
    assert r.best_val_acc == pytest.approx(0.3)


def test_never_fitting_is_confusion() -> None:
    r = classify(STEPS, ramp(None, low=0.6), ramp(None, low=0.1), CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val) == ("confusion", None, None)
    assert r.final_train_acc == pytest.approx(0.6)


def test_generalization_that_collapses_and_stays_down_is_unstable() -> None:
    val = [1.0 if 2000 <= s < 5000 else 0.2 for s in STEPS]
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay) == ("unstable", 300, None, None)
    assert r.best_val_acc == 1.0 and r.final_val_acc == pytest.approx(0.2)


def test_late_regeneralization_after_a_collapse_counts_from_the_recovery() -> None:
    val = [1.0 if 1000 <= s < 2000 or s >= 7000 else 0.2 for s in STEPS]
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_val, r.delay) == ("grokking", 7000, 6700)


def test_a_dip_within_the_margin_does_not_break_the_hold() -> None:
    val = [0.1 if s < 500 else (0.96 if s == 3000 else 1.0) for s in STEPS]
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_val) == ("comprehension", 500)


def test_fit_at_step_zero_uses_one_step_for_the_relative_gap() -> None:
    fast = classify(STEPS, ramp(0), ramp(400), CFG, BUDGET)
    slow = classify(STEPS, ramp(0), ramp(600), CFG, BUDGET)
    assert (fast.t_train, fast.phase) == (0, "comprehension")  # 400 < min_delay
    assert (slow.t_train, slow.delay, slow.phase) == (0, 600, "grokking")


def test_budget_ending_mid_jump_is_memorization_with_its_best_val_acc_visible() -> None:
    val = [0.05 if s < 9000 else 0.05 + (s - 9000) / 1000 * 0.9 for s in STEPS]  # 0.95 at the end
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_val) == ("memorization", None)
    assert r.best_val_acc == pytest.approx(0.95)


def test_a_lost_training_fit_keeps_the_first_t_train() -> None:
    train = [1.0 if 300 <= s < 1000 else 0.5 for s in STEPS]
    r = classify(STEPS, train, ramp(None, low=0.2), CFG, BUDGET)
    assert (r.phase, r.t_train) == ("memorization", 300)
    assert r.final_train_acc == pytest.approx(0.5)


def test_validation_before_training_gives_a_negative_delay_and_comprehension() -> None:
    r = classify(STEPS, ramp(800), ramp(400), CFG, BUDGET)
    assert (r.phase, r.delay) == ("comprehension", -400)


def test_holding_validation_without_a_training_fit_is_comprehension() -> None:
    r = classify(STEPS, ramp(None, low=0.985), ramp(400), CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay) == ("comprehension", None, 400, None)


def test_single_point_curve_is_classified() -> None:
    assert classify([0], [0.01], [0.01], CFG, BUDGET).phase == "confusion"
    r = classify([0], [1.0], [1.0], CFG, BUDGET)
    assert (r.phase, r.t_train, r.t_val, r.delay, r.steps) == ("comprehension", 0, 0, 0, 0)


def test_eval_points_beyond_the_budget_are_ignored() -> None:
    r = classify(STEPS, ramp(300), ramp(6000), CFG, max_steps=5000)
    assert (r.phase, r.t_val, r.steps) == ("memorization", None, 5000)


def test_threshold_and_gap_parameters_change_the_label() -> None:
    train, val = ramp(300, high=0.97), ramp(2000, high=0.97)
    assert classify(STEPS, train, val, CFG, BUDGET).phase == "confusion"
    low = dataclasses.replace(CFG, threshold=0.95)
    assert classify(STEPS, train, val, low, BUDGET).phase == "grokking"
    lenient = dataclasses.replace(low, grok_delay_factor=10.0)
    assert classify(STEPS, train, val, lenient, BUDGET).phase == "comprehension"
    long_gap = dataclasses.replace(low, min_delay=2000)
    assert classify(STEPS, train, val, long_gap, BUDGET).phase == "comprehension"


def test_margin_decides_whether_a_dip_is_a_collapse() -> None:
    val = [0.1 if s < 500 else (0.9 if s == 3000 else 1.0) for s in STEPS]
    assert classify(STEPS, ramp(300), val, CFG, BUDGET).t_val == 3100
    wide = dataclasses.replace(CFG, margin=0.2)
    assert classify(STEPS, ramp(300), val, wide, BUDGET).t_val == 500


def test_generalization_is_confirmed_only_after_holding_for_confirm_steps() -> None:
    train, val = ramp(300), ramp(2000)
    upto = [i for i, s in enumerate(STEPS) if s <= 2900]
    assert not generalization_confirmed(
        STEPS[: len(upto)], train[: len(upto)], val[: len(upto)], CFG
    )  # held 900 steps
    n = STEPS.index(3000) + 1
    assert generalization_confirmed(STEPS[:n], train[:n], val[:n], CFG)  # held 1000 steps


def test_generalization_is_not_confirmed_without_a_training_fit_or_after_a_collapse() -> None:
    assert not generalization_confirmed(STEPS, ramp(None, low=0.5), ramp(400), CFG)
    collapsed = [1.0 if 1000 <= s < 9500 else 0.2 for s in STEPS]
    assert not generalization_confirmed(STEPS, ramp(300), collapsed, CFG)
    assert not generalization_confirmed([], [], [], CFG)


def test_zero_confirm_steps_confirms_at_the_crossing() -> None:
    now = dataclasses.replace(CFG, confirm_steps=0)
    assert generalization_confirmed([0, 100], [0.5, 1.0], [0.1, 1.0], now)
    assert not generalization_confirmed([0, 100], [0.5, 1.0], [0.1, 0.98], now)


def test_classify_records_matches_classify_on_the_same_curve() -> None:
    train, val = ramp(300), ramp(6000)
    records = [
        EvalRecord(step=s, train_loss=1.0, train_acc=a, val_loss=1.0, val_acc=b, weights_norm=1.0)
        for s, a, b in zip(STEPS, train, val, strict=True)
    ]
    assert classify_records(records, CFG, BUDGET) == classify(STEPS, train, val, CFG, BUDGET)


def test_numpy_inputs_and_noisy_curves_are_accepted() -> None:
    rng = np.random.default_rng(0)
    s = np.arange(0, 20_001, 50)
    train = np.clip(1 / (1 + np.exp(-(s - 400) / 60)) + rng.normal(0, 0.003, s.size), 0, 1)
    val = np.clip(1 / (1 + np.exp(-(s - 12_000) / 400)) + rng.normal(0, 0.003, s.size), 0, 1)
    r = classify(s, train, val, CFG, 20_000)
    assert r.phase == "grokking"
    assert 600 <= r.t_train <= 900 and 13_000 <= r.t_val <= 14_500


def test_malformed_curves_are_rejected() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        classify([0, 1], [0.1], [0.1, 0.2], CFG, BUDGET)
    with pytest.raises(ValueError, match="increase"):
        classify([0, 0], [0.1, 0.1], [0.1, 0.2], CFG, BUDGET)
    with pytest.raises(ValueError, match="empty"):
        classify([], [], [], CFG, BUDGET)


def test_every_phase_has_a_definition_and_a_rule() -> None:
    assert set(PHASE_DEFINITIONS) == set(PHASES)
    assert set(PHASES) <= set(rules(CFG))
    assert "0.94" in rules(CFG)["t_val"]
