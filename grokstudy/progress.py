"""A running study's progress, counted from its trials' reports: what the live bar shows, the
snapshot `grokstudy status` reads (`snapshot.Snapshot`), and the one rule that stops a study on
an MLflow outage. No Ray here: the runner's Tune callback forwards each trial's events (a trial
is anything with `trial_id` and `config`)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grokstudy import member
from grokstudy.snapshot import HEARTBEAT_S, MemberState, Snapshot, this_driver
from grokstudy.uris import redact


class TrackingUnavailable(Exception):
    """MLflow stayed unreachable longer than `run.tracking_outage_s`: the study stops, resumably."""


@dataclass(slots=True)
class Progress:
    """A snapshot for the live progress bar: counts of trials (pack members)."""

    total: int | None
    """Trials the study will run (None: the sampler decides as it goes)."""
    done: int = 0
    running: int = 0
    failed: int = 0
    phases: Counter = field(default_factory=Counter)
    warning: str | None = None
    """A problem the trials report (MLflow unreachable), shown once per change."""
    elapsed_s: float = 0.0
    """Since the study first started (resumes included)."""
    eta_s: float | None = None
    """Until the last trial ends, at this driver run's rate (None: not known yet)."""

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done - self.running - self.failed)


class StudyProgress:
    """Counts members from trial reports; keeps the study's snapshot; stops the study when
    MLflow stays down too long."""

    def __init__(
        self,
        total: int | None,
        emit: Callable[[Progress], None] | None,
        outage_limit_s: float,
        tracking_uri: str,
        known: dict[str, MemberState],
        every_s: float = 2.0,
        *,
        study: str = "",
        save: Callable[[Snapshot], None] | None = None,
        started_at: float | None = None,
    ) -> None:
        """`known`: the members a restored experiment holds; `save`: where each snapshot goes
        (at most every `every_s`, and every HEARTBEAT_S when nothing changes); `started_at`: when
        the study first started (a resume's previous snapshot), else now."""
        self.total, self.emit, self.every_s, self.save = total, emit, every_s, save
        self.outage_limit_s, self.tracking_uri = outage_limit_s, tracking_uri
        self.study = study
        self.members: dict[str, MemberState] = {
            tid: m if m.status != "running" else dataclasses.replace(m, status="pending")
            for tid, m in known.items()
        }  # a restored member runs again only once Tune starts its trial
        self.trials: dict[str, list[str]] = {}  # Tune trial id -> its members
        now = time.time()
        self.run_started_at = now
        self.started_at = started_at or now
        self.done_at_run_start = sum(m.status in ("done", "failed") for m in self.members.values())
        self.warning: str | None = None
        self.down_since: float | None = None
        """When MLflow stopped answering, by this driver's clock (None: it answers)."""
        self.last_error: str | None = None
        self.last_emit = self.last_save = 0.0
        self.driver = this_driver()  # read once: its host id reads /proc
        self.last_line: tuple | None = None

    # -- counts --

    def snapshot(self, state: str = "running") -> Snapshot:
        return Snapshot(
            study=self.study,
            total=self.total,
            started_at=self.started_at,
            run_started_at=self.run_started_at,
            done_at_run_start=self.done_at_run_start,
            updated_at=time.time(),
            members=list(self.members.values()),
            driver=self.driver | {"state": state},
            warning=self.warning,
        )

    def ended_count(self) -> int:
        """Members done or failed."""
        return sum(m.status in ("done", "failed") for m in self.members.values())

    def _maybe_emit(self, force: bool = False) -> None:
        """Emit a changed count (at most every `every_s`, unless forced) and save the snapshot
        with it, or every HEARTBEAT_S when nothing changed. Called at every Tune loop step: the
        snapshot is built only when it is written."""
        if self.emit is None and self.save is None:
            return
        now = time.monotonic()
        count = Counter(m.status for m in self.members.values())
        phases = Counter(m.phase for m in self.members.values() if m.status == "done")
        key = (count["done"], count["running"], count["failed"], tuple(sorted(phases.items())), self.warning)
        show = key != self.last_line and (force or now - self.last_emit >= self.every_s)
        if not show and now - self.last_save < HEARTBEAT_S:
            return
        snap = self.snapshot()
        if self.save is not None:
            self.last_save = now
            self.save(snap)
        if show:
            self.last_emit, self.last_line = now, key
            if self.emit is not None:
                self.emit(
                    Progress(self.total, count["done"], count["running"], count["failed"], phases, self.warning,
                             elapsed_s=snap.updated_at - self.started_at, eta_s=snap.eta_s(snap.updated_at))
                )  # fmt: skip

    def _set(self, trial: Any, status: str) -> None:
        """Every member of `trial` not finished yet gets `status` (running or failed)."""
        members = trial.config.get("members", [])
        self.trials[trial.trial_id] = [m["trial_id"] for m in members]
        for m in members:
            tid = m["trial_id"]
            if tid not in self.members or self.members[tid].status not in ("done",):
                self.members[tid] = MemberState(tid, dict(m.get("point") or {}), status)

    def started(self, trial: Any) -> None:
        self._set(trial, "running")
        self._maybe_emit()

    def reported(self, trial: Any, result: dict[str, Any]) -> None:
        if trial.trial_id not in self.trials:
            self._set(trial, "running")
        for tid, outcome in member.outcomes_of(result):
            old = self.members.get(tid)
            point = old.point if old is not None else {}
            self.members[tid] = MemberState(tid, point, "done", outcome.phase)
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
        trial reports (trials ending wait a while for MLflow); the snapshot's heartbeat."""
        self._stop_if_down_too_long()
        self._maybe_emit()

    def ended(self, state: str) -> None:
        """The driver run ends (finished, interrupted, crashed): the last snapshot says so."""
        if self.save is not None:
            self.save(self.snapshot(state))

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
        for tid in self.trials.get(trial.trial_id, []):
            if self.members[tid].status == "running":  # ended without an outcome
                self.members[tid] = dataclasses.replace(self.members[tid], status="failed")
        self._maybe_emit(force=True)

    def errored(self, trial: Any) -> None:
        if trial.trial_id not in self.trials:
            self._set(trial, "failed")
        for tid in self.trials[trial.trial_id]:
            if self.members[tid].status == "running":
                self.members[tid] = dataclasses.replace(self.members[tid], status="failed")
        self._maybe_emit(force=True)
