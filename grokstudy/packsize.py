"""How many trials to pack (`resources.pack: auto`): measured, not guessed.

A pack of K trials trains as one stacked model (`packed.py`). Its member-steps per second grow
with K while the device has capacity to spare and flatten, or fall, once it is saturated (where,
depends on the device and the model: bench/README.md has the measured packs). A bigger pack than the knee buys nothing and costs much: results come later (the boundary
sampler decides from them), fewer packs than slots leave devices idle, and a pack runs as long
as its slowest member. So `choose` takes the smallest K within `TOLERANCE` of the best rate.

`measure` times a few training steps at K = 1, 2, 4, ... on the device the trials use, for the
study's heaviest trial (`preflight.largest_point`: its largest training set), each member a seed
of it. K = 1 is the lone trainer (`train.seconds_per_step`), which is what a pack of one runs;
larger K are packs (`packed.seconds_per_step`). It stops at `max_k`, at the memory estimate's
bound (`footprint.trial_bytes`), once the rate fell `FALLS` Ks in a row, or when the next K
would overrun `BUDGET_S`. No Ray here: the runner runs `auto` in a Ray task where trials run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grokstudy import footprint
from grokstudy.config import TrialConfig, with_overrides

TOLERANCE = 0.05
"""The chosen K is the smallest whose rate is at least (1 - TOLERANCE) x the best measured: within
the run-to-run noise of a few timed steps, a smaller pack is the better one."""
STEPS = 5
"""Timed steps per K (after 2 untimed ones: allocation, kernel selection)."""
FALLS = 2
"""Stop once the rate fell this many Ks in a row (past the knee it only falls further)."""
BUDGET_S = 30.0
"""Wall-clock budget of the whole measurement; a K whose steps would overrun it is not tried."""
MAX_K = 256


@dataclass(frozen=True, slots=True)
class Rate:
    k: int
    member_steps_per_s: float


@dataclass(frozen=True, slots=True)
class Choice:
    """The pack size `auto` chose, the rates it chose from, and why it stopped measuring."""

    k: int
    rates: tuple[Rate, ...]
    device: str
    stopped: str

    def describe(self) -> str:
        """One line: `packs of 4 (resources.pack: auto; member-steps/s on cpu: K=1 410, ...)`."""
        rates = ", ".join(f"K={r.k} {r.member_steps_per_s:,.0f}" for r in self.rates)
        return (
            f"packs of {self.k} (resources.pack: auto; member-steps/s on {self.device}: {rates}; "
            f"the smallest K within {TOLERANCE:.0%} of the best; measuring stopped: {self.stopped})"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Choice:
        rates = tuple(Rate(int(r["k"]), float(r["member_steps_per_s"])) for r in d["rates"])
        return Choice(int(d["k"]), rates, str(d["device"]), str(d["stopped"]))


def candidates(max_k: int) -> list[int]:
    """1, 2, 4, ... up to `max_k`, and `max_k` itself."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max(1, max_k)]


def choose(rates: Sequence[Rate]) -> int:
    """The smallest K whose rate is within TOLERANCE of the best."""
    best = max(r.member_steps_per_s for r in rates)
    return min(r.k for r in rates if r.member_steps_per_s >= (1 - TOLERANCE) * best)


def members(cfg: TrialConfig, k: int) -> list[TrialConfig]:
    """K members of one pack: `cfg` at init seeds seed, seed + 1, ... (one pack key)."""
    return [with_overrides(cfg, {"train.seed": cfg.train.seed + i}) for i in range(k)]


def measure(
    cfg: TrialConfig,
    max_k: int,
    memory_bytes: int,
    *,
    seconds_per_step: Callable[[Sequence[TrialConfig]], float] | None = None,
    budget_s: float = BUDGET_S,
) -> tuple[list[Rate], str]:
    """Member-steps/s at K = 1, 2, 4, ... (`candidates(max_k)`), and why measuring stopped.
    `seconds_per_step(members)` times one step (default: the lone trainer for one member, a
    pack otherwise); `memory_bytes` bounds the packs tried by their estimated footprint."""
    timer = seconds_per_step or _seconds_per_step
    rates: list[Rate] = []
    falls = 0
    started = time.monotonic()
    stopped = f"K reached {max_k}"
    for k in candidates(max_k):
        if rates and footprint.trial_bytes(cfg, k) > memory_bytes:
            stopped = f"a pack of {k} would need ~{footprint.describe(footprint.trial_bytes(cfg, k))} " \
                      f"of {footprint.describe(memory_bytes)}"  # fmt: skip
            break
        if rates:
            last = rates[-1]
            expected = (2 + STEPS) * k / last.member_steps_per_s
            if time.monotonic() - started + expected > budget_s:
                stopped = f"K={k} would overrun the {budget_s:.0f} s measuring budget"
                break
        seconds = timer(members(cfg, k))
        rates.append(Rate(k, k / seconds))
        falls = (
            falls + 1 if len(rates) > 1 and rates[-1].member_steps_per_s < rates[-2].member_steps_per_s else 0
        )
        if falls >= FALLS:
            stopped = f"the rate fell {FALLS} Ks in a row"
            break
    return rates, stopped


def auto(cfg: TrialConfig, max_k: int, memory_bytes: int, device: str) -> Choice:
    """Measure and choose (see the module docstring)."""
    rates, stopped = measure(cfg, max(1, min(max_k, MAX_K)), memory_bytes)
    return Choice(choose(rates), tuple(rates), device, stopped)


def _seconds_per_step(cfgs: Sequence[TrialConfig]) -> float:
    from grokstudy import packed, train  # torch: only where trials run

    if len(cfgs) == 1:
        return train.seconds_per_step(cfgs[0], STEPS)
    return packed.seconds_per_step(cfgs, STEPS)
