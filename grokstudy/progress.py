"""A running study's progress, counted from its trials' reports: what the live line shows, and
the one rule that stops a study on an MLflow outage. No Ray here: the runner's Tune callback
forwards each trial's events (a trial is anything with `trial_id` and `config`)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grokstudy import member
from grokstudy.uris import redact


class TrackingUnavailable(Exception):
    """MLflow stayed unreachable longer than `run.tracking_outage_s`: the study stops, resumably."""


@dataclass(slots=True)
class Progress:
    """A snapshot for the live progress line: counts of trials (pack members)."""

    total: int | None
    """Trials the study will run (None: the sampler decides as it goes)."""
    done: int = 0
    running: int = 0
    failed: int = 0
    phases: Counter = field(default_factory=Counter)
    warning: str | None = None
    """A problem the trials report (MLflow unreachable), shown once per change."""

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done - self.running - self.failed)


class StudyProgress:
    """Counts members from trial reports; stops the study when MLflow stays down too long."""

    def __init__(
        self,
        total: int | None,
        emit: Callable[[Progress], None] | None,
        outage_limit_s: float,
        tracking_uri: str,
        already: dict[str, str],
        every_s: float = 2.0,
    ) -> None:
        self.total, self.emit, self.every_s = total, emit, every_s
        self.outage_limit_s, self.tracking_uri = outage_limit_s, tracking_uri
        self.done: dict[str, str] = dict(already)  # member trial id -> phase
        self.running: dict[str, int] = {}  # Tune trial id -> members still training
        self.failed: dict[str, int] = {}
        self.warning: str | None = None
        self.down_since: float | None = None
        """When MLflow stopped answering, by this driver's clock (None: it answers)."""
        self.last_error: str | None = None
        self.last_emit = 0.0
        self.last_line: tuple | None = None

    def _maybe_emit(self, force: bool = False) -> None:
        if self.emit is None:
            return
        running, failed = sum(self.running.values()), sum(self.failed.values())
        p = Progress(self.total, len(self.done), running, failed, Counter(self.done.values()), self.warning)
        key = (p.done, p.running, p.failed, tuple(sorted(p.phases.items())), p.warning)
        now = time.monotonic()
        if key != self.last_line and (force or now - self.last_emit >= self.every_s):
            self.last_emit, self.last_line = now, key
            self.emit(p)

    def _unfinished(self, trial: Any) -> int:
        return sum(1 for m in trial.config.get("members", []) if m["trial_id"] not in self.done)

    def started(self, trial: Any) -> None:
        self.running[trial.trial_id] = self._unfinished(trial)
        self._maybe_emit()

    def reported(self, trial: Any, result: dict[str, Any]) -> None:
        for tid, outcome in member.outcomes_of(result):
            self.done[tid] = outcome.phase
        self.running[trial.trial_id] = self._unfinished(trial)
        down = self._outage_s(result)
        self.last_error = result.get("tracking_error") or (self.last_error if down > 0 else None)
        warning = None
        if down > 0:
            warning = f"MLflow at {redact(self.tracking_uri)} unreachable for {down:.0f} s ({self.last_error}); trials keep training"
        if warning != self.warning and (warning is None or self.warning is None):
            self.warning = warning
            self._maybe_emit(force=True)
        self._stop_if_down_too_long()
        self._maybe_emit()

    def tick(self) -> None:
        """Between reports (Tune's every loop step): an outage may outlast the limit while no
        trial reports (trials ending wait a while for MLflow)."""
        self._stop_if_down_too_long()

    def _stop_if_down_too_long(self) -> None:
        down = 0.0 if self.down_since is None else time.monotonic() - self.down_since
        if down > self.outage_limit_s:
            raise TrackingUnavailable(
                f"MLflow at {redact(self.tracking_uri)} was unreachable for {down:.0f} s, longer than "
                f"run.tracking_outage_s ({self.outage_limit_s:g} s); checkpoints are kept: run the same command "
                "again to resume"
            )

    def _outage_s(self, result: dict[str, Any]) -> float:
        """How long MLflow has been unreachable, as far as the trials' reports tell: since the
        earliest failure any trial reports in this outage, until a trial reports storing
        something after it began. (A trial shorter than the limit would never see it alone.)"""
        now = time.monotonic()
        down = float(result.get("tracking_down_s") or 0.0)
        reached = result.get("tracking_reached_s")
        if down > 0:
            self.down_since = min(now - down, self.down_since if self.down_since is not None else now)
        elif self.down_since is not None and reached is not None and 0 <= reached < now - self.down_since:
            self.down_since = None
        return 0.0 if self.down_since is None else now - self.down_since

    def completed(self, trial: Any) -> None:
        self.running.pop(trial.trial_id, None)
        self._maybe_emit(force=True)

    def errored(self, trial: Any) -> None:
        self.running.pop(trial.trial_id, None)
        self.failed[trial.trial_id] = self._unfinished(trial)
        self._maybe_emit(force=True)
