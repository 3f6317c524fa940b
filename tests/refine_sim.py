"""A simulated cluster running the boundary sampler's refinement on synthetic phase maps.

Test and benchmark code (tests/test_refine.py, tests/test_boundary.py, bench/refine_synthetic.py):
`simulate` hands cells to `batch` simulated workers with `refine.next_cells` and `refine.seeds_to_add`
as a study's trials would get them; the maps are pure functions of the cell with known boundaries.
"""

from __future__ import annotations

import random
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


def _islands(u: float, v: float) -> str:
    # Discs of radius 3, 3.5 and 5 in a memorization sea, the smallest 1.5 coarse strides across
    # (the coarse stride is 4 of these 16 units at every 2^k + 1 resolution): none may be missed.
    if (u - 3.5) ** 2 + (v - 12) ** 2 <= 3**2:
        return "grokking"
    if (u - 12.5) ** 2 + (v - 11.5) ** 2 <= 3.5**2:
        return "comprehension"
    if (u - 9) ** 2 + (v - 3) ** 2 <= 5**2:
        return "grokking"
    return "memorization"


def _band_island(u: float, v: float) -> str:
    # The band with a confusion island of radius 3 in its memorization side.
    return "confusion" if (u - 12) ** 2 + (v - 3.5) ** 2 <= 3**2 else _band(u, v)


GENERIC = (0.137, 0.291)
"""A shift that puts no boundary exactly on a point of a 2^k + 1 grid (bench/refine_synthetic.py)."""

ISLAND_MAPS: dict[str, Callable[[float, float], str]] = {"islands": _islands, "band_island": _band_island}
"""Maps whose phase regions include islands 1.5 to 2.5 coarse strides across (bench/refine_synthetic.py)."""

ISLANDS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "islands": ((3.5, 12, 3), (12.5, 11.5, 3.5), (9, 3, 5)),
    "band_island": ((12, 3.5, 3),),
}
"""Each island map's discs as (u, v, radius), in the maps' 16-unit coordinates."""


def synthetic_map(name: str, n: int = 17, shift: tuple[float, float] = (0.0, 0.0)) -> Callable[[Cell], str]:
    """The phase of each cell of an n x n grid for the map `name` (of SYNTHETIC_MAPS or ISLAND_MAPS).

    The maps' boundaries lie on the 17 x 17 grid's points; `shift` (in the maps' 16 units) moves the
    picture off them, so that a finer grid's points do not sit exactly on a boundary either (GENERIC).
    """
    maps = SYNTHETIC_MAPS | ISLAND_MAPS
    if name not in maps:
        raise ValueError(f"unknown synthetic map {name!r}; choose one of: {', '.join(maps)}")
    draw, scale = maps[name], 16 / max(1, n - 1)
    du, dv = shift
    return lambda c: draw(c[0] * scale + du, c[1] * scale + dv)


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


def seeds_noisy(
    lattice: Lattice, phase_of: Callable[[Cell], str], seeds: int, flip: float, salt: int = 0
) -> Callable[[Cell], list[str]]:
    """Seed noise where phases meet: each seed of a boundary cell independently takes the phase of a
    differing neighbour (the first by name) with probability `flip`, drawn from (salt, cell, seed).

    With 2 seeds and flip 0.2 a third of the boundary cells split 1-1, a tie in the dense grid's vote.
    """
    edge = boundary_cells(lattice, phase_of)
    rng = random.Random(salt)
    draws = {c: [rng.random() < flip for _ in range(seeds)] for c in sorted(edge)}

    def labels(c: Cell) -> list[str]:
        own = phase_of(c)
        if c not in draws:
            return [own] * seeds
        other = min(phase_of(nb) for nb in neighbours(lattice, c) if phase_of(nb) != own)
        return [other if flipped else own for flipped in draws[c]]

    return labels


def islands_missed(
    name: str, n: int, phase: Callable[[Cell], str | None], shift: tuple[float, float] = (0.0, 0.0)
) -> int:
    """Islands of the map `name` (ISLANDS) of which no cell inside holds the island's phase in `phase`."""
    draw, scale = ISLAND_MAPS[name], 16 / max(1, n - 1)
    missed = 0
    for u, v, r in ISLANDS[name]:
        inside = [
            (i, j) for i in range(n) for j in range(n) if (i * scale - u) ** 2 + (j * scale - v) ** 2 <= r**2
        ]
        missed += not any(phase((i, j)) == draw(i * scale, j * scale) for i, j in inside)
    return missed
