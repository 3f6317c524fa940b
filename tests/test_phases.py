"""phases.py on synthetic curves: every phase, the edge cases, and the stopper's test."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from grokstudy.config import PhaseConfig
from grokstudy.phases import (
    PHASE_DEFINITIONS,
    PHASES,
    circuit_time,
    classify,
    classify_records,
    generalization_confirmed,
    rules,
)
from grokstudy.records import EvalRecord

CFG = PhaseConfig(threshold=0.99, grok_delay_factor=5.0, min_delay=500, margin=0.05, confirm_steps=1000)
STEPS = list(range(0, 10_001, 100))  # 0, 100, ..., 10000
BUDGET = 10_000


def ramp(at: int | None, low: float = 0.05, high: float = 0.99) -> list[float]:
    """Accuracy `low` before step `at`, `high` from it on (never, if at is None). The default
    `high` is the threshold itself, so the interpolated crossing is exactly `at`."""
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
    recovery = round(6900 + (0.99 - 0.2) / (1.0 - 0.2) * 100)  # interpolated between 6900 and 7000
    assert (r.phase, r.t_val, r.delay) == ("grokking", recovery, recovery - 300)


def test_a_dip_within_the_margin_does_not_break_the_hold() -> None:
    val = [0.1 if s < 500 else (0.96 if s == 3000 else 1.0) for s in STEPS]
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_val) == ("comprehension", 499)  # crossing 0.99 between 400 (0.1) and 500 (1.0)


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
    assert (r.phase, r.t_train) == ("memorization", 298)  # 0.5 at 200, 1.0 at 300: 0.99 at 298
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


def test_margin_and_the_confirmation_window_decide_whether_a_dip_is_a_collapse() -> None:
    val = [0.1 if s < 500 else (0.9 if s == 3000 else 1.0) for s in STEPS]
    # Below θ - m for 100 steps, shorter than confirm_steps: a dip, forgiven.
    assert classify(STEPS, ramp(300), val, CFG, BUDGET).t_val == 499
    # With a 50-step window the same fall is a collapse: t_val is the recovery.
    short = dataclasses.replace(CFG, confirm_steps=50)
    assert classify(STEPS, ramp(300), val, short, BUDGET).t_val == 3090
    wide = dataclasses.replace(short, margin=0.2)  # 0.9 is no fall at all below 0.79
    assert classify(STEPS, ramp(300), val, wide, BUDGET).t_val == 499


def test_one_brief_dip_after_generalizing_does_not_turn_comprehension_into_grokking() -> None:
    val = [0.1 if s < 500 else (0.3 if s in (4000, 4100) else 1.0) for s in STEPS]
    r = classify(STEPS, ramp(300), val, CFG, BUDGET)
    assert (r.phase, r.t_val) == ("comprehension", 499)
    long_collapse = [0.1 if s < 500 else (0.3 if 4000 <= s < 5500 else 1.0) for s in STEPS]
    r = classify(STEPS, ramp(300), long_collapse, CFG, BUDGET)
    assert r.phase == "grokking" and r.t_val > 5400  # a real collapse: t_val is the recovery
    never = [0.1 if s < 500 else (0.3 if s >= 9900 else 1.0) for s in STEPS]
    assert classify(STEPS, ramp(300), never, CFG, BUDGET).phase == "unstable"  # open at the end


@pytest.mark.parametrize("every", [10, 50, 100, 250])
def test_the_grokking_cut_does_not_move_with_the_eval_grid(every: int) -> None:
    """The same smooth curves sampled on train.eval_steps with eval_every 10 to 250 give the same
    verdict and timings within interpolation error (before, t_train was the next eval step)."""
    from grokstudy.config import TrainConfig
    from grokstudy.train import eval_steps

    steps = np.array(eval_steps(TrainConfig(max_steps=4000, eval_every=every)))
    train = 1 / (1 + np.exp(-(steps - 120) / 15))  # crosses 0.99 at step ~189
    val = 1 / (1 + np.exp(-(steps - 900) / 40))  # crosses 0.99 at step ~1084
    cfg = dataclasses.replace(CFG, min_delay=200)
    r = classify(steps, train, val, cfg, 4000)
    assert r.phase == "grokking"
    assert abs(r.t_train - 189) <= 15 and abs(r.t_val - 1084) <= every


def test_t_val_loss_is_the_first_step_the_validation_loss_stays_below_its_threshold() -> None:
    loss = [1.0 if s < 2000 else 10 ** (-(s - 2000) / 500) for s in STEPS]  # 1e-2 at step 3000
    r = classify(STEPS, ramp(300), ramp(1500), CFG, BUDGET, val_loss=loss)
    assert r.t_val == 1500 and r.t_val_loss == 3000
    spike = [v * (50 if s == 5000 else 1) for s, v in zip(STEPS, loss, strict=True)]  # a 100-step spike
    assert classify(STEPS, ramp(300), ramp(1500), CFG, BUDGET, val_loss=spike).t_val_loss == 3000
    stuck = [0.05 for _ in STEPS]
    assert classify(STEPS, ramp(300), ramp(1500), CFG, BUDGET, val_loss=stuck).t_val_loss is None


def test_liu2022_rule_is_their_fixed_gap_at_accuracy_0_9() -> None:
    from grokstudy.config import PHASE_RULES

    liu = PhaseConfig(rule="liu2022", **PHASE_RULES["liu2022"])
    assert (liu.threshold, liu.grok_delay_factor, liu.min_delay) == (0.9, 1.0, 1001)
    # Fits at 300, generalizes at 1200: 900 steps later, not more than 1000: comprehension
    # (under the default rule, t_val >= 5 * t_train and a gap >= 500 make it grokking).
    r = classify(STEPS, ramp(300, high=0.9), ramp(1200, high=0.9), liu, BUDGET)
    assert r.phase == "comprehension"
    assert classify(STEPS, ramp(300, high=0.9), ramp(1400, high=0.9), liu, BUDGET).phase == "grokking"
    # No hold: a collapse after reaching 0.9 does not undo generalization.
    val = [0.9 if 1400 <= s < 3000 else 0.1 for s in STEPS]
    assert classify(STEPS, ramp(300, high=0.9), val, liu, BUDGET).phase == "grokking"


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


def test_a_study_measured_by_loss_is_not_stopped_before_its_loss_has_held() -> None:
    # Accuracy holds from step 2000; the loss only gets below 1e-2 at 4000.
    train, val = ramp(300), ramp(2000)
    loss = [1.0 if s < 2000 else (0.05 if s < 4000 else 1e-3) for s in STEPS]
    both = dataclasses.replace(CFG, early_stop="accuracy_and_loss")

    def upto(step: int, cfg: PhaseConfig) -> bool:
        n = STEPS.index(step) + 1
        return generalization_confirmed(STEPS[:n], train[:n], val[:n], cfg, loss[:n])

    assert upto(3000, CFG)  # accuracy alone stops at 3000
    assert not upto(4900, both) and upto(5000, both)
    with pytest.raises(ValueError, match="needs the validation loss"):
        generalization_confirmed(STEPS, train, val, both)
    never = dataclasses.replace(CFG, early_stop="never")
    assert not generalization_confirmed(STEPS, train, val, never, loss)


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


def test_validation_accuracy_at_the_fit_tells_a_plateau_from_a_run_already_generalizing() -> None:
    plateau = classify(STEPS, ramp(300), ramp(6000, low=0.02), CFG, BUDGET)
    assert plateau.phase == "grokking" and plateau.val_acc_at_fit == pytest.approx(0.02)
    # Validation climbing linearly from 0 at step 0 to 0.99 at step 6000: 0.55 when it fits at 3300.
    climbing = [min(0.99, 0.99 * s / 6000) for s in STEPS]
    early = classify(STEPS, ramp(3300), climbing, CFG, BUDGET)
    assert early.t_train == 3300 and early.val_acc_at_fit == pytest.approx(0.99 * 3300 / 6000)
    assert classify(STEPS, ramp(None, low=0.5), ramp(None), CFG, BUDGET).val_acc_at_fit is None


def test_a_trial_that_spends_its_budget_without_generalizing_is_censored() -> None:
    assert classify(STEPS, ramp(300), ramp(None, low=0.3), CFG, BUDGET).censored  # memorization
    assert classify(STEPS, ramp(None, low=0.6), ramp(None), CFG, BUDGET).censored  # confusion
    assert not classify(STEPS, ramp(300), ramp(6000), CFG, BUDGET).censored  # grokked
    # Stopped before its budget (it diverged, or the study stopped it): not censored by the budget.
    assert not classify(STEPS[:50], ramp(300)[:50], ramp(None)[:50], CFG, BUDGET).censored
    records = [EvalRecord(s, 0.1 if s < 5000 else math.inf, 1.0, 4.0, 0.01, 10.0) for s in STEPS]
    diverged = classify_records(records, CFG, BUDGET)
    assert diverged.phase == "diverged" and not diverged.censored


def test_plateau_max_makes_grokking_need_validation_near_chance_at_the_fit() -> None:
    half_way = [0.99 if s >= 6000 else 0.5 if s >= 200 else 0.02 for s in STEPS]  # at 0.5 as it fits
    plateau = ramp(6000, low=0.02)
    near_chance = dataclasses.replace(CFG, plateau_max=0.1)
    assert classify(STEPS, ramp(300), half_way, CFG, BUDGET).phase == "grokking"  # off by default
    risen = classify(STEPS, ramp(300), half_way, near_chance, BUDGET)
    assert (risen.phase, risen.t_train, risen.t_val) == ("comprehension", 300, 6000)
    assert risen.val_acc_at_fit == pytest.approx(0.5)
    assert classify(STEPS, ramp(300), plateau, near_chance, BUDGET).phase == "grokking"
    # The bound is inclusive, and the other phases do not depend on it.
    assert classify(STEPS, ramp(300), half_way, dataclasses.replace(CFG, plateau_max=0.5), BUDGET).phase == (
        "grokking"
    )
    assert classify(STEPS, ramp(300), ramp(None, low=0.5), near_chance, BUDGET).phase == "memorization"
    assert classify(STEPS, ramp(300), ramp(500), near_chance, BUDGET).phase == "comprehension"
    assert "val/acc at t_train <= 0.1" in rules(near_chance)["grokking"]
    assert "t_train <=" not in rules(CFG)["grokking"]


def restricted_curve(losses: dict[int, float]) -> list[EvalRecord]:
    """A fitted, not yet generalized curve whose progress measures were taken at `losses`' steps
    (every other eval: NaN at the rest, as with measures_every: 2)."""
    return [
        EvalRecord(s, 0.01, 1.0, 4.0, 0.1, 10.0, restricted_loss=losses.get(s, math.nan))
        for s in range(0, 3001, 50)
    ]


def test_t_circuit_is_where_the_restricted_loss_holds_below_the_loss_threshold() -> None:
    cfg = PhaseConfig(confirm_steps=300)  # loss_threshold 1e-2
    falling = {s: 10.0 ** (0.5 - (s - 400) / 200) if s > 400 else 4.0 for s in range(0, 3001, 100)}
    # log10 loss falls 0.5 per 100 steps from 400: 10^-1.5 at 800, 10^-2 at 900 exactly.
    assert circuit_time(restricted_curve(falling), cfg) == 900
    assert classify_records(restricted_curve(falling), cfg, 3000).t_circuit == 900
    # Between eval points the crossing is interpolated in log-loss: 1e-2 a third of the way.
    coarse = {0: 1.0, 300: 10.0**-1.0, 600: 10.0**-4.0, 900: 10.0**-4.0}
    assert circuit_time(restricted_curve(coarse), cfg) == 400
    # A brief rise above 10x the threshold (shorter than confirm_steps) is forgiven; a long one is not.
    brief = falling | {1200: 0.5}
    assert circuit_time(restricted_curve(brief), cfg) == 900
    long_rise = falling | {1200: 0.5, 1300: 0.5, 1400: 0.5, 1500: 0.5}
    # ...counted again from the fall after it: log10 -0.3 at 1500 to -5.5 at 1600 crosses -2 at 1533.
    assert circuit_time(restricted_curve(long_rise), cfg) == 1533
    assert circuit_time(restricted_curve({0: 4.0, 1000: 1.0}), cfg) is None  # never there
    assert circuit_time(restricted_curve({}), cfg) is None  # no measures taken
