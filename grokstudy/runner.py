"""Runs a study on Ray Tune: the only module that imports ray.

Flow: `run_study` takes the output directory's lock and the study's lease,
starts (or joins) Ray, opens the study's MLflow parent run, and fits a `Tuner`
whose searcher (`_Searcher`) hands out work from the study's `search.Ledger`,
or restores the same experiment when its storage already holds one. One Tune
trial trains a *pack*: one or more point x seeds (`resources.pack`; one
member trains through `train.run`, several as one stacked model through
`packed.run_pack`). Each member is its own Optuna trial, its own MLflow child
run (`tracking.Sender`) and its own row in the tables. A trial checkpoints
every `train.checkpoint_every` steps: the training state and, in
`meta.json`, every member's curve (`records.to_dicts`), run id and outcome.
It reports to Tune at checkpoints, when a member finishes, and at least every
`REPORT_EVERY_S`; the curves themselves never go through Tune. When all
trials are done the driver reads each trial's last checkpoint into
`records.TrialHistory`s, and `results.build_tables` writes the tables.

Scheduling follows the science (DESIGN.md): FIFO, never a plateau rule; a
member stops when its generalization has held for `phases.confirm_steps`, its
loss diverges, or its budget is spent, and a trial ends itself when all its
members have (no Tune stopper).

Ray and Tune internals this module relies on, checked against ray 2.60.0:
- `TUNE_MAX_PENDING_TRIALS_PG` (read when `fit` builds its controller): with
  a searcher, Tune keeps one trial pending unless told otherwise (`_pending_trials`).
- `RAY_AIR_NEW_OUTPUT=0`: the legacy reporter prints nothing at verbose=0;
  the new engine prints its own table and a TensorBoard hint.
- `tuner._local_tuner.get_run_config().callbacks`: a restored Tuner keeps the
  first run's callbacks (pickled in `tuner.pkl`); this run's progress callback
  replaces them there.
- `TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0`: silences a
  warning on every checkpoint; the snapshots it warns of are what a resume uses.
- `Searcher.suggest` returning None (nothing now, ask again) or
  `Searcher.FINISHED`, and `TuneConfig(num_samples=-1)`: the searcher alone
  decides when the study is complete.
- `Tuner.restore` rebuilds the searcher from the first run's `tuner.pkl` and
  then `Searcher.restore` loads its newest state; `_Searcher.restore` settles
  the ledger against the trials Tune restored (read with `ExperimentAnalysis`).
- Tune catches the first SIGINT itself, saves the experiment and returns from
  `fit` with unfinished trials; `run_study` reports that as an interruption.
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (set by the CLI before ray is imported)
  keeps an embedded Ray on 127.0.0.1.
- `ray.train._internal.checkpoint_manager._delete_fs_path` (`_forgive_deleted_checkpoints`):
  a restored trial's checkpoint list may name checkpoints the killed driver already
  deleted (its last experiment snapshot predates the deletion); Tune's deletion of
  them then raises FileNotFoundError and logs a traceback for every such trial. A
  checkpoint that is already gone needs no deleting: the wrapper says so and goes on.
- `TuneController._restore_trials`, `_CheckpointManager._checkpoint_results` and
  `_latest_checkpoint_result`, `StorageContext.current_checkpoint_index`
  (`_resume_from_surviving_checkpoints`): for the same reason a restored trial's
  latest checkpoint may be gone (the killed driver registered newer ones and deleted it
  under `num_to_keep`), and Tune's restore of it fails every retry. The wrapper points
  such a trial at the newest complete checkpoint its directory still holds (the newer
  ones the worker persisted), or at none (it starts over: training is deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import Searcher

from grokstudy import phases, records, results, search, storage, tracking, train
from grokstudy.config import Study, TrialConfig, flatten, get_path, to_dict
from grokstudy.errors import StudyError
from grokstudy.records import EvalRecord, TrialHistory

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
STUDY_FILE = "grokstudy-study.yaml"
"""Beside the Tune experiment: the resolved study it runs (a resume must match it)."""
OUTCOMES = "outcomes"
"""In each report: the outcome of every member finished so far (Tune keeps "done" for itself)."""
REPORT_EVERY_S = 30.0
"""A trial reports at least this often (progress, MLflow health) even between checkpoints."""
FLUSH_BEFORE_CHECKPOINT_S = 10.0
CLOSE_TIMEOUT_S = 30.0
DEFAULT_GPU_PACK = 16


class TrackingUnavailable(Exception):
    """MLflow stayed unreachable longer than `run.tracking_outage_s`: the study stops, resumably."""


class Interrupted(Exception):
    """The study stopped before all its trials finished (Ctrl-C, or `request_stop`); run it
    again to resume."""


_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Stop the running study as Ctrl-C does (Tune saves the experiment and returns), but end
    its parent run FAILED with `reason` (the CLI's SIGTERM handler: `ray job stop`)."""
    global _stop_reason
    _stop_reason = reason
    os.kill(os.getpid(), signal.SIGINT)


def stop_reason() -> str | None:
    """Why `request_stop` stopped the study (None: it was not asked to)."""
    return _stop_reason


# ---- one Tune trial: a pack of members ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrialContext:
    """Plain values every trial needs on any node (no live objects)."""

    study: Study
    where: tracking.Where


class _Trainer:
    """One member through `train.run`, or several through `packed.run_pack`; yields, per
    eval step, the (member index, record) of every member evaluated there."""

    def __init__(self, cfgs: Sequence[TrialConfig], directory: Path | None) -> None:
        self.cfgs = list(cfgs)
        self.single = len(cfgs) == 1
        path = None if directory is None else directory / STATE_FILE
        if self.single:
            self.state = train.init_state(cfgs[0]) if path is None else train.load_state(cfgs[0], path)
        else:
            from grokstudy import packed

            self._packed = packed
            self.state = packed.init_pack(cfgs) if path is None else packed.load_pack(cfgs, path)
        self.retired: set[int] = set()
        self._schedules = [set(train.eval_steps(c.train)) for c in cfgs]

    def retire(self, i: int) -> None:
        self.retired.add(i)
        if not self.single:
            self.state.retire(i)

    def save(self, directory: Path) -> None:
        if self.single:
            train.save_state(self.state, directory / STATE_FILE)
        else:
            self._packed.save_pack(self.state, directory / STATE_FILE)

    def steps(self) -> Iterator[list[tuple[int, EvalRecord]]]:
        if self.single:
            for record in train.run(self.cfgs[0], self.state):
                yield [(0, record)]
                if 0 in self.retired:
                    return
            return
        group: list[tuple[int, EvalRecord]] = []
        for i, record in self._packed.run_pack(self.state):
            if group and record.step != group[0][1].step:
                yield group  # a step whose members were not all evaluated (should not happen)
                group = []
            group.append((i, record))
            if self._complete(group):
                yield group
                group = []
        if group:
            yield group

    def _complete(self, group: list[tuple[int, EvalRecord]]) -> bool:
        step = group[0][1].step
        seen = {i for i, _ in group}
        expected = {
            i
            for i, sched in enumerate(self._schedules)
            if step in sched and (i not in self.retired or i in seen)
        }
        return expected <= seen


def _trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Ray Tune trial: its members trained to their ends, checkpointed, reported and tracked."""
    import torch

    train.configure_process()
    study = ctx.study
    ids = [m["trial_id"] for m in config["members"]]
    points = [search.point_from_config(study, m["point"]) for m in config["members"]]
    cfgs = [study.trial(p) for p in points]
    tune_ctx = tune.get_context()
    resources = tune_ctx.get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", study.resources.cpu))))
    if resources.get("GPU", 0.0) and torch.cuda.is_available():
        # Fractional GPUs only share Ray's bookkeeping; cap this process's memory
        # ourselves so trials sharing a GPU cannot starve each other.
        torch.cuda.set_per_process_memory_fraction(min(1.0, resources["GPU"]))

    meta: dict[str, Any] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        trainer = _Trainer(cfgs, None)
    else:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / META_FILE).read_text())
            trainer = _Trainer(cfgs, Path(d))
    saved = meta.get("members", {})
    curves = {tid: records.from_dicts(saved.get(tid, {}).get("records", [])) for tid in ids}
    outcomes: dict[str, dict[str, Any]] = {
        tid: saved[tid]["outcome"] for tid in ids if saved.get(tid, {}).get("outcome")
    }
    for i, tid in enumerate(ids):
        if tid in outcomes:
            trainer.retire(i)

    node = ray.get_runtime_context().get_node_id()
    sender = tracking.Sender(ctx.where)
    runs = {
        tid: sender.open(
            tid,
            search.point_label(point),
            params=flatten(cfg),
            tags=_run_tags(search.point_id(point), cfg) | {"grokstudy.pack_size": str(len(ids))},
            run_id=saved.get(tid, {}).get("run_id"),
        )
        for tid, point, cfg in zip(ids, points, cfgs, strict=True)
    }
    for tid in ids:
        runs[tid].sync(curves[tid])  # after a restore: replay what MLflow lost since its last step

    def report(step: int, with_checkpoint: bool) -> None:
        metrics = {
            "step": step,
            "members": len(ids),
            "members_done": len(outcomes),
            # JSON text, not a list: Tune's CSV and TensorBoard loggers keep a string as it is.
            OUTCOMES: json.dumps(
                [
                    {"trial_id": tid, **outcomes[tid], "run_id": runs[tid].run_id}
                    for tid in ids
                    if tid in outcomes
                ]
            ),
            "tracking_down_s": round(sender.down_s, 1),
            "tracking_error": sender.last_error or "",
            "node": node,
        }
        if not with_checkpoint:
            tune.report(metrics)
            return
        if sender.down_s == 0:  # while MLflow is down, checkpoints do not wait for it
            sender.flush(FLUSH_BEFORE_CHECKPOINT_S)
        with tempfile.TemporaryDirectory() as d:
            trainer.save(Path(d))
            members = {
                tid: {
                    "records": records.to_dicts(curves[tid]),
                    "run_id": runs[tid].run_id,
                    "outcome": outcomes.get(tid),
                }
                for tid in ids
            }
            (Path(d) / META_FILE).write_text(json.dumps({"format": 1, "members": members}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        last_report = time.monotonic()
        if len(outcomes) == len(ids):  # restored after its last member finished
            report(trainer.state.step, with_checkpoint=True)
            return
        for group in trainer.steps():
            step = group[0][1].step
            finished_now = False
            for i, record in group:
                tid = ids[i]
                if curves[tid] and record.step <= curves[tid][-1].step:
                    continue
                curves[tid].append(record)
                runs[tid].sync(curves[tid])
                outcome = _outcome(curves[tid], cfgs[i], study)
                if outcome is not None:
                    outcomes[tid] = outcome
                    trainer.retire(i)
                    runs[tid].set_tags(_final_tags(outcome, node))
                    runs[tid].finish("FINISHED")
                    finished_now = True
            everyone = len(outcomes) == len(ids)
            checkpoint_due = everyone or step % cfgs[0].train.checkpoint_every == 0
            if checkpoint_due or finished_now or time.monotonic() - last_report > REPORT_EVERY_S:
                report(step, with_checkpoint=checkpoint_due)
                last_report = time.monotonic()
            if everyone:
                return
    except BaseException as err:
        # The runs stay resumable: a retry from the checkpoint re-opens them.
        for tid in ids:
            if tid not in outcomes:
                runs[tid].finish("FAILED", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        sender.close(CLOSE_TIMEOUT_S)


def _outcome(curve: list[EvalRecord], cfg: TrialConfig, study: Study) -> dict[str, Any] | None:
    """A member's outcome once it should stop (generalization confirmed, diverged, or budget), else None."""
    last = curve[-1]
    diverged = phases.diverged(last)
    generalized = not diverged and phases.generalization_confirmed(
        [r.step for r in curve],
        [r.train_acc for r in curve],
        [r.val_acc for r in curve],
        study.phases,
        [r.val_loss for r in curve],
    )
    if not (diverged or generalized or last.step >= cfg.train.max_steps):
        return None
    verdict = phases.classify_records(curve, study.phases, cfg.train.max_steps)
    return {
        "phase": verdict.phase,
        "t_train": verdict.t_train,
        "t_val": verdict.t_val,
        "t_val_loss": verdict.t_val_loss,
        "objective": float(verdict.t_val if verdict.t_val is not None else cfg.train.max_steps),
        "stop_reason": "diverged" if diverged else ("generalized" if generalized else "budget"),
    }


def _run_tags(point_id: str, cfg: TrialConfig) -> dict[str, str]:
    return {"grokstudy.point_id": point_id, "optimizer.weight_decay_form": cfg.optimizer.weight_decay_form}


def _final_tags(outcome: dict[str, Any], node: str) -> dict[str, str]:
    keys = ("phase", "t_train", "t_val", "t_val_loss", "stop_reason")
    return {k: "" if outcome.get(k) is None else str(outcome[k]) for k in keys} | {"ray.node": node}


# ---- the searcher: packs of members from the ledger ------------------------------------------------


class _Searcher(Searcher):
    """Ray Tune's view of the study's `search.Ledger`: each suggestion is a pack of up to
    `pack_size` compatible members (`packed.pack_key`); results are told member by member
    as trials report them. The ledger pickles with this searcher into every experiment
    snapshot, and `restore` settles it against the trials Tune restored."""

    experiment_path_now: str | None = None
    """Set by `run_study` before a restore: where the restored experiment lives now
    (the pickled searcher remembers where it lived when it was first built)."""

    def __init__(self, study: Study, pack_size: int, slots: int, experiment_path: str) -> None:
        super().__init__()
        self.study = study
        self.ledger = search.Ledger(study)
        self.pack_size = pack_size
        self.slots = slots
        self.experiment_path = experiment_path
        self.packs: dict[str, list[str]] = {}
        """Tune trial id -> its members' trial ids."""
        self.told: set[str] = set()
        self.held: list[search.Member] = []
        """Members asked for but not yet packed (they did not fit the pack being formed)."""
        self.lost: list[str] = []
        self.running: set[str] = set()
        """Tune trials suggested and not yet complete."""

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        pack = self._next_pack()
        if pack:
            self.packs[trial_id] = [m.trial_id for m in pack]
            self.running.add(trial_id)
            return {"members": [{"trial_id": m.trial_id, "point": _jsonable(m.point)} for m in pack]}
        if not self.held and self.ledger.finished():
            return Searcher.FINISHED
        return None

    def _next_pack(self) -> list[search.Member]:
        if self.pack_size == 1:
            member = self.held.pop(0) if self.held else self.ledger.ask()
            return [member] if member else []
        from grokstudy import packed

        remaining = self.ledger.remaining()
        size = self.pack_size
        if remaining is not None:  # spread what is left over the free slots rather than one full pack
            free = max(1, self.slots - len(self.running))
            size = max(1, min(size, math.ceil((remaining + len(self.held)) / free)))
        pack: list[search.Member] = []
        key = None
        for m in list(self.held):
            k = packed.pack_key(self.study.trial(m.point))
            if len(pack) < size and (key is None or k == key):
                key = k
                pack.append(m)
                self.held.remove(m)
        while len(pack) < size and len(self.held) < size:
            m = self.ledger.ask()
            if m is None:
                break
            k = packed.pack_key(self.study.trial(m.point))
            if key is None or k == key:
                key = k
                pack.append(m)
            else:
                self.held.append(m)
        return pack

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._tell(result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self.running.discard(trial_id)
        if result:
            self._tell(result)
        for tid in self.packs.get(trial_id, []):
            if tid not in self.told:
                why = "failed beyond run.max_failures retries" if error else "ended without an outcome"
                self.ledger.fail(tid, why)
                self.told.add(tid)

    def _tell(self, result: dict[str, Any]) -> None:
        for outcome in _outcomes(result):
            tid = outcome["trial_id"]
            if tid not in self.told:
                self.ledger.tell(tid, outcome["objective"], outcome["phase"])
                self.told.add(tid)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        if _Searcher.experiment_path_now:
            self.experiment_path = _Searcher.experiment_path_now
        self._reconcile()

    def _reconcile(self) -> None:
        """Settle the ledger against the trials Tune restored (see `search.Ledger.reconcile`)."""
        known = restored_members(self.study, self.experiment_path)
        self.lost = self.ledger.reconcile(known)
        self.packs = {}
        for k in known.values():
            self.packs.setdefault(k.tune_trial_id, []).append(k.trial_id)
        self.told = {tid for tid, k in known.items() if k.status != "running"}
        self.running = {k.tune_trial_id for k in known.values() if k.status == "running"}
        self.held = []


def restored_members(study: Study, experiment_path: str) -> dict[str, search.Known]:
    """{member trial id: what Tune's saved experiment says of it} (running, done or failed)."""
    analysis = tune.ExperimentAnalysis(experiment_path)
    known: dict[str, search.Known] = {}
    for trial in analysis.trials:
        last = trial.last_result or {}
        done = {o["trial_id"]: o for o in _outcomes(last) if "trial_id" in o}
        for m in (trial.config or {}).get("members", []):
            tid = m["trial_id"]
            point = search.point_from_config(study, m["point"])
            if tid in done:
                o = done[tid]
                known[tid] = search.Known(tid, trial.trial_id, point, "done", o["objective"], o["phase"])
            elif trial.status == "ERROR":
                known[tid] = search.Known(tid, trial.trial_id, point, "failed")
            else:
                known[tid] = search.Known(tid, trial.trial_id, point, "running")
    return known


def _outcomes(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The member outcomes a trial's report carries (JSON text under OUTCOMES)."""
    text = result.get(OUTCOMES)
    return json.loads(text) if isinstance(text, str) and text else []


def _jsonable(point: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in point.items()}


# ---- live progress ---------------------------------------------------------------------------------


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


class _ProgressCallback(tune.Callback):
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

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running[trial.trial_id] = self._unfinished(trial)
        self._maybe_emit()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        for o in _outcomes(result):
            self.done[o["trial_id"]] = o["phase"]
        self.running[trial.trial_id] = self._unfinished(trial)
        down = float(result.get("tracking_down_s") or 0.0)
        warning = None
        if down > 0:
            warning = f"MLflow at {self.tracking_uri} unreachable for {down:.0f} s ({result.get('tracking_error')}); trials keep training"
        if warning != self.warning and (warning is None or self.warning is None):
            self.warning = warning
            self._maybe_emit(force=True)
        if down > self.outage_limit_s:
            raise TrackingUnavailable(
                f"MLflow at {self.tracking_uri} was unreachable for {down:.0f} s, longer than "
                f"run.tracking_outage_s ({self.outage_limit_s:g} s); checkpoints are kept: run the same command "
                "again to resume"
            )
        self._maybe_emit()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.pop(trial.trial_id, None)
        self._maybe_emit(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.pop(trial.trial_id, None)
        self.failed[trial.trial_id] = self._unfinished(trial)
        self._maybe_emit(force=True)


# ---- the driver ------------------------------------------------------------------------------------


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


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`/RAY_ADDRESS, or start an embedded local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False)
        return True
    _private_token_file()
    # Embedded: loopback only, sized to the machine, a small object store (trials
    # pass no large objects).
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
    )
    _private_token_file()
    return True


def _private_token_file() -> None:
    """Ray >= 2.59 writes its token to ~/.ray/auth_token for a local cluster; keep it 0600."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):
        if token.exists() and token.stat().st_mode & 0o077:
            token.chmod(0o600)


def pack_size(study: Study) -> int:
    """`resources.pack`, or its default: DEFAULT_GPU_PACK where trials use a GPU, 1 on CPUs."""
    if study.resources.pack is not None:
        return study.resources.pack
    return DEFAULT_GPU_PACK if study.resources.gpu > 0 else 1


def run_study(
    study: Study,
    *,
    out_dir: Path,
    address: str | None = None,
    tracking_uri: str | None = None,
    formats: tuple[str, ...] = ("png", "pdf"),
    progress: Callable[[Progress], None] | None = None,
    num_cpus: int | None = None,
    stop_on_sigterm: bool = False,
) -> StudyOutcome:
    """Run (or resume) a study to completion and write its tables and figures.

    With `stop_on_sigterm`, SIGTERM (`ray job stop`) stops the study as `request_stop` does.

    Raises StudyError/UsageError for what can be refused before anything runs
    (a changed study on resume, cuda without a GPU, a locked output), Interrupted
    when Ctrl-C stopped it, TrackingUnavailable when MLflow stayed down too long;
    the parent run then ends KILLED or FAILED and the study resumes when run again.
    """
    out_dir = Path(out_dir).resolve()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage_path = study.run.storage or str(out_dir / "ray")
    experiment_path = storage.join(storage_path, study.name)
    uri = tracking.resolve_tracking_uri(tracking_uri, study.run.tracking_uri, out_dir)

    with storage.OutputLock(out_dir), storage.Lease(experiment_path):
        resumed = _check_same_study(study, experiment_path)
        state_file = out_dir / "study-state.json"
        saved = storage.read_json(state_file, "STUDY_DIR")
        started_ray = init_ray(address, num_cpus)
        if stop_on_sigterm:
            # After ray.init: Ray installs its own SIGTERM handler there, which aborts the process.
            signal.signal(signal.SIGTERM, lambda *_: request_stop("SIGTERM"))
        try:
            _check_devices(study)
            study_tracker = tracking.StudyTracker(uri)
            parent_run_id = saved.get("parent_run_id")
            if parent_run_id is None:
                # A resume continues its parent run; a fresh start continues one only if a
                # driver died before it could record it (it is still RUNNING).
                parent_run_id = tracking.find_study_run(
                    uri, study.name, experiment_path, running_only=not resumed
                )
            parent_run_id = _open_parent(study_tracker, study, experiment_path, parent_run_id)
            storage.write_atomic(state_file, json.dumps({"parent_run_id": parent_run_id}))
            storage.write_atomic(out_dir / "study.yaml", _study_yaml(study))
            try:
                return _fit(
                    study, out_dir, storage_path, experiment_path, resumed, formats, progress, study_tracker
                )
            except (Interrupted, KeyboardInterrupt):
                _best_effort(study_tracker.finish, "FAILED" if _stop_reason else "KILLED")
                raise
            except BaseException:
                _best_effort(study_tracker.finish, "FAILED")
                raise
        finally:
            if started_ray:
                ray.shutdown()


def _fit(
    study: Study,
    out_dir: Path,
    storage_path: str,
    experiment_path: str,
    resumed: bool,
    formats: tuple[str, ...],
    progress: Callable[[Progress], None] | None,
    study_tracker: tracking.StudyTracker,
) -> StudyOutcome:
    where = study_tracker.where()
    ctx = TrialContext(study, where)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, ctx=ctx), {"cpu": study.resources.cpu, "gpu": study.resources.gpu}
    )
    total = search.n_trials(study)
    already: dict[str, str] = {}
    if resumed:
        already = {
            t: k.phase or "?"
            for t, k in restored_members(study, experiment_path).items()
            if k.status == "done"
        }
    callback = _ProgressCallback(total, progress, study.run.tracking_outage_s, where.tracking_uri, already)
    slots = _trial_slots(study)
    if resumed:
        _forgive_deleted_checkpoints()
        _resume_from_surviving_checkpoints()
        _Searcher.experiment_path_now = experiment_path
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        searcher = _Searcher(study, pack_size(study), slots, experiment_path)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=-1,  # the searcher says when the study is complete
                max_concurrent_trials=study.run.max_concurrent,
                # Function trainables reuse their actor between trials: this saves
                # a Python + torch start-up per trial (seconds each on a small CPU).
                reuse_actors=True,
                trial_name_creator=lambda t: f"pack_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=study.name,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=study.run.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[callback],
                verbose=0,
            ),
        )
    if resumed:
        # The restored RunConfig holds the first run's callback; this run's replaces it.
        tuner._local_tuner.get_run_config().callbacks = [callback]
    # Samplers that ignore results may run ahead (pending trials also make an
    # autoscaling cluster grow); TPE gets a suggestion per free slot and no more.
    ahead = 1 if study.search.sampler == "tpe" else 16
    with _pending_trials(max(slots, ahead)):
        try:
            grid = tuner.fit()
        except Exception as err:  # Tune wraps what a callback raised in its own TuneError
            cause = _cause(err, TrackingUnavailable)
            raise cause or err from None
    histories, unfinished = _histories(
        study,
        [
            (r.config, r.checkpoint, None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:2000],
             (r.metrics or {}).get("node"))
            for r in grid
        ],
    )  # fmt: skip
    if unfinished:
        raise Interrupted(
            f"{unfinished} trial(s) did not finish (interrupted); run the same command again to resume"
        )
    searcher = _find_searcher(tuner)
    lost = 0
    if isinstance(searcher, _Searcher):
        searcher.ledger.export(out_dir / "optuna.db")
        lost = len(searcher.lost)
    return _write_results(study, out_dir, histories, resumed, formats, study_tracker, lost)


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`err` or the first exception of type `kind` in its cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _forgive_deleted_checkpoints() -> None:
    """See the module docstring (ray 2.60's checkpoint manager); idempotent."""
    from ray.train._internal import checkpoint_manager

    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "forgiving", False):
        return

    def forgiving(fs: Any, fs_path: str) -> None:
        try:
            delete(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            pass  # deleted by the previous driver after its last snapshot

    forgiving.forgiving = True  # type: ignore[attr-defined]
    checkpoint_manager._delete_fs_path = forgiving


def _resume_from_surviving_checkpoints() -> None:
    """See the module docstring (ray 2.60's TuneController); idempotent."""
    from ray.tune.execution.tune_controller import TuneController

    restore_trials = TuneController._restore_trials
    if getattr(restore_trials, "surviving", False):
        return

    def surviving(self: Any, experiment_state: dict) -> list:
        trials = restore_trials(self, experiment_state)
        for trial in trials:
            _point_at_surviving_checkpoint(trial)
        return trials

    surviving.surviving = True  # type: ignore[attr-defined]
    TuneController._restore_trials = surviving


def _point_at_surviving_checkpoint(trial: Any) -> None:
    """Point a restored trial whose latest checkpoint is gone at its newest complete one."""
    from ray.train._internal.session import _TrainingResult

    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    if latest is None or _checkpoint_complete(latest.checkpoint.filesystem, latest.checkpoint.path):
        return
    fs, trial_dir = trial.storage.storage_filesystem, trial.storage.trial_fs_path
    for index, path in sorted(_checkpoint_dirs(fs, trial_dir), reverse=True):
        if _checkpoint_complete(fs, path):
            found = _TrainingResult(checkpoint=tune.Checkpoint(path, fs), metrics=latest.metrics)
            manager._checkpoint_results = [
                r for r in manager._checkpoint_results if _checkpoint_complete(fs, r.checkpoint.path)
            ] + [found]
            manager._latest_checkpoint_result = found
            trial.storage.current_checkpoint_index = index + 1  # never write into a dir that exists
            log.warning("trial %s: its last recorded checkpoint is gone; resuming from %s", trial, path)
            break
    else:
        manager._checkpoint_results, manager._latest_checkpoint_result = [], None
        log.warning("trial %s: none of its checkpoints survived; it starts over", trial)
    trial.invalidate_json_state()


def _checkpoint_dirs(fs: Any, trial_dir: str) -> list[tuple[int, str]]:
    """(index, path) of every `checkpoint_NNNNNN` directory under a trial's directory."""
    import pyarrow.fs as pafs

    found = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name[11:].isdigit():
            found.append((int(name[11:]), info.path))
    return found


def _checkpoint_complete(fs: Any, path: str) -> bool:
    """Whether a checkpoint on storage holds a readable meta.json and a whole state file
    (a worker killed while persisting one leaves some files, or a truncated one)."""
    import zipfile

    try:
        with fs.open_input_stream(f"{path}/{META_FILE}") as f:
            json.loads(f.read().decode())
        with fs.open_input_file(f"{path}/{STATE_FILE}") as f, zipfile.ZipFile(f):  # torch.save's format
            return True
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def _find_searcher(tuner: Any) -> Any:
    """The searcher Tune ran with (`tuner._local_tuner._tune_config.search_alg`, ray 2.60)."""
    with contextlib.suppress(AttributeError):
        alg = tuner._local_tuner._tune_config.search_alg
        return getattr(alg, "searcher", alg)
    return None


def _write_results(
    study: Study,
    out_dir: Path,
    histories: list[TrialHistory],
    resumed: bool,
    formats: tuple[str, ...],
    study_tracker: tracking.StudyTracker,
    lost: int,
) -> StudyOutcome:
    from grokstudy import figures  # here: trial workers import this module too, and need no matplotlib

    histories = _tracked(study, histories, study_tracker)
    trials, curves = results.build_tables(study, histories)
    trials_path, curves_path = results.write_tables(trials, curves, out_dir)
    cells = results.build_cells(study, trials)
    tables = [trials_path, curves_path] + ([results.write_cells(cells, out_dir)] if cells is not None else [])
    figure_paths = (
        figures.render_study(trials, curves, out_dir / "figures", formats=formats, cells=cells)
        if trials.num_rows
        else []
    )
    failed = [h.trial_id for h in histories if h.stop_reason == "error"]
    _best_effort(study_tracker.log_artifacts, tables, "results")
    _best_effort(study_tracker.log_artifacts, figure_paths, "figures")
    phase_counts = dict(Counter(p for p in trials.column("phase").to_pylist() if p))
    _best_effort(
        study_tracker.set_tags,
        {f"phases.{k}": str(v) for k, v in phase_counts.items()} | {"trials.failed": str(len(failed))},
    )
    _best_effort(study_tracker.finish, "FAILED" if failed else "FINISHED")
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
    )


def _tracked(
    study: Study, histories: list[TrialHistory], study_tracker: tracking.StudyTracker
) -> list[TrialHistory]:
    """The histories, each linked to its MLflow run, every run holding its trial's whole curve
    and ended as its trial ended (best effort: MLflow may be down at the very end)."""
    try:
        return _settle_runs(study, histories, study_tracker)
    except Exception as err:
        log.warning("MLflow: the trial runs were not settled: %s", err)
    try:
        runs = study_tracker.trial_runs()
    except Exception:
        return histories
    return [
        h if h.run_id else dataclasses.replace(h, run_id=runs.get(h.trial_id, (None,))[0]) for h in histories
    ]


def _settle_runs(
    study: Study, histories: list[TrialHistory], study_tracker: tracking.StudyTracker
) -> list[TrialHistory]:
    """Finish the runs that their trials could not: a trial that finished while MLflow was
    down (its curve's tail and its end were dropped when it exited), one whose worker died
    before it reached MLflow at all (no run), one that failed beyond retries. The driver's
    curve is whole (from the checkpoint), so the run gets what it lacks. Returns the
    histories with their run ids."""
    runs = study_tracker.trial_runs()
    ends = []
    for h in histories:
        run_id, status = runs.get(h.trial_id, (None, None))
        if h.run_id is not None and h.run_id != run_id:
            run_id, status = h.run_id, None  # a run the search does not see: let the sender check it
        if h.stop_reason == "error":
            want, tags = "FAILED", {}
        elif outcome := _outcome(list(h.records), h.cfg, study):
            want, tags = "FINISHED", _final_tags(outcome, h.node or "")
        else:
            continue
        if status != want:
            params = flatten(h.cfg)
            point = {d.key: get_path(h.cfg, d.key) for d in study.search.space} | {
                search.SEED: h.cfg.train.seed
            }
            label = search.point_label(point)
            tags |= _run_tags(h.point_id, h.cfg)
            error = (h.error or "failed") if want == "FAILED" else None
            ends.append(tracking.TrialEnd(h.trial_id, run_id, label, params, tags, h.records, want, error))
    run_ids = {key: run_id for key, (run_id, _) in runs.items()} | (
        study_tracker.settle_trial_runs(ends, CLOSE_TIMEOUT_S) if ends else {}
    )
    return [dataclasses.replace(h, run_id=h.run_id or run_ids.get(h.trial_id)) for h in histories]


def _histories(
    study: Study, trials: Sequence[tuple[dict, Any, str | None, str | None]]
) -> tuple[list[TrialHistory], int]:
    """(one history per member of every Tune trial, the number of members left unfinished),
    from each trial's (config, last checkpoint, error or None, node)."""
    out: list[TrialHistory] = []
    unfinished = 0
    for config, checkpoint, error, node in trials:
        saved = _checkpoint_meta(checkpoint)
        for m in (config or {}).get("members", []):
            h = _history(study, m, saved.get(m["trial_id"], {}), node, error)
            if h is None:
                unfinished += 1
            else:
                out.append(h)
    return out, unfinished


def _history(
    study: Study, member: dict[str, Any], saved: dict[str, Any], node: str | None, error: str | None
) -> TrialHistory | None:
    point = search.point_from_config(study, member["point"])
    outcome = saved.get("outcome")
    if outcome is None and error is None:
        return None
    return TrialHistory(
        trial_id=member["trial_id"],
        point_id=search.point_id(point),
        cfg=study.trial(point),
        records=tuple(records.from_dicts(saved.get("records", []))),
        stop_reason=outcome["stop_reason"] if outcome else "error",
        node=node,
        run_id=saved.get("run_id"),
        error=None if outcome else error,
    )


def _checkpoint_meta(checkpoint: Any) -> dict[str, Any]:
    """{member trial id: saved member} of a trial's checkpoint, read without downloading its state."""
    if checkpoint is None:
        return {}
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{META_FILE}") as f:
        return json.loads(f.read().decode()).get("members", {})


def histories_from_tune_dir(path: Path) -> tuple[Study, list[TrialHistory]]:
    """The study and trial histories of a Ray Tune experiment directory (`grokstudy export`)."""
    from grokstudy.errors import UsageError
    from grokstudy.study import parse_study

    text = storage.read_text(storage.join(str(path), STUDY_FILE))
    if text is None:
        raise UsageError("SOURCE", f"{path} holds no {STUDY_FILE}: not a grokstudy Ray Tune experiment")
    import yaml

    study = parse_study(yaml.safe_load(text), f"{path}/{STUDY_FILE}")
    analysis = tune.ExperimentAnalysis(str(path))
    failed = "failed beyond run.max_failures retries"
    trials = [
        (t.config, t.checkpoint, failed if t.status == "ERROR" else None, (t.last_result or {}).get("node"))
        for t in analysis.trials
    ]
    return study, _histories(study, trials)[0]


# ---- before anything runs ----------------------------------------------------------------------------


def _check_same_study(study: Study, experiment_path: str) -> bool:
    """True when the experiment exists (a resume): then it must be the same study."""
    import yaml

    from grokstudy.study import changes, fingerprint, parse_study

    file = storage.join(experiment_path, STUDY_FILE)
    text = storage.read_text(file)
    # Resumable once Tune has saved an experiment snapshot; a driver killed before the
    # first one leaves only `tuner.pkl` (enough for Tuner.can_restore, not for a restore),
    # and nothing of it needs keeping: its trials start afresh and re-attach to their runs.
    if not storage.has_file(experiment_path, "experiment_state-", ".json"):
        storage.write_text(file, _study_yaml(study))
        return False
    if text is not None:
        before = parse_study(yaml.safe_load(text), file)
        diff = changes(fingerprint(before), fingerprint(study))
        if diff:
            raise StudyError(
                "study",
                f"changed since its trials started, so resuming would mislabel them: {diff}; "
                "run the original study, or give the changed one a new name",
            )
    storage.write_text(file, _study_yaml(study))
    return True


def _check_devices(study: Study) -> None:
    """Refuse `train.device: cuda` where no trial would get a GPU."""
    devices = {study.base.train.device} | {
        v for d in study.search.space if d.key == "train.device" for v in (d.choice or d.values or ())
    }
    if "cuda" not in devices:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if study.resources.gpu <= 0 or gpus <= 0:
        why = "resources.gpu is 0" if study.resources.gpu <= 0 else "the Ray cluster has no GPU"
        raise StudyError(
            "train.device", f"cuda asked for, but {why}; use train.device: auto, or give trials a GPU"
        )


def _open_parent(
    study_tracker: tracking.StudyTracker,
    study: Study,
    experiment_path: str,
    parent_run_id: str | None,
) -> str:
    """Open the study's parent run (its id); StudyError when MLflow cannot be reached."""
    try:
        return study_tracker.open(
            study.name,
            study_yaml=_study_yaml(study),
            params=_study_params(study),
            tags=_study_tags(study) | {tracking.TUNE_EXPERIMENT_TAG: experiment_path},
            parent_run_id=parent_run_id,
        )[1]
    except StudyError:
        raise
    except Exception as err:
        raise StudyError(
            "run.tracking_uri",
            f"cannot reach MLflow at {study_tracker.tracking_uri} ({type(err).__name__}: {' '.join(str(err).split())[:200]})",
        ) from None


def _best_effort(fn: Callable[..., Any], *args: Any) -> None:
    """MLflow at the end of a study is best effort: the tables are written either way."""
    try:
        fn(*args)
    except Exception as err:
        log.warning("MLflow: %s failed: %s", getattr(fn, "__name__", fn), err)


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
    """Let Tune start `n` trials at once (a value the user set wins)."""
    if "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        yield
        return
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(2, n))
    try:
        yield
    finally:
        del os.environ["TUNE_MAX_PENDING_TRIALS_PG"]


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
        "search.points": str(search.n_points(study) or "adaptive"),
        "search.seeds": str(study.search.seeds),
        "search.axes": ",".join(d.key for d in study.search.space),
        "resources.pack": str(pack_size(study)),
    } | {f"phases.rule.{k}": v for k, v in phases.rules(study.phases).items()}
