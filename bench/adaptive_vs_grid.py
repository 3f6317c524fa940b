"""The boundary sampler against the dense grid, on the quickstart's space (issue 12).

The quickstart's model and task (MLP, x+y mod 47, 3,000 full-batch steps) on a 9 x 9 grid of
weight decay (log, 0.01 to 10) x training fraction (0.2 to 0.8), 2 seeds per point: once as a
dense grid (162 trials), once with `sampler: boundary`, both through the real runner in this
one invocation. Prints the share of the 81 cells where the two diagrams agree (the boundary
study's cells measured or inferred, against the grid's majority over seeds), and the ratios of
model-steps (the steps every trial ran, summed) and of wall-clock time. Saves both phase
diagrams side by side to docs/gallery/adaptive_vs_grid.png (--figure to change).

    .venv/bin/python bench/adaptive_vs_grid.py            # tens of minutes on 2 cores

Goal: >= 0.95 agreement at <= 0.4 of the dense grid's model-steps. Last line: the figures.

    .venv/bin/python bench/adaptive_vs_grid.py --budget 64   # the boundary study capped at 64 trials
    .venv/bin/python bench/adaptive_vs_grid.py --redraw DIR  # only redraw the figure of an earlier run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from grokstudy.phases import vote

REPO = Path(__file__).resolve().parent.parent

STUDY = """
name: {name}
task: {{op: "x+y", p: 47}}
data: {{fraction: 0.5, split_seed: 0}}
model: {{kind: mlp, embed_dim: 64, width: 256, depth: 1}}
optimizer: {{name: adamw, lr: 3.0e-3, betas: [0.9, 0.98], weight_decay: 1.0, warmup_steps: 10}}
train: {{max_steps: {steps}, batch_size: full, eval_every: 50, checkpoint_every: 500}}
search:
  sampler: {sampler}
  space:
    optimizer.weight_decay: {{log: [0.01, 10.0], points: {n}}}
    data.fraction: {{range: [0.2, 0.8], points: {n}}}
  seeds: 2{budget}
phases: {{threshold: 0.99, grok_delay_factor: 5, min_delay: 200, confirm_steps: 300}}
resources: {{cpu: 1}}
diagram: {{x: data.fraction, y: optimizer.weight_decay}}
"""


KEY = ("optimizer.weight_decay", "data.fraction")
"""The searched axes, as the tables name them."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=9, help="grid points per axis")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "gallery" / "adaptive_vs_grid.png")
    parser.add_argument("--budget", type=int, help="search.budget of the boundary study, in trials")
    parser.add_argument("--redraw", type=Path, metavar="DIR", help="only redraw the figure of the run in DIR")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.redraw:
        draw(args.redraw, args.figure)
        return

    import pyarrow.parquet as pq

    from grokstudy import runner
    from grokstudy.study import load_study

    root = Path(tempfile.mkdtemp(prefix="grokstudy-adaptive-"))
    outcomes, seconds = {}, {}
    for sampler in ("grid", "boundary"):
        path = root / f"{sampler}.yaml"
        budget = f"\n  budget: {args.budget}" if sampler == "boundary" and args.budget else ""
        path.write_text(
            STUDY.format(
                name=f"adaptive-{sampler}", sampler=sampler, n=args.points, steps=args.steps, budget=budget
            )
        )
        start = time.perf_counter()
        outcomes[sampler] = runner.run_study(load_study(path), out_dir=root / sampler, formats=("png",))
        seconds[sampler] = time.perf_counter() - start
        print(f"{sampler}: {outcomes[sampler].n_trials} trials in {seconds[sampler]:.0f} s", flush=True)

    grid = pq.read_table(root / "grid" / "trials.parquet").to_pylist()
    boundary = pq.read_table(root / "boundary" / "trials.parquet").to_pylist()
    cells = pq.read_table(root / "boundary" / "cells.parquet").to_pylist()
    key = KEY
    dense: dict[tuple, list[str]] = {}
    for t in grid:
        dense.setdefault(tuple(t[k] for k in key), []).append(t["phase"])
    agree = sum(vote(dense[tuple(c[k] for k in key)]).phase == c["phase"] for c in cells)
    measured = sum(c["measured"] for c in cells)
    steps = {name: sum(t["steps"] for t in rows) for name, rows in (("grid", grid), ("boundary", boundary))}
    for c in cells:
        truth = vote(dense[tuple(c[k] for k in key)]).phase
        if truth != c["phase"]:
            print(f"  differs at wd={c[key[0]]:.3g} frac={c[key[1]]:.3g}: grid {truth}, boundary {c['phase']}"
                  f" ({'measured' if c['measured'] else 'inferred'}, confidence {c['confidence']:.2f})")  # fmt: skip

    draw(root, args.figure)
    print(f"figure: {args.figure}; outputs under {root}")
    print(
        f"boundary sampler measured {measured} of {len(cells)} cells, {len(boundary)} of {len(grid)} trials"
    )
    print(
        f"adaptive vs grid: agreement {agree / len(cells):.3f} of {len(cells)} cells, "
        f"model-steps {steps['boundary'] / steps['grid']:.3f}, wall-clock {seconds['boundary'] / seconds['grid']:.3f}"
    )


def draw(root: Path, figure: Path) -> None:
    """Both phase diagrams side by side, one legend below them."""
    import pyarrow.parquet as pq
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from grokstudy import figures, results

    fig = Figure(figsize=(12.5, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    figures.phase_diagram(results.read_trials(root / "grid" / "trials.parquet"), KEY[1], KEY[0], ax=left)
    figures.phase_diagram(
        results.read_trials(root / "boundary" / "trials.parquet"),
        KEY[1],
        KEY[0],
        ax=right,
        cells=results.read_cells(root / "boundary" / "cells.parquet"),
    )
    for ax, name, title in ((left, "grid", "dense grid"), (right, "boundary", "boundary sampler")):
        rows = pq.read_table(root / name / "trials.parquet").to_pylist()
        ax.set_title(f"{title}: {len(rows)} trials, {sum(t['steps'] for t in rows):,} model-steps")
    legend = right.get_legend()
    handles, title = legend.legend_handles, legend.get_title().get_text()
    left.get_legend().remove()
    legend.remove()
    fig.legend(handles=handles, title=title, loc="outside lower center", ncols=2, frameon=False)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=150)


if __name__ == "__main__":
    main()
