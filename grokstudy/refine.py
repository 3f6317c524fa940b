"""Adaptive refinement of a grid phase diagram: train the cells where phases change, infer the rest.

A dense phase diagram trains every cell of a grid (weight decay × training fraction, say, 17 × 17).
Most cells lie inside a phase region and tell nothing that their neighbours do not, so this module
chooses which cells to train and infers the others, in the spirit of adaptive mesh refinement
(Berger & Oliger 1984, J. Comput. Phys. 53:484): sample a coarse sub-lattice, then halve the stride
only where the phase changes.

Levels. Along an ordered axis of n points the coarse stride S is the largest power of two that keeps
at least `COARSE_INTERVALS` = 4 intervals (17 → 4, 9 → 2, ≤ 8 → 1); the last index always belongs to
the coarse grid, so corners are always measured. A cell's level is the finest stride s at which all its
ordered coordinates are grid points. A cell of level s < S has, along each axis where it is not on
the grid of stride 2s, a *pair*: the two nearest points of that grid on either side, all else equal.

Inference (the line rule). From the coarsest level down, an unmeasured cell is
- inferred as phase P when the endpoints of at least one of its pairs are both P and no pair's
  endpoints are both some other phase (a cell between two cells of one phase is that phase);
- in conflict when no pair agrees (the cell lies between different phases: a boundary cell), or pairs
  agree on different phases (a saddle): it must be measured;
- unknown while an endpoint is itself unknown or in conflict (it waits for the coarser cell).
Each measured cell of level s thus refines the boundary by a factor of two, down to stride 1, where a
cell between two different measured phases is always measured. A region narrower than the coarse
stride can be missed; tests/test_refine.py shows discs of radius 3 (> S/√2 on 17 × 17) are all found,
and bench/refine_synthetic.py gives the cost.

Resolution. Beyond 64 points an axis the hierarchy stops at `finest_stride` (4 on 65, 8 on 129): the
cells it trains grow with a boundary's length in units of the axis, not with the resolution squared.
A cell off that grid between two agreeing cells takes their phase (the line rule); between differing
ones, the side of a straight boundary fitted through the trained cells around it (`_local_fit`, a
vote over lines weighted by how well each separates them), coarser cells first so that finer ones can
lean on them. Where that fit is less sure than `PROBE_BELOW` (0.65) the cell is trained (a probe), and
each probe sharpens the fit of the cells beside it: a boundary along the grid's rows or diagonals,
where every in-between cell is a coin flip, costs a probe every few cells along it, not every cell.
33 × 33 keeps stride 1: a coarser one there lost more agreement than it saved cells (the figures of
both sizes: bench/README.md, bench/refine_synthetic.py).

Seeds where phases meet. A new cell is trained with its first seed only; its other seeds run once
the cell meets another phase: when its seeds so far disagree, or when a stride-1 neighbour is measured
or inferred as another phase (`seeds_to_add`); a neighbour still in conflict waits until it is located.
Inside a phase region one seed, confirmed by every cell around it, settles a cell; on a boundary,
where seeds disagree most, every cell gets all its seeds (what this saves: bench/README.md,
bench/adaptive_vs_grid.py).

Seeds and ties. A measured cell's phase is the majority of its seeds' labels so far. A tie for the most votes
(1-1 with two seeds, 1-1-1 with three) is the phase `TIE` ("tie") with confidence = the tied share
(0.5 for 1-1), never the first-listed label: a tie is evidence of nothing, so no cell is inferred from
it (a pair with a tied endpoint never agrees). Any measured cell whose seeds disagree (a tie or a
split majority) is uncertain: every unmeasured neighbour at stride 1 is then measured.

Categorical axes (`ordered=False`, e.g. the optimizer) are never interpolated across: each of their
values is an independent sheet with its own coarse grid and refinement.

Speculation. With a cluster to keep busy, `next_cells` may return cells that are not needed yet but
probably will be: for each pending cell it weighs the outcomes its finished seeds and its pair
endpoints make likely, and ranks unmeasured cells by the chance that they become needed; only cells
with a chance above `SPECULATE_MIN_CHANCE` are proposed (a coin flip is not enough).

Every function is a pure, deterministic function of its arguments (a per-lattice cache of the grid
structure holds no results). Pure Python and numpy: the Optuna sampler that calls it lives elsewhere.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grokstudy.phases import TIE, vote

Cell = tuple[int, ...]

COARSE_INTERVALS = 4  # the coarse grid keeps at least this many intervals per ordered axis
SPECULATE_MIN_CHANCE = 0.5  # a speculative cell must be more likely needed than not
FINE_PER_COARSE = 4  # beyond 64 points an axis the grid is trained down to stride S/4 (4 on 65 points)

PROBE_BELOW = 0.65  # an untrained cell whose local fit is less sure than this is trained (a probe)
FIT_SOFTNESS = 4.0  # the local fit's log-odds penalty for each trained cell on the wrong side of a line
_CONFLICT = "<conflict>"  # internal estimate: unmeasured, between different phases: measure it
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def lattice_of(space: Sequence[Any]) -> Lattice:
    """The lattice of a study's grid: one axis per searched dimension (`config.SearchDim`),
    in order; a `choice` axis is categorical (a facet), every other axis ordered."""
    return Lattice(tuple(len(d.grid) for d in space), tuple(d.choice is None for d in space))


@dataclass(frozen=True, slots=True)
class Lattice:
    """A grid of cells: `shape` points per axis; `ordered[ax]` False for a categorical axis (a facet)."""

    shape: tuple[int, ...]
    ordered: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.shape or len(self.shape) != len(self.ordered):
            raise ValueError(
                f"shape {self.shape} and ordered {self.ordered} must be non-empty and of equal length"
            )
        if any(n < 1 for n in self.shape):
            raise ValueError(f"every axis needs at least one point; got shape {self.shape}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def cells(self) -> list[Cell]:
        """Every cell, in row-major order."""
        return list(itertools.product(*(range(n) for n in self.shape)))

    def sheet(self, cell: Cell) -> tuple[int, ...]:
        """The categorical coordinates of `cell`: cells of one sheet are refined together."""
        return tuple(i for i, o in zip(cell, self.ordered, strict=True) if not o)


def neighbours(lattice: Lattice, cell: Cell) -> tuple[Cell, ...]:
    """The stride-1 neighbours of `cell` along the ordered axes."""
    return _plan(lattice).neighbours[cell]


def finest_stride(n: int) -> int:
    """The finest spacing of the hierarchy on an ordered axis of n points: 1 up to 64 points, then a
    quarter of the coarse stride (4 on 65, 8 on 129), so that the cells it trains grow with a
    boundary's length in units of the axis, not with the resolution.

    A cell off that grid is trained only as a probe: between two agreeing cells it is their phase (the
    line rule), between differing ones the side of a boundary fitted through the trained cells around
    it (`_local_fit`), and it is trained when that fit is less sure than `PROBE_BELOW`.
    """
    return 1 if n <= 64 else coarse_stride(n) // FINE_PER_COARSE


def coarse_stride(n: int) -> int:
    """The largest power of two that leaves at least COARSE_INTERVALS intervals on an axis of n points.

    On 17 points: 4 (a 5 × 5 coarse grid); on 9: 2. Every point then lies within S/√2 of a coarse
    cell, so any island of radius > S/√2 holds one (2.83 on 17 points; tests/test_refine.py checks
    radius 3). One step coarser (8 on 17, 4 on 9) missed whole islands in a development sweep over
    random discs of radius 0.15-0.4 n (agreement down to 0.79, against 0.975 at worst with this
    stride); one step finer costs 81 instead of 25 coarse cells on 17 × 17.
    """
    s = 1
    while (n - 1) // (2 * s) >= COARSE_INTERVALS:
        s *= 2
    return s


@dataclass(frozen=True)
class _Plan:
    """The grid structure of a lattice: what refines what. Independent of any result."""

    level: dict[Cell, int]
    pairs: dict[Cell, tuple[tuple[Cell, Cell], ...]]  # () for coarse cells
    neighbours: dict[Cell, tuple[Cell, ...]]  # stride-1 neighbours along the ordered axes
    trainable: frozenset[Cell]  # the hierarchy's finest grid (`finest_stride`; all when 1): others are probes
    fine_neighbours: dict[Cell, tuple[Cell, ...]]  # neighbours on that grid; stride-1 ones off it
    fine_grid: tuple[tuple[int, ...] | None, ...]  # per axis: the finest trained grid; None if categorical
    fine: tuple[int, ...]  # per axis: its stride (1 on a categorical axis)
    sources: dict[Cell, tuple[Cell, ...]]  # pair endpoints, or coarse-grid neighbours of a coarse cell
    order: tuple[Cell, ...]  # every cell, each after the cells its pairs refer to
    coarse: tuple[Cell, ...]  # coarse cells, spread out: any prefix covers the grid evenly
    coarse_index: dict[Cell, int]  # position in `coarse`
    rank: dict[Cell, float]  # a scattered tie-break, so that equal priorities do not cluster


def _bisection_depths(k: int) -> list[int]:
    """Depth of each of k grid positions when bisecting: both ends 0, the middle 1, the quarters 2, ..."""
    depth = [0] * k

    def split(lo: int, hi: int, d: int) -> None:
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            depth[mid] = d
            split(lo, mid, d + 1)
            split(mid, hi, d + 1)

    split(0, k - 1, 1)
    return depth


# Long on purpose: one pass over the grid, its helpers closures over the axes' strides.
@functools.lru_cache(maxsize=64)
def _plan(lattice: Lattice) -> _Plan:
    dims = range(len(lattice.shape))
    strides = [coarse_stride(n) if o else 1 for n, o in zip(lattice.shape, lattice.ordered, strict=True)]
    fines = [finest_stride(n) if o else 1 for n, o in zip(lattice.shape, lattice.ordered, strict=True)]
    top = max(strides)
    grid = {  # (axis, stride) -> its sorted grid points, the last index included, for strides 1, 2, 4 ...
        (ax, 1 << k): sorted({*range(0, n, 1 << k), n - 1})
        for ax, n in enumerate(lattice.shape)
        for k in range(strides[ax].bit_length())
    }

    def axis_level(ax: int, i: int) -> int:
        if not lattice.ordered[ax] or i in grid[ax, strides[ax]]:
            return top
        s = strides[ax] // 2
        while i % s:
            s //= 2
        return s

    def bracket(ax: int, i: int, s: int) -> tuple[int, ...]:
        g = grid[ax, min(s, strides[ax])]
        lo, hi = max(x for x in g if x <= i), min(x for x in g if x >= i)
        return (lo,) if lo == hi else (lo, hi)

    def moved(c: Cell, ax: int, i: int) -> Cell:
        return c[:ax] + (i,) + c[ax + 1 :]

    def grid_moves(c: Cell, stride: Sequence[int]) -> tuple[Cell, ...]:
        """c's neighbours on the grid of each ordered axis's `stride` (c on those grids)."""
        out = []
        for ax in dims:
            if lattice.ordered[ax]:
                g = grid[ax, stride[ax]]
                k = g.index(c[ax])
                out += [moved(c, ax, g[j]) for j in (k - 1, k + 1) if 0 <= j < len(g)]
        return tuple(out)

    cells = lattice.cells()
    trainable = frozenset(
        c
        for c in cells
        if all(
            not o or i in grid[ax, fines[ax]]
            for ax, (i, o) in enumerate(zip(c, lattice.ordered, strict=True))
        )
    )
    level, pairs, neighbours, sources, fine_neighbours = {}, {}, {}, {}, {}
    for c in cells:
        level[c] = lv = min(axis_level(ax, i) for ax, i in enumerate(c))
        if lv < top:
            pairs[c] = tuple(
                (moved(c, ax, b[0]), moved(c, ax, b[1]))
                for ax in dims
                if lattice.ordered[ax] and len(b := bracket(ax, c[ax], 2 * lv)) == 2
            )
            sources[c] = tuple(e for pr in pairs[c] for e in pr)
        else:
            pairs[c] = ()
            sources[c] = grid_moves(c, strides)
        neighbours[c] = tuple(
            moved(c, ax, c[ax] + d)
            for ax in dims
            if lattice.ordered[ax]
            for d in (-1, 1)
            if 0 <= c[ax] + d < lattice.shape[ax]
        )
        fine_neighbours[c] = grid_moves(c, fines) if c in trainable else neighbours[c]

    rank = {c: (k * _GOLDEN) % 1.0 for k, c in enumerate(cells)}
    depth = {}
    for ax in dims:
        if lattice.ordered[ax]:
            g = grid[ax, strides[ax]]
            depth.update(((ax, i), d) for i, d in zip(g, _bisection_depths(len(g)), strict=True))

    def coarse_key(c: Cell) -> tuple[int, int, float]:
        ds = [depth[ax, i] for ax, i in enumerate(c) if lattice.ordered[ax]] or [0]
        return max(ds), sum(ds), rank[c]

    coarse = tuple(sorted((c for c in cells if level[c] == top), key=coarse_key))
    # coarse levels first; within a level, a pair's endpoints have fewer pairs than the cell itself
    order = tuple(sorted(cells, key=lambda c: (-level[c], len(pairs[c]))))
    coarse_index = {c: k for k, c in enumerate(coarse)}
    return _Plan(
        level,
        pairs,
        neighbours,
        trainable,
        fine_neighbours,
        tuple(tuple(grid[ax, fines[ax]]) if o else None for ax, o in enumerate(lattice.ordered)),
        tuple(fines),
        sources,
        order,
        coarse,
        coarse_index,
        rank,
    )


def _cell(lattice: Lattice, c: Sequence[int]) -> Cell:
    cell = tuple(int(i) for i in c)
    if len(cell) != len(lattice.shape) or not all(
        0 <= i < n for i, n in zip(cell, lattice.shape, strict=True)
    ):
        raise ValueError(f"cell {tuple(c)} is not in a lattice of shape {lattice.shape}")
    return cell


def coarse_cells(lattice: Lattice) -> list[Cell]:
    """The first cells to measure: the coarse grid of every sheet, corners first, then by bisection depth."""
    return list(_plan(lattice).coarse)


def _estimate(plan: _Plan, known: Mapping[Cell, str]) -> dict[Cell, str | None]:
    """Each cell -> its measured phase (maybe TIE), an inferred phase, _CONFLICT, or None (unknown yet)."""
    est: dict[Cell, str | None] = {}
    for c in plan.order:
        if c in known:
            est[c] = known[c]
            continue
        ends = [(est[a], est[b]) for a, b in plan.pairs[c]]
        if not ends or any(v is None or v == _CONFLICT for pr in ends for v in pr):
            est[c] = None
            continue
        agreed = {a for a, b in ends if a == b and a != TIE}
        est[c] = agreed.pop() if len(agreed) == 1 else _CONFLICT
    return est


def _needed(
    plan: _Plan,
    known: Mapping[Cell, str],
    shaky: Mapping[Cell, float],
    skip: Collection[Cell],
    labels: Mapping[Cell, Sequence[str]] | None = None,
) -> dict[Cell, tuple]:
    """The cells that must be measured given `known` -> a sort key, smallest first.

    Unmeasured coarse cells first, then coarser levels (they unblock more cells), then the least
    agreement among the cells that made it needed. With `labels` (every observed cell's labels), also
    the cells off the trained grid whose local fit is less sure than `PROBE_BELOW` (the probes); the
    speculative look-ahead leaves them out.
    """
    est = _estimate(plan, known)
    out: dict[Cell, tuple] = {}
    for c in plan.order:
        if c in known or c in skip:
            continue
        if not plan.pairs[c]:
            out[c] = (0, 0, 0.0, plan.coarse_index[c])
        elif est[c] == _CONFLICT and c in plan.trainable:
            votes = Counter(est[e] for e in plan.sources[c])
            agree = votes.most_common(1)[0][1] / sum(votes.values())
            out[c] = (1, -plan.level[c], agree, plan.rank[c])
    for c, share in shaky.items():
        for nb in plan.fine_neighbours[c]:
            if nb in known or nb in skip or nb not in plan.trainable:
                continue
            key = (1, -plan.level[nb], share, plan.rank[nb])
            out[nb] = min(out.get(nb, key), key)
    if labels is not None and len(plan.trainable) < len(plan.level):
        for c, (_, conf) in _fill_untrainable(plan, dict(est), labels).items():
            if conf < PROBE_BELOW and c not in known and c not in skip:
                out[c] = (1, -plan.level[c], conf, plan.rank[c])
    return out


def _finished(
    lattice: Lattice, observed: Mapping[Cell, Sequence[str]], pending: Collection[Cell]
) -> tuple[dict[Cell, str], dict[Cell, float], dict[Cell, list[str]]]:
    """(finished cell -> phase, finished cells whose seeds disagree -> majority share, every observed cell -> labels).

    A cell is finished once any seed has reported: seeds run one at a time at first (`seeds_to_add`),
    so a pending cell with labels is one whose further seeds run, and it counts with the labels it
    has, as does a cell whose other seeds failed for good. A cell without labels counts (as TIE) only
    when it is not pending: all its seeds failed.
    """
    labels = {_cell(lattice, c): list(v) for c, v in observed.items()}
    known, shaky = {}, {}
    for c, labs in labels.items():
        if c in pending and not labs:
            continue
        v = vote(labs)
        phase, share = v.phase, v.share
        known[c] = phase
        if share < 1.0:
            shaky[c] = share
    return known, shaky, labels


def seeds_to_add(
    lattice: Lattice, observed: Mapping[Cell, Sequence[str]], pending: Collection[Cell], seeds: int
) -> list[Cell]:
    """Measured cells whose further seeds should run now, most needed first.

    A cell that is not pending and has fewer than `seeds` labels gets its other seeds when it meets
    another phase: its labels disagree, or a stride-1 neighbour is known or inferred as another phase,
    TIE included. A neighbour not yet known, or in conflict, does not count: the boundary is located
    first, and the cell is looked at again then (counting cells two strides away gave a coarse cell
    near a boundary both seeds for nothing: 0.412 instead of 0.397 of the grid's model-steps).
    """
    plan = _plan(lattice)
    pend = {_cell(lattice, c) for c in pending}
    known, _, labels = _finished(lattice, observed, pend)
    est = _estimate(plan, known)
    out = []
    for c in plan.order:
        labs = labels.get(c)
        if not labs or c in pend or len(labs) >= seeds:
            continue
        around = {est[nb] for nb in plan.fine_neighbours[c]} - {None, _CONFLICT}
        if len(set(labs)) > 1 or around - {known[c]}:
            out.append(c)
    return sorted(out, key=lambda c: (-plan.level[c], plan.rank[c]))


def next_cells(
    lattice: Lattice,
    observed: Mapping[Cell, Sequence[str]],
    pending: Collection[Cell],
    seeds: int,
    limit: int,
    *,
    speculate: bool = True,
) -> list[Cell]:
    """Up to `limit` new cells to train (neither observed nor pending), most needed first.

    `observed`: cell -> the phase label of each finished seed; `pending`: cells proposed or running
    whose results are not all in. First the unmeasured coarse cells, then cells in conflict (between
    different phases) and the neighbours of cells whose seeds disagree. If these run out while results
    are pending and `speculate` is set, cells likely to be needed once they report (see the module
    docstring). [] when nothing is left to refine given what is known.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if limit <= 0:
        return []
    plan = _plan(lattice)
    pend = {_cell(lattice, c) for c in pending}
    known, shaky, labels = _finished(lattice, observed, pend)
    skip = set(labels) | pend
    need = _needed(plan, known, shaky, skip, labels)
    chosen = sorted(need, key=need.__getitem__)[:limit]
    waiting = sorted(pend - set(known))
    if len(chosen) == limit or not speculate or not waiting:
        return chosen
    return (
        chosen + _speculative(plan, known, shaky, labels, waiting, skip | set(chosen))[: limit - len(chosen)]
    )


def _speculative(
    plan: _Plan,
    known: Mapping[Cell, str],
    shaky: Mapping[Cell, float],
    labels: Mapping[Cell, Sequence[str]],
    waiting: Sequence[Cell],
    skip: Collection[Cell],
) -> list[Cell]:
    """Cells ranked by the chance that they become needed when one of the `waiting` cells reports.

    Outcomes of a waiting cell: each label its finished seeds gave (weight 1 each) and, sharing a
    weight of 1, the phases of the cells it is refined from. Each outcome is tried alone, the other
    waiting cells staying unknown; a cell's chance is the summed weight of the outcomes that need it.
    """
    chance: dict[Cell, float] = Counter()
    for p in waiting:
        outcomes: dict[str, float] = Counter(labels.get(p, ()))
        near = [known[s] for s in plan.sources[p] if s in known and known[s] != TIE]
        for phase in near:
            outcomes[phase] += 1.0 / len(near)
        total = sum(outcomes.values())
        for phase, w in sorted(outcomes.items()):
            for c in _needed(plan, {**known, p: phase}, shaky, skip):
                chance[c] += w / total
    ranked = sorted(chance, key=lambda c: (-chance[c], -plan.level[c], plan.rank[c]))
    return [c for c in ranked if chance[c] > SPECULATE_MIN_CHANCE]


def is_resolved(
    lattice: Lattice, observed: Mapping[Cell, Sequence[str]], pending: Collection[Cell], seeds: int = 1
) -> bool:
    """True when nothing is pending, no cell is left to measure and no cell needs more of its
    `seeds`: the diagram is done."""
    if pending or seeds_to_add(lattice, observed, (), seeds):
        return False
    known, shaky, labels = _finished(lattice, observed, ())
    return not _needed(_plan(lattice), known, shaky, (), labels)


@dataclass(frozen=True)
class Inferred:
    """The phase diagram as known so far, every array of `lattice.shape`.

    phase: object array; measured cells hold their seeds' majority (TIE on a tie), inferred cells the
      phase of the pairs they lie between; an unresolved cell (study in progress) holds the vote of the
      nearest measured cells of its sheet (TIE on a draw, None if its sheet has no measured cell).
    measured: True where the cell was trained (at least one seed reported).
    confidence: measured cells: the share of seeds in the majority; inferred cells: the lowest
      confidence among the cells they were inferred from, capped by the share of any measured
      neighbour whose seeds disagree; unresolved cells: half the share of their nearest-cell vote.
    """

    phase: np.ndarray
    measured: np.ndarray
    confidence: np.ndarray


def infer(lattice: Lattice, observed: Mapping[Cell, Sequence[str]]) -> Inferred:
    """Every cell's phase from the measured ones (cells with any label count as measured)."""
    plan = _plan(lattice)
    phase = np.full(lattice.shape, None, dtype=object)
    measured = np.zeros(lattice.shape, dtype=bool)
    confidence = np.zeros(lattice.shape, dtype=float)
    known, observed_labels = {}, {}
    for c, labs in observed.items():
        c = _cell(lattice, c)
        observed_labels[c] = labs
        v = vote(labs)
        known[c], share = v.phase, v.share
        phase[c], measured[c], confidence[c] = known[c], True, share
    est = _estimate(plan, known)
    filled = _fill_untrainable(plan, est, observed_labels)
    for c in plan.order:
        if c in known:
            continue
        p = est[c]
        if c in filled:
            phase[c], confidence[c] = filled[c]
            continue
        if p is None or p == _CONFLICT:
            phase[c], confidence[c] = _nearest_vote(lattice, c, known)
            continue
        sources = [e for a, b in plan.pairs[c] if est[a] == p == est[b] for e in (a, b)]
        shares = [confidence[nb] for nb in plan.neighbours[c] if nb in known and confidence[nb] < 1.0]
        phase[c], confidence[c] = p, min([confidence[e] for e in sources] + shares)
    return Inferred(phase, measured, confidence)


def _nearest_vote(lattice: Lattice, c: Cell, known: Mapping[Cell, str]) -> tuple[str | None, float]:
    sheet = lattice.sheet(c)
    dist = {k: sum(abs(a - b) for a, b in zip(k, c, strict=True)) for k in known if lattice.sheet(k) == sheet}
    if not dist:
        return None, 0.0
    d0 = min(dist.values())
    v = vote([known[k] for k in sorted(dist) if dist[k] == d0])
    return v.phase, 0.5 * v.share


def _fill_untrainable(
    plan: _Plan, est: dict[Cell, str | None], labels: Mapping[Cell, Sequence[str]]
) -> dict[Cell, tuple[str, float]]:
    """Untrainable cells between differing phases -> (phase, confidence) by the local fit, coarser
    first; `est` takes each filled phase, so a finer cell's pairs can agree on it. A cell waits (stays
    out) while a pair endpoint is unknown or still to be measured."""
    filled: dict[Cell, tuple[str, float]] = {}
    for c in plan.order:
        if c in plan.trainable or est[c] != _CONFLICT and est[c] is not None:
            continue
        ends = [est[e] for pr in plan.pairs[c] for e in pr]
        if not ends or any(v is None or v == _CONFLICT for v in ends):
            continue
        agreed = {a for a, b in zip(ends[::2], ends[1::2], strict=True) if a == b and a != TIE}
        filled[c] = (agreed.pop(), 1.0) if len(agreed) == 1 else _local_fit(plan, c, est, labels)
        est[c] = filled[c][0]
    return filled


@functools.lru_cache(maxsize=8)
def _directions(d: int) -> np.ndarray:
    """Unit normals of the lines (planes) that `_local_fit` weighs, evenly spread, both orientations:
    every 4 degrees in 2 dimensions, 256 fixed random ones beyond."""
    if d == 1:
        return np.array([[1.0], [-1.0]])
    if d == 2:
        a = np.arange(90) * (2 * math.pi / 90)
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    v = np.random.default_rng(0).normal(size=(256, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _local_fit(
    plan: _Plan, c: Cell, est: Mapping[Cell, str | None], labels: Mapping[Cell, Sequence[str]]
) -> tuple[str, float]:
    """(phase, confidence) of an untrained cell between differing phases: the chance that it lies on
    each side of a straight boundary through the cells around it.

    The cells within two finest strides on every ordered axis that are trained (seeds' labels in
    proportion) or lie on the trained grid with an inferred phase; of the two phases with the most
    weight there, first = +1, second = -1, others 0. Every line (normal every 4 degrees, any offset
    within the window) is weighted by exp(-FIT_SOFTNESS x the weight of the cells it puts on the wrong
    side), a cell's weight exp(-d²/4), d in strides; the confidence is the weighted share of lines that
    put the cell on the side it is given. A Bayesian vote over lines, not one least-squares plane: a
    boundary along the grid's rows or diagonals leaves the cell a coin flip (0.5), which `_needed`
    then trains, and a trained cell beside it settles the cells along the same line. Exactly even: TIE.
    """
    axes = [
        range(c[ax], c[ax] + 1) if g is None else range(c[ax] - 2 * f, c[ax] + 2 * f + 1)
        for ax, (g, f) in enumerate(zip(plan.fine_grid, plan.fine, strict=True))
    ]
    xs, shares = [], []
    score: dict[str, float] = Counter()
    for t in itertools.product(*axes):
        if t in labels and labels[t]:
            share = {p: n / len(labels[t]) for p, n in Counter(labels[t]).items()}
        elif t in plan.trainable and est.get(t) not in (None, _CONFLICT, TIE):
            share = {est[t]: 1.0}
        else:
            continue
        x = [(a - b) / f for a, b, f, g in zip(t, c, plan.fine, plan.fine_grid, strict=True) if g is not None]
        w = math.exp(-sum(v * v for v in x) / 4)
        xs.append(x)
        shares.append((w, share))
        for p, v in share.items():
            score[p] += w * v
    ranked = sorted(score, key=lambda p: (-score[p], p))
    if len(ranked) < 2:
        return (ranked[0], 1.0) if ranked else (TIE, 0.5)
    first, second = ranked[:2]
    x = np.array(xs)
    w = np.array([w for w, _ in shares])
    y = np.array([sh.get(first, 0.0) - sh.get(second, 0.0) for _, sh in shares])
    normals = _directions(x.shape[1])
    reach = 2.0 * math.sqrt(x.shape[1]) + 0.5  # offsets considered: the window's half-diagonal and a bit
    ends = np.tile([0.0, -reach, reach], (len(normals), 1))  # the cell itself and the range's ends
    proj = np.clip(np.concatenate([normals @ x.T, ends], axis=1), -reach, reach)
    above = np.concatenate([w * np.maximum(y, 0), [0.0] * 3])  # weight wrong when below the line
    below = np.concatenate([w * np.maximum(-y, 0), [0.0] * 3])  # weight wrong when above it
    order = np.argsort(proj, axis=1, kind="stable")
    q = np.take_along_axis(proj, order, 1)
    # offset b between q[k] and q[k+1]: the cells up to k lie below the line, the rest above it
    wrong = np.cumsum(above[order], 1)[:, :-1] + below.sum() - np.cumsum(below[order], 1)[:, :-1]
    weight = np.diff(q, axis=1) * np.exp(-FIT_SOFTNESS * (wrong - wrong.min()))
    total = float(weight.sum())
    p_first = float(weight[q[:, 1:] <= 0].sum()) / total if total > 0 else 0.5
    if abs(p_first - 0.5) < 1e-9:
        return TIE, 0.5
    return (first if p_first > 0.5 else second), max(p_first, 1.0 - p_first)
