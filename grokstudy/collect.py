"""What happens after Tune's `fit`: histories from the checkpoints, MLflow runs settled, results
written. No Ray here: the runner hands over each Tune trial as a `Ended`.

- `histories`: one `TrialHistory` per member of every trial, read from its newest checkpoint.
- `settle_runs`: the MLflow runs their trials could not end (MLflow was down at the end, the
  worker died before it reached MLflow, the trial failed beyond retries) get what they lack from
  the checkpoint's whole curve: their tail, their outcome tags, their end.
- `write_results`: the tables, the figures, the parent run's artifacts, description and end.
- `LiveResults`: the same tables and figures while the study runs, every `run.results_every`
  finished trials or `run.results_every_s`; trials still training are rows with status RUNNING
  and no phase, and are drawn as running.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grokstudy import checkpoints, member, phases, results, tracking, weights
from grokstudy.config import Study, flatten
from grokstudy.errors import one_line
from grokstudy.points import point_label
from grokstudy.records import TrialHistory
from grokstudy.snapshot import MemberState
from grokstudy.uris import redact

log = logging.getLogger(__name__)

FAILED_BEYOND_RETRIES = "failed beyond run.max_failures retries"
ENDED_WITHOUT_OUTCOME = "its Tune trial ended without an outcome for it"


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
    done: bool = False
    """Tune finished the trial (its function returned): a member without an outcome will get none."""


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
    elapsed_s: float | None = None
    """Wall-clock seconds since the study first started (resumes included)."""
    weights: tuple[int, int, str] | None = None
    """(files, bytes, directory) of the finished trials' weights; None: the study keeps none."""
    report: Path | None = None
    """The interactive report (`grokstudy.report`)."""
    grown: tuple[str, ...] = ()
    """How the study grew since its trials started (`study.compare`), when it did."""


def histories(study: Study, trials: Sequence[Ended]) -> tuple[list[TrialHistory], int]:
    """(one history per member, the number of members left unfinished). A member that more
    than one Tune trial holds (one that ended without an outcome for it, then one that ran it
    again) is what its best attempt says: finished, else still unfinished, else failed."""
    best: dict[str, TrialHistory | None] = {}
    for trial in trials:
        saved = checkpoints.read_members(*trial.checkpoint) if trial.checkpoint else {}
        error = trial.error or (ENDED_WITHOUT_OUTCOME if trial.done else None)
        for m in (trial.config or {}).get("members", []):
            h = member.history(study, m, saved.get(m["trial_id"]), trial.node, error)
            tid = m["trial_id"]
            if tid not in best or _rank(h) > _rank(best[tid]):
                best[tid] = h
    out = [h for h in best.values() if h is not None]
    return out, sum(h is None for h in best.values())


def _rank(h: TrialHistory | None) -> int:
    return 0 if h is not None and h.outcome is None else 1 if h is None else 2


def write_results(
    study: Study,
    out_dir: Path,
    trial_histories: list[TrialHistory],
    formats: tuple[str, ...],
    study_tracker: tracking.StudyTracker,
    resumed: bool,
    lost: int,
    retried: int = 0,
    started_at: float | None = None,
    weights_dir: str | None = None,
    grown: tuple[str, ...] = (),
) -> StudyOutcome:
    """Tables, cells and figures into `out_dir`; the parent run gets them and its end.
    `started_at`: when the study first started (Unix time), for its wall-clock. `weights_dir`:
    where the trials kept their weights; a file there whose trial did not finish goes."""
    kept = None
    if weights_dir is not None:
        finished = {h.trial_id for h in trial_histories if h.outcome is not None}
        files, size = weights.prune(weights_dir, finished)
        kept = (files, size, weights_dir) if files or study.run.save_weights == "final" else None
    trial_histories, unsettled = tracked(study, trial_histories, study_tracker)
    incomplete = [unsettled] if unsettled else []
    trials, tables, figure_paths, report = write_files(
        study, out_dir, trial_histories, formats, study_tracker.tracking_uri
    )
    trials_path, curves_path = tables[:2]
    failed = [h.trial_id for h in trial_histories if h.outcome is None]
    phase_counts = dict(Counter(p for p in trials.column("phase").to_pylist() if p))
    tags = {f"phases.{k}": str(v) for k, v in phase_counts.items()} | {"trials.failed": str(len(failed))}
    for fn, *args in [
        (study_tracker.log_artifacts, tables, "results"),
        (study_tracker.log_artifacts, figure_paths, "figures"),
        (study_tracker.log_artifacts, [report]),
        (study_tracker.set_tags, tags | {tracking.NOTE_TAG: description(study, trials, "finished")}),
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
        elapsed_s=None if started_at is None else time.time() - started_at,
        weights=kept,
        report=report,
        grown=grown,
    )


def write_files(
    study: Study,
    out_dir: Path,
    trial_histories: list[TrialHistory],
    formats: tuple[str, ...],
    tracking_uri: str | None = None,
    live: bool = False,
) -> tuple[Any, list[Path], list[Path], Path]:
    """(the trials table, [trials, curves, cells] paths written, figure paths, the interactive
    report's path): every file replaced atomically, so a reader never sees half of one. The report
    links each trial to its run when `tracking_uri` is an MLflow server's. `live` (while the
    study runs) leaves out the learning-curves figure: the slowest to draw (2.8 s of 4.9 s for
    the quickstart on a 2-core EPYC), spent in Tune's loop; the report draws any trial's curves."""
    # Here: trial workers import the modules above, and need no matplotlib.
    from grokstudy import figures, report

    trials, curves = results.build_tables(study, trial_histories)
    tables = list(results.write_tables(trials, curves, out_dir))
    cells = results.build_cells(study, trials)
    if cells is not None:
        tables.append(results.write_cells(cells, out_dir))
    figure_paths = (
        figures.render_study(
            trials, None if live else curves, out_dir / "figures", formats=formats, cells=cells
        )
        if trials.num_rows
        else []
    )
    study_yaml = (out_dir / report.STUDY_FILE).read_text() if (out_dir / report.STUDY_FILE).exists() else None
    report_path = report.write_report(trials, curves, out_dir / report.REPORT_FILE, study_yaml=study_yaml,
                                      tracking_uri=tracking_uri, cells=cells)  # fmt: skip
    return trials, tables, figure_paths, report_path


def member_states(trials: Any) -> list[MemberState]:
    """The trials table's rows as a progress snapshot's members."""
    return [
        MemberState(r["trial_id"], {k: r[k] for k in [*r["searched"], "train.seed"]},
                    {"RUNNING": "running", "ERROR": "failed"}.get(r["status"], "done"), r["phase"])
        for r in trials.to_pylist()
    ]  # fmt: skip


def description(study: Study, trials: Any, state: str) -> str:
    """The parent run's description (markdown): the study, its phases so far as a letter grid,
    what `phase_code` means, how to reproduce it."""
    from grokstudy import status

    members = member_states(trials)
    counts = Counter(m.phase for m in members if m.status == "done" and m.phase)
    total = study.search.n_trials
    done = sum(m.status != "running" for m in members)
    lines = [
        f"**grokstudy study `{study.name}`** ({state}): {done}/{total or '?'} trials ended, "
        f"{study.search.sampler} sampler over {', '.join(f'`{d.key}`' for d in study.search.space) or 'no axes'}, "
        f"{study.search.seeds} seed(s) per point.",
        "",
        "Phases: " + (", ".join(f"{p} {n}" for p, n in sorted(counts.items())) or "none yet"),
        "",
    ]
    grid = status.phase_grid(study, members)
    if grid:
        lines += ["```", *grid, "```", ""]
    codes = ", ".join(f"{i} {p}" for i, p in enumerate(phases.PHASES))
    lines += [
        "Compare the trial runs: metrics `t_val`, `t_train`, `delay`, `final_val_acc` and `phase_code` "
        f"({codes}) against params `{study.diagram.x}` and `{study.diagram.y}`.",
        "The diagram is under Artifacts, `figures/phase_diagram.png`; tables under `results/`.",
        "",
        f"Reproduce: download `{tracking.STUDY_ARTIFACT}` and run `grokstudy run {tracking.STUDY_ARTIFACT}`.",
    ]
    return "\n".join(lines)


class LiveResults:
    """The tables and figures while the study runs, rewritten every `run.results_every`
    finished trials or `run.results_every_s`, whichever comes first; the parent run gets the
    diagram and a fresh description each time. Reads each trial's newest checkpoint (a finished
    member's history once); never raises (results while running are a view, not the record)."""

    def __init__(
        self, study: Study, out_dir: Path, formats: tuple[str, ...], study_tracker: tracking.StudyTracker
    ) -> None:
        self.study, self.out_dir, self.tracker = study, out_dir, study_tracker
        # PNG only while running (the end writes every format), and no learning curves: 2.1 s a
        # rewrite for the quickstart's 40 trials on a 2-core EPYC (4.9 s with the curves), spent in
        # Tune's loop.
        self.formats = ("png",) if "png" in formats else formats[:1]
        self.trials: dict[str, tuple[dict[str, Any], tuple[Any, str] | None, str | None]] = {}
        """Tune trial id -> (config, its newest checkpoint, node)."""
        self.finished: dict[str, TrialHistory] = {}
        """Members with an outcome: read from their checkpoint once."""
        self.failed: set[str] = set()
        """Tune trials that failed beyond retries: their unfinished members are failed, not running."""
        self.ended: set[str] = set()
        """Tune trials Tune finished: a member without an outcome there will get none from them."""
        self.done_at_last = 0
        self.last_at = time.monotonic()
        self.writes = 0

    def seen(
        self, trial_id: str, config: dict[str, Any], checkpoint: tuple[Any, str] | None, node: str | None
    ) -> None:
        old = self.trials.get(trial_id)
        self.trials[trial_id] = (
            config,
            checkpoint or (old[1] if old else None),
            node or (old[2] if old else None),
        )

    def due(self, done: int) -> bool:
        every = self.study.run
        if done - self.done_at_last >= every.results_every:
            return True
        return bool(self.trials) and time.monotonic() - self.last_at >= every.results_every_s

    def write(self, done: int) -> None:
        self.done_at_last, self.last_at = done, time.monotonic()
        try:
            trials, tables, figure_paths, _ = write_files(
                self.study,
                self.out_dir,
                self._histories(),
                self.formats,
                self.tracker.tracking_uri,
                live=True,
            )
        except Exception as err:
            log.warning("results while running not written: %s", one_line(err, 300))
            return
        self.writes += 1
        for fn, *args in [
            (self.tracker.log_artifacts, [p for p in figure_paths if p.stem == "phase_diagram"], "figures"),
            (self.tracker.set_tags, {tracking.NOTE_TAG: description(self.study, trials, "running")}),
        ]:
            best_effort(fn, *args)

    def _histories(self) -> list[TrialHistory]:
        best: dict[str, TrialHistory] = {}
        for trial_id, (config, checkpoint, node) in list(self.trials.items()):
            error = FAILED_BEYOND_RETRIES if trial_id in self.failed else None
            error = error or (ENDED_WITHOUT_OUTCOME if trial_id in self.ended else None)
            saved = None
            for m in (config or {}).get("members", []):
                tid = m["trial_id"]
                h = self.finished.get(tid)
                if h is None:
                    if saved is None:
                        try:
                            saved = checkpoints.read_members(*checkpoint) if checkpoint else {}
                        except Exception:  # the trial pruned it as it was read: its next one will do
                            saved = {}
                    h = member.history(self.study, m, saved.get(tid), node, error, running=True)
                    if h.outcome is not None:
                        self.finished[tid] = h
                if tid not in best or _live_rank(h) > _live_rank(best[tid]):
                    best[tid] = h  # a member run again by a newer trial: its best attempt
        return list(best.values())


def _live_rank(h: TrialHistory) -> int:
    return 2 if h.outcome is not None else 1 if h.running else 0


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
        summary = None
        if h.outcome is not None:
            tags |= member.final_tags(h.outcome, h.node or "")
            summary = member.outcome_metrics(h.outcome, h.records)
        if h.weights_uri:
            tags[tracking.WEIGHTS_TAG] = h.weights_uri
        error = (h.error or "failed") if h.outcome is None else None
        ends.append(tracking.TrialEnd(h.trial_id, run_id, point_label(h.point), flatten(h.cfg), tags,
                                      h.records, want, error, summary, h.weights_uri))  # fmt: skip
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
