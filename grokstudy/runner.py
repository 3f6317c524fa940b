"""Runs a study on Ray Tune: the driver, the Tune searcher, the trial function's Ray glue, progress.

Flow: `run_study` checks the installed versions (`compat.check`), takes the output directory's
lock and the study's lease, starts (or joins) Ray, opens the study's MLflow parent run, and fits
a `Tuner` whose searcher (`LedgerSearcher`) hands out work from the study's `search.Ledger`, or
restores the same experiment when its storage already holds one. One Tune trial trains a
*pack*: one or more point x seeds (`resources.pack`), each its own Optuna trial, MLflow child
run and table row; `member.PackRun` trains them (no Ray there) and `_trial_fn` gives it Tune's
checkpoint, reports and persistence. When all trials are done, `collect` reads each trial's
newest checkpoint into `TrialHistory`s and writes the tables and figures.

Scheduling follows the science: FIFO, never a plateau rule (grokking is a long plateau); a member stops when its
generalization has held, its loss diverged, or its budget is spent, and a trial ends itself
when all its members have (no Tune stopper).

Checkpoints are grokstudy's own (`checkpoints`): Tune keeps every one it records and deletes
none, each trial prunes its own and continues from its newest whole one, so a driver killed at
any moment leaves an experiment that restores with Tune's public API alone. Ray's few private
knobs live in `compat`. Public Tune behaviour this module relies on (ray 2.60.0):
- `Searcher.suggest` returning None (nothing now, ask again) or `Searcher.FINISHED`, with
  `TuneConfig(num_samples=-1)`: the searcher alone decides when the study is complete.
- `Tuner.restore` unpickles the searcher and the callbacks of the first run (`tuner.pkl`) and
  calls `Searcher.restore` with the newest searcher state. Both therefore serve whichever driver
  run restored them through `_current` (the searcher settles its ledger against the trials Tune
  restored; the callback holds no state and forwards to this run's `StudyProgress`).
- Tune catches the first SIGINT itself, saves the experiment and returns from `fit` with
  unfinished trials; `run_study` reports that as an interruption.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import secrets
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import Searcher

from grokstudy import (
    checkpoints,
    collect,
    compat,
    console,
    footprint,
    member,
    packsize,
    phases,
    preflight,
    search,
    storage,
    tracking,
    weights,
)
from grokstudy.collect import ENDED_WITHOUT_OUTCOME, FAILED_BEYOND_RETRIES, Ended, StudyOutcome
from grokstudy.config import Study, TrialConfig, flatten, pack_key, plain, to_dict
from grokstudy.errors import StudyError, UsageError, one_line
from grokstudy.points import point_from_config
from grokstudy.progress import Progress, StudyProgress, TrackingUnavailable
from grokstudy.records import TrialHistory
from grokstudy.snapshot import SNAPSHOT_FILE, STORAGE_SNAPSHOT_FILE, MemberState, Snapshot

log = logging.getLogger(__name__)

PACK_FILE = "pack.json"
PACK_CHOICE_TAG = "grokstudy.pack_choice"
"""`resources.pack: auto`'s measurement and choice, kept in the output directory for a resume."""

__all__ = ["Interrupted", "Progress", "StudyOutcome", "TrackingUnavailable", "pack_size", "run_study"]


class Interrupted(Exception):
    """The study stopped before all its trials finished (Ctrl-C, or `request_stop`); run it
    again to resume."""


_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Stop the running study as Ctrl-C does (Tune saves the experiment and returns), but end
    its parent run FAILED with `reason` (SIGTERM from `ray job stop`)."""
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
    weights_dir: str | None = None
    """Where members' final weights go (`weights.directory`); None: `run.save_weights: none`."""


def _trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Ray Tune trial: Tune's side of `member.PackRun` (resources, checkpoint, reports)."""
    import torch

    from grokstudy import train  # on the worker: the driver never imports torch

    train.configure_process()
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", ctx.study.resources.cpu))))
    if resources.get("GPU", 0.0) and torch.cuda.is_available():
        # Fractional GPUs only share Ray's bookkeeping; cap this process's memory
        # ourselves so trials sharing a GPU cannot starve each other.
        torch.cuda.set_per_process_memory_fraction(min(1.0, resources["GPU"]))
    recorded = tune.get_checkpoint()
    saved = None
    if recorded is not None:  # a restore or a retry: the trial's newest whole checkpoint
        trial_dir = checkpoints.trial_dir(recorded.path)
        saved = checkpoints.newest(recorded.filesystem, trial_dir, named=recorded.path)
        if saved is None:
            log.warning("trial %s: none of its checkpoints is whole; it starts over", trial_dir)
    node = ray.get_runtime_context().get_node_id()
    pack = member.PackRun(ctx.study, config["members"], saved, ctx.where, node, ctx.weights_dir)

    def report(metrics: dict[str, Any], with_checkpoint: member.PackRun | None) -> None:
        if with_checkpoint is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            with_checkpoint.write_checkpoint(Path(d))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        persisted = tune.get_checkpoint()  # where Tune put it
        checkpoints.prune(persisted.filesystem, checkpoints.trial_dir(persisted.path))

    pack.run(report)


# ---- the searcher: packs of members from the ledger ------------------------------------------------


class LedgerSearcher(Searcher):
    """Ray Tune's view of the study's `search.Ledger`: each suggestion is a pack of up to
    `pack_size` compatible members (`config.pack_key`); results are told member by member
    as trials report them. The ledger pickles with this searcher into every experiment
    snapshot, and `restore` settles it against the trials Tune restored."""

    def __init__(self, study: Study, pack_size: int, slots: int) -> None:
        super().__init__()
        self.study = study
        self.ledger = search.Ledger(study)
        self.pack_size = pack_size
        self.slots = slots
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
            return {"members": [{"trial_id": m.trial_id, "point": plain(m.point)} for m in pack]}
        if not self.held and self.ledger.finished():
            return Searcher.FINISHED
        return None

    def _next_pack(self) -> list[search.Member]:
        if self.pack_size == 1:
            next_member = self.held.pop(0) if self.held else self.ledger.ask()
            return [next_member] if next_member else []
        remaining = self.ledger.remaining()
        size = self.pack_size
        if remaining is not None:  # spread what is left over the free slots rather than one full pack
            free = max(1, self.slots - len(self.running))
            size = max(1, min(size, math.ceil((remaining + len(self.held)) / free)))
        pack: list[search.Member] = []
        key = None
        for m in list(self.held):
            k = pack_key(self.study.trial(m.point))
            if len(pack) < size and (key is None or k == key):
                key = k
                pack.append(m)
                self.held.remove(m)
        while len(pack) < size and len(self.held) < size:
            m = self.ledger.ask()
            if m is None:
                break
            k = pack_key(self.study.trial(m.point))
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
                self.ledger.fail(tid, FAILED_BEYOND_RETRIES if error else ENDED_WITHOUT_OUTCOME)
                self.told.add(tid)

    def _tell(self, result: dict[str, Any]) -> None:
        for tid, outcome in member.outcomes_of(result):
            if tid not in self.told:
                self.ledger.tell(tid, outcome.objective, outcome.phase)
                self.told.add(tid)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore: this searcher's saved state, settled against the trials Tune restored
        (`search.Ledger.reconcile`)."""
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        known = _current.known if _current is not None else {}
        self.lost = self.ledger.reconcile(known)
        if _current is not None and _current.grown is not None:
            # The study grew (more seeds, axis values, budget): the new study's ledger, holding
            # every member Tune holds, hands out only what is new.
            self.study = _current.grown
            self.ledger = search.Ledger(self.study)
            self.ledger.reconcile(known)
            self.ledger.add_seeds()
        self.packs = {}
        for k in known.values():
            self.packs.setdefault(k.tune_trial_id, []).append(k.trial_id)
        self.told = {tid for tid, k in known.items() if k.status in ("done", "failed")}
        self.running = {k.tune_trial_id for k in known.values() if k.status == "running"}
        # Tune resumes no finished trial: a member to run again from one goes into a new trial.
        self.held = [search.Member(tid, k.point) for tid, k in known.items() if k.status == "rerun"]
        if _current is not None:
            _current.searcher = self


def restored_members(study: Study, trials: list[Any], retry_failed: bool = False) -> dict[str, search.Known]:
    """{member trial id: what Tune's saved experiment (its `trials`) says of it}: done, running,
    failed (its trial failed beyond retries, or Tune finished its trial without an outcome for
    it), or with `retry_failed` rerun (a new Tune trial runs it again). A member two trials hold
    is what the better attempt says."""
    known: dict[str, search.Known] = {}
    for trial in trials:
        done = dict(member.outcomes_of(trial.last_result or {}))
        for m in (trial.config or {}).get("members", []):
            tid = m["trial_id"]
            point = point_from_config(study, m["point"])
            if tid in done:
                o = done[tid]
                k = search.Known(tid, trial.trial_id, point, "done", o.objective, o.phase)
            elif trial.status in ("ERROR", "TERMINATED"):
                k = search.Known(tid, trial.trial_id, point, "rerun" if retry_failed else "failed")
            else:
                k = search.Known(tid, trial.trial_id, point, "running")
            if tid not in known or _KNOWN_RANK[k.status] > _KNOWN_RANK[known[tid].status]:
                known[tid] = k
    return known


_KNOWN_RANK = {"failed": 0, "rerun": 1, "running": 2, "done": 3}


# ---- live progress ---------------------------------------------------------------------------------


class _Callback(tune.Callback):
    """Tune's events, forwarded to the running driver's `StudyProgress` (`_current`). Stateless, so
    the copy a restore unpickles from the first run serves the run that restored it."""

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        _current.progress.started(trial)
        _current.live.seen(trial.trial_id, trial.config, None, None)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        _current.progress.reported(trial, result)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        _current.live.seen(
            trial.trial_id, trial.config, _checkpoint(checkpoint), (trial.last_result or {}).get("node")
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _current.progress.completed(trial)
        _current.live.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _current.progress.errored(trial)
        _current.live.failed.add(trial.trial_id)

    def on_step_end(self, iteration, trials, **info) -> None:
        _current.progress.tick()
        if _current.waiting is not None:
            _current.waiting.check()
        ended = _current.progress.ended_count()
        if _current.live.due(ended):
            _current.live.write(ended)


@dataclass(slots=True)
class _DriverRun:
    """What this driver run shares with the searcher and callback Tune unpickles on a restore."""

    progress: StudyProgress
    known: dict[str, search.Known]
    """Every member Tune's saved experiment holds (empty on a fresh start); read once."""
    live: collect.LiveResults
    searcher: LedgerSearcher | None = None
    waiting: preflight.WaitForNodes | None = None
    """While a cluster has no node that fits a trial (`preflight.check_fits`)."""
    grown: Study | None = None
    """The study, when it grew since its trials started (the restored searcher still holds the
    old one)."""


_current: _DriverRun | None = None


# ---- the driver ------------------------------------------------------------------------------------


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`/RAY_ADDRESS, or start an embedded local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False)
        return True
    ensure_ray_token()
    # Embedded: loopback only, sized to the machine, a small object store (trials
    # pass no large objects).
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
    )
    return True


def ensure_ray_token() -> Path:
    """The token file an embedded Ray (>= 2.59) authenticates with, created 0600 with a random
    token before Ray starts (Ray writes one world-readable, then narrows it, when there is
    none). Created exclusively: of several processes starting at once, the first one's wins."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.exists():
        with contextlib.suppress(OSError):
            if token.stat().st_mode & 0o077:
                token.chmod(0o600)
        return token
    token.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=token.parent)  # mode 0600 from the start
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, token)
    finally:
        os.unlink(tmp)
    return token


def pack_size(study: Study) -> int | str:
    """`resources.pack` as the study asks: an integer, or "auto" (measured by `resolve_pack`),
    its default where trials use a GPU; 1 on CPUs, where a lone trial was measured fastest."""
    if study.resources.pack is not None:
        return study.resources.pack
    return "auto" if study.resources.gpu > 0 else 1


def resolve_pack(study: Study, out_dir: Path, slots: int) -> tuple[int, packsize.Choice | None]:
    """The pack size this run uses, and the measurement behind it under auto: the choice saved
    in `<out>/pack.json` by an earlier run of the study (a resume packs as it began), else
    `packsize.auto` run in a Ray task with a trial's resources, on the trials' device, then saved."""
    wanted = pack_size(study)
    if wanted != "auto":
        return int(wanted), None
    saved = storage.read_json(out_dir / PACK_FILE, "STUDY_DIR")
    if saved:
        choice = packsize.Choice.from_dict(saved)
    else:
        r = study.resources
        trials = (study.search.n_points or packsize.MAX_K) * study.search.seeds
        measure = ray.remote(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=0)(_measure_pack)
        cfg = study.trial(preflight.largest_point(study))
        choice = packsize.Choice.from_dict(ray.get(measure.remote(cfg, math.ceil(trials / slots), slots)))
        storage.write_atomic(out_dir / PACK_FILE, json.dumps(choice.to_dict()))
    print(f"grokstudy: {choice.describe()}", flush=True)
    return choice.k, choice


def _measure_pack(cfg: TrialConfig, max_k: int, slots: int) -> dict[str, Any]:
    """`packsize.auto` where a trial would run, within its memory: the GPU share Ray gave this
    task of the GPU's free memory, or on CPUs the node's memory over the trials running at once."""
    import torch

    from grokstudy import train

    train.configure_process()
    resources = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = train.resolve_device(cfg.train.device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        memory = int(free * min(1.0, resources.get("GPU", 1.0)))
    else:
        memory = footprint.machine_bytes() // max(1, slots)
    return packsize.auto(
        cfg, max_k, memory, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ).to_dict()


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
    retry_failed: bool = False,
    quiet_libraries: bool = False,
    fresh: bool = False,
) -> StudyOutcome:
    """Run (or resume) a study to completion and write its tables and figures.

    With `stop_on_sigterm`, SIGTERM (`ray job stop`) stops the study as `request_stop` does.
    With `retry_failed`, a resumed study runs again, from the start and in new Tune trials, the
    trials that failed beyond run.max_failures or that Tune ended without an outcome. With `quiet_libraries`, what Ray, MLflow and
    Tune write to stderr goes to `<out>/driver.log` once the checks passed (`console`).

    Raises StudyError/UsageError for what can be refused before anything runs (unsupported
    versions, an output or storage that cannot be written, MLflow unreachable, a changed study
    on resume, cuda without a GPU, a locked output or leased storage), Interrupted when Ctrl-C
    stopped it, TrackingUnavailable when MLflow stayed down too long (the parent run then ends
    KILLED or FAILED and the study resumes when run again), storage.LeaseLost when another
    driver took the study over (this driver writes nothing more).
    """
    compat.check()
    # Everything a run needs, checked before it writes anything anywhere or starts Ray.
    out_dir = storage.check_dir(out_dir, "--out").resolve()
    storage_path = study.run.storage or str(out_dir / "ray")
    if study.run.storage:
        storage.check_storage(study.run.storage)
    uri = tracking.resolve_tracking_uri(tracking_uri, study.run.tracking_uri, out_dir)
    tracking.check_reachable(uri)
    state_file = out_dir / "study-state.json"
    saved = storage.read_json(state_file, "STUDY_DIR")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # compat.ENV_KNOBS
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # _run_config's loggers only
    experiment_path = storage.join(storage_path, study.name)
    study_yaml = _study_yaml(study)
    previous_sigterm = _stop_on_sigterm() if stop_on_sigterm else None
    global _stop_reason
    _stop_reason = None
    try:
        with (
            storage.OutputLock(out_dir),
            storage.Lease(experiment_path, on_lost=request_stop) as lease,
            console.library_output_to(out_dir / console.DRIVER_LOG)
            if quiet_libraries
            else contextlib.nullcontext(),
        ):
            if fresh:
                _start_afresh(study, out_dir, experiment_path, uri)
                saved = {}
            resumed, grown = preflight.check_same_study(study, study_yaml, experiment_path)
            started_ray = init_ray(address, num_cpus)
            if stop_on_sigterm:
                _stop_on_sigterm()  # again: ray.init installs its own SIGTERM handler, which aborts
            try:
                preflight.check_devices(study)
                embedded = not (address or os.environ.get("RAY_ADDRESS"))  # this machine: no autoscaler
                pack, choice = resolve_pack(study, out_dir, _trial_slots(study))
                waiting = preflight.check_fits(study, pack, embedded)
                study_tracker = tracking.StudyTracker(uri)
                # A resume continues its parent run; a fresh start continues one only if a
                # driver died before it could record it (it is still RUNNING).
                parent_run_id = saved.get("parent_run_id") or tracking.find_study_run(
                    uri, study.name, experiment_path, running_only=not resumed
                )
                pack_tags = {"resources.pack": str(pack)} | (
                    {PACK_CHOICE_TAG: choice.describe()} if choice is not None else {}
                )
                parent_run_id = _open_parent(study_tracker, study, study_yaml, experiment_path, parent_run_id,
                                             pack_tags)  # fmt: skip
                storage.write_atomic(state_file, json.dumps({"parent_run_id": parent_run_id}))
                storage.write_atomic(out_dir / "study.yaml", study_yaml)
                try:
                    return _fit(study, out_dir, storage_path, experiment_path, resumed, formats, progress,
                                study_tracker, retry_failed, waiting, pack, grown)  # fmt: skip
                except (Interrupted, KeyboardInterrupt):
                    if lease.lost:  # the new holder owns the study now: touch nothing of it
                        raise storage.LeaseLost(lease.lost) from None
                    collect.best_effort(study_tracker.finish, "FAILED" if _stop_reason else "KILLED")
                    raise
                except BaseException:
                    collect.best_effort(study_tracker.finish, "FAILED")
                    raise
            finally:
                if started_ray:
                    ray.shutdown()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _stop_on_sigterm() -> Any:
    """SIGTERM (`ray job stop`) stops the study as Ctrl-C does, then the run ends FAILED
    (`request_stop`); returns the handler it replaced."""
    return signal.signal(signal.SIGTERM, lambda *_: request_stop("SIGTERM"))


def _fit(
    study: Study,
    out_dir: Path,
    storage_path: str,
    experiment_path: str,
    resumed: bool,
    formats: tuple[str, ...],
    emit: Callable[[Progress], None] | None,
    study_tracker: tracking.StudyTracker,
    retry_failed: bool,
    waiting: preflight.WaitForNodes | None,
    pack: int,
    grown: tuple[str, ...] = (),
) -> StudyOutcome:
    global _current
    where = study_tracker.where()
    weights_dir = weights.directory(experiment_path) if study.run.save_weights == "final" else None
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, ctx=TrialContext(study, where, weights_dir)),
        {"cpu": study.resources.cpu, "gpu": study.resources.gpu},
    )
    restored = tune.ExperimentAnalysis(experiment_path).trials if resumed else []
    known = restored_members(study, restored, retry_failed)
    progress = StudyProgress(
        study.search.n_trials, emit, study.run.tracking_outage_s, where.tracking_uri,
        {t: MemberState(t, plain(k.point), _MEMBER_STATUS[k.status], k.phase) for t, k in known.items()},
        study=study.name, save=_snapshot_writer(study, out_dir, experiment_path),
        started_at=_first_started(out_dir) if resumed else None,
    )  # fmt: skip
    live = collect.LiveResults(study, out_dir, formats, study_tracker)
    for t in restored:
        live.seen(t.trial_id, t.config, _checkpoint(t.checkpoint), (t.last_result or {}).get("node"))
        if t.status == "ERROR":
            live.failed.add(t.trial_id)
        elif t.status == "TERMINATED":
            live.ended.add(t.trial_id)
    _current = _DriverRun(progress, known, live, waiting=waiting, grown=study if grown else None)
    slots = _trial_slots(study)
    if resumed:
        # Failed trials stay failed in Tune's eyes: `--retry-failed` runs their members in new
        # trials (LedgerSearcher.restore). Tune's own resume of an errored trial
        # (resume_errored) was seen to end it after one report, its member never trained.
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        _current.searcher = LedgerSearcher(study, pack, slots)
        tuner = tune.Tuner(trainable, tune_config=_tune_config(study, _current.searcher),
                           run_config=_run_config(study, storage_path))  # fmt: skip
    # Samplers that ignore results may run ahead (pending trials also make an
    # autoscaling cluster grow); TPE gets a suggestion per free slot and no more.
    ahead = 1 if study.search.sampler == "tpe" else 16
    try:
        with _pending_trials(max(slots, ahead)):
            grid = tuner.fit()
    except Exception as err:  # Tune wraps what a callback raised in its own TuneError
        _end_snapshot(progress, "crashed")
        raise _cause(err, TrackingUnavailable) or _cause(err, StudyError) or err from None
    finally:
        searcher, _current = _current.searcher, None
    ended = [
        Ended(r.config, _checkpoint(r.checkpoint), None if r.error is None else one_line(r.error, 2000),
              (r.metrics or {}).get("node"), done=bool((r.metrics or {}).get("done")))
        for r in grid
    ]  # fmt: skip
    histories, unfinished = collect.histories(study, ended)
    _end_snapshot(progress, "interrupted" if unfinished else "finished")
    if unfinished:
        raise Interrupted(
            f"{unfinished} trial(s) did not finish (interrupted); run the same command again to resume"
        )
    if searcher is None:  # Tune restored a searcher without calling restore: not a ray we support
        raise RuntimeError("Tune did not restore the study's searcher; see grokstudy.compat")
    searcher.ledger.export(out_dir / "optuna.db")
    return collect.write_results(
        study, out_dir, histories, formats, study_tracker, resumed, len(searcher.lost),
        len(searcher.ledger.retried), progress.started_at, weights.directory(experiment_path), grown,
    )  # fmt: skip


_MEMBER_STATUS = {
    "done": "done",
    "failed": "failed",
    "running": "running",
    "rerun": "pending",
}
"""A restored member's `search.Known` status as a snapshot's."""


def _snapshot_writer(study: Study, out_dir: Path, experiment_path: str) -> Callable[[Snapshot], None]:
    """Where the study's progress snapshots go: `<out>/progress.json`, and beside the Tune
    experiment (under `run.storage`, where `grokstudy status` finds a cluster study's)."""
    local = out_dir / SNAPSHOT_FILE
    remote = storage.join(experiment_path, STORAGE_SNAPSHOT_FILE)

    def save(snap: Snapshot) -> None:
        text = snap.to_json()
        storage.write_atomic(local, text)
        try:
            storage.write_text(remote, text)
        except OSError as err:  # progress is for people: a failed put never stops a study
            log.warning("progress snapshot not written to %s: %s", remote, one_line(err, 200))

    return save


def _end_snapshot(progress: StudyProgress, state: str) -> None:
    try:
        progress.ended(state)
    except OSError as err:
        log.warning("the last progress snapshot was not written: %s", one_line(err, 200))


def _first_started(out_dir: Path) -> float | None:
    """When the study first started, from the snapshot of its previous driver run."""
    text = storage.read_text(str(out_dir / SNAPSHOT_FILE))
    try:
        return Snapshot.from_json(text).started_at if text else None
    except ValueError:
        return None


def _checkpoint(checkpoint: tune.Checkpoint | None) -> tuple[Any, str] | None:
    return (checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None


def _tune_config(study: Study, searcher: LedgerSearcher) -> tune.TuneConfig:
    return tune.TuneConfig(
        search_alg=compat.reopening_search(searcher),  # asks the searcher again after a restore
        num_samples=-1,  # the searcher says when the study is complete
        max_concurrent_trials=study.run.max_concurrent,
        # Function trainables reuse their actor between trials: this saves
        # a Python + torch start-up per trial (seconds each on a small CPU).
        reuse_actors=True,
        trial_name_creator=lambda t: f"pack_{t.trial_id}",
        trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
    )


def _run_config(study: Study, storage_path: str) -> tune.RunConfig:
    return tune.RunConfig(
        name=study.name,
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=study.run.max_failures),
        # Tune keeps every checkpoint and deletes none: trials prune their own (`checkpoints`).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        # Tune's CSV and JSON loggers (ExperimentAnalysis reads them), not its TensorBoard one:
        # MLflow is the dashboard, and tensorboardX imports torch into the driver (2-3 s).
        callbacks=[_Callback(), CSVLoggerCallback(), JsonLoggerCallback()],
        verbose=0,
    )


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`err` or the first exception of type `kind` in its cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def histories_from_tune_dir(path: Path) -> tuple[Study, list[TrialHistory]]:
    """The study and trial histories of a Ray Tune experiment directory (`grokstudy export`)."""
    from grokstudy.study import parse_study

    text = storage.read_text(storage.join(str(path), preflight.STUDY_FILE))
    if text is None:
        raise UsageError(
            "SOURCE", f"{path} holds no {preflight.STUDY_FILE}: not a grokstudy Ray Tune experiment"
        )
    import yaml

    study = parse_study(yaml.safe_load(text), f"{path}/{preflight.STUDY_FILE}")
    ended = [
        Ended(t.config, _checkpoint(t.checkpoint), FAILED_BEYOND_RETRIES if t.status == "ERROR" else None,
              (t.last_result or {}).get("node"), done=t.status == "TERMINATED")
        for t in tune.ExperimentAnalysis(str(path)).trials
    ]  # fmt: skip
    return study, collect.histories(study, ended)[0]


# ---- before anything runs ----------------------------------------------------------------------------


def _start_afresh(study: Study, out_dir: Path, experiment_path: str, tracking_uri: str) -> None:
    """`--fresh`: set the study's earlier results aside, beside where they were (`<out>.archived-
    <time>`, `<experiment>.archived-<time>`), and mark its MLflow parent runs archived, so this
    run starts over. The lock, the lease, this run's driver.log and an MLflow store kept in
    `out_dir` (a database of every run, the archived ones included) stay."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    inside = None  # the experiment's path under out_dir, when storage is the default <out>/ray
    if "://" not in experiment_path and Path(experiment_path).resolve().is_relative_to(out_dir):
        inside = str(Path(experiment_path).resolve().relative_to(out_dir))
    archived = f"{experiment_path}.archived-{stamp}"
    if inside is None:
        storage.move_aside(experiment_path, archived, lambda rel: rel.startswith(storage.LEASE_PREFIX))
    else:
        archived = str(Path(f"{out_dir}.archived-{stamp}", inside))
    stays = (storage.LOCK_FILE, console.DRIVER_LOG, "mlartifacts")

    def keep(rel: str) -> bool:
        lease = inside is not None and rel.startswith(f"{inside}/{storage.LEASE_PREFIX}")
        return lease or rel in stays or rel.startswith("mlflow.db")

    moved = storage.move_aside(str(out_dir), f"{out_dir}.archived-{stamp}", keep)
    runs = tracking.archive_study_runs(tracking_uri, study.name, experiment_path, archived)
    if moved or runs:
        print(f"grokstudy: --fresh: earlier results set aside in {out_dir}.archived-{stamp}"
              + ("" if inside is not None else f" and {archived}"), flush=True)  # fmt: skip


def _open_parent(
    study_tracker: tracking.StudyTracker, study: Study, study_yaml: str, experiment_path: str,
    parent_run_id: str | None, pack_tags: dict[str, str],
) -> str:  # fmt: skip
    """Open the study's parent run (its id); StudyError when MLflow cannot be reached."""
    try:
        return study_tracker.open(
            study.name,
            study_yaml=study_yaml,
            params=_study_params(study),
            tags=_study_tags(study) | pack_tags | {tracking.TUNE_EXPERIMENT_TAG: experiment_path},
            parent_run_id=parent_run_id,
        )[1]
    except StudyError:
        raise
    except Exception as err:
        raise StudyError(
            "run.tracking_uri", f"cannot reach MLflow at {study_tracker.tracking_uri} ({one_line(err, 200)})"
        ) from None


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
    """Let Tune start `n` trials at once (a value the user set wins; compat.ENV_KNOBS)."""
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
    if study.auto_max_steps is not None:  # the rule: the base trial's max_steps is only its upper end
        params["base.train.max_steps"] = "auto " + json.dumps(to_dict(study.auto_max_steps))
    params |= {f"phases.{k}": v for k, v in to_dict(study.phases).items()}
    params |= {"search.sampler": study.search.sampler}  # seeds may grow: a tag, not a param
    return params


def _study_tags(study: Study) -> dict[str, str]:
    return {
        "grokstudy.study": study.name,
        "search.sampler": study.search.sampler,
        "search.points": str(study.search.n_points or "adaptive"),
        "search.seeds": str(study.search.seeds),
        "search.axes": ",".join(d.key for d in study.search.space),
    } | {f"phases.rule.{k}": v for k, v in phases.rules(study.phases).items()}
