"""`grokstudy export`: a study brought home from where a cluster job left it, as a directory that
`grokstudy.load`, `plot`, `report` and `status` read like the study's own output.

Sources: the study's MLflow experiment (the parent run's study.yaml; each trial run's params,
curves, outcome and `weights/<trial_id>.pt` artifact), or its Ray Tune experiment under
`run.storage`, a directory or an s3://, gs://, file:// URI (grokstudy-study.yaml, the trials'
checkpoints, `weights/<trial_id>.pt`, grokstudy-progress.json).

Written into `out`, each file atomically: study.yaml, the tables, the figures, report.html,
progress.json, and `weights/<trial_id>.pt` of every finished trial, which the trials table's
`weights_uri` then names, so `grokstudy.load(out).model(trial_id)` works offline.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grokstudy import results, storage, weights
from grokstudy.config import Study
from grokstudy.errors import UsageError, one_line
from grokstudy.records import TrialHistory
from grokstudy.snapshot import SNAPSHOT_FILE, Snapshot
from grokstudy.uris import redact

DOWNLOADS = 8
"""Weights files fetched at once (each is one small request to MLflow or the object store)."""


@dataclass(frozen=True, slots=True)
class Source:
    """A study as read from MLflow or its Tune experiment, before anything is written."""

    described: str
    study_yaml: str
    study: Study
    histories: list[TrialHistory]
    weights_at: dict[str, str]
    """{trial id: where its weights file is} of the finished trials that kept one."""
    tracking_uri: str | None
    """For `runs:/` downloads and the report's links to the runs."""
    snapshot: Snapshot | None = None
    """The driver's own progress snapshot, where the source keeps one (the Tune experiment)."""
    run_times: tuple[float | None, float | None, str] = (None, None, "finished")
    """(started, ended, state) of the study's parent run, for a snapshot built from the tables."""


@dataclass(frozen=True, slots=True)
class Exported:
    study: str
    out_dir: Path
    study_file: Path
    tables: list[Path]
    """trials.parquet, curves.parquet, and cells.parquet for a grid study."""
    n_trials: int
    n_curve_rows: int
    figures: list[Path]
    report: Path
    progress: Path
    local_weights: tuple[int, int]
    """(files, bytes) under `<out>/weights`, which `weights_uri` names."""
    remote_weights: tuple[int, int]
    """(files, estimated bytes) not brought home (`--no-weights`, or a copy that failed)."""
    failed: list[str]
    """`trial_id (why)` of each weights file that could not be copied."""


def read(source: str | None, experiment: str | None, tracking_uri: str | None) -> Source:
    """The study named by SOURCE (a Tune experiment directory or URI, else an MLflow experiment
    name or id) or by `experiment` (an MLflow experiment); one-line UsageErrors naming the flag."""
    from grokstudy.api import is_uri

    if source is None and experiment is None:
        raise UsageError("SOURCE", "give SOURCE (a Ray Tune experiment: directory or URI) or --experiment "
                         "NAME (an MLflow experiment)")  # fmt: skip
    if source is not None and experiment is not None:
        raise UsageError("SOURCE", "give SOURCE or --experiment NAME, not both")
    if source is not None and (is_uri(source) or Path(source).exists()):
        return from_tune(source, tracking_uri)
    if not tracking_uri:
        if experiment is not None:
            raise UsageError("--tracking-uri", "--experiment needs --tracking-uri (or MLFLOW_TRACKING_URI)")
        raise UsageError("SOURCE", f"{source!r} is not a file or directory; to read an MLflow experiment "
                         "pass --tracking-uri (or set MLFLOW_TRACKING_URI)")  # fmt: skip
    if experiment is not None:
        return from_mlflow(tracking_uri, experiment, "--experiment")
    return from_mlflow(tracking_uri, str(source), "SOURCE")


def from_mlflow(tracking_uri: str, experiment: str, flag: str = "--experiment") -> Source:
    from grokstudy import tracking

    tracking.check_readable(tracking_uri)
    try:
        fetched, study, histories = tracking.fetch_study(tracking_uri, experiment)
    except UsageError as err:  # no such experiment, or no study run in it
        raise UsageError(flag, err.msg) from None
    state = "running" if fetched.parent_status == "RUNNING" else (fetched.parent_status or "unknown").lower()
    return Source(
        described=f"MLflow experiment {fetched.experiment_name!r} at {redact(tracking_uri)}",
        study_yaml=fetched.study_yaml or "", study=study, histories=histories,
        weights_at={h.trial_id: h.weights_uri for h in histories if h.outcome is not None and h.weights_uri},
        tracking_uri=tracking_uri, run_times=(fetched.parent_started_s, fetched.parent_ended_s, state),
    )  # fmt: skip


def from_tune(source: str, tracking_uri: str | None = None) -> Source:
    """A Tune experiment (`run.storage/<name>`). Weights are taken from beside it, not from the
    paths its checkpoints recorded: those name the storage as the cluster's nodes saw it."""
    from grokstudy import preflight, report, status
    from grokstudy.api import is_uri, read_tune_experiment

    path = Path(source)
    if (
        not is_uri(source)
        and (path / results.TRIALS_FILE).exists()
        and not (path / preflight.STUDY_FILE).exists()
    ):
        raise UsageError("SOURCE", f"{source} is a study's output directory; give its Ray Tune experiment "
                         f"({path / 'ray'}/<name>, or run.storage/<name>), or --experiment NAME")  # fmt: skip
    study, histories = read_tune_experiment(source)
    study_yaml = storage.read_text(storage.join(source, preflight.STUDY_FILE)) or ""
    try:
        snapshot = status.read_directory(source).snapshot
    except UsageError:  # a study from before the driver kept one there
        snapshot = None
    at = weights.directory(source)
    return Source(
        described=f"Ray Tune experiment {redact(source)}", study_yaml=study_yaml, study=study,
        histories=histories,
        weights_at={h.trial_id: storage.join(at, weights.file_name(h.trial_id))
                    for h in histories if h.outcome is not None and h.weights_uri},
        tracking_uri=tracking_uri or report.study_tracking_uri(study_yaml), snapshot=snapshot,
    )  # fmt: skip


def check_out(out_dir: Path, study: str) -> None:
    """`out_dir` may take this study: it holds no trials table, or this study's (a refresh)."""
    trials_file = Path(out_dir) / results.TRIALS_FILE
    if not trials_file.exists():
        return
    try:
        names = set(results.read_trials(trials_file).column("study").to_pylist())
    except UsageError:
        names = {"<unreadable>"}
    if others := sorted(names - {study}):
        raise UsageError(
            "--out", f"{out_dir} holds the trials of study {', '.join(map(repr, others))}, not {study!r}; "
            "give another --out",
        )  # fmt: skip


def export_study(
    src: Source, out_dir: Path, *, copy_weights: bool = True, formats: tuple[str, ...] = ("png", "pdf")
) -> Exported:
    """Write `src` into `out_dir` (refreshing an earlier export of the same study)."""
    from grokstudy import collect, report

    out_dir = Path(out_dir)
    check_out(out_dir, src.study.name)
    with storage.OutputLock(out_dir):  # not while a driver (or another export) writes there
        study_file = out_dir / report.STUDY_FILE
        storage.write_atomic(study_file, src.study_yaml)  # before the report, which shows it
        histories, local, remote, failed = _bring_weights(src, out_dir, copy_weights)
        trials, tables, figures, report_path = collect.write_files(
            src.study, out_dir, histories, formats, src.tracking_uri
        )
        progress = out_dir / SNAPSHOT_FILE
        storage.write_atomic(progress, (src.snapshot or _snapshot(src, trials)).to_json())
    return Exported(
        study=src.study.name, out_dir=out_dir, study_file=study_file, tables=tables, n_trials=trials.num_rows,
        n_curve_rows=results.read_curves(tables[1]).num_rows, figures=figures, report=report_path,
        progress=progress, local_weights=local, remote_weights=remote, failed=failed,
    )  # fmt: skip


def _bring_weights(
    src: Source, out_dir: Path, copy: bool
) -> tuple[list[TrialHistory], tuple[int, int], tuple[int, int], list[str]]:
    """(the histories with `weights_uri` naming the local copies, (local files, bytes), (files left
    at the source, estimated bytes), failures). A file already here is kept: a finished trial's
    weights never change, and each copy was written whole."""
    local = {tid: out_dir / weights.DIRECTORY / weights.file_name(tid) for tid in src.weights_at}
    failed = []
    if copy:
        todo = {tid: path for tid, path in local.items() if not path.is_file()}
        with ThreadPoolExecutor(max_workers=DOWNLOADS) as pool:
            jobs = {tid: pool.submit(weights.copy_to, src.weights_at[tid], path, src.tracking_uri)
                    for tid, path in todo.items()}  # fmt: skip
        failed = [
            f"{tid} ({redact(one_line(err, 200))})" for tid, job in jobs.items() if (err := job.exception())
        ]
    here = {tid: path for tid, path in local.items() if path.is_file()}
    histories = [
        dataclasses.replace(h, weights_uri=str(here[h.trial_id])) if h.trial_id in here else h
        for h in src.histories
    ]
    away = [h for h in src.histories if h.trial_id in src.weights_at and h.trial_id not in here]
    return (
        histories,
        (len(here), sum(path.stat().st_size for path in here.values())),
        (len(away), sum(weights.estimated_bytes(h.cfg) for h in away)),
        failed,
    )


def _snapshot(src: Source, trials: Any) -> Snapshot:
    """A progress snapshot from the exported trials table, for `grokstudy status <out>`."""
    from grokstudy import collect

    members = collect.member_states(trials)
    started, ended, state = src.run_times
    now = time.time()
    return Snapshot(
        study=src.study.name, total=src.study.search.n_trials, started_at=started or now,
        run_started_at=started or now, done_at_run_start=0, updated_at=ended or now, members=members,
        driver={"state": state},
    )  # fmt: skip
