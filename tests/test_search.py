"""Study → Optuna: every point x seed exactly once, seeds as true replicates, a persistent study."""

from __future__ import annotations

import math
import pickle
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import optuna
import pytest

from grokstudy import search
from grokstudy.config import Study
from grokstudy.study import parse_study

BASE = {
    "name": "search-test",
    "task": {"op": "x+y", "p": 23},
    "model": {"kind": "mlp", "embed_dim": 16, "width": 64},
    "train": {"max_steps": 300, "eval_every": 50, "checkpoint_every": 100},
}
SMALL_GRID = {
    "optimizer.weight_decay": {"log": [1e-3, 10.0], "points": 3},
    "optimizer.betas": {"choice": [[0.9, 0.98], [0.9, 0.999]]},
}
GRID_SPACE = {
    "optimizer.weight_decay": {"log": [1e-3, 10.0], "points": 3},
    "data.fraction": {"range": [0.2, 0.8], "points": 4},
    "optimizer.betas": {"choice": [[0.9, 0.98], [0.9, 0.999]]},
}
CONTINUOUS_SPACE = {
    "optimizer.weight_decay": {"log": [1e-3, 10.0]},
    "data.fraction": {"range": [0.1, 0.9]},
    "model.width": {"range": [32, 128]},
    "optimizer.name": {"choice": ["adamw", "adam"]},
}


def make_study(
    sampler: str = "grid", space: dict | None = None, seeds: int = 2, run: dict | None = None, **extra
) -> Study:
    search_section = {"sampler": sampler, "space": GRID_SPACE if space is None else space, "seeds": seeds}
    return parse_study({**BASE, "search": search_section | extra, "run": run or {}})


def ask_all(study: Study, ot_study: optuna.Study, at_once: bool) -> list[dict]:
    """n_trials asks as the runner's searcher makes them: all running together, or one by one."""
    space = search.optuna_space(study)
    trials, points = [], []
    for _ in range(search.n_trials(study)):
        trial = ot_study.ask()
        points.append(search.point_from_config(study, space(trial)))
        if at_once:
            trials.append(trial)
        else:
            ot_study.tell(trial, 1.0)
    for trial in trials:
        ot_study.tell(trial, 1.0)
    return points


def point_and_seed(p: dict) -> tuple[str, int]:
    return search.point_id(p), p["train.seed"]


@pytest.mark.parametrize("at_once", [False, True], ids=["one at a time", "all running at once"])
def test_grid_sampler_proposes_every_point_and_seed_exactly_once(at_once: bool) -> None:
    study = make_study()
    ot_study = optuna.create_study(sampler=search.make_sampler(study))
    points = ask_all(study, ot_study, at_once)
    expected = {(search.point_id(p), s) for p in search.grid_points(study) for s in range(2)}
    assert len(expected) == search.n_trials(study) == 3 * 4 * 2 * 2
    assert Counter(map(point_and_seed, points)) == Counter(expected)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ot_study.trials)


def test_grid_points_are_the_product_of_the_axes_in_a_stable_order() -> None:
    study = make_study()
    points = search.grid_points(study)
    assert len(points) == search.n_points(study) == 24
    assert points[0] == {
        "optimizer.weight_decay": 0.001,
        "data.fraction": 0.2,
        "optimizer.betas": (0.9, 0.98),
    }
    assert points[1]["optimizer.betas"] == (0.9, 0.999)  # the last axis varies fastest
    assert points == search.grid_points(make_study())
    assert search.grid_points(make_study(space={})) == [{}]


@pytest.mark.parametrize("sampler", ["sobol", "random", "tpe"])
def test_seeds_of_sampled_points_are_exact_replicates(sampler: str) -> None:
    study = make_study(sampler, CONTINUOUS_SPACE, seeds=3, num_samples=8)
    ot_study = optuna.create_study(sampler=search.make_sampler(study))
    points = ask_all(study, ot_study, at_once=True)
    seeds_of: dict[str, list[int]] = defaultdict(list)
    for p in points:
        seeds_of[search.point_id(p)].append(p["train.seed"])
    assert len(points) == search.n_trials(study) == 24
    assert len(seeds_of) == 8
    assert all(sorted(seeds) == [0, 1, 2] for seeds in seeds_of.values())
    # A replicate repeats its point's hyperparameters exactly, and follows it.
    for first, *replicates in (points[i : i + 3] for i in range(0, 24, 3)):
        assert [{**r, "train.seed": 0} for r in replicates] == [first, first]
    assert isinstance(points[0]["model.width"], int)


def test_sobol_points_are_the_scrambled_sobol_sequence_on_a_log_scale() -> None:
    from scipy.stats import qmc

    space = {"optimizer.weight_decay": {"log": [1e-3, 10.0]}, "data.fraction": {"range": [0.1, 0.9]}}
    study = make_study("sobol", space, seeds=2, num_samples=16)
    points = search.dry_run(study)[::2]  # seed 0 of each point
    wd = np.array([p["optimizer.weight_decay"] for p in points])
    frac = np.array([p["data.fraction"] for p in points])
    assert ((wd >= 1e-3) & (wd <= 10)).all() and ((frac >= 0.1) & (frac <= 0.9)).all()
    unit = np.stack([np.log(wd / 1e-3) / math.log(1e4), (frac - 0.1) / 0.8], axis=1)
    np.testing.assert_allclose(unit, qmc.Sobol(2, scramble=True, seed=0).random(16), atol=1e-12)
    # Log scale: a uniform draw on [1e-3, 10] would put ~0.1% below 1e-2, Sobol on log puts a quarter.
    assert (wd < 1e-2).sum() == 4


def test_point_id_is_stable_and_seed_independent() -> None:
    point = {"optimizer.weight_decay": 0.1, "data.fraction": 0.4, "model.width": 128, "train.seed": 0}
    assert search.point_id(point) == search.point_id({**point, "train.seed": 2})
    assert search.point_id(point) == search.point_id(dict(reversed(point.items())))
    assert search.point_id(point) == search.point_id({**point, "model.width": 128.0})
    assert search.point_id(point) != search.point_id({**point, "data.fraction": 0.5})
    assert search.point_id(point) == "6f0681fd64"  # pinned: ids name MLflow runs and Parquet rows


def test_point_label_uses_short_names_and_puts_the_seed_last() -> None:
    point = {"train.seed": 1, "optimizer.weight_decay": 0.1, "data.fraction": 0.4, "model.layer_norm": True}
    assert search.point_label(point) == "wd=0.1 frac=0.4 model.layer_norm=True seed=1"
    assert (
        search.point_label({"optimizer.betas": (0.9, 0.98), "train.batch_size": None})
        == "betas=0.9,0.98 bs=full"
    )


def test_storage_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert search.optuna_storage_url(make_study(), Path("runs/x")) == f"sqlite:///{tmp_path}/runs/x/optuna.db"
    relative = make_study(run={"optuna_storage": "sqlite:///db/optuna.db"})
    assert search.optuna_storage_url(relative, Path("runs/x")) == f"sqlite:///{tmp_path}/db/optuna.db"
    server = make_study(run={"optuna_storage": "postgresql://optuna@db:5432/optuna"})
    assert search.optuna_storage_url(server, Path("runs/x")) == "postgresql://optuna@db:5432/optuna"


def test_persisted_study_reloads_by_name_and_a_resumed_grid_finishes_exactly_once(tmp_path: Path) -> None:
    study = make_study(space=SMALL_GRID, seeds=1)
    space = search.optuna_space(study)

    def open_study() -> optuna.Study:
        return optuna.create_study(
            study_name=search.study_name(study),
            storage=search.optuna_storage(study, tmp_path),
            sampler=search.make_sampler(study),
            load_if_exists=True,
        )

    first = open_study()
    done = []
    for _ in range(4):
        trial = first.ask()
        done.append(search.point_from_config(study, space(trial)))
        first.tell(trial, 1.0)

    reloaded = optuna.load_study(study_name=study.name, storage=search.optuna_storage_url(study, tmp_path))
    assert [search.point_from_config(study, t.params) for t in reloaded.trials] == done

    resumed = open_study()
    rest = []
    for _ in range(search.n_trials(study) - 4):
        trial = resumed.ask()
        rest.append(search.point_from_config(study, space(trial)))
        resumed.tell(trial, 1.0)
    assert sorted(map(search.point_id, done + rest)) == sorted(
        map(search.point_id, search.grid_points(study))
    )


@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_trials_lost_with_a_crashed_driver_are_requeued_and_run_once(sampler: str) -> None:
    study = make_study(sampler, SMALL_GRID if sampler == "grid" else CONTINUOUS_SPACE, seeds=3, num_samples=4)
    ot_study = optuna.create_study(sampler=search.make_sampler(study))
    space = search.optuna_space(study)
    n = search.n_trials(study)
    # Tune's last searcher checkpoint knew trials 0-4 (0-2 finished, 3-4 running);
    # trials 5-7 were asked after it and die with the driver, RUNNING for ever,
    # the last one even before its space call.
    asked = []
    for i in range(8):  # OptunaSearch.suggest: ask, then run the space on the new trial
        asked.append(ot_study.ask())
        if i < 7:
            space(asked[-1])
    for trial in asked[:3]:
        ot_study.tell(trial, 1.0)

    assert search.requeue_lost_trials(study, ot_study, known={0, 1, 2, 3, 4}) == [5, 6, 7]

    for trial in asked[3:5]:  # the restored Tune resumes the trials it knew
        ot_study.tell(trial, 1.0)
    for _ in range(n - 5):  # and asks for the rest
        trial = ot_study.ask()
        space(trial)
        ot_study.tell(trial, 1.0)
    done = [t for t in ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # The grid keeps the seed as a parameter, the other samplers as a user attribute.
    points = [search.point_from_config(study, t.user_attrs | t.params) for t in done]
    counts = Counter(map(point_and_seed, points))
    assert len(done) == n and set(counts.values()) == {1}
    assert len({pid for pid, _ in counts}) == search.n_points(study)


def test_samplers_and_space_survive_pickling() -> None:
    # Tune checkpoints OptunaSearch (space, sampler, storage) with pickle.
    for sampler in ("grid", "sobol", "random", "tpe"):
        study = make_study(sampler, GRID_SPACE if sampler == "grid" else CONTINUOUS_SPACE, num_samples=4)
        space, made = pickle.loads(pickle.dumps((search.optuna_space(study), search.make_sampler(study))))
        assert space == search.optuna_space(study) and type(made) is type(search.make_sampler(study))


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_ray_optuna_search_drives_the_space_across_a_driver_restart(tmp_path: Path, sampler: str) -> None:
    """The wiring the runner uses, through Ray Tune's own OptunaSearch (no cluster needed)."""
    from ray.tune.search.optuna import OptunaSearch

    space = (
        SMALL_GRID
        if sampler == "grid"
        else CONTINUOUS_SPACE | {"optimizer.betas": SMALL_GRID["optimizer.betas"]}
    )
    study = make_study(sampler, space, seeds=2, num_samples=6)
    searcher = OptunaSearch(
        space=search.optuna_space(study),
        metric="objective",
        mode="min",
        sampler=search.make_sampler(study),
        study_name=search.study_name(study),
        storage=search.optuna_storage(study, tmp_path),
        points_to_evaluate=search.points_to_evaluate(study) or None,
    )
    n = search.n_trials(study)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(n // 2)}
    searcher.on_trial_complete("t0", {"objective": 100.0})
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune's experiment checkpoint keeps

    restored = OptunaSearch()
    restored.restore(str(tmp_path / "searcher.pkl"))
    configs |= {f"t{i}": restored.suggest(f"t{i}") for i in range(n // 2, n)}
    for i in range(1, n):
        restored.on_trial_complete(f"t{i}", {"objective": float(i)})

    points = [search.point_from_config(study, c) for c in configs.values()]
    assert all(isinstance(c["optimizer.betas"], tuple) for c in configs.values())
    counts = Counter(map(point_and_seed, points))
    assert len(counts) == n and set(counts.values()) == {1}
    assert {s for _, s in counts} == {0, 1}
    stored = optuna.load_study(study_name=study.name, storage=search.optuna_storage_url(study, tmp_path))
    assert [t.state.name for t in stored.trials] == ["COMPLETE"] * n
