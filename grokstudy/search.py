"""Study → Optuna: search space, sampler and storage. The only module that imports optuna.

Checked against optuna 5.0.0, and against how ray 2.60.0's
`ray.tune.search.optuna.OptunaSearch` drives it (this module never imports ray):
OptunaSearch calls `study.ask()` once per Tune trial, runs our define-by-run
`space` on the new trial, hands the returned dict to Tune as the trial's config,
and `tell`s the trial when Tune completes it. It pickles itself (space, sampler,
storage) into Tune's experiment checkpoint, so everything here pickles.

One Tune trial = one Optuna trial = one training run = a point and a seed.
A point is the searched hyperparameters; seeds are replicates of a point
(`train.seed` = 0 .. seeds-1, nothing else differs), so a phase-diagram cell
can report how many seeds agree:

- grid: `train.seed` is one more axis of the grid. GridSampler proposes every
  point x seed exactly once (see `_GridSampler`).
- sobol, random, tpe: the sampler proposes a point on a fresh trial, which
  trains seed 0; in the same call the space enqueues seeds 1 .. seeds-1 with
  the very same parameters. Optuna pops its queue (kept in the storage) before
  it samples anything new, so the next seeds-1 trials are those replicates and
  num_samples x seeds trials are exactly num_samples points with all their
  seeds, however many run at once. The seed never enters a sampler's space:
  Sobol's dimensions and TPE's model see only hyperparameters.

A non-scalar choice (`optimizer.betas: {choice: [[0.9, 0.98], ...]}`) is
stored in Optuna as its JSON text, because Optuna's categorical values must be
None, bool, int, float or str; the space returns the decoded value to Tune, and
`point_from_config` turns any config back into typed values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from grokstudy.config import SearchDim, Study

# grokstudy prints its own progress; Optuna's per-trial INFO lines would interleave with it.
optuna.logging.set_verbosity(optuna.logging.WARNING)

SEED = "train.seed"
REPLICATE_OF = "grokstudy.replicate_of"
"""User attribute of an enqueued replicate: the number of the trial that proposed its point."""


# ---- counting ------------------------------------------------------------------------------------


def grid_points(study: Study) -> list[dict[str, Any]]:
    """Every combination of the grid's axes (seeds excluded), the last axis varying fastest."""
    if study.search.sampler != "grid":
        raise ValueError(f"grid_points needs the grid sampler, not {study.search.sampler!r}")
    dims = study.search.space
    return [
        {d.key: v for d, v in zip(dims, combo, strict=True)}
        for combo in itertools.product(*(d.grid for d in dims))
    ]


def n_points(study: Study) -> int:
    """Distinct hyperparameter points: the grid's size, or num_samples for the other samplers."""
    if study.search.sampler == "grid":
        return math.prod(len(d.grid) for d in study.search.space)
    assert study.search.num_samples is not None, "study.py requires num_samples for this sampler"
    return study.search.num_samples


def n_trials(study: Study) -> int:
    """Training runs in the study: points x seeds (Tune's num_samples)."""
    return n_points(study) * study.search.seeds


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
    grid = study.search.sampler == "grid"
    distributions: dict[str, BaseDistribution] = {}
    decode: dict[str, dict[str, Any]] = {}
    for dim in study.search.space:
        distributions[dim.key] = _distribution(dim, grid)
        table = {_encode(v): v for v in (dim.choice or ()) if not _is_scalar(v)}
        if table:
            decode[dim.key] = table
    return SearchSpace(distributions, decode, study.search.seeds, seed_is_axis=grid)


def _distribution(dim: SearchDim, grid: bool) -> BaseDistribution:
    if grid or dim.values is not None or dim.choice is not None:
        return CategoricalDistribution([_encode(v) for v in dim.grid])
    lo, hi = dim.log or dim.range
    log = dim.log is not None
    if dim.integer:
        return IntDistribution(math.ceil(lo), math.floor(hi), log=log)
    return FloatDistribution(lo, hi, log=log)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _encode(v: Any) -> Any:
    return v if _is_scalar(v) else json.dumps(_plain(v))


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def points_to_evaluate(study: Study) -> list[dict[str, Any]]:
    """Points to enqueue before the sampler starts: none.

    Every sampler proposes its own points (the grid through GridSampler) and
    replicates are enqueued by `SearchSpace` as points are proposed, so there
    is nothing to warm-start. Kept so a runner may pass it to OptunaSearch.
    """
    return []


# ---- samplers ------------------------------------------------------------------------------------


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its auto-stop.

    Exactly once (optuna 5.0, `samplers/_grid.py`, `before_trial`): trial
    number k < grid size is given grid point k, so the first n asks of a study
    cover the grid exactly once however many of them run at the same time;
    OptunaSearch asks from the single Tune driver, one ask at a time. Optuna's
    warning that concurrent workers "occasionally suggest the same parameter
    configuration" concerns trial numbers >= n (several processes sharing one
    study, or a study resumed with extra trials): there a point is drawn at
    random among those neither finished nor running, and repeats only once all
    unfinished points are running. Points whose trials a crashed driver lost
    (RUNNING for ever in the storage) are put back by `requeue_lost_trials`.

    Tune, not the sampler, decides when the study ends (num_samples = n_trials).
    GridSampler's `after_trial` calls `study.stop()` after the last point, which
    raises RuntimeError outside `study.optimize` ("supposed to be invoked inside
    an objective function"); OptunaSearch would log that as a warning on every
    grid study.
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None

    def grid_point(self, grid_id: int) -> dict[str, Any]:
        """The parameters GridSampler gives `grid_id` (a seeded shuffle of the product)."""
        return dict(zip(self._param_names, self._all_grids[grid_id], strict=True))


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
        # QMCSampler imports scipy lazily at its first sample, inside OptunaSearch's
        # define-by-run call, which Tune warns about when it takes over a second.
        # scipy comes with mlflow; it is no direct dependency of grokstudy.
        import scipy.stats.qmc  # noqa: F401

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, BaseDistribution]:
        return dict(self._space)


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of `search.sampler`, seeded by `search.sampler_seed`.

    - grid: `_GridSampler` over every axis plus `train.seed`.
    - sobol: the first num_samples points of a scrambled Sobol sequence (`_SobolSampler`).
    - random: independent uniform / log-uniform draws.
    - tpe: multivariate TPE minimizing `search.objective`; its first
      10 x seeds trials (about 10 points with their replicates) are random.
    """
    s = study.search
    if s.sampler == "grid":
        space = {d.key: [_encode(v) for v in d.grid] for d in s.space}
        return _GridSampler({**space, SEED: list(range(s.seeds))}, seed=s.sampler_seed)
    if s.sampler == "sobol":
        return _SobolSampler(optuna_space(study).distributions, seed=s.sampler_seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.sampler_seed, multivariate=True, n_startup_trials=10 * s.seeds
        )
    raise AssertionError(f"study.py admits no sampler {s.sampler!r}")


# ---- storage -------------------------------------------------------------------------------------


def study_name(study: Study) -> str:
    """The Optuna study's name in its storage: the study's name, so a resumed run continues it."""
    return study.name


def optuna_storage_url(study: Study, out_dir: Path) -> str:
    """`run.optuna_storage` (any SQLAlchemy URL; a relative sqlite path made absolute),
    else `sqlite:///<absolute out_dir>/optuna.db`. Open it with `optuna-dashboard <url>`."""
    url = getattr(study.run, "optuna_storage", None)
    if url is None:
        return f"sqlite:///{(Path(out_dir) / 'optuna.db').resolve()}"
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/") and url != prefix:
        return f"{prefix}{Path(url[len(prefix) :]).resolve()}"
    return url


def optuna_storage(study: Study, out_dir: Path) -> optuna.storages.BaseStorage:
    """The RDB storage behind `optuna_storage_url` (what `OptunaSearch(storage=...)` takes)."""
    url = optuna_storage_url(study, out_dir)
    if url.startswith("sqlite:////"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def requeue_lost_trials(study: Study, ot_study: optuna.Study, known: Collection[int]) -> list[int]:
    """After a driver crash, queue again what it lost, so every point x seed still runs once.

    Tune checkpoints its searcher every so often; Optuna trials asked after the
    last checkpoint stay RUNNING in the storage and the restored searcher never
    tells them. Call this on resume, before Tune asks again, with `known`: the
    Optuna trial numbers the restored searcher holds
    (`{t.number for t in searcher._ot_trials.values()}`). Every other RUNNING
    trial is marked FAIL, and the point x seeds it leaves missing are enqueued,
    to be popped before anything new is sampled. Returns the lost numbers.
    """
    lost = [
        t
        for t in ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.number not in known
    ]
    numbers = [t.number for t in lost]
    for t in lost:
        ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if study.search.sampler == "grid":
        sampler = make_sampler(study)  # the same seed shuffles the grid the same way
        assert isinstance(sampler, _GridSampler)
        for t in lost:
            # A trial lost before its suggest calls ended has only its grid id or queued values.
            params = t.system_attrs.get("fixed_params") or sampler.grid_point(t.system_attrs["grid_id"])
            ot_study.enqueue_trial(params)
        return numbers
    keys = set(optuna_space(study).distributions)
    trials = ot_study.get_trials(deepcopy=False)
    for group in dict.fromkeys(t.user_attrs.get(REPLICATE_OF, t.number) for t in lost):
        members = [t for t in trials if group in (t.number, t.user_attrs.get(REPLICATE_OF))]
        complete = [p for t in members if set(p := t.system_attrs.get("fixed_params") or t.params) == keys]
        if not complete:
            continue  # a fresh point lost before it had its values: a new point takes its place
        # Only the lost are missing: a trial that errored under Tune is Tune's to retry.
        alive = {t.user_attrs.get(SEED) for t in members if t.number not in numbers}
        for seed in range(study.search.seeds):
            if seed not in alive:
                ot_study.enqueue_trial(complete[0], user_attrs={SEED: seed, REPLICATE_OF: group})
    return numbers


# ---- points --------------------------------------------------------------------------------------


def point_from_config(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    """The typed point (searched keys and `train.seed`) of a Tune config or Optuna params.

    Decodes JSON-encoded choices and restores types (tuples for betas, ints for
    integer axes), so `study.trial(point)` is the trial that ran.
    """
    grid = study.search.sampler == "grid"
    point: dict[str, Any] = {}
    for dim in study.search.space:
        if dim.key in config:
            point[dim.key] = _typed(dim, config[dim.key], grid)
    if SEED in config:
        point[SEED] = int(config[SEED])
    return point


def _typed(dim: SearchDim, value: Any, grid: bool) -> Any:
    if grid or dim.values is not None or dim.choice is not None:
        for c in dim.grid:
            if _encode(c) == _encode(value) or c == value:
                return c
        raise ValueError(f"{dim.key}={value!r} is not a value of the study's axis")
    return int(value) if dim.integer else float(value)


def point_id(point: dict[str, Any]) -> str:
    """A short stable hash of a point's hyperparameters; the same for all its seeds."""
    canonical = {k: _canonical(v) for k, v in point.items() if k != SEED}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _canonical(v: Any) -> Any:
    # Numbers as floats: 128 and 128.0 are the same point whichever path typed them.
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    return str(v)


ALIASES = {
    "optimizer.weight_decay": "wd",
    "data.fraction": "frac",
    "optimizer.lr": "lr",
    "optimizer.name": "opt",
    "optimizer.betas": "betas",
    "optimizer.momentum": "mom",
    "model.init_scale": "init",
    "model.width": "width",
    "model.embed_dim": "d",
    "model.depth": "depth",
    "model.heads": "heads",
    "model.kind": "model",
    "task.op": "op",
    "task.p": "p",
    "train.batch_size": "bs",
    "train.max_steps": "steps",
    "train.seed": "seed",
}


def point_label(point: dict[str, Any]) -> str:
    """A human label, `wd=0.1 frac=0.4 seed=1`: short aliases for common keys, the seed last."""
    keys = [k for k in point if k != SEED] + ([SEED] if SEED in point else [])
    return " ".join(f"{ALIASES.get(k, k)}={_fmt(point[k])}" for k in keys)


def _fmt(v: Any) -> str:
    if v is None:
        return "full"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


# ---- a dry run -----------------------------------------------------------------------------------


def dry_run(study: Study) -> list[dict[str, Any]]:
    """The study's trials as its sampler proposes them, from an in-memory Optuna study.

    n_trials asks through the same space and sampler the runner uses; every
    trial is told a constant objective, so TPE's picks here only illustrate.
    Returns typed points, `train.seed` included, in proposal order.
    """
    ot_study = optuna.create_study(sampler=make_sampler(study), direction="minimize")
    space = optuna_space(study)
    points = []
    for _ in range(n_trials(study)):
        trial = ot_study.ask()
        points.append(point_from_config(study, space(trial)))
        ot_study.tell(trial, 0.0)
    return points
