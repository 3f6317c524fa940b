"""refine.py on synthetic phase maps: the diagram from a fraction of the cells, ties, facets, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from refine_sim import (
    GENERIC,
    SYNTHETIC_MAPS,
    boundary_cells,
    seeds_agree,
    seeds_disagree_near_boundary,
    seeds_noisy,
    simulate,
    synthetic_map,
)

from grokstudy.phases import TIE, vote
from grokstudy.refine import (
    Lattice,
    coarse_cells,
    coarse_stride,
    finest_stride,
    infer,
    is_resolved,
    next_cells,
    seeds_to_add,
)

GRID = Lattice((17, 17), (True, True))
MAPS = sorted(SYNTHETIC_MAPS)


def agreement(lattice: Lattice, truth, observed) -> float:
    """Share of cells where the inferred phase is the majority of the truth's seeds."""
    phase = infer(lattice, observed).phase
    return sum(phase[c] == vote(truth(c)).phase for c in lattice.cells()) / lattice.size


def test_the_vote_is_the_most_voted_phase_and_a_tie_is_a_tie_not_the_first_label():
    def v(labels):
        result = vote(labels)
        return result.phase, result.share

    assert v(["grokking", "grokking"]) == ("grokking", 1.0)
    assert v(["grokking", "memorization", "grokking"]) == ("grokking", pytest.approx(2 / 3))
    assert v(["grokking", "memorization"]) == (TIE, 0.5)
    assert v(["memorization", "grokking"]) == (TIE, 0.5)
    assert v(["a", "b", "c"]) == (TIE, pytest.approx(1 / 3))
    assert v([]) == (TIE, 0.0)
    # The tied phases come in PHASES order whatever order the seeds reported in.
    assert vote(["memorization", "grokking", "confusion", "grokking", "memorization"]).tied == (
        "grokking",
        "memorization",
    )
    assert vote(["memorization", "grokking", "grokking"]).count == 2


def test_coarse_stride_keeps_at_least_four_intervals():
    assert [coarse_stride(n) for n in (1, 2, 5, 8, 9, 16, 17, 33)] == [1, 1, 1, 1, 2, 2, 4, 8]


def test_coarse_cells_are_a_stride_4_grid_on_17x17_with_corners_first_and_any_prefix_spread():
    cells = coarse_cells(GRID)
    axis = (0, 4, 8, 12, 16)
    assert sorted(cells) == [(i, j) for i in axis for j in axis]
    assert set(cells[:4]) == {(0, 0), (0, 16), (16, 0), (16, 16)}
    assert set(cells[:9]) == {(i, j) for i in (0, 8, 16) for j in (0, 8, 16)}
    assert len(coarse_cells(Lattice((9, 9), (True, True)))) == 25  # stride 2
    ten = coarse_cells(Lattice((3, 10), (True, True)))  # stride 2 on 10 points, the last index kept
    assert {c[1] for c in ten} == {0, 2, 4, 6, 8, 9}


def test_the_hierarchy_stops_at_a_quarter_of_the_coarse_stride_beyond_64_points():
    assert [finest_stride(n) for n in (2, 9, 17, 33, 64, 65, 129)] == [1, 1, 1, 1, 1, 4, 8]


def test_at_33x33_the_hierarchy_trains_an_eighth_of_the_cells_for_the_whole_diagram():
    # Stride 8, 4, 2, 1 where labels differ: 123 of 1089 cells for a disc, every cell right.
    lattice = Lattice((33, 33), (True, True))
    truth = seeds_agree(synthetic_map("disc", 33, GENERIC), seeds=2)
    sim = simulate(lattice, truth, seeds=2, batch=8)
    assert is_resolved(lattice, sim.observed, (), seeds=2)
    assert agreement(lattice, truth, sim.observed) == 1.0
    assert sim.trained <= 0.12 * lattice.size


@pytest.mark.parametrize("flip", [0.0, 0.1])
def test_at_65x65_the_stride_4_grid_is_trained_and_only_unsure_cells_between_phases_below_it(flip):
    lattice = Lattice((65, 65), (True, True))
    phase_of = synthetic_map("disc", 65, GENERIC)
    truth = seeds_noisy(lattice, phase_of, seeds=2, flip=flip)
    sim = simulate(lattice, truth, seeds=2, batch=8)
    assert is_resolved(lattice, sim.observed, (), seeds=2)
    assert sim.trained <= 0.04 * lattice.size  # 139 (157 with noise) of 4225
    probes = [c for c in sim.observed if c[0] % 4 or c[1] % 4]
    edge = boundary_cells(lattice, phase_of)
    assert probes and len(probes) <= 0.4 * len(edge)  # 73 (85) of the 248 boundary cells
    assert sum(c in edge for c in probes) >= 0.9 * len(probes)  # probes sit where phases meet
    assert agreement(lattice, truth, sim.observed) >= 0.985
    # Untrained cells between two trained phases are fitted, never left unknown.
    assert all(p is not None for p in infer(lattice, sim.observed).phase.flat)


def test_an_untrained_cell_on_a_boundary_along_the_grid_is_a_coin_flip_until_a_probe_beside_it_settles_it():
    # A boundary between columns 4 and 8 of the stride-4 grid at 65 x 65: nothing on that grid tells
    # on which side of it column 6 lies, so (6, 32) is unsure and trained; once (6, 30) is measured,
    # its neighbours along the boundary follow from it and are no longer unsure.
    lattice = Lattice((65, 65), (True, True))

    def labels(c):
        return ["grokking" if c[0] <= 6 else "memorization"] * 2

    grid = {c: labels(c) for c in lattice.cells() if c[0] % 4 == 0 and c[1] % 4 == 0}
    unsure = next_cells(lattice, grid, (), seeds=2, limit=100, speculate=False)
    assert unsure and {c[0] for c in unsure} == {6}  # column 6 only, the line rule settles the rest
    fitted = infer(lattice, grid)
    assert fitted.confidence[6, 32] == pytest.approx(0.5, abs=0.1)
    probed = infer(lattice, grid | {(6, 30): labels((6, 30))})
    assert probed.phase[6, 32] == "grokking" and probed.confidence[6, 32] > 0.65
    assert probed.phase[7, 32] == "memorization"
    still = next_cells(lattice, grid | {(6, 30): labels((6, 30))}, (), seeds=2, limit=100, speculate=False)
    assert (6, 32) not in still and (6, 28) not in still


@pytest.mark.parametrize("n", [33, 65])
@pytest.mark.parametrize("center", [(0.4, 0.3), (0.55, 0.7), (0.2, 0.8)])
def test_an_island_one_and_a_half_coarse_strides_across_is_found_at_high_resolution(n, center):
    # radius 0.75 S > S/sqrt(2): a coarse cell lies inside, and refinement keeps the island
    radius, (u, v) = 0.75 * coarse_stride(n), (center[0] * (n - 1), center[1] * (n - 1))

    def phase(c):
        return "grokking" if (c[0] - u) ** 2 + (c[1] - v) ** 2 <= radius**2 else "memorization"

    lattice = Lattice((n, n), (True, True))
    truth = seeds_agree(phase, seeds=2)
    sim = simulate(lattice, truth, seeds=2, batch=8)
    inferred = infer(lattice, sim.observed).phase
    assert any(inferred[c] == "grokking" for c in lattice.cells() if phase(c) == "grokking")
    assert agreement(lattice, truth, sim.observed) >= 0.97


def test_high_resolution_refinement_is_a_function_of_the_finished_labels_alone():
    # What the ledger relies on to resume: the same labels, in any order, give the same proposals.
    lattice = Lattice((65, 65), (True, True))
    truth = seeds_noisy(lattice, synthetic_map("band", 65, GENERIC), seeds=2, flip=0.1)
    full = simulate(lattice, truth, seeds=2, batch=8).observed
    order = list(full)
    for cut, probing in ((60, False), (130, True)):  # the stride-4 hierarchy first, then probes below it
        observed = {c: full[c] for c in order[:cut]}
        running = order[cut : cut + 10]
        shuffled = dict(reversed(observed.items()))
        for speculate in (False, True):
            first = next_cells(lattice, observed, running, seeds=2, limit=16, speculate=speculate)
            assert first == next_cells(lattice, shuffled, list(reversed(running)), 2, 16, speculate=speculate)
            assert any(i % 4 or j % 4 for i, j in first) == probing
        assert seeds_to_add(lattice, observed, running, 2) == seeds_to_add(
            lattice, shuffled, running[::-1], 2
        )
    a, b = infer(lattice, full), infer(lattice, dict(reversed(full.items())))
    assert (a.phase == b.phase).all() and np.array_equal(a.confidence, b.confidence)


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MAPS)
def test_refinement_recovers_the_map_from_at_most_40_percent_of_the_cells(name, batch, speculate):
    truth = seeds_agree(synthetic_map(name), seeds=2)
    sim = simulate(GRID, truth, seeds=2, batch=batch, speculate=speculate)
    assert is_resolved(GRID, sim.observed, ())
    assert agreement(GRID, truth, sim.observed) >= 0.97
    assert sim.trained <= 0.40 * GRID.size  # 115 of 289
    inferred = infer(GRID, sim.observed)
    assert (
        inferred.confidence[~inferred.measured] == 1.0
    ).all()  # resolved: every other cell lies between agreeing cells


@pytest.mark.parametrize("center", [(8, 8), (5.5, 10.25), (10, 10), (3, 13), (6.5, 6.5)])
def test_an_island_of_radius_3_anywhere_is_found_by_the_stride_4_coarse_grid(center):
    # every point lies within 4/sqrt(2) = 2.83 of a coarse cell, so a disc of radius 3 holds one
    def phase(c):
        return "grokking" if (c[0] - center[0]) ** 2 + (c[1] - center[1]) ** 2 <= 9 else "memorization"

    truth = seeds_agree(phase, seeds=2)
    sim = simulate(GRID, truth, seeds=2, batch=8)
    assert agreement(GRID, truth, sim.observed) >= 0.97


@pytest.mark.parametrize("seeds", [2, 3])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MAPS)
def test_cells_next_to_disagreeing_seeds_are_measured_not_inferred(name, batch, seeds):
    phase_of = synthetic_map(name)
    truth = seeds_disagree_near_boundary(GRID, phase_of, seeds)
    sim = simulate(GRID, truth, seeds=seeds, batch=batch)
    edge = boundary_cells(GRID, phase_of)
    shaky = {c for c, labels in sim.observed.items() if len(set(labels)) > 1}
    assert shaky  # the boundary was found, and its seeds disagree there
    for i, j in shaky:
        for nb in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if nb in edge:
                assert nb in sim.observed, f"{nb} next to disagreeing {(i, j)} was inferred"
    assert is_resolved(GRID, sim.observed, ())
    assert agreement(GRID, truth, sim.observed) >= 0.95


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MAPS)
def test_one_seed_settles_a_cell_inside_a_region_and_every_boundary_cell_runs_all_its_seeds(name, batch):
    phase_of = synthetic_map(name)
    sim = simulate(GRID, seeds_agree(phase_of, seeds=2), seeds=2, batch=batch)
    edge = boundary_cells(GRID, phase_of)
    assert all(len(labels) == 2 for c, labels in sim.observed.items() if c in edge)
    assert all(len(labels) == 1 for c, labels in sim.observed.items() if c not in edge)
    assert sim.runs <= 0.30 * 2 * GRID.size  # trials, against 578 for the dense grid
    assert is_resolved(GRID, sim.observed, (), seeds=2)


def test_further_seeds_wait_until_the_cell_meets_another_phase():
    # Coarse cells (0, 0) and (0, 4) measured once each; (0, 2) between them not yet known.
    one = {(0, 0): ["grokking"], (0, 4): ["grokking"]}
    assert seeds_to_add(GRID, one, (), seeds=2) == []  # nothing around them is known to differ
    other = {(0, 0): ["grokking"], (0, 4): ["memorization"]}
    assert seeds_to_add(GRID, other, (), seeds=2) == []  # (0, 2) is in conflict: located first
    located = other | {(0, 2): ["grokking"], (0, 3): ["memorization"]}
    assert seeds_to_add(GRID, located, (), seeds=2) == [(0, 2), (0, 3)]  # the boundary's two sides
    assert seeds_to_add(GRID, located, {(0, 2)}, seeds=2) == [(0, 3)]  # already running its seeds
    assert seeds_to_add(GRID, located, (), seeds=1) == []
    split = {(8, 8): ["grokking", "memorization"]}
    assert seeds_to_add(GRID, split, (), seeds=3) == [(8, 8)]  # its seeds so far disagree
    assert not is_resolved(GRID, located, (), seeds=2)


@pytest.mark.parametrize(
    ("labels", "phase", "share"),
    [
        (["grokking", "memorization"], TIE, 0.5),
        (["grokking", "memorization", "memorization"], "memorization", 2 / 3),
    ],
)
def test_cells_next_to_a_cell_whose_seeds_disagree_are_sampled_even_where_the_lines_agree(
    labels, phase, share
):
    # (3, 4) lies on no coarse line, its neighbours lie between agreeing cells: only the seeds flag them
    around = {(2, 4), (4, 4), (3, 3), (3, 5)}
    observed = {c: ["memorization"] * len(labels) for c in GRID.cells() if c not in around}
    observed[3, 4] = labels
    inferred = infer(GRID, observed)
    assert inferred.phase[3, 4] == phase and inferred.confidence[3, 4] == pytest.approx(share)
    assert all(inferred.phase[c] == "memorization" and inferred.confidence[c] <= share for c in around)
    assert set(next_cells(GRID, observed, (), seeds=len(labels), limit=10)) == around
    assert not is_resolved(GRID, observed, ())
    assert is_resolved(GRID, observed | {c: ["memorization"] * len(labels) for c in around}, ())


def test_facets_are_refined_independently_as_separate_sheets():
    names = ("disc", "staircase")
    facets = Lattice((9, 9, 2), (True, True, False))
    sheet = Lattice((9, 9), (True, True))
    maps = [synthetic_map(name, 9) for name in names]
    truth = seeds_agree(lambda c: maps[c[2]](c[:2]), seeds=2)
    sim = simulate(facets, truth, seeds=2, batch=8, speculate=False)
    assert agreement(facets, truth, sim.observed) >= 0.97
    assert len(coarse_cells(facets)) == 2 * 25
    inferred = infer(facets, sim.observed)
    for k, phase_of in enumerate(maps):
        alone = simulate(sheet, seeds_agree(phase_of, seeds=2), seeds=2, batch=8, speculate=False)
        assert {c[:2] for c in sim.observed if c[2] == k} == set(alone.observed)
        assert (inferred.phase[:, :, k] == infer(sheet, alone.observed).phase).all()


def test_next_cells_and_infer_are_deterministic_and_ignore_input_order():
    truth = seeds_agree(synthetic_map("band"), seeds=2)
    full = simulate(GRID, truth, seeds=2, batch=8).observed
    done = list(full)[:50]
    running = list(full)[50:58]
    observed = {c: full[c] for c in done} | {c: full[c][:1] for c in running[::2]}
    shuffled = dict(reversed(observed.items()))
    first = next_cells(GRID, observed, running, seeds=2, limit=32)
    assert first == next_cells(GRID, observed, running, seeds=2, limit=32)
    assert first == next_cells(GRID, shuffled, set(reversed(running)), seeds=2, limit=32)
    a, b = infer(GRID, observed), infer(GRID, shuffled)
    assert (a.phase == b.phase).all() and np.array_equal(a.confidence, b.confidence)
    assert np.array_equal(a.measured, b.measured)


@pytest.mark.parametrize("name", MAPS)
def test_next_cells_never_returns_an_observed_or_pending_cell(name):
    truth = seeds_agree(synthetic_map(name), seeds=2)
    order = list(simulate(GRID, truth, seeds=2, batch=8).observed)
    for cut in range(0, len(order), 7):
        running = order[cut : cut + 10]
        observed = {c: truth(c) for c in order[:cut]} | {c: truth(c)[:1] for c in running[::3]}
        for speculate in (False, True):
            got = next_cells(GRID, observed, running, seeds=2, limit=40, speculate=speculate)
            assert len(got) == len(set(got)) <= 40
            assert not set(got) & (set(observed) | set(running))


def test_speculation_proposes_likely_cells_only_once_the_certain_ones_are_pending():
    truth = seeds_agree(synthetic_map("disc"), seeds=2)
    observed = {c: truth(c) for c in coarse_cells(GRID)}
    certain = next_cells(GRID, observed, (), seeds=2, limit=100)
    assert certain and next_cells(GRID, observed, certain, seeds=2, limit=100, speculate=False) == []
    observed |= {c: truth(c)[:1] for c in certain}  # one seed of each is in
    guesses = next_cells(GRID, observed, certain, seeds=2, limit=100)
    assert guesses
    needed = set(simulate(GRID, truth, seeds=2, batch=1).observed)
    assert len(set(guesses) & needed) >= 0.8 * len(guesses)
    assert next_cells(GRID, observed, certain, seeds=2, limit=3) == guesses[:3]


@pytest.mark.parametrize("shape", [(1, 17), (17, 1), (1, 2), (2, 2), (1, 1), (3, 2)])
def test_degenerate_lattices_are_refined(shape):
    lattice = Lattice(shape, (True, True))
    truth = seeds_agree(lambda c: "grokking" if c[0] + c[1] >= 9 else "memorization", seeds=2)
    sim = simulate(lattice, truth, seeds=2, batch=4)
    assert is_resolved(lattice, sim.observed, ())
    assert agreement(lattice, truth, sim.observed) == 1.0
    if lattice.size <= 6:
        assert sim.trained == lattice.size


def test_a_lattice_of_categorical_axes_only_measures_every_cell_once():
    lattice = Lattice((3, 2), (False, False))
    assert sorted(coarse_cells(lattice)) == lattice.cells()
    sim = simulate(
        lattice, seeds_agree(lambda c: "grokking" if c[0] else "confusion", seeds=1), seeds=1, batch=2
    )
    assert sim.trained == 6 and is_resolved(lattice, sim.observed, ())


def test_a_dense_observation_is_resolved_and_fully_measured():
    truth = seeds_agree(synthetic_map("staircase"), seeds=2)
    observed = {c: truth(c) for c in GRID.cells()}
    assert is_resolved(GRID, observed, ())
    assert next_cells(GRID, observed, (), seeds=2, limit=10) == []
    inferred = infer(GRID, observed)
    assert inferred.measured.all() and (inferred.confidence == 1.0).all()
    assert not is_resolved(GRID, observed, [(0, 0)])  # something still pending
    assert not is_resolved(GRID, {}, ())
    assert next_cells(GRID, {}, (), seeds=2, limit=5) == coarse_cells(GRID)[:5]


def test_infer_before_anything_is_measured_and_with_partial_results():
    empty = infer(GRID, {})
    assert all(p is None for p in empty.phase.flat) and not empty.measured.any()
    truth = seeds_agree(synthetic_map("disc"), seeds=2)
    observed = {c: truth(c)[:1] for c in coarse_cells(GRID)}
    inferred = infer(GRID, observed)
    assert inferred.measured.sum() == 25
    assert ((inferred.confidence >= 0) & (inferred.confidence <= 1)).all()
    assert inferred.phase[8, 8] == "grokking" and inferred.phase[0, 1] == "memorization"


def test_cells_outside_the_lattice_and_bad_lattices_are_rejected():
    with pytest.raises(ValueError, match="not in a lattice"):
        next_cells(GRID, {(17, 0): ["grokking"]}, (), seeds=1, limit=1)
    with pytest.raises(ValueError, match="equal length"):
        Lattice((3, 3), (True,))
    with pytest.raises(ValueError, match="at least one point"):
        Lattice((0, 3), (True, True))
    with pytest.raises(ValueError, match="choose one of"):
        synthetic_map("spiral")
