"""How many cells adaptive refinement trains, and how right its diagram is, on synthetic phase maps.

For the maps of `tests/refine_sim.SYNTHETIC_MAPS` (disc, band, staircase) on 17 x 17 and 9 x 9 grids,
2 seeds, a simulated cluster of 1, 8 and 32 workers (`refine_sim.simulate`), with and without
speculation: cells trained / total, trials (seeds trained) / the dense grid's, agreement of `infer` with the truth, simulated rounds (wall
clock: each round the older half of the running cells report one seed) and the share of busy
workers. Speculation buys rounds with cells; the table shows the exchange rate. A second table does
the same with seeds that disagree on every boundary cell (the second seed takes the other phase),
where every neighbour of a disagreeing cell is trained. Pure Python, a few seconds:

    .venv/bin/python bench/refine_synthetic.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the simulator is test code
from refine_sim import (  # noqa: E402
    SYNTHETIC_MAPS,
    seeds_agree,
    seeds_disagree_near_boundary,
    simulate,
    synthetic_map,
)

from grokstudy.phases import vote  # noqa: E402
from grokstudy.refine import Lattice, infer  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="17,9", help="grid sizes, comma-separated (default 17,9)")
    parser.add_argument("--batches", default="1,8,32", help="cluster sizes, comma-separated (default 1,8,32)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]

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


if __name__ == "__main__":
    main()
