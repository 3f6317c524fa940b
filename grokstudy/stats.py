"""Statistics for claims about step timings: a median with its bootstrap interval, and the
two-sided test of a difference (Mann-Whitney U between independent groups, the sign test
between pairs).

Step timings are right-censored: a trial that never got there within its budget has no step
(None). It counts as +inf, later than any finite step, as the figures' medians count it, so a
median or an interval bound can be "never". The tests use only the order of the values, for
which +inf is exact: every never ranks after every finite step and ties with every other never.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


def as_steps(values: Iterable[float | None]) -> np.ndarray:
    """Step timings as floats; a missing one (never got there) as +inf."""
    return np.array([math.inf if v is None else float(v) for v in values], dtype=float)


def median_interval(
    values: Iterable[float | None],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(median, low, high): the median and its percentile-bootstrap interval, None counted as +inf.

    A seeded numpy bootstrap rather than scipy.stats.bootstrap: scipy interpolates between
    bootstrap medians, which with a "never" among them computes inf - inf (NaN, a warning), and
    refuses a single value. The resamples are drawn as scipy draws them; each bound is a
    bootstrap median itself, the one at or outside the interpolated percentile, so the interval
    is never narrower than scipy's. One value: the interval is that value.
    """
    x = as_steps(values)
    if x.size == 0:
        raise ValueError("median_interval of no values")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, (resamples, x.size))], axis=1)
    tail = (1 - confidence) / 2
    low = np.quantile(medians, tail, method="lower")
    high = np.quantile(medians, 1 - tail, method="higher")
    return float(np.median(x)), float(low), float(high)


def steps_text(value: float) -> str:
    """A step count as the docs write it: 1,130; +inf as "never"."""
    return "never" if value == math.inf else f"{value:,.0f}"


@dataclass(frozen=True)
class Median:
    """A group's size, median and bootstrap interval (+inf: never)."""

    n: int
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float | None], seed: int = 0) -> Median:
        x = as_steps(values)
        return cls(int(x.size), *median_interval(x, seed=seed))

    def text(self) -> str:
        """`1,130 [1,050, 1,250]`; just the median where the interval is that point (one value, or
        all alike)."""
        if self.low == self.high:
            return steps_text(self.median)
        return f"{steps_text(self.median)} [{steps_text(self.low)}, {steps_text(self.high)}]"


@dataclass(frozen=True)
class Comparison:
    """Two groups of step timings, their medians and a two-sided test of their difference.

    p is NaN where the test has nothing to go on: a side with fewer than 2 values
    (Mann-Whitney; scipy's permutation test needs two), or no pair that differs (sign test).
    """

    a: Median
    b: Median
    test: str  # "Mann-Whitney" | "sign test"
    p: float
    detail: str = ""  # the sign test's counts; why there is no test

    def text(self) -> str:
        """One line: `n 5 vs 5, median 1,130 [1,050, 1,250] vs never [2,900, never]; Mann-Whitney p = 0.008`."""
        head = f"n {self.a.n} vs {self.b.n}, median {self.a.text()} vs {self.b.text()}; {self.test}"
        line = f"{head}: no test" if math.isnan(self.p) else f"{head} p = {self.p:.3f}"
        return line + (f" ({self.detail})" if self.detail else "")


def compare(
    a: Iterable[float | None], b: Iterable[float | None], resamples: int = RESAMPLES, seed: int = 0
) -> Comparison:
    """Mann-Whitney U, two-sided, between independent groups (None: +inf, tied with every other).

    scipy's p-value from the permutation distribution of U, not its default: with ties (every
    "never" is one) scipy falls back to the normal approximation, poor at a few seeds a side.
    The permutation distribution is exact up to `resamples` distinct splits of the values
    (7 against 7), and seeded Monte Carlo above that.
    """
    x, y = as_steps(a), as_steps(b)
    if x.size == 0 or y.size == 0:
        raise ValueError(f"compare needs values on both sides, got {x.size} and {y.size}")
    if x.size < 2 or y.size < 2:
        p, why = math.nan, "a side has one value"
    else:
        method = stats.PermutationMethod(n_resamples=resamples, rng=np.random.default_rng(seed))
        p, why = float(stats.mannwhitneyu(x, y, alternative="two-sided", method=method).pvalue), ""
    return Comparison(Median.of(x, seed), Median.of(y, seed), "Mann-Whitney", p, why)


def sign_test(pairs: Iterable[tuple[float | None, float | None]], seed: int = 0) -> Comparison:
    """The sign test, two-sided, on (a, b) pairs (the same seed under two arms): a binomial test
    of how often a came first among the pairs that differ; ties (never and never too) are dropped."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("sign_test of no pairs")
    x, y = as_steps(a for a, _ in pairs), as_steps(b for _, b in pairs)
    earlier, later = int(np.sum(x < y)), int(np.sum(x > y))
    tied = len(pairs) - earlier - later
    p = float(stats.binomtest(earlier, earlier + later).pvalue) if earlier + later else math.nan
    detail = f"{earlier} earlier, {later} later, {tied} tied"
    return Comparison(Median.of(x, seed), Median.of(y, seed), "sign test", p, detail)
