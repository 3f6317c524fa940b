"""Study → Optuna: every point x seed exactly once, seeds as true replicates, a ledger that survives any restart."""

from __future__ import annotations

import math
import pickle
from collections import Counter, defaultdict

import numpy as np
import pytest

from grokstudy import points, search
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


def run_ledger(ledger: search.Ledger, at_once: bool, stop_after: int | None = None) -> list[dict]:
    """Ask the ledger for every member (as the runner's searcher does), all running at once or one
    by one, telling each a result; stop after `stop_after` asks (members then stay running)."""
    members, proposed = [], []
    while (stop_after is None or len(proposed) < stop_after) and (m := ledger.ask()) is not None:
        proposed.append(m.point)
        if at_once:
            members.append(m)
        else:
            ledger.tell(m.trial_id, 1.0, "grokking")
    for m in members if stop_after is None else []:
        ledger.tell(m.trial_id, 1.0, "grokking")
    return proposed


def point_and_seed(p: dict) -> tuple[str, int]:
    return points.point_id(p), p["train.seed"]


@pytest.mark.parametrize("at_once", [False, True], ids=["one at a time", "all running at once"])
def test_grid_ledger_hands_out_every_point_and_seed_exactly_once(at_once: bool) -> None:
    study = make_study()
    ledger = search.Ledger(study)
    proposed = run_ledger(ledger, at_once)
    expected = {(points.point_id(p), s) for p in points.grid_points(study) for s in range(2)}
    assert len(expected) == study.search.n_trials == 3 * 4 * 2 * 2
    assert sorted(map(point_and_seed, proposed)) == sorted(expected)
    assert ledger.ask() is None and ledger.finished() and ledger.remaining() == 0


def test_grid_points_are_the_product_of_the_axes_in_a_stable_order() -> None:
    study = make_study()
    proposed = points.grid_points(study)
    assert len(proposed) == study.search.n_points == 24
    assert proposed[0] == {
        "optimizer.weight_decay": 0.001,
        "data.fraction": 0.2,
        "optimizer.betas": (0.9, 0.98),
    }
    assert proposed[1]["optimizer.betas"] == (0.9, 0.999)  # the last axis varies fastest
    assert proposed == points.grid_points(make_study())
    assert points.grid_points(make_study(space={})) == [{}]


@pytest.mark.parametrize("sampler", ["sobol", "random", "tpe"])
def test_seeds_of_sampled_points_are_exact_replicates(sampler: str) -> None:
    study = make_study(sampler, CONTINUOUS_SPACE, seeds=3, num_samples=8)
    proposed = run_ledger(search.Ledger(study), at_once=True)
    seeds_of: dict[str, list[int]] = defaultdict(list)
    for p in proposed:
        seeds_of[points.point_id(p)].append(p["train.seed"])
    assert len(proposed) == study.search.n_trials == 24
    assert len(seeds_of) == 8
    assert all(sorted(seeds) == [0, 1, 2] for seeds in seeds_of.values())
    # A replicate repeats its point's hyperparameters exactly, and follows it.
    for first, *replicates in (proposed[i : i + 3] for i in range(0, 24, 3)):
        assert [{**r, "train.seed": 0} for r in replicates] == [first, first]
    assert isinstance(proposed[0]["model.width"], int)


def test_sobol_points_are_the_scrambled_sobol_sequence_on_a_log_scale() -> None:
    from scipy.stats import qmc

    space = {"optimizer.weight_decay": {"log": [1e-3, 10.0]}, "data.fraction": {"range": [0.1, 0.9]}}
    study = make_study("sobol", space, seeds=2, num_samples=16)
    proposed = search.dry_run(study)[::2]  # seed 0 of each point
    wd = np.array([p["optimizer.weight_decay"] for p in proposed])
    frac = np.array([p["data.fraction"] for p in proposed])
    assert ((wd >= 1e-3) & (wd <= 10)).all() and ((frac >= 0.1) & (frac <= 0.9)).all()
    unit = np.stack([np.log(wd / 1e-3) / math.log(1e4), (frac - 0.1) / 0.8], axis=1)
    np.testing.assert_allclose(unit, qmc.Sobol(2, scramble=True, seed=0).random(16), atol=1e-12)
    # Log scale: a uniform draw on [1e-3, 10] would put ~0.1% below 1e-2, Sobol on log puts a quarter.
    assert (wd < 1e-2).sum() == 4


def test_point_id_is_stable_and_seed_independent() -> None:
    point = {"optimizer.weight_decay": 0.1, "data.fraction": 0.4, "model.width": 128, "train.seed": 0}
    assert points.point_id(point) == points.point_id({**point, "train.seed": 2})
    assert points.point_id(point) == points.point_id(dict(reversed(point.items())))
    assert points.point_id(point) == points.point_id({**point, "model.width": 128.0})
    assert points.point_id(point) != points.point_id({**point, "data.fraction": 0.5})
    assert points.point_id(point) == "6f0681fd64"  # pinned: ids name MLflow runs and Parquet rows


def test_point_label_uses_short_names_and_puts_the_seed_last() -> None:
    point = {"train.seed": 1, "optimizer.weight_decay": 0.1, "data.fraction": 0.4, "model.layer_norm": True}
    assert points.point_label(point) == "wd=0.1 frac=0.4 model.layer_norm=True seed=1"
    assert (
        points.point_label({"optimizer.betas": (0.9, 0.98), "train.batch_size": None})
        == "betas=0.9,0.98 bs=full"
    )


def test_samplers_and_space_survive_pickling() -> None:
    for sampler in ("grid", "sobol", "random", "tpe"):
        study = make_study(sampler, GRID_SPACE if sampler == "grid" else CONTINUOUS_SPACE, num_samples=4)
        space, made = pickle.loads(pickle.dumps((search.optuna_space(study), search.make_sampler(study))))
        assert space == search.optuna_space(study) and type(made) is type(search.make_sampler(study))


@pytest.mark.parametrize("sampler", ["grid", "sobol", "tpe"])
def test_a_pickled_ledger_finishes_the_study_exactly_once(sampler: str) -> None:
    # What Tune saves with its experiment is a pickle of the ledger mid-study.
    study = make_study(sampler, GRID_SPACE if sampler == "grid" else CONTINUOUS_SPACE, num_samples=6)
    ledger = search.Ledger(study)
    first = run_ledger(ledger, at_once=False, stop_after=7)
    restored = pickle.loads(pickle.dumps(ledger))
    rest = run_ledger(restored, at_once=False)
    counts = Counter(map(point_and_seed, first + rest))
    assert len(counts) == study.search.n_trials and set(counts.values()) == {1}


def known(ledger_points: list[dict], status: str, tune_id: str = "t") -> dict[str, search.Known]:
    return {
        points.trial_id(p): search.Known(
            points.trial_id(p),
            tune_id,
            p,
            status,
            10.0 if status == "done" else None,
            "grokking" if status == "done" else None,
        )
        for p in ledger_points
    }


@pytest.mark.parametrize("sampler", ["grid", "sobol", "tpe"])
def test_reconcile_requeues_lost_members_adopts_unknown_ones_and_tells_what_finished(sampler: str) -> None:
    """The two halves of a Tune snapshot (experiment state, searcher) can differ after a kill."""
    study = make_study(sampler, GRID_SPACE if sampler == "grid" else CONTINUOUS_SPACE, num_samples=6)
    ledger = search.Ledger(study)
    snapshot = None
    asked = []
    for i in range(9):
        m = ledger.ask()
        asked.append(m.point)
        if i == 5:
            snapshot = pickle.dumps(ledger)  # the searcher's half, saved after 6 asks
    # Tune's half was saved after 4 asks, and says: two done, one failed, one running.
    # Asks 5 and 6 are lost (the ledger has them running; Tune never recorded them);
    # asks 7 to 9 happened after both halves and are forgotten by both.
    restored = pickle.loads(snapshot)
    tune_view = known(asked[:2], "done") | known(asked[2:3], "failed") | known(asked[3:4], "running")
    lost = restored.reconcile(tune_view)
    assert sorted(lost) == sorted(points.trial_id(p) for p in asked[4:6])
    # Telling a finished member again, or a result for a failed one, changes nothing and raises nothing.
    restored.tell(points.trial_id(asked[0]), 99.0, "memorization")
    restored.tell(points.trial_id(asked[2]), 1.0, "grokking")
    assert restored.phases()[points.trial_id(asked[0])] == "grokking"
    rest = run_ledger(restored, at_once=False)
    done = asked[:4] + rest
    counts = Counter(map(point_and_seed, done))
    assert len(counts) == study.search.n_trials and set(counts.values()) == {1}, counts


def test_reconcile_adopts_members_the_ledger_never_saw() -> None:
    # The experiment state (Tune's half) was written after the searcher's snapshot.
    study = make_study()
    early = search.Ledger(study)
    snapshot = pickle.dumps(early)
    later = [early.ask().point for _ in range(3)]
    restored = pickle.loads(snapshot)
    restored.reconcile(known(later[:1], "done") | known(later[1:], "running"))
    rest = run_ledger(restored, at_once=False)
    counts = Counter(map(point_and_seed, later + rest))
    assert len(counts) == study.search.n_trials and set(counts.values()) == {1}


@pytest.mark.parametrize("status", ["rerun", "running"])
def test_a_failed_member_tune_runs_again_gets_a_new_trial_that_its_result_completes(status: str) -> None:
    """`--retry-failed` ("rerun": a new Tune trial runs it), or a Tune snapshot that missed the
    failure ("running"): the FAIL stays, a new trial holds the point x seed, and its result
    completes that one."""
    study = make_study()
    ledger = search.Ledger(study)
    m = ledger.ask()
    ledger.fail(m.trial_id, "failed beyond run.max_failures retries")
    restored = pickle.loads(pickle.dumps(ledger))
    restored.reconcile(known([m.point], status))
    assert restored.retried == [m.trial_id]
    restored.tell(m.trial_id, 1.0, "grokking")
    mine = [t for t in restored.ot.trials if t.user_attrs.get(search.TRIAL_ID) == m.trial_id]
    assert [t.state.name for t in mine] == ["FAIL", "COMPLETE"]
    assert mine[1].user_attrs[search.RETRY_OF] == mine[0].number
    assert restored.phases() == {m.trial_id: "grokking"}
    restored.reconcile(known([m.point], "done"))  # a later resume: nothing runs again
    assert restored.retried == []


GROWTHS = {
    "grid: a seed": ("grid", GRID_SPACE, {"seeds": 3}),
    "grid: an axis value": (
        "grid",
        GRID_SPACE,
        {"space": GRID_SPACE | {"optimizer.weight_decay": {"log": [1e-3, 10.0], "points": 5}}},
    ),
    "boundary: a budget": ("boundary", GRID_SPACE, {"budget": 30}),
    "sobol: points and a seed": ("sobol", CONTINUOUS_SPACE, {"num_samples": 8, "seeds": 3}),
    "random: points": ("random", CONTINUOUS_SPACE, {"num_samples": 8}),
    "tpe: a seed": ("tpe", CONTINUOUS_SPACE, {"seeds": 3}),
}


@pytest.mark.parametrize("case", GROWTHS.values(), ids=GROWTHS.keys())
def test_a_grown_studys_ledger_keeps_every_finished_member_and_hands_out_only_new_ones(case) -> None:
    """What the runner's searcher does when a restored study grew: a ledger of the new study
    adopts every member Tune holds (`reconcile`), queues the new seeds of points it has, and
    then proposes only what the old study never ran."""
    sampler, space, grow = case
    old_extra = {"num_samples": 5} if sampler in ("sobol", "random", "tpe") else {}
    if sampler == "boundary":
        old_extra = {"budget": 12}
    old = make_study(sampler, space, seeds=2, **old_extra)
    ledger = search.Ledger(old)
    before = run_ledger(ledger, at_once=False)
    assert ledger.finished()
    grow = dict(grow)
    seeds = grow.pop("seeds", 2)
    new = make_study(sampler, grow.pop("space", space), seeds=seeds, **(old_extra | grow))
    grown = search.Ledger(new)
    grown.reconcile(known(before, "done"))
    grown.add_seeds()
    added = run_ledger(grown, at_once=False)
    assert added and grown.finished()
    assert not {point_and_seed(p) for p in added} & {point_and_seed(p) for p in before}
    everything = Counter(map(point_and_seed, before + added))
    assert set(everything.values()) == {1}
    by_point = Counter(pid for pid, _ in everything)
    if sampler != "boundary":  # the boundary sampler runs every seed only where phases meet
        assert set(by_point.values()) == {seeds}, "every point has every seed"
    if new.search.n_trials is not None:
        assert len(everything) == new.search.n_trials
    else:
        assert len(everything) <= new.search.budget
