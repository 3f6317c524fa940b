"""A simulated cluster running the boundary sampler's refinement on synthetic phase maps.

Test and benchmark code (tests/test_refine.py, tests/test_boundary.py, bench/refine_synthetic.py):
`simulate` hands cells to `batch` simulated workers with `refine.next_cells` and `refine.seeds_to_add`
as a study's trials would get them; the maps are pure functions of the cell with known boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grokstudy.refine import Cell, Lattice, neighbours, next_cells, seeds_to_add


@dataclass(frozen=True)
class Simulation:
    """The outcome of `simulate`: what was measured, and how long and how busy the cluster was."""

    observed: dict[Cell, list[str]]
    rounds: int  # simulated time: each round, the older half of the running seeds report
    busy: float  # share of worker-rounds with a seed to run

    @property
    def trained(self) -> int:
        """Cells measured (with any number of seeds)."""
        return len(self.observed)

    @property
    def runs(self) -> int:
        """Seeds trained, over all cells: the trials a study would run."""
        return sum(len(v) for v in self.observed.values())


def simulate(
    lattice: Lattice,
    truth: Callable[[Cell], Sequence[str]],
    seeds: int,
    batch: int,
    *,
    speculate: bool = True,
    max_rounds: int = 100_000,
) -> Simulation:
    """Refine `lattice` on a simulated cluster of `batch` workers; `truth(cell)` -> one label per seed.

    A worker trains one seed of one cell, as a study's trial does. Each round, free workers get first
    the further seeds of the cells in `seeds_to_add`, then the first seed of `next_cells`; then the
    older half of the running seeds (at least one) report, so results arrive staggered and cells are
    seen partly finished, as on a real cluster. Ends when nothing runs and nothing is proposed.
    """
    observed: dict[Cell, list[str]] = {}
    running: list[Cell] = []  # one entry per seed in training
    rounds = busy = 0
    while rounds < max_rounds:
        for c in seeds_to_add(lattice, observed, running, seeds):
            running += [c] * min(seeds - len(observed[c]), batch - len(running))
        running += next_cells(lattice, observed, running, seeds, batch - len(running), speculate=speculate)
        if not running:
            break
        rounds += 1
        busy += len(running)
        done = max(1, (len(running) + 1) // 2)
        for c in running[:done]:
            got = observed.setdefault(c, [])
            got.append(truth(c)[len(got)])
        running = running[done:]
    return Simulation(observed, rounds, busy / max(1, rounds * batch))


# Synthetic phase maps: pure functions of the cell, drawn on a 17 x 17 grid; the n x n version samples the same picture (9 x 9: every second point).


def _disc(u: float, v: float) -> str:
    return "grokking" if (u - 8) ** 2 + (v - 8) ** 2 <= 5.5**2 else "memorization"


def _band(u: float, v: float) -> str:
    d = v - u  # a band 4 cells wide along the diagonal
    return "comprehension" if d >= 2 else "grokking" if d >= -2 else "memorization"


def _staircase(u: float, v: float) -> str:
    wd, fraction = int(u), int(v)  # like weight decay x training fraction: monotone steps, 4 phases
    if wd >= 14:
        return "confusion"
    if fraction >= 12 - wd // 3:
        return "comprehension"
    if fraction >= 7 - wd // 2 and wd >= 2:
        return "grokking"
    return "memorization"


SYNTHETIC_MAPS: dict[str, Callable[[float, float], str]] = {
    "disc": _disc,
    "band": _band,
    "staircase": _staircase,
}


def synthetic_map(name: str, n: int = 17) -> Callable[[Cell], str]:
    """The phase of each cell of an n x n grid for the map `name` (one of SYNTHETIC_MAPS)."""
    if name not in SYNTHETIC_MAPS:
        raise ValueError(f"unknown synthetic map {name!r}; choose one of: {', '.join(SYNTHETIC_MAPS)}")
    draw, scale = SYNTHETIC_MAPS[name], 16 / max(1, n - 1)
    return lambda c: draw(c[0] * scale, c[1] * scale)


def boundary_cells(lattice: Lattice, phase_of: Callable[[Cell], str]) -> set[Cell]:
    """Cells with a stride-1 neighbour of another phase."""
    return {c for c in lattice.cells() if any(phase_of(nb) != phase_of(c) for nb in neighbours(lattice, c))}


def seeds_agree(phase_of: Callable[[Cell], str], seeds: int) -> Callable[[Cell], list[str]]:
    """Every seed of a cell gives its true phase."""
    return lambda c: [phase_of(c)] * seeds


def seeds_disagree_near_boundary(
    lattice: Lattice, phase_of: Callable[[Cell], str], seeds: int
) -> Callable[[Cell], list[str]]:
    """The second seed of each boundary cell gives the phase of a differing neighbour (the first by name)."""
    edge = boundary_cells(lattice, phase_of)

    def labels(c: Cell) -> list[str]:
        out = [phase_of(c)] * seeds
        if c in edge and seeds > 1:
            out[1] = min(phase_of(nb) for nb in neighbours(lattice, c) if phase_of(nb) != out[0])
        return out

    return labels
