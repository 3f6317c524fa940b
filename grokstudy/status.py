"""`grokstudy status`: where a study stands, from what it has written so far. Read-only: it never
takes the study's lock or lease and never writes a file, so it is safe beside a running driver.

Sources, each read into one `snapshot.Snapshot` and the `Study` it belongs to:
- a study's output directory: `progress.json` and `study.yaml`, which the driver rewrites;
- a Tune experiment's directory, local or under `run.storage` (s3://, gs://): the copies the
  driver keeps there (`grokstudy-progress.json`, `grokstudy-study.yaml`), for a cluster study;
- an MLflow experiment: the study's parent run and its trial runs (their status and phase tag).

`render` draws counts, elapsed time, rate and ETA, phase counts and a small phase grid over the
study's diagram axes, one letter per cell (`LETTERS`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from grokstudy import storage
from grokstudy.config import Study, get_path, value_key
from grokstudy.errors import UsageError
from grokstudy.phases import PHASES, TIE, vote
from grokstudy.points import value_text as _fmt
from grokstudy.snapshot import SNAPSHOT_FILE, STORAGE_SNAPSHOT_FILE, MemberState, Snapshot, driver_alive

LETTERS: dict[str, str] = {
    "comprehension": "C",
    "grokking": "G",
    "memorization": "M",
    "confusion": "X",
    "unstable": "U",
    "diverged": "D",
    TIE: "T",
    "running": "~",
    "pending": ".",
    "failed": "!",
}
"""One letter per phase and per unfinished state, in the terminal grid."""
BINS = 8
"""Cells per axis where the study samples a continuous range (sobol, random, tpe)."""


@dataclass(frozen=True, slots=True)
class StudyStatus:
    snapshot: Snapshot
    study: Study
    source: str
    alive: bool | None
    """Is its driver running (None: cannot be told from here)."""


def read_directory(source: str) -> StudyStatus:
    """A study output directory or a Tune experiment directory (a local path or a URI)."""
    from grokstudy import preflight

    for snap_name, study_name in (
        (SNAPSHOT_FILE, "study.yaml"),
        (STORAGE_SNAPSHOT_FILE, preflight.STUDY_FILE),
    ):
        text = _read(storage.join(source, snap_name))
        if text is None:
            continue
        try:
            snap = Snapshot.from_json(text)
        except ValueError as err:
            raise UsageError("SOURCE", f"{storage.join(source, snap_name)}: {err}") from None
        study_text = _read(storage.join(source, study_name))
        if study_text is None:
            raise UsageError("SOURCE", f"{source} has {snap_name} but no {study_name}")
        return StudyStatus(
            snap, _parse(study_text, storage.join(source, study_name)), source, driver_alive(snap)
        )
    raise UsageError(
        "SOURCE",
        f"{source} holds no {SNAPSHOT_FILE} or {STORAGE_SNAPSHOT_FILE}: not a study directory or Tune "
        "experiment (or the study has not started yet)",
    )


def read_mlflow(tracking_uri: str, experiment: str) -> StudyStatus:
    """A study's status from its MLflow experiment: the newest study run and its trial runs."""
    from grokstudy import tracking

    fetched = tracking.fetch_results(tracking_uri, experiment, histories=False)
    if fetched.study_yaml is None:
        raise UsageError(
            "--experiment", f"MLflow experiment {experiment!r} has no study run with its study.yaml"
        )
    study = _parse(fetched.study_yaml, f"{experiment}/study.yaml")
    members = {}
    for run in fetched.trials:
        key = run["tags"].get(tracking.TRIAL_KEY_TAG)
        if key is None:
            continue
        cfg = tracking.trial_config_from_params(run["params"])
        point = {d.key: get_path(cfg, d.key) for d in study.search.space} | {"train.seed": cfg.train.seed}
        status = {"RUNNING": "running", "FINISHED": "done", "SCHEDULED": "pending"}.get(
            run["status"], "failed"
        )
        members[key] = MemberState(
            key, point, status, run["tags"].get("phase") or None if status == "done" else None
        )
    now = time.time()
    started = fetched.parent_started_s or now
    ended = fetched.parent_ended_s if fetched.parent_status != "RUNNING" else None
    state = "running" if fetched.parent_status == "RUNNING" else (fetched.parent_status or "unknown").lower()
    snap = Snapshot(
        study=study.name, total=study.search.n_trials, started_at=started, run_started_at=started,
        done_at_run_start=0, updated_at=ended or now, members=list(members.values()), driver={"state": state},
    )  # fmt: skip
    return StudyStatus(
        snap, study, f"MLflow experiment {fetched.experiment_name!r}", None if state == "running" else False
    )


def _read(uri: str) -> str | None:
    try:
        return storage.read_text(uri)
    except OSError as err:
        raise UsageError("SOURCE", f"cannot read {uri}: {err}") from None


def _parse(text: str, where: str) -> Study:
    import yaml

    from grokstudy.study import parse_study

    return parse_study(yaml.safe_load(text), where)


# ---- drawing -------------------------------------------------------------------------------------


def render(status: StudyStatus, now: float | None = None) -> str:
    """The status as text: a header, counts and timing, phases, the grid and its legend."""
    from grokstudy.console import duration

    now = time.time() if now is None else now
    snap, study = status.snapshot, status.study
    state = snap.driver.get("state", "running")
    if state == "running":
        who = (
            f"pid {snap.driver['pid']} on {snap.driver.get('host')}" if "pid" in snap.driver else "its driver"
        )
        driving = {True: f"running ({who})", None: f"running? ({who}; no news for {duration(now - snap.updated_at)})",
                   False: f"stopped: {who} is gone (killed?); run the same command again to resume"}[status.alive]  # fmt: skip
    else:
        driving = {"finished": "finished", "interrupted": "interrupted; run the same command again to resume",
                   "crashed": "crashed; run the same command again to resume"}.get(state, state)  # fmt: skip
    done, running, failed = snap.count("done"), snap.count("running"), snap.count("failed")
    total = "?" if snap.total is None else str(snap.total)
    pending = "" if snap.pending is None else f", {snap.pending} pending"
    elapsed = (snap.updated_at if state != "running" else now) - snap.started_at
    timing = f"elapsed {duration(elapsed)}"
    rate = snap.rate_per_s(snap.updated_at)
    if rate:
        timing += f", {rate * 60:.3g} trials/min"
        eta = snap.eta_s(snap.updated_at)
        if eta and state == "running" and status.alive is not False:
            timing += f", ETA {duration(max(0.0, eta - (now - snap.updated_at)))}"
    counts: dict[str, int] = defaultdict(int)
    for m in snap.members:
        if m.status == "done" and m.phase:
            counts[m.phase] += 1
    phases = ", ".join(f"{p} {counts[p]}" for p in sorted(counts, key=lambda p: (p not in PHASES, p)))
    lines = [
        f"study {snap.study!r} ({status.source}): {driving}",
        f"trials {done + failed}/{total}: {done} done, {running} running, {failed} failed{pending}",
        timing,
        f"phases: {phases or '-'}",
    ]
    if snap.warning:
        lines.append(f"warning: {snap.warning}")
    grid = phase_grid(study, snap.members)
    if grid:
        lines += ["", *grid]
    return "\n".join(lines)


def phase_grid(study: Study, members: list[MemberState]) -> list[str]:
    """The study's diagram axes as a letter grid (y up, x across); [] when an axis is not a
    number or a listed choice the grid can place."""
    x, y = _GridAxis.of(study, study.diagram.x), _GridAxis.of(study, study.diagram.y)
    if x is None or y is None:
        return []
    cells: dict[tuple[int, int], list[MemberState]] = defaultdict(list)
    for m in members:
        i, j = x.index(m.point.get(x.key, x.fixed)), y.index(m.point.get(y.key, y.fixed))
        if i is not None and j is not None:
            cells[(i, j)].append(m)
    width = max(2, *(len(t) for t in x.labels)) + 1
    margin = max(len(t) for t in y.labels)
    out = [y.key]
    for j in reversed(range(len(y.labels))):
        row = "".join(_letter(cells.get((i, j), [])).rjust(width) for i in range(len(x.labels)))
        out.append(f"{y.labels[j].rjust(margin)} {row}")
    out.append(" " * (margin + 1) + "".join(t.rjust(width) for t in x.labels) + f"   {x.key}")
    shown = [f"{LETTERS[k]} {k}" for k in (*PHASES, TIE, "running", "pending", "failed")]
    out.append("  ".join(shown))
    return out


def _letter(members: list[MemberState]) -> str:
    """A cell's letter: running while any of its trials runs, the majority phase once all its
    started trials ended (never a phase while one still trains), failed, or pending."""
    if any(m.status == "running" for m in members):
        return LETTERS["running"]
    phases = [m.phase for m in members if m.status == "done" and m.phase]
    if phases:
        return LETTERS.get(vote(phases).phase, "?")
    return LETTERS["failed"] if members else LETTERS["pending"]


@dataclass(frozen=True, slots=True)
class _GridAxis:
    key: str
    labels: list[str]
    values: list[Any] | None
    """The grid's values (a discrete axis), else None and `edges` bin a range."""
    edges: list[float] | None
    log: bool
    fixed: Any
    """The base trial's value, for a diagram axis the study does not search."""

    @classmethod
    def of(cls, study: Study, key: str) -> _GridAxis | None:
        dims = {d.key: d for d in study.search.space}
        base = get_path(study.base, key) if _has_path(study, key) else None
        dim = dims.get(key)
        if dim is None:
            return cls(key, [_fmt(base)], [base], None, False, base)
        if dim.is_discrete:
            return cls(key, [_fmt(v) for v in dim.grid], list(dim.grid), None, dim.is_log, base)
        lo, hi = dim.log or dim.range or (0.0, 1.0)
        f, inv = (math.log10, lambda v: 10**v) if dim.log else (float, float)
        edges = [inv(f(lo) + (f(hi) - f(lo)) * k / BINS) for k in range(BINS + 1)]
        labels = [_fmt(inv((f(edges[k]) + f(edges[k + 1])) / 2)) for k in range(BINS)]
        return cls(key, labels, None, edges, bool(dim.log), base)

    def index(self, value: Any) -> int | None:
        if self.values is not None:
            key = value_key(value)
            for i, v in enumerate(self.values):
                if value_key(v) == key or (
                    _number(v) and _number(value) and math.isclose(v, value, rel_tol=1e-9)
                ):
                    return i
            return None
        if not _number(value) or self.edges is None:
            return None
        for k in range(BINS):
            if value <= self.edges[k + 1] or k == BINS - 1:
                return k if value >= self.edges[0] * (1 - 1e-12) else None
        return None


def _has_path(study: Study, key: str) -> bool:
    try:
        get_path(study.base, key)
    except (AttributeError, KeyError):
        return False
    return True


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
