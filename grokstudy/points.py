"""A study's points: who a trial is, what it is called, what its values are. Standard library only.

A point is the searched hyperparameters of a trial, `{dotted key: value}`, with
`train.seed` (`SEED`) for a point x seed. Its identity is a hash of its values in
their normal form (`config.value_key`, numbers as floats), so it is the same
whichever path typed the values (a YAML int, a Parquet float); it names the MLflow run,
the Parquet rows and the sampler's record of each trial (`trial_id`), and so is
pinned by a test: changing it orphans every stored study.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from grokstudy.config import LATTICE_SAMPLERS, SearchDim, Study, is_number, value_key

SEED = "train.seed"
"""The point key of a replicate's seed (0 .. search.seeds - 1)."""

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
    SEED: "seed",
}
"""Short names of common keys in labels (`wd=0.1 frac=0.4 seed=1`)."""


def point_id(point: dict[str, Any]) -> str:
    """A short stable hash of a point's hyperparameters; the same for all its seeds."""
    canonical = {k: _numbers_as_floats(value_key(v)) for k, v in point.items() if k != SEED}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _numbers_as_floats(v: Any) -> Any:
    # The hash reads JSON text, where 128 and 128.0 differ: numbers are written as floats.
    if isinstance(v, tuple):
        return [_numbers_as_floats(x) for x in v]
    return float(v) if is_number(v) else v


def trial_id(point: dict[str, Any]) -> str:
    """A trial's identity across retries, restores and packs: `<point_id>-s<seed>`."""
    return f"{point_id(point)}-s{point.get(SEED, 0)}"


def point_label(point: dict[str, Any]) -> str:
    """A human label, `wd=0.1 frac=0.4 seed=1`: short aliases for common keys, the seed last."""
    keys = [k for k in point if k != SEED] + ([SEED] if SEED in point else [])
    return " ".join(f"{ALIASES.get(k, k)}={value_text(point[k])}" for k in keys)


def value_text(v: Any) -> str:
    """A value as labels write it: 4 significant digits, `full` for a full batch, lists by commas."""
    if v is None:
        return "full"  # train.batch_size: None is the full batch, as the study file says it
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(value_text(x) for x in v)
    return str(v)


def grid_points(study: Study) -> list[dict[str, Any]]:
    """Every combination of the grid's axes (seeds excluded), the last axis varying fastest."""
    if study.search.sampler not in LATTICE_SAMPLERS:
        raise ValueError(f"grid_points needs a grid, and the {study.search.sampler!r} sampler has none")
    dims = study.search.space
    return [
        {d.key: v for d, v in zip(dims, combo, strict=True)}
        for combo in itertools.product(*(d.grid for d in dims))
    ]


def encode(v: Any) -> Any:
    """A value as one scalar: itself, or a non-scalar choice (betas) as its JSON text.
    (Optuna's categorical values must be scalars; Tune configs travel as JSON.)"""
    return v if is_scalar(v) else json.dumps(v)  # tuples as JSON lists, like lists


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def point_from_config(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    """The typed point (searched keys and `train.seed`) of a Tune config, Optuna params or a
    table row: decodes JSON-encoded choices and restores types (tuples for betas, ints for
    integer axes), so `study.trial(point)` is the trial that ran."""
    grid = study.search.sampler in LATTICE_SAMPLERS
    point = {d.key: _typed(d, config[d.key], grid) for d in study.search.space if d.key in config}
    if SEED in config:
        point[SEED] = int(config[SEED])
    return point


def _typed(dim: SearchDim, value: Any, grid: bool) -> Any:
    if grid or dim.is_listed:
        for c in dim.grid:
            if encode(c) == encode(value) or value_key(c) == value_key(value):
                return c
        raise ValueError(f"{dim.key}={value!r} is not a value of the study's axis")
    return int(value) if dim.integer else float(value)
