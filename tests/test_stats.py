"""stats.py against hand-computed cases and scipy, and the reproductions page's summarize.py
(studies/papers/summarize.py) on synthetic paper studies: their intervals, claims and tests.

The bootstrap distribution of a median is known exactly: with n values, a resample's median
is at most the k-th smallest value when at least (n+1)/2 of its n draws are (odd n), a
binomial tail. The tests below read the interval bounds off that tail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from grokstudy import results
from grokstudy.config import DiagramConfig, SearchConfig, SearchDim, Study, TrialConfig, with_overrides
from grokstudy.records import EvalRecord, Outcome, TrialHistory
from grokstudy.stats import Comparison, Median, compare, median_interval, sign_test

INF = math.inf


def test_a_median_interval_is_the_bootstrap_distributions_quantiles_read_off_its_binomial_tail() -> None:
    x = np.arange(1.0, 12.0)  # 11 distinct values: the bootstrap median is one of them
    # P(bootstrap median <= k-th value) = P(at least 6 of 11 draws are among the k smallest).
    cdf = [scipy_stats.binom.sf(5, 11, k / 11) for k in range(1, 12)]
    low = 1 + next(k for k, c in enumerate(cdf) if c >= 0.025)
    high = 1 + next(k for k, c in enumerate(cdf) if c >= 0.975)
    # cdf 0.007 at 2, 0.051 at 3; 0.949 at 8, 0.993 at 9: far from 0.025 and 0.975 either side,
    # so 10,000 resamples (standard error 0.002) cannot land elsewhere.
    assert (low, high) == (3, 9)
    assert median_interval(x) == (6.0, 3.0, 9.0)


def test_five_values_give_their_range_as_the_interval() -> None:
    # The smallest is the bootstrap median when 3 of 5 draws are it: 0.058 > 0.025 (and the
    # largest likewise), so the 95 % interval is [min, max].
    assert scipy_stats.binom.sf(2, 5, 1 / 5) == pytest.approx(0.05792)
    assert median_interval([1050, 1130, 1250, 1100, 1200]) == (1130.0, 1050.0, 1250.0)


@pytest.mark.parametrize("values", [[1050, 1130, 1250, 1100, 1200], [3, 1, 4, 1, 5, 9, 2, 6], [10, 20]])
def test_on_finite_values_the_interval_is_scipys_percentile_bootstrap_with_the_same_draws(values) -> None:
    ours = median_interval(values, seed=7)
    theirs = scipy_stats.bootstrap(
        (np.array(values, dtype=float),),
        np.median,
        method="percentile",
        n_resamples=10_000,
        rng=np.random.default_rng(7),
    ).confidence_interval
    assert ours[1:] == (theirs.low, theirs.high)


def test_a_seed_that_never_got_there_is_infinitely_late_in_the_median_and_its_interval() -> None:
    # [1, 2, never]: the resample median is never when 2 of 3 draws are (7/27 > 0.025), 1 when 2
    # of 3 are 1: the interval runs from 1 to never.
    assert median_interval([1, 2, None]) == (2.0, 1.0, INF)
    # An even count averages the middle two: 10 and never make never; a resample of two 10s
    # (1/4) keeps the lower bound finite.
    assert median_interval([10, None]) == (INF, 10.0, INF)
    assert median_interval([None, None, None]) == (INF, INF, INF)
    # [2,900, never, never, 3,000, never]: low is 2,900 (3 of 5 draws: 0.058), high never.
    assert median_interval([2900, None, None, 3000, None]) == (INF, 2900.0, INF)


def test_the_bootstrap_is_seeded_and_so_repeats_exactly() -> None:
    values = [5, 7, 7, 9, 100, 3, 8, 8, 12, 15, 2]
    assert median_interval(values, seed=3) == median_interval(values, seed=3)
    assert Median.of(values) == Median.of(values)


def test_one_value_is_its_own_interval_and_no_value_is_refused() -> None:
    assert median_interval([7]) == (7.0, 7.0, 7.0)
    assert median_interval([None]) == (INF, INF, INF)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_mann_whitney_on_separated_groups_is_the_exact_permutation_p() -> None:
    # 5 against 5, every a before every b: 2 of C(10, 5) = 252 splits are as extreme.
    result = compare([1050, 1130, 1250, 1100, 1200], [2900, None, None, 3000, None])
    assert result.p == pytest.approx(2 / 252)
    assert (result.a, result.b) == (Median(5, 1130, 1050, 1250), Median(5, INF, 2900, INF))
    assert result.text() == (
        "n 5 vs 5, median 1,130 [1,050, 1,250] vs never [2,900, never]; Mann-Whitney p = 0.008"
    )
    # 3 against 3 separated: 2 of C(6, 3) = 20.
    assert compare([1, 2, 3], [4, None, None]).p == pytest.approx(0.1)


def test_mann_whitney_ranks_nevers_as_ties_with_each_other() -> None:
    # a = [1, 2, never], b = [never] * 3: U_a = 3 + 3 + 1.5 = 7.5 of 9. Over the 20 ways to
    # pick a's three from {1, 2, never x 4}: both finite in a (4 ways) give 7.5; one (12 ways) 5
    # or 4; none (4 ways) 1.5. P(U >= 7.5) = 4/20, two-sided twice that.
    assert compare([1, 2, None], [None, None, None]).p == pytest.approx(0.4)
    # The normal approximation scipy uses by default with ties says otherwise.
    assert scipy_stats.mannwhitneyu([1, 2, INF], [INF, INF, INF]).pvalue != pytest.approx(0.4)
    assert compare([None, None], [None, None, None]).p == 1.0


def test_a_group_of_one_gets_no_mann_whitney_test_and_an_empty_one_is_refused() -> None:
    result = compare([1], [2, 3])
    assert math.isnan(result.p)
    assert result.text() == "n 1 vs 2, median 1 vs 2 [2, 3]; Mann-Whitney: no test (a side has one value)"
    with pytest.raises(ValueError, match="both sides"):
        compare([], [1, 2])


def test_the_sign_test_drops_tied_pairs_and_is_scipys_binomial_test_on_the_rest() -> None:
    pairs = [(100, 200)] * 5 + [(150, None), (None, None), (None, None)]
    result = sign_test(pairs)
    assert result.p == pytest.approx(2 / 2**6)  # 6 of 6 untied pairs earlier
    assert result.p == scipy_stats.binomtest(6, 6).pvalue
    assert result.text().endswith("sign test p = 0.031 (6 earlier, 0 later, 2 tied)")
    # 1 earlier, 2 later: binomtest(1, 3) = 1.0 (P(1 or fewer) + P(2 or more) of 3 fair coins).
    assert sign_test([(1, 2), (3, 2), (None, 5)]).p == 1.0


def test_a_sign_test_with_every_pair_tied_has_no_test() -> None:
    result = sign_test([(None, None), (5, 5)])
    assert math.isnan(result.p)
    assert (
        result.text()
        == "n 2 vs 2, median never [5, never] vs never [5, never]; sign test: no test (0 earlier, 0 later, 2 tied)"
    )
    assert sign_test([(1, 2)]).p == 1.0  # one pair: as likely either way
    with pytest.raises(ValueError, match="no pairs"):
        sign_test([])


def test_a_comparison_is_a_frozen_value() -> None:
    result = compare([1, 2], [3, 4])
    assert isinstance(result, Comparison)
    with pytest.raises(AttributeError):
        result.p = 0.0  # type: ignore[misc]


# summarize.py on synthetic paper studies ------------------------------------------------------

BUDGET = 3000
SUMMARIZE = Path(__file__).resolve().parent.parent / "studies" / "papers" / "summarize.py"


def summarize_module():
    """studies/papers/summarize.py, a script, imported as a module (registered first: its
    dataclass looks itself up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("papers_summarize", SUMMARIZE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def step_curve(t_train: int, t_val: int | None, t_val_loss: int | None) -> tuple[EvalRecord, ...]:
    """A curve whose t_train, t_val and t_val_loss are exactly the given steps: each measure
    jumps between an eval one step before and one at it (the interpolated crossing rounds to it)."""
    jumps = [t for t in (t_train, t_val, t_val_loss) if t is not None]
    steps = sorted({0, BUDGET, *jumps, *(t - 1 for t in jumps)})

    def reached(t: int | None, s: int) -> bool:
        return t is not None and s >= t

    return tuple(
        EvalRecord(
            step=s,
            train_loss=0.001 if reached(t_train, s) else 3.0,
            train_acc=1.0 if reached(t_train, s) else 0.0,
            val_loss=0.001 if reached(t_val_loss, s) else 3.0,
            val_acc=1.0 if reached(t_val, s) else 0.0,
            weights_norm=10.0,
            elapsed_s=s / 1000,
        )
        for s in steps
    )


def write_study(root: Path, name: str, axes: list[SearchDim], seeds: int, timings, failed: int = 0) -> None:
    """A grid study's trials.parquet, built as a real study's is; timings(point) -> (t_train,
    t_val, t_val_loss) for a point with its train.seed; `failed` more trials that failed."""
    study = Study(
        name,
        base=with_overrides(TrialConfig(), {"train.max_steps": BUDGET}),
        search=SearchConfig(sampler="grid", space=tuple(axes), seeds=seeds),
        diagram=DiagramConfig(x=axes[0].key, y=axes[-1].key),
    )
    points = [{}]
    for d in [*axes, SearchDim("train.seed", values=tuple(range(seeds)))]:
        points = [{**p, d.key: v} for p in points for v in d.grid]
    histories = [
        TrialHistory(
            trial_id=f"t{i}",
            point=point,
            cfg=study.trial(point),
            records=step_curve(*timings(point)),
            outcome=Outcome("memorization", None, None, None, 0.0, "budget"),
        )
        for i, point in enumerate(points)
    ]
    histories += [
        TrialHistory(
            trial_id=f"failed{i}",
            point=points[0],
            cfg=study.trial(points[0]),
            records=(),
            outcome=None,
            error="boom",
        )
        for i in range(failed)
    ]
    trials, curves = results.build_tables(study, histories)
    results.write_tables(trials, curves, root / name)


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("papers")
    # Nanda: at 0.6 every seed generalizes (t_val 900..1,300, loss 1,000..1,400), at 0.4 none.
    write_study(
        root,
        "nanda2023-cpu",
        [SearchDim("data.fraction", values=(0.4, 0.6))],
        5,
        lambda p: (
            (100, None, None)
            if p["data.fraction"] == 0.4
            else (100, 900 + 100 * p["train.seed"], 1000 + 100 * p["train.seed"])
        ),
        failed=1,
    )
    # Grokfast: the filter is earlier on all 3 seeds at wd 0.005; at wd 0 nothing generalizes.
    ema, none = {0: 1000, 1: 1050, 2: 990}, {0: 1150, 1: 1100, 2: 1090}
    write_study(
        root,
        "grokfast2024-cpu",
        [
            SearchDim("optimizer.grokfast", choice=("none", "ema")),
            SearchDim("optimizer.weight_decay", choice=(0.0, 0.005)),
        ],
        3,
        lambda p: (
            100,
            None
            if p["optimizer.weight_decay"] == 0
            else (ema if p["optimizer.grokfast"] == "ema" else none)[p["train.seed"]],
            None,
        ),
    )
    # Power's weight decay: wd 1 generalizes at 0.6 (3 seeds), never at 0.3; wd 0 never.
    write_study(
        root,
        "power2022-wd-cpu",
        [
            SearchDim("optimizer.weight_decay", choice=(0.0, 1.0)),
            SearchDim("data.fraction", values=(0.3, 0.6)),
        ],
        3,
        lambda p: (
            100,
            1000 + 100 * p["train.seed"]
            if p["optimizer.weight_decay"] == 1 and p["data.fraction"] == 0.6
            else None,
            None,
        ),
    )
    # Prieto: only ⊥Grad generalizes (seed 0 at 400, seed 1 at 600).
    write_study(
        root,
        "prieto2025-cpu",
        [
            SearchDim("train.loss", choice=("cross_entropy_float32", "stablemax")),
            SearchDim("optimizer.orthograd", choice=(False, True)),
        ],
        2,
        lambda p: (50, 400 + 200 * p["train.seed"] if p["optimizer.orthograd"] else None, None),
    )
    # Liu: one seed per point, no comparison claimed.
    write_study(
        root,
        "liu2022-cpu",
        [
            SearchDim("optimizer.lr", values=(1e-3, 1e-2)),
            SearchDim("optimizer.weight_decay", values=(0.1, 1.0)),
        ],
        1,
        lambda p: (100, 700 if p["optimizer.lr"] == 1e-2 else None, None),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summarize_module().main(root)
    return out.getvalue().splitlines()


def section(lines: list[str], study: str) -> list[str]:
    start = lines.index(f"### {study}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))
    return lines[start:end]


def test_each_point_has_n_and_medians_with_their_bootstrap_intervals(printed) -> None:
    nanda = section(printed, "nanda2023-cpu")
    assert "| data.fraction | n | phases | t_train | t_val | t_val_loss |" in nanda
    # Five seeds: the interval is [min, max] (see test_five_values_give_their_range_as_the_interval);
    # the failed sixth trial at 0.4 is left out of n and counted at the end.
    [row04] = [line for line in nanda if line.startswith("| 0.4 |")]
    [row06] = [line for line in nanda if line.startswith("| 0.6 |")]
    assert row04.startswith("| 0.4 | 5 |") and row04.endswith("| 100 | never | never |")
    assert row06.startswith("| 0.6 | 5 |") and row06.endswith(
        "| 100 | 1,100 [900, 1,300] | 1,200 [1,000, 1,400] |"
    )
    # Ten trials of 3 s each (step_curve's clock: a step a millisecond) and a failed one.
    assert "11 trials (1 failed or unfinished, left out), 0.5 min of training in all." in nanda


def test_a_comparison_between_fractions_is_tested_with_mann_whitney(printed) -> None:
    nanda = section(printed, "nanda2023-cpu")
    i = nanda.index(
        "- t_val_loss: data.fraction 0.4 vs 0.6: n 5 vs 5, median never vs 1,200 [1,000, 1,400]; "
        "Mann-Whitney p = 0.008"
    )
    assert not nanda[i + 1].startswith("  - n < 5")  # five seeds a side: enough to say it


def test_paired_claims_take_the_same_seed_under_both_arms_and_warn_under_five(printed) -> None:
    grokfast = section(printed, "grokfast2024-cpu")
    at_decay = "- t_val: optimizer.grokfast ema vs none, at optimizer.weight_decay 0.005: "
    expected = sign_test([(1000, 1150), (1050, 1100), (990, 1090)]).text()
    assert expected.endswith("sign test p = 0.250 (3 earlier, 0 later, 0 tied)")
    i = grokfast.index(at_decay + expected)
    assert grokfast[i + 1] == "  - n < 5: not enough for a claim"
    j = grokfast.index(
        "- t_val: optimizer.grokfast ema vs none, at optimizer.weight_decay 0.0: n 3 vs 3, median never vs "
        "never; sign test: no test (0 earlier, 0 later, 3 tied)"
    )
    assert grokfast[j + 1] == "  - n < 5: not enough for a claim"


def test_the_largest_weight_decay_is_paired_with_each_smaller_across_fractions(printed) -> None:
    power = section(printed, "power2022-wd-cpu")
    pairs = [(None, None)] * 3 + [(1000, None), (1100, None), (1200, None)]  # fraction 0.3, then 0.6
    [line] = [line for line in power if line.startswith("- t_val:")]
    assert line == "- t_val: optimizer.weight_decay 1.0 vs 0.0: " + sign_test(pairs).text()
    # wd 1's side, [never x 3, 1,000, 1,100, 1,200]: a resample's median averages its 3rd and
    # 4th smallest. P(median <= 1,000) = P(4+ of 6 draws are 1,000) = 0.009; P(median <= 1,050)
    # adds exactly 3 of them with a 1,100 among the other 3: 0.009 + 0.054 * 0.488 = 0.035.
    # So the lower bound is 1,050.
    assert scipy_stats.binom.sf(3, 6, 1 / 6) + scipy_stats.binom.pmf(3, 6, 1 / 6) * (
        1 - (4 / 5) ** 3
    ) == pytest.approx(0.0349, abs=1e-4)
    assert line.endswith(
        "n 6 vs 6, median never [1,050, never] vs never; sign test p = 0.250 (3 earlier, 0 later, 3 tied)"
    )
    assert "  - n < 5: not enough for a claim" not in power


def test_prieto_compares_each_fix_against_plain_float32(printed) -> None:
    claims = [line for line in section(printed, "prieto2025-cpu") if line.startswith("- ")]
    assert claims == [
        "- t_val: optimizer.orthograd True vs False, at train.loss cross_entropy_float32: "
        + sign_test([(400, None), (600, None)]).text(),
        "- t_val: train.loss stablemax vs cross_entropy_float32, at optimizer.orthograd False: "
        + sign_test([(None, None), (None, None)]).text(),
    ]


def test_a_study_without_a_claimed_difference_has_no_tests(printed) -> None:
    liu = section(printed, "liu2022-cpu")
    assert not any("Claims tested" in line or line.startswith("- ") for line in liu)
    assert "| 0.01 | 1.0 | 1 | " in "\n".join(liu)


def test_the_claims_table_names_each_studys_differences_with_and_without_its_size_suffix() -> None:
    claims = summarize_module().CLAIMS
    omnigrok = claims["omnigrok2023"](
        {"model.init_scale": [0.5, 1.0, 2.0, 8.0], "optimizer.weight_decay": [0.1]}
    )
    assert [c.label() for c in omnigrok] == [
        "t_val: model.init_scale 1.0 vs 2.0",
        "t_val: model.init_scale 1.0 vs 8.0",
    ]
    assert all(c.paired for c in omnigrok)
    power = claims["power2022"]({"task.op": ["x+y", "x/y"], "data.fraction": [0.3, 0.5, 0.8]})
    assert [(c.label(), c.paired) for c in power] == [
        ("t_val: data.fraction 0.3 vs 0.5", True),  # each operation's seeds, paired
        ("t_val: data.fraction 0.5 vs 0.8", True),
        ("t_val: task.op x/y vs x+y", True),
    ]
    assert "liu2022" not in claims and "gromov2023" not in claims and "gromov2023-gd" not in claims


def test_each_study_says_which_grokking_trials_sat_on_a_plateau_and_what_the_other_rule_changes(
    printed,
) -> None:
    # Nanda's synthetic 0.6 seeds fit at 100 with validation accuracy 0, and generalize at 900..1,300:
    # grokking under the default rule with a plateau at chance; under Liu et al.'s rule (a gap over
    # 1,000 steps) only seeds whose t_val - t_train > 1,000 stay grokking.
    nanda = section(printed, "nanda2023-cpu")
    plateau = [line for line in nanda if line.startswith("Plateau: ")]
    assert plateau == [
        "Plateau: 5 of 5 grokking trials had validation accuracy at most 2x chance when they fitted "
        "(val_acc_at_fit: 0.00, 0.00, 0.00, 0.00, 0.00)."
    ]
    [rule] = [line for line in nanda if line.startswith("Under the liu2022 rule")]
    assert rule.startswith(
        "Under the liu2022 rule (`grokstudy plot nanda2023-cpu --rule liu2022`): 1 of 2 cells"
    )
    assert "data.fraction=0.6: grokking -> comprehension" in rule
