"""Study → Optuna: search space, samplers, and the ledger of trials. The only module that imports optuna.

Checked against optuna 5.0.0. This module never imports ray: the runner's Tune
searcher asks the `Ledger` for work and tells it results, and the ledger (its
in-memory Optuna study, sampler and space) pickles into Ray Tune's experiment
snapshots with that searcher.

One Optuna trial = one training run = a point and a seed (a packed Tune trial
holds several). A point is the searched hyperparameters; seeds are replicates
of a point (`train.seed` = 0 .. seeds-1, nothing else differs), so a
phase-diagram cell can report how many seeds agree:

- grid: `train.seed` is one more axis of the lattice; `LatticeSampler` hands
  out every point x seed exactly once.
- sobol, random, tpe: the sampler proposes a point on a fresh trial, which
  trains seed 0; in the same call the space enqueues seeds 1 .. seeds-1 with
  the very same parameters. Optuna pops its queue before it samples anything
  new, so the next seeds-1 trials are those replicates and num_samples x seeds
  trials are exactly num_samples points with all their seeds, however many run
  at once. The seed never enters a sampler's space: Sobol's dimensions and
  TPE's model see only hyperparameters.

A non-scalar choice (`optimizer.betas: {choice: [[0.9, 0.98], ...]}`) is
stored in Optuna as its JSON text, because Optuna's categorical values must be
None, bool, int, float or str; the space returns the decoded value, and
`point_from_config` turns any config back into typed values.

Optuna's private APIs (a sampler marking its trial in `before_trial`, the
ledger tagging a frozen trial) go through `compat`, which checks them at the
start of every run.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from grokstudy import compat, refine, storage
from grokstudy.config import LATTICE_SAMPLERS, SearchDim, Study
from grokstudy.points import SEED, encode, is_scalar, point_from_config, trial_id

# grokstudy prints its own progress; Optuna's per-trial INFO lines would interleave with it.
optuna.logging.set_verbosity(optuna.logging.WARNING)

REPLICATE_OF = "grokstudy.replicate_of"
"""User attribute of an enqueued replicate: the number of the trial that proposed its point."""


# ---- the space -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Define-by-run space for OptunaSearch: suggests a point and picks its seed.

    Returns the Tune config of the trial: `{dotted key: value, ..., "train.seed": s}`
    with non-scalar choices decoded. Run it right after each `ask()`, as
    `OptunaSearch.suggest` does: a point's replicates are queued by its first
    trial's call. Calling it twice on one trial is harmless (Optuna returns the
    already-suggested values; replicates are enqueued once).
    """

    distributions: dict[str, BaseDistribution]
    decode: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per key, JSON text → the non-scalar choice it stands for."""
    seeds: int = 1
    seed_is_axis: bool = False
    """True for grid: `train.seed` is a grid axis; else seeds are enqueued replicates."""

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        params = {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}
        if self.seed_is_axis:
            seed = trial.suggest_categorical(SEED, list(range(self.seeds)))
        else:
            seed = trial.user_attrs.get(SEED)
            if seed is None:
                # A fresh point: this trial is its seed 0, the queue gets the rest.
                seed = 0
                trial.set_user_attr(SEED, 0)
                for s in range(1, self.seeds):
                    trial.study.enqueue_trial(params, user_attrs={SEED: s, REPLICATE_OF: trial.number})
        config = {k: self.decode.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in params.items()}
        return {**config, SEED: seed}


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    # Through the public suggest_* methods: OptunaSearch records values by wrapping them.
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def optuna_space(study: Study) -> SearchSpace:
    """The study's search space as a define-by-run callable for `OptunaSearch(space=...)`."""
    grid = study.search.sampler in LATTICE_SAMPLERS
    distributions: dict[str, BaseDistribution] = {}
    decode: dict[str, dict[str, Any]] = {}
    for dim in study.search.space:
        distributions[dim.key] = _distribution(dim, grid)
        if table := {encode(v): v for v in (dim.choice or ()) if not is_scalar(v)}:
            decode[dim.key] = table
    return SearchSpace(distributions, decode, study.search.seeds, seed_is_axis=grid)


def _distribution(dim: SearchDim, grid: bool) -> BaseDistribution:
    if grid or dim.is_listed:
        return CategoricalDistribution([encode(v) for v in dim.grid])
    lo, hi = dim.log or dim.range
    log = dim.log is not None
    if dim.integer:
        return IntDistribution(math.ceil(lo), math.floor(hi), log=log)
    return FloatDistribution(lo, hi, log=log)


# ---- samplers ------------------------------------------------------------------------------------

CELL_ATTR = "grokstudy.cell"
"""System attribute of a lattice sampler's trial: the index of its point x seed in the lattice."""


class LatticeSampler(optuna.samplers.BaseSampler):
    """A sampler over a finite lattice: every grid point x seed, each at most once.

    `before_trial` gives a new trial the first point x seed of `order(study)`
    that no trial in the storage has taken (RUNNING, COMPLETE, or failed for
    good; a trial FAILed as lost or duplicate frees its cell), and
    `sample_independent` returns that cell's values. What is taken is read from
    the storage every time, so the sampler keeps no state of its own: it
    resumes from whatever storage it is given, and exactly-once holds however
    trials were numbered, lost, requeued or adopted (the reason it replaces
    Optuna's GridSampler, which assigns cells by trial number and falls back to
    random draws once numbers pass the grid's size). Trials enqueued with fixed
    parameters (requeued or adopted ones) are left alone and take their cell.

    Subclasses decide the order; this one walks a seeded shuffle of the lattice,
    so any prefix of a grid study covers the space evenly.
    """

    def __init__(self, space: dict[str, list[Any]], seed: int = 0) -> None:
        self._names = list(space)
        self._cells = list(itertools.product(*space.values()))
        self._index = {cell: i for i, cell in enumerate(self._cells)}
        self._seed = seed
        self._last_held: list[tuple] | None = None
        self._last_next: int | None = None

    # -- Optuna's sampler interface --

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    adaptive = False
    """True when running trials may still add cells to run (the ledger then waits for them)."""

    def before_trial(self, study: Any, trial: Any) -> None:
        if "fixed_params" in trial.system_attrs:
            return
        cell = self.next_cell(study) or 0  # None: nothing to run, and the ledger does not ask then
        compat.set_system_attr(study, trial, CELL_ATTR, cell)

    def next_cell(self, study: Any) -> int | None:
        """The next point x seed to run, or None when there is none now."""
        # Asked twice per trial (the ledger checks there is one, then Optuna's ask assigns it)
        # over the same held trials: an adaptive order is worth computing once (a 33 x 33
        # boundary study's dry run: 23 s -> 14 s).
        held = [(t.number, cell, t.state, t.user_attrs.get(PHASE)) for t, cell in self.held(study)]
        if held != self._last_held:
            taken = {cell for _, cell, _, _ in held}
            self._last_held = held
            self._last_next = next((i for i in self.order(study, taken) if i not in taken), None)
        return self._last_next

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        cell = trial.system_attrs[CELL_ATTR]
        return self._cells[cell][self._names.index(param_name)]

    # -- the lattice --

    def order(self, study: Any, taken: set[int]) -> list[int]:
        """Cells in the order to run them; the first untaken one goes next."""
        order = list(range(len(self._cells)))
        random.Random(self._seed).shuffle(order)
        return order

    def cell_of(self, params: dict[str, Any]) -> int | None:
        try:
            return self._index[tuple(params[n] for n in self._names)]
        except KeyError:
            return None

    def held(self, study: Any) -> Iterator[tuple[FrozenTrial, int]]:
        """(trial, cell) of each trial that holds its cell (`holds`)."""
        for t in study.get_trials(deepcopy=False):
            if holds(t):
                cell = self.cell_of(t.params) if t.params else t.system_attrs.get(CELL_ATTR)
                if cell is not None:
                    yield t, cell

    def taken(self, study: Any) -> set[int]:
        return {cell for _, cell in self.held(study)}

    def remaining(self, study: Any) -> int | None:
        """Point x seeds still to run (None: the sampler decides as results come)."""
        return None if self.adaptive else len(self._cells) - len(self.taken(study))


class BoundarySampler(LatticeSampler):
    """Refines a grid phase diagram where phases change, instead of training every cell.

    The lattice is the study's grid (`choice` axes are facets, never interpolated
    across) x seeds, ordered by `refine` over the phases told so far (the `PHASE`
    user attribute of COMPLETE trials): first the other seeds of points that meet
    another phase (`refine.seeds_to_add`: one seed settles a point inside a region,
    every seed runs on a boundary), then the first seed of the next new point
    (`refine.next_cells`: a coarse sub-lattice, then points between differing phases
    or disagreeing seeds, and while results are pending those most likely needed
    next, so every slot keeps working). It proposes nothing more once no boundary is
    left unresolved or `search.budget` trials are handed out. Everything is read
    from the storage, so it resumes like the grid.
    """

    adaptive = True

    def __init__(
        self, space: dict[str, list[Any]], seeds: int, lattice: Any, budget: int | None, seed: int = 0
    ) -> None:
        super().__init__({**space, SEED: list(range(seeds))}, seed)
        self._seeds = seeds
        self._lattice = lattice
        self._budget = budget

    def order(self, study: Any, taken: set[int]) -> list[int]:
        if self._budget is not None and len(taken) >= self._budget:
            return []
        seeds, shape = self._seeds, self._lattice.shape
        observed, pending = self._observed(study)
        # Cells are (point, seed) with the seed varying fastest: cell // seeds is the point.
        further = [
            int(np.ravel_multi_index(p, shape)) * seeds + s
            for p in refine.seeds_to_add(self._lattice, observed, pending, seeds)
            for s in range(seeds)
        ]
        points = refine.next_cells(self._lattice, observed, pending, seeds, limit=1)
        return further + [int(np.ravel_multi_index(p, shape)) * seeds for p in points]

    def _observed(self, study: Any) -> tuple[dict[tuple[int, ...], list[str]], set[tuple[int, ...]]]:
        observed: dict[tuple[int, ...], list[str]] = {}
        pending: set[tuple[int, ...]] = set()
        shape = self._lattice.shape
        for t, cell in self.held(study):
            point = tuple(int(i) for i in np.unravel_index(cell // self._seeds, shape))
            if t.state == TrialState.RUNNING:
                pending.add(point)
            elif t.state == TrialState.COMPLETE and t.user_attrs.get(PHASE):
                observed.setdefault(point, []).append(t.user_attrs[PHASE])
            else:
                observed.setdefault(point, [])  # failed for good: finished, without a label
        return observed, pending


def holds(t: Any) -> bool:
    """Does Optuna trial `t` hold its point x seed (running, done, or failed for good)?"""
    if t.state in (TrialState.RUNNING, TrialState.COMPLETE):
        return True
    return t.state == TrialState.FAIL and not (t.user_attrs.get(LOST) or t.user_attrs.get(DUPLICATE))


def _held_points(trials: list[FrozenTrial]) -> set[str]:
    """Point ids (`point_id`) of the ledger's trials that hold their point x seed."""
    return {
        t.user_attrs[TRIAL_ID].rsplit("-s", 1)[0] for t in trials if holds(t) and TRIAL_ID in t.user_attrs
    }


class _SobolSampler(optuna.samplers.QMCSampler):
    """Scrambled Sobol over a space given up front.

    Optuna's QMCSampler infers its space from the study's first trial and so
    draws that trial with its independent RandomSampler (optuna 5.0,
    `samplers/_qmc.py`: "The initial trial is sampled by the independent
    sampler"). Knowing the space, every proposed point is a Sobol point: the
    study's num_samples points are the first num_samples points of the
    scrambled sequence (best balanced when num_samples is a power of 2).
    Replicates are enqueued with fixed values and never consume a Sobol index.
    """

    def __init__(self, space: dict[str, BaseDistribution], seed: int) -> None:
        with warnings.catch_warnings():
            # QMCSampler is marked experimental since optuna 3.0; we chose it knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(qmc_type="sobol", scramble=True, seed=seed)
        self._space = dict(space)
        import scipy.stats.qmc  # noqa: F401  (imported lazily by QMCSampler; here, once)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return dict(self._space)


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of `search.sampler`, seeded by `search.sampler_seed`.

    - grid: `LatticeSampler` over every axis plus `train.seed`.
    - sobol: the first num_samples points of a scrambled Sobol sequence (`_SobolSampler`).
    - random: independent uniform / log-uniform draws.
    - tpe: multivariate TPE minimizing `search.objective`; its first
      10 x seeds trials (about 10 points with their replicates) are random.
    """
    s = study.search
    if s.sampler in LATTICE_SAMPLERS:
        space = {d.key: [encode(v) for v in d.grid] for d in s.space}
        if s.sampler == "boundary":
            return BoundarySampler(space, s.seeds, refine.lattice_of(s.space), s.budget, seed=s.sampler_seed)
        return LatticeSampler({**space, SEED: list(range(s.seeds))}, seed=s.sampler_seed)
    if s.sampler == "sobol":
        return _SobolSampler(optuna_space(study).distributions, seed=s.sampler_seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.sampler_seed, multivariate=True, constant_liar=True, n_startup_trials=10 * s.seeds
        )
    raise AssertionError(f"study.py admits no sampler {s.sampler!r}")


# ---- the ledger: which point x seed is proposed, running, done or lost ------------------------------

TRIAL_ID = "grokstudy.trial_id"
"""User attribute of every Optuna trial the ledger hands out: its trial id."""
LOST = "grokstudy.lost"
"""User attribute of a trial FAILed by `Ledger.reconcile`: its driver died before Tune recorded it."""
DUPLICATE = "grokstudy.duplicate"
"""User attribute of a trial FAILed because its point x seed was already taken."""
ERROR = "grokstudy.error"
"""User attribute of a trial that failed for good (beyond run.max_failures retries)."""
RETRY_OF = "grokstudy.retry_of"
"""User attribute of a trial that runs a failed one again (`--retry-failed`): the failed one's number."""
PHASE = "grokstudy.phase"
"""User attribute of a COMPLETE trial: its phase (the boundary sampler reads it)."""


@dataclass(frozen=True, slots=True)
class Known:
    """What a restored Ray Tune experiment says of one member (`Ledger.reconcile`)."""

    trial_id: str
    tune_trial_id: str
    point: dict[str, Any]
    status: str
    """running | done | failed | rerun (failed, and run again in a new Tune trial: `--retry-failed`)"""
    objective: float | None = None
    phase: str | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """One point x seed handed out by the ledger: one training run."""

    trial_id: str
    point: dict[str, Any]
    """Typed searched values and `train.seed`: `study.trial(point)` is the run's config."""


class Ledger:
    """The study's Optuna study, the one record of which point x seed is proposed,
    running, done or lost; the runner's searcher asks it for members and tells it results.

    The Optuna study lives in memory and is pickled with the runner's searcher
    into every Ray Tune experiment snapshot, so it travels with the Tune
    experiment (wherever `run.storage` is) and a restored study starts from
    Optuna and Tune states saved together. Tune writes the experiment state and
    the searcher in two steps, so after a crash they can still differ by the
    few trials between the two writes: `reconcile` settles that against the
    trials Tune restored. Each trial is keyed by its trial id
    (`<point_id>-s<seed>`), never by Optuna's trial number, and a point x seed
    that is already held is never handed out twice.
    """

    def __init__(self, study: Study) -> None:
        self.study = study
        self.space = optuna_space(study)
        self.ot = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(), sampler=make_sampler(study), direction="minimize"
        )
        self.retried: list[str] = []
        """Failed members a restore hands to Tune to run again (`reconcile`)."""

    # -- handing out work --

    def ask(self) -> Member | None:
        """The next point x seed to run, or None when the sampler has nothing to propose
        now (`finished()` says whether it ever will)."""
        sampler = self.ot.sampler
        # A sampler that keeps repeating held points is a bug; stop looking. (A grown study's
        # random or Sobol sampler first proposes again every point it had: one per held trial.)
        for _ in range(1000 + len(self.ot.get_trials(deepcopy=False))):
            waiting = any(t.state == TrialState.WAITING for t in self.ot.get_trials(deepcopy=False))
            if not waiting and (
                sampler.next_cell(self.ot) is None if isinstance(sampler, LatticeSampler) else self.finished()
            ):
                return None
            trial = self.ot.ask()
            point = point_from_config(self.study, self.space(trial))
            tid = trial_id(point)
            if self._holder(tid) is not None:
                trial.set_user_attr(DUPLICATE, True)
                self.ot.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr(TRIAL_ID, tid)
            return Member(tid, point)
        raise RuntimeError(f"the {self.study.search.sampler} sampler proposed only held points")

    def finished(self) -> bool:
        """True when every point x seed the study will ever run has been handed out."""
        trials = self.ot.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        sampler = self.ot.sampler
        if isinstance(sampler, LatticeSampler):
            running = any(t.state == TrialState.RUNNING for t in trials)
            return sampler.next_cell(self.ot) is None and not (sampler.adaptive and running)
        return len(_held_points(trials)) >= self.study.search.n_points

    # -- results --

    def tell(self, tid: str, objective: float, phase: str | None) -> None:
        """Record a finished trial (idempotent: a trial told before is left as it is)."""
        trial = self._holder(tid)
        if trial is None or trial.state != TrialState.RUNNING:
            return
        if phase is not None:
            compat.set_user_attr(self.ot, trial, PHASE, phase)
        self.ot.tell(trial.number, objective, skip_if_finished=True)

    def fail(self, tid: str, error: str) -> None:
        """Record a trial that failed for good (its point x seed is not run again)."""
        trial = self._holder(tid)
        if trial is None or trial.state != TrialState.RUNNING:
            return
        compat.set_user_attr(self.ot, trial, ERROR, error[:2000])
        self.ot.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)

    def reconcile(self, known: dict[str, Known]) -> list[str]:
        """Make the ledger agree with what a restored Tune experiment holds; returns the lost ids.

        `known`: every member of every trial Tune restored, running, done or failed.
        A RUNNING Optuna trial that Tune does not know is lost (the driver died
        between the two halves of a snapshot): it is FAILed as lost and its point x
        seed is handed out again. A member Tune knows but the ledger does not (the
        experiment state was written after the ledger's snapshot) is adopted, and
        what Tune saw finish or fail is told. A member the ledger holds as failed that Tune
        will run again (asked to, `--retry-failed`, or because its snapshot was taken while
        the trial was saving and so never recorded the failure) gets a new trial; their ids
        are left in `self.retried`.
        """
        lost: list[str] = []
        self.retried = []
        for t in self.ot.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            tid = t.user_attrs.get(TRIAL_ID)
            if tid in known:
                continue
            compat.set_user_attr(self.ot, t, LOST, True)
            self.ot.tell(t.number, state=TrialState.FAIL)
            if tid is not None:
                lost.append(tid)
                if not isinstance(self.ot.sampler, LatticeSampler):  # a lattice frees the cell itself
                    attrs = {k: v for k, v in t.user_attrs.items() if k in (SEED, REPLICATE_OF)}
                    self.ot.enqueue_trial({k: v for k, v in t.params.items() if k != SEED}, user_attrs=attrs)
        for tid, k in known.items():
            held = self._holder(tid)
            if held is None:
                self._adopt(tid, k.point)
            elif held.state == TrialState.FAIL and k.status in ("running", "rerun"):
                self._retry(tid, k.point)
                self.retried.append(tid)
            if k.status == "done":
                self.tell(tid, k.objective, k.phase)
            elif k.status == "failed":
                self.fail(tid, "failed beyond run.max_failures retries")
        return lost

    def add_seeds(self) -> None:
        """Queue the seeds a grown study added to points already proposed. (A lattice sampler
        has seeds as an axis and hands them out itself; the others enqueue a point's seeds only
        when they first propose it.)"""
        if self.space.seed_is_axis:
            return
        first: dict[str, FrozenTrial] = {}
        seeds: dict[str, set[int]] = {}
        for t in self.ot.get_trials(deepcopy=False):
            tid = t.user_attrs.get(TRIAL_ID)
            if tid is not None and holds(t):
                pid, seed = tid.rsplit("-s", 1)
                first.setdefault(pid, t)
                seeds.setdefault(pid, set()).add(int(seed))
        for pid, t in first.items():
            for s in sorted(set(range(self.study.search.seeds)) - seeds[pid]):
                params = {k: v for k, v in t.params.items() if k != SEED}
                self.ot.enqueue_trial(params, user_attrs={SEED: s, REPLICATE_OF: t.number})

    def _retry(self, tid: str, point: dict[str, Any]) -> None:
        """A failed trial runs again: its FAIL is kept, and a new trial (the newest, so the one
        `_holder` finds) holds its point x seed."""
        failed = self._holder(tid)
        self._adopt(tid, point).set_user_attr(RETRY_OF, failed.number)

    def remaining(self) -> int | None:
        """Point x seeds still to hand out, when the sampler knows (None: it decides as it goes)."""
        sampler = self.ot.sampler
        if isinstance(sampler, LatticeSampler):
            return sampler.remaining(self.ot)
        trials = self.ot.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return (
            max(0, self.study.search.n_points - len(_held_points(trials))) * self.study.search.seeds + waiting
        )

    def _adopt(self, tid: str, point: dict[str, Any]) -> optuna.Trial:
        params = {k: encode(v) for k, v in point.items() if k != SEED}
        if self.space.seed_is_axis:
            params[SEED] = point[SEED]
            self.ot.enqueue_trial(params)
        else:
            self.ot.enqueue_trial(params, user_attrs={SEED: point[SEED], REPLICATE_OF: -1})
        trial = self.ot.ask()
        self.space(trial)
        trial.set_user_attr(TRIAL_ID, tid)
        return trial

    def _holder(self, tid: str) -> FrozenTrial | None:
        """The newest trial holding `tid` (a retried trial's new one, not its FAIL)."""
        return next(
            (t for t in reversed(self.ot.get_trials(deepcopy=False))
             if t.user_attrs.get(TRIAL_ID) == tid and holds(t)),
            None,
        )  # fmt: skip

    # -- reading it --

    def phases(self) -> dict[str, str]:
        """{trial id: phase} of every COMPLETE trial."""
        return {
            t.user_attrs[TRIAL_ID]: t.user_attrs.get(PHASE)
            for t in self.ot.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TRIAL_ID in t.user_attrs
        }

    def export(self, path: Path) -> Path:
        """Write the Optuna study to a sqlite file (for `optuna-dashboard sqlite:///<path>`)."""
        path = Path(path).resolve()
        with storage.atomic_path(path) as tmp:
            tmp.unlink()  # RDBStorage creates its own database file
            rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
            optuna.copy_study(
                from_study_name=self.ot.study_name,
                from_storage=compat.storage_of(self.ot),
                to_storage=rdb,
                to_study_name=self.study.name,
            )
            rdb.engine.dispose()
        return path


# ---- a dry run -----------------------------------------------------------------------------------


def dry_run(study: Study) -> list[dict[str, Any]]:
    """The study's trials as its sampler proposes them, through the runner's `Ledger`.

    Every trial is told a constant objective, so TPE's picks here only illustrate.
    Returns typed points, `train.seed` included, in proposal order.
    """
    ledger = Ledger(study)
    points = []
    while (member := ledger.ask()) is not None:
        points.append(member.point)
        ledger.tell(member.trial_id, 0.0, None)
    return points
