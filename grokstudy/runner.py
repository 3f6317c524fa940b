"""Runs a study on Ray Tune: the only module that imports ray.

Checked against ray 2.60.0 (Tune's function-trainable API: `tune.report`,
`tune.get_checkpoint`, `tune.get_context`; `Tuner.can_restore/restore`).

Flow: `run_study` starts (or joins) Ray, opens the study's MLflow parent run,
builds an `OptunaSearch` from `search.py`, and fits a `Tuner` over
`_trial_fn`, or restores the same experiment when its directory already holds
one. Each trial wraps the pure training core (`train.run`), reports to Tune
only at eval points, checkpoints every `train.checkpoint_every` steps and logs
its curve to its own nested MLflow run. When all trials are done the driver
reads the curves back from Tune's storage, labels phases, writes the Parquet
tables and figures and attaches them to the parent run.

Scheduling follows the science (DESIGN.md): FIFO, never a plateau rule. A
trial ends when its phase is decided (generalization held for
`phases.confirm_steps`) or its step budget is spent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from grokstudy import phases, results, search, tracking, train
from grokstudy.config import Study, flatten, to_dict
from grokstudy.records import EvalRecord

STATE_FILE = "state.pt"
META_FILE = "meta.json"
RUN_ID_KEY = "mlflow_run_id"
"""In each report: the trial's MLflow run, so trials.parquet links every row to it."""
OBJECTIVE = "objective"
"""What Optuna sees: steps to generalize (t_val), or the budget if not (yet)."""

PLATEAU_SCHEDULERS = ("asha", "hyperband", "median", "pbt", "pb2", "plateau")
PLATEAU_REFUSAL = (
    "grokstudy refuses plateau/early-stopping schedulers: a grokking trial sits on a "
    "validation plateau for thousands of steps before it generalizes, so stopping on a "
    "plateau kills exactly the late grokkers and biases the phase diagram. Trials stop "
    "when their phase is decided or their step budget is spent."
)


# ---- what the driver hands to every trial ------------------------------------------


@dataclass(frozen=True, slots=True)
class TrialContext:
    """Plain values a trial needs on any node (no live objects)."""

    study: Study
    searched: tuple[str, ...]
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None


def _trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Ray Tune trial: the training core plus checkpoints, reports and tracking."""
    import torch

    study = ctx.study
    point = {k: config[k] for k in (*ctx.searched, "train.seed") if k in config}
    cfg = study.trial(point)
    tune_ctx = tune.get_context()
    trial_id = tune_ctx.get_trial_id()
    resources = tune_ctx.get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", study.resources.cpu))))
    gpu_share = resources.get("GPU", 0.0)
    if gpu_share and torch.cuda.is_available():
        # Fractional GPUs only share Ray's bookkeeping; cap this process's memory
        # ourselves so packed trials cannot starve each other.
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_share))

    checkpoint = tune.get_checkpoint()
    run_id: str | None = None
    curve: dict[str, list[float]] = {"step": [], "train/acc": [], "val/acc": []}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = train.load_state(cfg, Path(d) / STATE_FILE)
            meta = json.loads((Path(d) / META_FILE).read_text())
        run_id = meta.get("run_id")
        curve = meta["curve"]
    else:
        state = train.init_state(cfg)

    tracker = _start_tracker(ctx, cfg, point, trial_id, run_id)
    node = ray.get_runtime_context().get_node_id()
    max_steps = cfg.train.max_steps
    try:
        for record in train.run(cfg, state):
            tracker.log_records([record])
            curve["step"].append(record.step)
            curve["train/acc"].append(record.train_acc)
            curve["val/acc"].append(record.val_acc)
            generalized = phases.generalization_confirmed(
                curve["step"], curve["train/acc"], curve["val/acc"], study.phases
            )
            done = generalized or record.step >= max_steps
            verdict = phases.classify(
                curve["step"], curve["train/acc"], curve["val/acc"], study.phases, max_steps
            )
            report = _report_metrics(record, verdict, max_steps, generalized, done, node)
            if tracker.run_id:
                report[RUN_ID_KEY] = tracker.run_id
            if done:
                tracker.set_tags(_final_tags(verdict, report["stop_reason"], trial_id, node))
                tracker.finish("FINISHED")
            if done or record.step % cfg.train.checkpoint_every == 0:
                with tempfile.TemporaryDirectory() as d:
                    train.save_state(state, Path(d) / STATE_FILE)
                    meta = {"run_id": tracker.run_id, "curve": curve}
                    (Path(d) / META_FILE).write_text(json.dumps(meta))
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
            else:
                tune.report(report)
            if done:
                return
    except BaseException:
        # The run stays resumable: a retry from the checkpoint continues it.
        tracker.finish("FAILED")
        raise


def _start_tracker(
    ctx: TrialContext, cfg: Any, point: dict[str, Any], trial_id: str, run_id: str | None
) -> tracking.Tracker:
    if not ctx.tracking_uri or not ctx.experiment_id:
        return tracking.NullTracker()
    if run_id is None:
        # A trial that failed before its first checkpoint re-attaches to its run
        # instead of creating a duplicate; repeated steps are skipped by the tracker.
        existing = tracking.find_trial_runs(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id)
        run_id = existing.get(_trial_key(point))
    return tracking.MlflowTrialTracker.start(
        ctx.tracking_uri,
        ctx.experiment_id,
        ctx.parent_run_id,
        run_name=search.point_label(point),
        params=flatten(cfg),
        tags={
            # Point and seed, not Tune's trial id: a trial a killed driver lost and
            # the resumed study runs again under a new id re-attaches to its run.
            "grokstudy.trial_key": _trial_key(point),
            "grokstudy.point_id": search.point_id(point),
            "ray.trial_id": trial_id,
            "optimizer.weight_decay_form": cfg.optimizer.weight_decay_form,
        },
        run_id=run_id,
    )


def _trial_key(point: dict[str, Any]) -> str:
    """A trial's identity across Tune restarts: its point and seed."""
    return f"{search.point_id(point)}/seed={point.get(search.SEED, 0)}"


def _report_metrics(
    record: EvalRecord,
    verdict: phases.PhaseResult,
    max_steps: int,
    generalized: bool,
    done: bool,
    node: str,
) -> dict[str, Any]:
    t_val = verdict.t_val if verdict.t_val is not None else max_steps
    stop_reason = "generalized" if generalized else ("budget" if done else "")
    return {
        "step": record.step,
        **record.metrics(),
        "time/elapsed_s": record.elapsed_s,
        OBJECTIVE: float(t_val),
        "phase": verdict.phase,
        "t_train": -1 if verdict.t_train is None else verdict.t_train,
        "t_val": -1 if verdict.t_val is None else verdict.t_val,
        "generalized": generalized,
        "stop_reason": stop_reason,
        "node": node,
    }


def _final_tags(verdict: phases.PhaseResult, stop_reason: str, trial_id: str, node: str) -> dict[str, str]:
    def fmt(v: int | None) -> str:
        return "" if v is None else str(v)

    return {
        "phase": verdict.phase,
        "t_train": fmt(verdict.t_train),
        "t_val": fmt(verdict.t_val),
        "delay": fmt(verdict.delay),
        "stop_reason": stop_reason,
        "ray.node": node,
        "ray.trial_id": trial_id,
    }


# ---- the stopper ---------------------------------------------------------------------


class GrokStopper(tune.Stopper):
    """Stop a trial once its phase is decided or its budget is spent; nothing else.

    The trial reports `generalized` when validation accuracy has held above the
    threshold for `phases.confirm_steps`; a plateau is never a reason to stop.
    """

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get("generalized")) or result.get("step", 0) >= self.max_steps

    def stop_all(self) -> bool:
        return False


# ---- live progress ---------------------------------------------------------------------


@dataclass(slots=True)
class Progress:
    """A snapshot for the live progress line."""

    total: int
    done: int = 0
    running: int = 0
    failed: int = 0
    phases: Counter = field(default_factory=Counter)

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.running - self.failed)


class _ProgressCallback(tune.Callback):
    def __init__(self, total: int, emit: Callable[[Progress], None], every_s: float = 2.0) -> None:
        self.total, self.emit, self.every_s = total, emit, every_s
        self.states: dict[str, str] = {}
        self.trial_phase: dict[str, str] = {}
        self.last_emit = 0.0
        self.last_line: tuple | None = None

    def _snapshot(self) -> Progress:
        p = Progress(total=self.total)
        for tid, state in self.states.items():
            if state == "done":
                p.done += 1
                p.phases[self.trial_phase.get(tid, "?")] += 1
            elif state == "failed":
                p.failed += 1
            else:
                p.running += 1
        return p

    def _maybe_emit(self, force: bool = False) -> None:
        p = self._snapshot()
        key = (p.done, p.running, p.failed, tuple(sorted(p.phases.items())))
        now = time.monotonic()
        if key != self.last_line and (force or now - self.last_emit >= self.every_s):
            self.last_emit, self.last_line = now, key
            self.emit(p)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "running"
        self._maybe_emit()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.trial_phase[trial.trial_id] = result.get("phase", "?")
        self._maybe_emit()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "done"
        self._maybe_emit(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.states[trial.trial_id] = "failed"
        self._maybe_emit(force=True)


# ---- the driver ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StudyOutcome:
    out_dir: Path
    trials_path: Path
    curves_path: Path
    figures: list[Path]
    n_trials: int
    n_failed: int
    phase_counts: dict[str, int]
    tracking_uri: str
    parent_run_id: str | None
    resumed: bool
    summary_rows: list[dict[str, Any]]


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`/RAY_ADDRESS, or start an embedded local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False)
        return True
    # Embedded: loopback only, sized to the machine, a small object store (trials
    # pass no large objects). `grokstudy run` keeps the node address on loopback
    # (see cli._cmd_run).
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
    )
    return True


def run_study(
    study: Study,
    *,
    out_dir: Path,
    address: str | None = None,
    tracking_uri: str | None = None,
    formats: tuple[str, ...] = ("png", "pdf"),
    progress: Callable[[Progress], None] | None = None,
    num_cpus: int | None = None,
) -> StudyOutcome:
    """Run (or resume) a study to completion and write its tables and figures."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tune snapshots the experiment whenever a trial has checkpointed num_to_keep times
    # since the last snapshot, and warns each time; those snapshots are what a resumed
    # study restores from, so we keep them and silence the warning.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # grokstudy prints its own progress. Tune's new output engine prints its experiment
    # table and a TensorBoard hint even at verbose=0; the legacy reporter is silent there.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage_path = study.run.storage or str(out_dir / "ray")
    experiment_path = _join(storage_path, study.name)
    uri = tracking.resolve_tracking_uri(tracking_uri, study.run.tracking_uri, out_dir)
    searched = tuple(d.key for d in study.search.space)
    n_trials = search.n_trials(study)

    state_file = out_dir / "study-state.json"
    saved = json.loads(state_file.read_text()) if state_file.exists() else {}
    started_ray = init_ray(address, num_cpus)
    study_tracker = tracking.StudyTracker(uri)
    try:
        resumed = tune.Tuner.can_restore(experiment_path)
        parent_run_id = saved.get("parent_run_id")
        if parent_run_id is None and resumed:
            parent_run_id = tracking.find_study_run(uri, study.name, experiment_path)
        experiment_id, parent_run_id = study_tracker.open(
            study.name,
            study_yaml=_study_yaml(study),
            params=_study_params(study),
            tags=_study_tags(study) | {tracking.TUNE_EXPERIMENT_TAG: experiment_path},
            parent_run_id=parent_run_id,
        )
        state_file.write_text(json.dumps({"parent_run_id": parent_run_id, "tracking_uri": uri}))
        (out_dir / "study.yaml").write_text(_study_yaml(study))
        ctx = TrialContext(study, searched, uri, experiment_id, parent_run_id)
        trainable = tune.with_resources(
            tune.with_parameters(_trial_fn, ctx=ctx),
            {"cpu": study.resources.cpu, "gpu": study.resources.gpu},
        )
        if resumed:
            _requeue_lost_trials(study, experiment_path)
            tuner = tune.Tuner.restore(
                experiment_path, trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = _new_tuner(study, trainable, storage_path, out_dir, n_trials, progress)
        # Samplers that ignore results may run ahead (pending trials also make an
        # autoscaling cluster grow); TPE gets a suggestion per free slot and no more.
        ahead = 1 if study.search.sampler == "tpe" else 16
        with _pending_trials(max(_trial_slots(study), ahead)):
            grid = tuner.fit()
        outcome = _collect(study, grid, out_dir, uri, parent_run_id, resumed, formats)
        study_tracker.log_artifacts([outcome.trials_path, outcome.curves_path], "results")
        study_tracker.log_artifacts(outcome.figures, "figures")
        study_tracker.set_tags(
            {f"phases.{k}": str(v) for k, v in outcome.phase_counts.items()}
            | {"trials.failed": str(outcome.n_failed)}
        )
        study_tracker.finish("FAILED" if outcome.n_failed else "FINISHED")
        return outcome
    except KeyboardInterrupt:
        study_tracker.finish("KILLED")
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _new_tuner(
    study: Study,
    trainable: Any,
    storage_path: str,
    out_dir: Path,
    n_trials: int,
    progress: Callable[[Progress], None] | None,
) -> tune.Tuner:
    searcher = OptunaSearch(
        space=search.optuna_space(study),
        metric=OBJECTIVE,
        mode="min",
        sampler=search.make_sampler(study),
        study_name=search.study_name(study),
        storage=search.optuna_storage(study, out_dir),
        points_to_evaluate=search.points_to_evaluate(study) or None,
    )
    callbacks = [_ProgressCallback(n_trials, progress)] if progress else []
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=n_trials,
            max_concurrent_trials=study.run.max_concurrent,
            # Function trainables reuse their actor between trials: this saves
            # a Python + torch start-up per trial (seconds each on a small CPU).
            reuse_actors=True,
            trial_name_creator=lambda t: search.point_label(t.config),
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=storage_path,
            stop=GrokStopper(study.base.train.max_steps if not _searches_budget(study) else 2**62),
            failure_config=tune.FailureConfig(max_failures=study.run.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _requeue_lost_trials(study: Study, experiment_path: str) -> None:
    """Give Optuna back the trials a killed driver asked for after Tune's last
    experiment checkpoint (see `search.requeue_lost_trials`).

    Tune saves its trials and the pickled searcher together every few seconds;
    what the driver asked between that save and its death is RUNNING for ever
    in the Optuna storage and unknown to the restored Tuner. Read the same
    searcher state `Tuner.restore` will load, and requeue what it does not know,
    so the restored searcher proposes those point x seeds again before any new one.
    """
    with tempfile.TemporaryDirectory() as local:
        source = experiment_path
        if "://" in experiment_path:
            # Remote storage (s3://, gs://): Searcher.restore_from_dir reads a local directory.
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(experiment_path)
            for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
                name = info.base_name
                if name.startswith("searcher-state-") and name.endswith(".pkl"):
                    pyarrow.fs.copy_files(info.path, str(Path(local) / name), source_filesystem=fs)
            source = local
        searcher = OptunaSearch()
        try:
            searcher.restore_from_dir(source)
        except (FileNotFoundError, RuntimeError):
            return  # nothing saved yet: Tune restores no searcher either
        # OptunaSearch keeps {Tune trial id: Optuna trial} in `_ot_trials` (ray 2.60.0).
        known = {t.number for t in searcher._ot_trials.values()}
        lost = search.requeue_lost_trials(study, searcher._ot_study, known)
    if lost:
        print(f"requeued {len(lost)} trial(s) the interrupted driver had started but not recorded")


def _trial_slots(study: Study) -> int:
    """How many trials the cluster can run at once now (at least 1)."""
    resources = ray.cluster_resources()
    slots = []
    if study.resources.cpu:
        slots.append(int(resources.get("CPU", 0) // study.resources.cpu))
    if study.resources.gpu:
        slots.append(int(resources.get("GPU", 0) // study.resources.gpu))
    n = max(1, min(slots, default=1))
    return min(n, study.run.max_concurrent) if study.run.max_concurrent else n


@contextlib.contextmanager
def _pending_trials(n: int) -> Iterator[None]:
    """Let Tune start `n` trials at once.

    With a searcher (OptunaSearch), Tune keeps one trial pending at a time unless
    TUNE_MAX_PENDING_TRIALS_PG says otherwise (ray 2.60, `_get_max_pending_trials`):
    a trial is created only once the previous one is running, so the second slot of
    a fresh study waits a whole actor start-up (seconds) before it gets work. Every
    sampler here proposes without waiting for results (the grid, Sobol, random;
    TPE with constant_liar), so the slots are filled at once. A value the user set
    wins. Ray reads the variable when `fit` builds its controller.
    """
    if "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        yield
        return
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(2, n))
    try:
        yield
    finally:
        del os.environ["TUNE_MAX_PENDING_TRIALS_PG"]


def _searches_budget(study: Study) -> bool:
    return any(d.key == "train.max_steps" for d in study.search.space)


def _collect(
    study: Study,
    grid: Any,
    out_dir: Path,
    uri: str,
    parent_run_id: str | None,
    resumed: bool,
    formats: tuple[str, ...],
) -> StudyOutcome:
    """Curves from Tune's stored results → phases → Parquet tables → figures."""
    # Here, not at the top: trial workers import this module too, and need no matplotlib.
    from grokstudy import figures

    entries = [
        (res.config or {}, res.metrics or {}, res.metrics_dataframe, res.error is not None, res.path)
        for res in grid
    ]
    trials, curves, summary, n_failed = _tables(study, entries)
    trials_path, curves_path = results.write_tables(trials, curves, out_dir)
    figure_paths = (
        figures.render_study(
            trials,
            curves,
            out_dir / "figures",
            x=study.diagram.x,
            y=study.diagram.y,
            facet=study.diagram.facet,
            formats=formats,
            log_x=_axis_is_log(study, study.diagram.x),
            log_y=_axis_is_log(study, study.diagram.y),
        )
        if trials.num_rows
        else []
    )
    phase_counts = dict(Counter(trials.column("phase").to_pylist()))
    return StudyOutcome(
        out_dir=out_dir,
        trials_path=trials_path,
        curves_path=curves_path,
        figures=figure_paths,
        n_trials=trials.num_rows,
        n_failed=n_failed,
        phase_counts=phase_counts,
        tracking_uri=uri,
        parent_run_id=parent_run_id,
        resumed=resumed,
        summary_rows=summary,
    )


def _tables(study: Study, entries: list[tuple]) -> tuple[Any, Any, list[dict[str, Any]], int]:
    """(config, last metrics, history dataframe, errored, path) per trial → tables."""
    searched = tuple(d.key for d in study.search.space)
    trial_rows, curve_rows, summary = [], [], []
    n_failed = 0
    for config, last, history, errored, path in entries:
        point = {k: config[k] for k in (*searched, "train.seed") if k in config}
        cfg = study.trial(point)
        trial_id = last.get("trial_id") or Path(path).name.removeprefix("trial_")
        records = _records_from_history(history)
        n_failed += bool(errored)
        if not records:
            continue
        verdict = phases.classify_records(records, study.phases, cfg.train.max_steps)
        stop_reason = "error" if errored else (last.get("stop_reason") or "budget")
        trial_rows.append(
            results.trial_row(
                study.name,
                trial_id,
                search.point_id(point),
                cfg,
                searched,
                verdict,
                final_train_loss=records[-1].train_loss,
                final_val_loss=records[-1].val_loss,
                stop_reason=stop_reason,
                wall_s=float(last.get("time_total_s", 0.0)),
                node=last.get("node"),
                run_id=last.get(RUN_ID_KEY),
                status="ERROR" if errored else "TERMINATED",
            )
        )
        curve_rows.extend(results.curve_rows(study.name, trial_id, records))
        summary.append({"label": search.point_label(point), "verdict": verdict, "stop_reason": stop_reason})
    return results.trials_table(trial_rows), results.curves_table(curve_rows), summary, n_failed


def tables_from_tune_dir(path: Path) -> tuple[Any, Any]:
    """Rebuild both tables from a Ray Tune experiment directory (`grokstudy export`).

    The resolved study is read from `study.yaml` in the experiment directory or
    the study output directory above it.
    """
    from grokstudy.study import load_study

    path = Path(path).resolve()
    study_file = next(
        (p / "study.yaml" for p in (path, path.parent, path.parent.parent) if (p / "study.yaml").exists()),
        None,
    )
    if study_file is None:
        from grokstudy.errors import StudyError

        raise StudyError("SOURCE", f"no study.yaml in or above {path}; cannot interpret the Tune experiment")
    study = load_study(study_file)
    analysis = tune.ExperimentAnalysis(str(path))
    entries = []
    for trial in analysis.trials:
        # Keyed by trial id in ray 2.60 (by trial path in older releases).
        frames = analysis.trial_dataframes
        history = frames.get(trial.trial_id, frames.get(trial.path))
        last = dict(trial.last_result or {})
        entries.append((trial.config, last, history, trial.status == "ERROR", trial.path))
    trials, curves, _, _ = _tables(study, entries)
    return trials, curves


def _records_from_history(df: Any) -> list[EvalRecord]:
    """Reported eval points, deduplicated by step (a retried trial re-reports
    the steps after its checkpoint; training is deterministic, keep the last)."""
    if df is None or len(df) == 0 or "step" not in df:
        return []
    df = df.drop_duplicates(subset="step", keep="last").sort_values("step")

    def col(name: str) -> list[float]:
        return df[name].tolist() if name in df else [math.nan] * len(df)

    return [
        EvalRecord(
            step=int(s),
            train_loss=float(tl),
            train_acc=float(ta),
            val_loss=float(vl),
            val_acc=float(va),
            weights_norm=float(wn),
            fourier_top_k_share=float(fs),
            elapsed_s=float(el),
        )
        for s, tl, ta, vl, va, wn, fs, el in zip(
            col("step"),
            col("train/loss"),
            col("train/acc"),
            col("val/loss"),
            col("val/acc"),
            col("weights/norm"),
            col("fourier/top_k_share"),
            col("time/elapsed_s"),
            strict=True,
        )
    ]


def _axis_is_log(study: Study, key: str) -> bool | None:
    for dim in study.search.space:
        if dim.key == key:
            return dim.is_log
    return None


def _join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else str(Path(storage_path) / name)


def _study_yaml(study: Study) -> str:
    import yaml

    from grokstudy.study import study_to_dict

    return yaml.safe_dump(study_to_dict(study), sort_keys=False)


def _study_params(study: Study) -> dict[str, Any]:
    params = {f"base.{k}": v for k, v in flatten(study.base).items()}
    params |= {f"phases.{k}": v for k, v in to_dict(study.phases).items()}
    params |= {"search.sampler": study.search.sampler, "search.seeds": study.search.seeds}
    return params


def _study_tags(study: Study) -> dict[str, str]:
    return {
        "grokstudy.study": study.name,
        "search.sampler": study.search.sampler,
        "search.points": str(search.n_points(study)),
        "search.seeds": str(study.search.seeds),
        "search.axes": ",".join(d.key for d in study.search.space),
    }
