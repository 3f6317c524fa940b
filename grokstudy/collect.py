"""What happens after Tune's `fit`: histories from the checkpoints, MLflow runs settled, results
written. No Ray here: the runner hands over each Tune trial as a `Ended`.

- `histories`: one `TrialHistory` per member of every trial, read from its newest checkpoint.
- `settle_runs`: the MLflow runs their trials could not end (MLflow was down at the end, the
  worker died before it reached MLflow, the trial failed beyond retries) get what they lack from
  the checkpoint's whole curve: their tail, their outcome tags, their end.
- `write_results`: the tables, the figures, the parent run's artifacts and end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grokstudy import checkpoints, member, results, tracking
from grokstudy.config import Study, flatten
from grokstudy.errors import one_line
from grokstudy.points import point_label
from grokstudy.records import TrialHistory
from grokstudy.uris import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ended:
    """One Tune trial as `fit` (or a saved experiment) left it."""

    config: dict[str, Any]
    """Its Tune config: `{"members": [{"trial_id", "point"}, ...]}`."""
    checkpoint: tuple[Any, str] | None
    """(pyarrow filesystem, path) of the checkpoint Tune recorded last; None: none yet."""
    error: str | None
    """Why it failed beyond run.max_failures retries (None: it did not fail)."""
    node: str | None


@dataclass(frozen=True, slots=True)
class StudyOutcome:
    out_dir: Path
    trials_path: Path
    curves_path: Path
    figures: list[Path]
    n_trials: int
    failed: list[str]
    """Trial ids that failed beyond run.max_failures retries."""
    phase_counts: dict[str, int]
    tracking_uri: str
    parent_run_id: str | None
    resumed: bool
    lost: int
    """Trials a killed driver had started but not recorded, run again by this resume."""
    retried: int = 0
    """Failed trials this run ran again (`--retry-failed`, or Tune's snapshot had missed the failure)."""
    tracking_incomplete: list[str] = dataclasses.field(default_factory=list)
    """What MLflow did not store at the end (empty: every run is whole and ended); running the
    same command again settles it."""


def histories(study: Study, trials: Sequence[Ended]) -> tuple[list[TrialHistory], int]:
    """(one history per member of every trial, the number of members left unfinished)."""
    out: list[TrialHistory] = []
    unfinished = 0
    for trial in trials:
        saved = checkpoints.read_members(*trial.checkpoint) if trial.checkpoint else {}
        for m in (trial.config or {}).get("members", []):
            h = member.history(study, m, saved.get(m["trial_id"]), trial.node, trial.error)
            if h is None:
                unfinished += 1
            else:
                out.append(h)
    return out, unfinished


def write_results(
    study: Study,
    out_dir: Path,
    trial_histories: list[TrialHistory],
    formats: tuple[str, ...],
    study_tracker: tracking.StudyTracker,
    resumed: bool,
    lost: int,
    retried: int = 0,
) -> StudyOutcome:
    """Tables, cells and figures into `out_dir`; the parent run gets them and its end."""
    from grokstudy import figures  # here: trial workers import the modules above, and need no matplotlib

    trial_histories, unsettled = tracked(study, trial_histories, study_tracker)
    incomplete = [unsettled] if unsettled else []
    trials, curves = results.build_tables(study, trial_histories)
    trials_path, curves_path = results.write_tables(trials, curves, out_dir)
    cells = results.build_cells(study, trials)
    tables = [trials_path, curves_path] + ([results.write_cells(cells, out_dir)] if cells is not None else [])
    figure_paths = (
        figures.render_study(trials, curves, out_dir / "figures", formats=formats, cells=cells)
        if trials.num_rows
        else []
    )
    failed = [h.trial_id for h in trial_histories if h.outcome is None]
    phase_counts = dict(Counter(p for p in trials.column("phase").to_pylist() if p))
    tags = {f"phases.{k}": str(v) for k, v in phase_counts.items()} | {"trials.failed": str(len(failed))}
    for fn, *args in [
        (study_tracker.log_artifacts, tables, "results"),
        (study_tracker.log_artifacts, figure_paths, "figures"),
        (study_tracker.set_tags, tags),
        (study_tracker.finish, "FAILED" if failed else "FINISHED"),
    ]:
        if (problem := best_effort(fn, *args)) is not None:
            incomplete.append(problem)
    return StudyOutcome(
        out_dir=out_dir,
        trials_path=trials_path,
        curves_path=curves_path,
        figures=figure_paths,
        n_trials=trials.num_rows,
        failed=failed,
        phase_counts=phase_counts,
        tracking_uri=study_tracker.tracking_uri,
        parent_run_id=study_tracker.run_id,
        resumed=resumed,
        lost=lost,
        retried=retried,
        tracking_incomplete=incomplete,
    )


def tracked(
    study: Study, trial_histories: list[TrialHistory], study_tracker: tracking.StudyTracker
) -> tuple[list[TrialHistory], str | None]:
    """(the histories, each linked to its MLflow run, every run holding its trial's whole curve
    and ended as its trial ended; why not, when MLflow could not be made so at the very end)."""
    try:
        return settle_runs(trial_histories, study_tracker), None
    except Exception as err:
        problem = f"the trial runs were not settled ({redact(one_line(err, 300))})"
        log.warning("MLflow: %s", problem)
    try:
        runs = study_tracker.trial_runs()
    except Exception:
        return trial_histories, problem
    return [
        h if h.run_id else dataclasses.replace(h, run_id=runs.get(h.trial_id, (None,))[0])
        for h in trial_histories
    ], problem


def settle_runs(
    trial_histories: list[TrialHistory], study_tracker: tracking.StudyTracker
) -> list[TrialHistory]:
    """End the runs that their trials could not: a trial that finished while MLflow was down
    (its curve's tail and its end were dropped when it exited), one whose worker died before it
    reached MLflow at all (no run), one that failed beyond retries. The driver's curve is whole
    (from the checkpoint), so the run gets what it lacks. Returns the histories with their run ids."""
    runs = study_tracker.trial_runs()
    ends = []
    for h in trial_histories:
        run_id, status = runs.get(h.trial_id, (None, None))
        if h.run_id is not None and h.run_id != run_id:
            run_id, status = h.run_id, None  # a run the search does not see: let the sender check it
        want = "FAILED" if h.outcome is None else "FINISHED"
        if status == want:
            continue
        tags = member.run_tags(h.point, h.cfg)
        if h.outcome is not None:
            tags |= member.final_tags(h.outcome, h.node or "")
        error = (h.error or "failed") if h.outcome is None else None
        ends.append(tracking.TrialEnd(h.trial_id, run_id, point_label(h.point), flatten(h.cfg), tags,
                                      h.records, want, error))  # fmt: skip
    run_ids = {key: run_id for key, (run_id, _) in runs.items()} | (
        study_tracker.settle_trial_runs(ends, member.CLOSE_TIMEOUT_S) if ends else {}
    )
    return [dataclasses.replace(h, run_id=h.run_id or run_ids.get(h.trial_id)) for h in trial_histories]


def best_effort(fn: Callable[..., Any], *args: Any) -> str | None:
    """MLflow at the end of a study is best effort: the tables are written either way. Returns
    what failed (None: it was stored)."""
    try:
        fn(*args)
    except Exception as err:
        problem = f"{getattr(fn, '__name__', fn)} failed ({redact(one_line(err, 300))})"
        log.warning("MLflow: %s", problem)
        return problem
    return None
