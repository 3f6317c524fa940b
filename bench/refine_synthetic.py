"""How many cells adaptive refinement trains, and how right its diagram is, on synthetic phase maps.

For the maps of `tests/refine_sim.SYNTHETIC_MAPS` (disc, band, staircase) on 17 x 17 and 9 x 9 grids,
2 seeds, a simulated cluster of 1, 8 and 32 workers (`refine_sim.simulate`), with and without
speculation: cells trained / total, trials (seeds trained) / the dense grid's, agreement of `infer` with the truth, simulated rounds (wall
clock: each round the older half of the running cells report one seed) and the share of busy
workers. Speculation buys rounds with cells; the table shows the exchange rate. A second table does
the same with seeds that disagree on every boundary cell (the second seed takes the other phase),
where every neighbour of a disagreeing cell is trained.

Then the high-resolution table (`--fine-sizes`, default 33 and 65), against the dense grid run in the
same invocation (every cell, every seed; agreement 1 by definition): the five maps (those three and
`refine_sim.ISLAND_MAPS`, islands 1.5 to 2.5 coarse strides across) moved off the grid points
(`refine_sim.GENERIC`: a boundary through a grid point makes the cell between two trained cells an
exact coin flip), with seeds that agree and with seed noise (`refine_sim.seeds_noisy`: each seed of a
boundary cell takes the other phase with probability `--flip`), 8 workers. Its closing line is the
figure: worst agreement and most cells trained per size, against the dense grid's, and islands missed.
Pure Python, about a minute:

    .venv/bin/python bench/refine_synthetic.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the simulator is test code
from refine_sim import (  # noqa: E402
    GENERIC,
    ISLAND_MAPS,
    SYNTHETIC_MAPS,
    islands_missed,
    seeds_agree,
    seeds_disagree_near_boundary,
    seeds_noisy,
    simulate,
    synthetic_map,
)

from grokstudy.phases import vote  # noqa: E402
from grokstudy.refine import Lattice, coarse_cells, finest_stride, infer  # noqa: E402

SEEDS = 2


def run(n: int, name: str, batch: int, speculate: bool, noisy: bool) -> tuple[int, int, float, int, float]:
    """(cells trained, trials, agreement, rounds, busy share) of one simulated study."""
    lattice = Lattice((n, n), (True, True))
    phase_of = synthetic_map(name, n)
    truth = seeds_disagree_near_boundary(lattice, phase_of, SEEDS) if noisy else seeds_agree(phase_of, SEEDS)
    sim = simulate(lattice, truth, SEEDS, batch, speculate=speculate)
    phase = infer(lattice, sim.observed).phase
    agree = sum(phase[c] == vote(truth(c)).phase for c in lattice.cells()) / lattice.size
    return sim.trained, sim.runs, agree, sim.rounds, sim.busy


def table(sizes: list[int], batches: list[int], noisy: bool) -> dict[int, tuple[float, float, float]]:
    """Print one row per map, size and batch; return size -> worst (agreement, trained share, trial share)."""
    worst: dict[int, tuple[float, float, float]] = {}
    print(
        f"{'grid':>5} {'map':>9} {'batch':>5}  {'speculate off: trained trials  agree rounds busy':>48}"
        "  on: trained trials  agree rounds busy"
    )
    for n in sizes:
        for name in SYNTHETIC_MAPS:
            for batch in batches:
                cols = []
                for speculate in (False, True):
                    trained, trials, agree, rounds, busy = run(n, name, batch, speculate, noisy)
                    share, trial_share = trained / n**2, trials / (SEEDS * n**2)
                    low_agree, high_share, high_trials = worst.get(n, (1.0, 0.0, 0.0))
                    worst[n] = (min(low_agree, agree), max(high_share, share), max(high_trials, trial_share))
                    cols.append(
                        f"{trained:3d}/{n * n} {share:.2f} {trial_share:6.2f}  {agree:.3f} {rounds:6d} {busy:4.2f}"
                    )
                print(f"{n:>2}x{n:<2} {name:>9} {batch:>5}  {cols[0]:>48}  {cols[1]:>36}")
    return worst


def dense(lattice: Lattice, truth) -> tuple[int, int, float]:
    """The baseline: (cells trained, trials, agreement) of the dense grid, every cell with every seed."""
    observed = {c: truth(c) for c in lattice.cells()}
    phase = infer(lattice, observed).phase
    agree = sum(phase[c] == vote(truth(c)).phase for c in lattice.cells()) / lattice.size
    return len(observed), sum(map(len, observed.values())), agree


def gp_level_set(lattice: Lattice, truth, budget: int, batch: int = 8) -> dict:
    """The Gaussian-process baseline at a trial budget: cell -> phase for every cell.

    Active learning of a level set with one GP regression per phase on its +1/-1 indicator over
    the cells' coordinates in [0, 1]^2 (scikit-learn, an optional bench dependency: a constant
    times an RBF kernel plus white noise, its hyperparameters fitted at each round). It starts
    from refine's own coarse lattice, then adds `batch` cells a round where the two likeliest
    phases are closest relative to their uncertainty, |m1 - m2| / sqrt(s1^2 + s2^2) (the
    straddle idea of Bryan et al. 2005, for several classes), until `budget` trials are spent.
    Each cell trains every seed, labelled by their vote (a tie is a label of its own, as the
    dense grid's vote makes it); unmeasured cells take the phase of the highest mean.
    """
    import numpy as np

    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    except ImportError as err:  # a bench dependency only: `pip install scikit-learn`
        raise SystemExit(f"refine_synthetic.py --gp needs scikit-learn ({err})") from None
    # A phase whose indicator is nearly flat drives its length scale to the bound: expected.
    warnings.simplefilter("ignore", ConvergenceWarning)

    cells = lattice.cells()
    scale = np.array([max(1, n - 1) for n in lattice.shape], dtype=float)
    xy = np.array(cells, dtype=float) / scale
    index = {c: k for k, c in enumerate(cells)}
    labels: dict = {}

    def measure(c) -> None:
        labels[c] = vote(truth(c)).phase

    for c in coarse_cells(lattice):
        measure(tuple(c))
    while True:
        phases = sorted(set(labels.values()))
        known = [index[c] for c in labels]
        rest = np.array([k for k in range(len(cells)) if cells[k] not in labels])
        means = np.zeros((len(cells), len(phases)))
        stds = np.zeros_like(means)
        for j, phase in enumerate(phases):
            y = np.array([1.0 if labels[cells[k]] == phase else -1.0 for k in known])
            kernel = ConstantKernel(1.0) * RBF(0.1, (0.01, 1.0)) + WhiteKernel(0.01, (1e-5, 1.0))
            gp = GaussianProcessRegressor(kernel, normalize_y=False).fit(xy[known], y)
            means[:, j], stds[:, j] = gp.predict(xy, return_std=True)
        spent = len(labels) * len(truth(cells[0]))
        room = (budget - spent) // len(truth(cells[0]))
        if room <= 0 or len(rest) == 0 or len(phases) < 2:
            break
        order = np.argsort(-means[rest], axis=1)
        rows = np.arange(len(rest))
        m1, m2 = means[rest, order[:, 0]], means[rest, order[:, 1]]
        s1, s2 = stds[rest, order[:, 0]], stds[rest, order[:, 1]]
        score = np.abs(m1 - m2) / np.sqrt(s1**2 + s2**2 + 1e-12)
        for k in rest[rows[np.argsort(score)][: min(batch, room)]]:
            measure(cells[k])
    return {c: labels.get(c, phases[int(np.argmax(means[index[c]]))]) for c in cells}


def fine_table(
    sizes: list[int], flips: list[float], batch: int, gp: bool = False
) -> tuple[dict[int, tuple], int, dict[int, tuple[float, int]]]:
    """Print one row per size, map and seed noise; return (size -> worst (agreement, trained share,
    trial share, dense agreement, dense share)), islands missed over all rows, and with `gp` the
    Gaussian-process baseline's size -> (worst agreement, islands missed) at refine's budget)."""
    worst: dict[int, tuple] = {}
    gp_worst: dict[int, tuple[float, int]] = {}
    missed_all = 0
    print(
        f"{'grid':>5} {'stride':>6} {'map':>11} {'flip':>4}   dense: trained  agree"
        "   refine: trained share trials  agree  islands missed"
        + ("   GP, same trials: agree  missed" if gp else "")
    )
    for n in sizes:
        lattice = Lattice((n, n), (True, True))
        for name in [*SYNTHETIC_MAPS, *ISLAND_MAPS]:
            phase_of = synthetic_map(name, n, GENERIC)
            for flip in flips:
                truth = seeds_noisy(lattice, phase_of, SEEDS, flip)
                d_cells, d_trials, d_agree = dense(lattice, truth)
                sim = simulate(lattice, truth, SEEDS, batch)
                phase = infer(lattice, sim.observed).phase
                agree = sum(phase[c] == vote(truth(c)).phase for c in lattice.cells()) / lattice.size
                missed = (
                    islands_missed(name, n, lambda c, p=phase: p[c], GENERIC) if name in ISLAND_MAPS else 0
                )
                missed_all += missed
                share, trials = sim.trained / d_cells, sim.runs / d_trials
                a, s, t, da, ds = worst.get(n, (1.0, 0.0, 0.0, 1.0, 0.0))
                worst[n] = (
                    min(a, agree),
                    max(s, share),
                    max(t, trials),
                    min(da, d_agree),
                    max(ds, d_cells / n**2),
                )
                extra = ""
                if gp:
                    gp_phase = gp_level_set(lattice, truth, sim.runs, batch)
                    gp_agree = (
                        sum(gp_phase[c] == vote(truth(c)).phase for c in lattice.cells()) / lattice.size
                    )
                    gp_missed = (
                        islands_missed(name, n, lambda c, p=gp_phase: p[c], GENERIC)
                        if name in ISLAND_MAPS
                        else 0
                    )
                    lo, miss = gp_worst.get(n, (1.0, 0))
                    gp_worst[n] = (min(lo, gp_agree), miss + gp_missed)
                    extra = f"   {gp_agree:>20.3f}  {gp_missed:>6}"
                print(
                    f"{n:>2}x{n:<2} {finest_stride(n):>6} {name:>11} {flip:>4.2f}   {d_cells:>6d}/{n * n} {d_agree:.3f}"
                    f"   {sim.trained:>6d}/{n * n} {share:.3f} {trials:6.3f}  {agree:.3f}  {missed:>2}"
                    + extra
                )
    return worst, missed_all, gp_worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="17,9", help="grid sizes, comma-separated (default 17,9)")
    parser.add_argument("--batches", default="1,8,32", help="cluster sizes, comma-separated (default 1,8,32)")
    parser.add_argument("--fine-sizes", default="33,65", help="high-resolution grid sizes (default 33,65)")
    parser.add_argument("--flip", type=float, default=0.1, help="seed noise: a boundary seed's flip chance")
    parser.add_argument(
        "--gp", action="store_true", help="also the Gaussian-process level-set baseline (needs scikit-learn)"
    )
    parser.add_argument("--skip-coarse", action="store_true", help="only the high-resolution table")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]

    if args.skip_coarse:
        sizes = []
    print(f"seeds disagree on every boundary cell ({SEEDS} seeds):")
    noisy = table(sizes, batches, noisy=True)
    for n, (agree, share, trial_share) in noisy.items():
        print(
            f"  {n}x{n} with disagreeing seeds: worst agreement {agree:.3f}, trained {share:.2f} of cells,"
            f" {trial_share:.2f} of trials"
        )
    print(f"\nseeds agree ({SEEDS} seeds):")
    worst = table(sizes, batches, noisy=False)
    runs = f"{len(SYNTHETIC_MAPS)} maps x {len(batches)} batches x speculation off/on"
    print(
        f"refine: worst of {runs}: "
        + "; ".join(
            f"{n}x{n} agreement {a:.2f}, trained {s:.2f} of cells, {t:.2f} of trials"
            for n, (a, s, t) in worst.items()
        )
    )

    fine_sizes = [int(v) for v in args.fine_sizes.split(",") if v]
    if not fine_sizes:
        return
    flips = [0.0, args.flip]
    print(
        f"\nhigh resolution, maps off the grid points, 8 workers, {SEEDS} seeds, seed noise flip 0 and {args.flip}:"
    )
    fine, missed, gp = fine_table(fine_sizes, flips, batch=8, gp=args.gp)
    rows = len(SYNTHETIC_MAPS) + len(ISLAND_MAPS)
    print(
        f"refine at high resolution, worst of {rows} maps x {len(flips)} noise levels, against the dense grid: "
        + "; ".join(
            f"{n}x{n} agreement {a:.3f} (dense {da:.2f}) at {s:.3f} of the dense grid's cells ({t:.3f} of its trials)"
            for n, (a, s, t, da, _) in fine.items()
        )
        + f"; islands missed {missed}"
        + "".join(
            f"; Gaussian process at the same trials {n}x{n}: agreement {a:.3f}, islands missed {m}"
            for n, (a, m) in gp.items()
        )
    )


if __name__ == "__main__":
    main()
