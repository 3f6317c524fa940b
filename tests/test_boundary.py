"""The boundary sampler (issue 12) through the study's real Optuna ledger, on synthetic phase maps
(a pure function of the point, no training): the diagram of a 17 x 17 grid from <= 40% of it."""

from __future__ import annotations

import pickle
from collections import Counter

import pyarrow as pa
import pytest
import refine_sim

from grokstudy import points, refine, results, search
from grokstudy.config import Study
from grokstudy.records import EvalRecord, Outcome, TrialHistory
from grokstudy.study import parse_study

MAPS = ("disc", "band", "staircase")


def boundary_study(n: int = 17, seeds: int = 2, **search_extra) -> Study:
    return parse_study(
        {
            "name": "boundary",
            "task": {"op": "x+y", "p": 23},
            "search": {
                "sampler": "boundary",
                "space": {
                    "optimizer.weight_decay": {"log": [1e-3, 10.0], "points": n},
                    "data.fraction": {"range": [0.1, 0.9], "points": n},
                },
                "seeds": seeds,
                **search_extra,
            },
        }
    )


def cell_of(study: Study, point: dict) -> tuple[int, ...]:
    return tuple(d.grid.index(point[d.key]) for d in study.search.space)


def run(study: Study, labels, batch: int, ledger: search.Ledger | None = None, stop_after: int | None = None):
    """Drive the ledger as the runner would with `batch` slots: results arrive staggered (the older
    half of the running trials report each round). Returns (ledger, handed-out points in order)."""
    ledger = ledger or search.Ledger(study)
    running: list[search.Member] = []
    handed: list[dict] = []
    while stop_after is None or len(handed) < stop_after:
        while len(running) < batch and (m := ledger.ask()) is not None:
            running.append(m)
            handed.append(m.point)
        if not running:
            assert ledger.finished()
            break
        for m in running[: max(1, (len(running) + 1) // 2)]:
            ledger.tell(m.trial_id, 0.0, labels(cell_of(study, m.point))[m.point["train.seed"]])
        running = running[max(1, (len(running) + 1) // 2) :]
    return ledger, handed


def inferred_map(study: Study, ledger: search.Ledger) -> refine.Inferred:
    lattice = refine.lattice_of(study.search.space)
    observed: dict[tuple[int, ...], list[str]] = {}
    for t in ledger.ot.trials:
        if t.state.name == "COMPLETE":
            point = points.point_from_config(study, t.params)
            observed.setdefault(cell_of(study, point), []).append(t.user_attrs[search.PHASE])
    return refine.infer(lattice, observed)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MAPS)
def test_the_boundary_of_a_map_is_found_from_at_most_40_percent_of_the_grid(name: str, batch: int) -> None:
    study = boundary_study()
    truth = refine_sim.synthetic_map(name, 17)
    ledger, handed = run(study, refine_sim.seeds_agree(truth, 2), batch)
    assert len(set(map(points.trial_id, handed))) == len(handed), "each point x seed at most once"
    seeds = Counter(cell_of(study, p) for p in handed)
    assert len(seeds) <= 0.40 * 289, len(seeds)
    lattice = refine.Lattice((17, 17), (True, True))
    edge = refine_sim.boundary_cells(lattice, truth)
    assert all(n == 2 for c, n in seeds.items() if c in edge), "a boundary point runs all its seeds"
    assert any(n == 1 for n in seeds.values()), "one seed settles a point inside a region"
    assert len(handed) <= 0.30 * 2 * 289, len(handed)
    inferred = inferred_map(study, ledger)
    agree = sum(inferred.phase[c] == truth(c) for c in lattice.cells())
    assert agree >= 0.97 * 289, agree


def test_seeds_that_disagree_near_the_boundary_are_resolved_by_sampling_not_guessing() -> None:
    study = boundary_study()
    lattice = refine.lattice_of(study.search.space)
    truth = refine_sim.synthetic_map("staircase", 17)
    labels = refine_sim.seeds_disagree_near_boundary(lattice, truth, 2)
    ledger, _ = run(study, labels, batch=8)
    inferred = inferred_map(study, ledger)
    disagreeing = [c for c in lattice.cells() if inferred.measured[c] and inferred.confidence[c] < 1]
    assert disagreeing
    edge = refine_sim.boundary_cells(lattice, truth)
    plan_neighbours = {
        c: [
            tuple(c[:a]) + (c[a] + d,) + tuple(c[a + 1 :])
            for a in range(2)
            for d in (-1, 1)
            if 0 <= c[a] + d < 17
        ]
        for c in disagreeing
    }
    for c in disagreeing:
        for nb in plan_neighbours[c]:
            if nb in edge:
                assert inferred.measured[nb], f"{nb} next to disagreeing {c} was guessed"


def test_a_resumed_boundary_study_continues_without_repeating_or_skipping_a_point() -> None:
    study = boundary_study(n=9)
    truth = refine_sim.synthetic_map("disc", 9)
    labels = refine_sim.seeds_agree(truth, 2)
    whole, whole_points = run(study, labels, batch=4)
    half, first = run(study, labels, batch=1, stop_after=20)
    restored = pickle.loads(pickle.dumps(half))  # what Tune's snapshot holds
    # The driver died with its running trials: Tune restores none of them (they were lost).
    restored.reconcile({})
    _, rest = run(study, labels, batch=4, ledger=restored)
    done = Counter(points.trial_id(p) for p in first + rest)
    lost = len(first) - sum(1 for t in half.ot.trials if t.state.name == "COMPLETE")
    assert max(done.values()) <= 2 and sum(n == 2 for n in done.values()) <= lost, (
        "only lost trials run again"
    )
    complete = Counter(
        t.user_attrs[search.TRIAL_ID] for t in restored.ot.trials if t.state.name == "COMPLETE"
    )
    assert set(complete.values()) == {1}
    assert inferred_map(study, restored).phase.tolist() == inferred_map(study, whole).phase.tolist()


def test_a_budget_stops_the_sampler_and_facets_are_refined_apart() -> None:
    capped = boundary_study(n=9, budget=20)
    ledger, handed = run(capped, refine_sim.seeds_agree(refine_sim.synthetic_map("band", 9), 2), batch=4)
    assert len(handed) == 20 and ledger.finished()
    faceted = parse_study(
        {
            "name": "facets",
            "search": {
                "sampler": "boundary",
                "space": {
                    "optimizer.weight_decay": {"log": [1e-3, 10.0], "points": 9},
                    "data.fraction": {"range": [0.1, 0.9], "points": 9},
                    "optimizer.name": {"choice": ["adamw", "adam"]},
                },
                "seeds": 1,
            },
        }
    )
    disc, band = refine_sim.synthetic_map("disc", 9), refine_sim.synthetic_map("band", 9)

    def labels(cell):
        return [(disc if cell[2] == 0 else band)(cell[:2])]

    ledger, handed = run(faceted, labels, batch=4)
    inferred = inferred_map(faceted, ledger)
    for c in refine.lattice_of(faceted.search.space).cells():
        assert inferred.phase[c] == labels(c)[0]


def test_cells_table_holds_the_whole_grid_with_measured_and_inferred_cells() -> None:
    study = boundary_study(n=9)
    truth = refine_sim.synthetic_map("disc", 9)
    ledger, handed = run(study, refine_sim.seeds_agree(truth, 2), batch=4)
    histories = [
        TrialHistory(
            trial_id=points.trial_id(p),
            point=p,
            cfg=study.trial(p),
            records=(EvalRecord(0, 1.0, 0.0, 1.0, 0.0, 1.0),),
            outcome=Outcome("memorization", 0, None, None, 0.0, "budget"),
        )
        for p in handed
    ]
    trials, _ = results.build_tables(study, histories)
    # The phases the study would have written (build_tables classifies curves; here they are the map's).
    phases = [truth(cell_of(study, points.point_from_config(study, r))) for r in trials.to_pylist()]
    trials = trials.set_column(trials.schema.get_field_index("phase"), "phase", pa.array(phases))
    cells = results.build_cells(study, trials)
    assert cells.num_rows == 81
    rows = cells.to_pylist()
    seeds = Counter(cell_of(study, p) for p in handed)
    assert sum(r["measured"] for r in rows) == len(seeds)
    assert all(r["seeds"] == seeds.get(cell_of(study, r), 0) for r in rows)
    assert {r["seeds"] for r in rows if r["measured"]} == {1, 2}
    for r in rows:
        assert r["phase"] == truth(cell_of(study, r))
    from grokstudy import figures

    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay", cells=cells)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not trained: inferred from its neighbours" in legend
    dotted = [p for p in fig.axes[0].patches if p.get_hatch() == "...."]
    assert len(dotted) == 81 - len(seeds)
    counts = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "count"]
    assert counts == ["1"] * sum(n == 1 for n in seeds.values()), "a one-seed cell says so"
    assert "corner number: seeds in a cell with fewer than 2" in fig.legends[0].get_title().get_text()
