"""figures.py on synthetic studies: every figure, every format, grids, samples, facets, bad input.

The synthetic study mimics a weight decay × training fraction sweep: the delay
to generalize grows as weight decay and the fraction fall (Omnigrok's t ∝ 1/γ;
Power et al.'s steep rise at small fractions), too much decay on too little
data never fits, and curves are labelled by the real `phases.classify`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from matplotlib.colors import to_rgba
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from grokstudy import figures, results
from grokstudy.cli import main
from grokstudy.config import DiagramConfig, SearchConfig, SearchDim, Study, TrialConfig, with_overrides
from grokstudy.errors import UsageError
from grokstudy.phases import PHASES, TIE, vote
from grokstudy.records import EvalRecord, Outcome, TrialHistory
from grokstudy.results import build_tables, trials_table

BUDGET = 20_000
EVAL_STEPS = [0, 1, 2, 5, 10, 20, 50, 100, *range(200, BUDGET + 1, 200)]
WDS = [0.001, 0.00464, 0.0215, 0.1, 0.464, 2.15, 10.0]
FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def _sigmoid_curve(steps: np.ndarray, t: float | None, low: float, rng: np.random.Generator) -> np.ndarray:
    """Accuracy rising from `low` to 1 in log-time, crossing 0.99 near step t (never if t is None)."""
    if t is None:
        base = np.full(steps.shape, low)
    else:
        z = 25 * (np.log10(steps + 1) - np.log10(t / 1.6))
        base = low + (1 - low) / (1 + np.exp(-np.clip(z, -50, 50)))
    return np.clip(base + rng.normal(0, 0.002, steps.shape), 0, 1)


def synthetic_curve(
    wd: float, frac: float, seed: int, optimizer: str = "adamw"
) -> tuple[list[EvalRecord], str]:
    """A plausible eval curve for one trial, and the regime it was drawn from."""
    rng = np.random.default_rng([int(wd * 1e5), int(frac * 100), seed, len(optimizer)])
    steps = np.array(EVAL_STEPS, dtype=float)
    noise = math.exp(rng.normal(0, 0.35))
    t_train = 250 * noise * (1.5 if optimizer == "adam" else 1.0)
    # Delay to generalize: ∝ 1/wd^0.6, rising steeply as the fraction shrinks.
    t_val = t_train + 900 * noise / max(wd, 1e-4) ** 0.6 * math.exp(6 * (0.45 - frac)) * (
        3 if optimizer == "adam" else 1
    )
    if wd >= 2 and frac <= 0.2 + 0.1 * (wd >= 10):
        regime, t_train, t_val = "confusion", None, None
    elif wd >= 2 and frac <= 0.3 and seed == 0:
        regime = "unstable"
    else:
        regime = "ok"
    train = _sigmoid_curve(steps, t_train, 0.02, rng)
    if regime == "confusion":
        train = np.minimum(train + 0.6, 0.93)
    val = _sigmoid_curve(steps, t_val if t_val is not None and t_val < 3 * BUDGET else None, 0.01, rng)
    val = np.minimum(val + 0.02 * (steps > (t_train or 0)), 1.0)
    if regime == "unstable":
        val = np.where(steps > 2 * t_val, 0.35, val)
    records = [
        EvalRecord(
            step=int(s),
            train_loss=float(-np.log(max(a, 1e-3))),
            train_acc=float(a),
            val_loss=float(-np.log(max(b, 1e-3))),
            val_acc=float(b),
            weights_norm=float(40 / (1 + wd * s / 1000)),
            elapsed_s=float(s) * 1e-3,
        )
        for s, a, b in zip(steps, train, val, strict=True)
    ]
    return records, regime


def synthetic_study(
    name: str = "wd-vs-frac",
    wds: list[float] = WDS,
    fractions: list[float] = FRACTIONS,
    seeds: int = 3,
    optimizers: tuple[str, ...] = ("adamw",),
    skip: frozenset = frozenset({(0.1, 0.4), (10.0, 0.7)}),
    points: list[tuple[float, float]] | None = None,
    progress: bool = False,
) -> tuple[pa.Table, pa.Table]:
    """Trials and curves tables of a grid (or of a random sample at `points`), built as a study's
    are: `results.build_tables` on its trial histories; with `progress`, curves carry progress
    measures (`with_progress`)."""
    space = [
        SearchDim("optimizer.weight_decay", values=tuple(wds)),
        SearchDim("data.fraction", values=tuple(fractions)),
    ]
    if len(optimizers) > 1:
        space.append(SearchDim("optimizer.name", choice=optimizers))
    sampler = "grid" if points is None else "random"
    study = Study(
        name,
        base=with_overrides(TrialConfig(), {"train.max_steps": BUDGET}),
        search=SearchConfig(
            sampler=sampler, space=tuple(space), seeds=seeds, num_samples=len(points or ()) or None
        ),
        diagram=DiagramConfig(x="data.fraction", y="optimizer.weight_decay"),
    )
    grid = points if points is not None else [(w, f) for w in wds for f in fractions if (w, f) not in skip]
    histories = []
    for opt in optimizers:
        for wd, frac in grid:
            for seed in range(seeds):
                point = {
                    "optimizer.weight_decay": wd,
                    "data.fraction": frac,
                    "optimizer.name": opt,
                    "train.seed": seed,
                }
                records, _ = synthetic_curve(wd, frac, seed, opt)
                if progress:
                    records = with_progress(records)
                histories.append(
                    TrialHistory(
                        trial_id=f"{opt}-{wd:g}-{frac:g}-{seed}",
                        point=point,
                        cfg=study.trial(point),
                        records=tuple(records),
                        outcome=Outcome("memorization", None, None, None, 0.0, "budget"),
                    )
                )
    return build_tables(study, histories)


def with_progress(records: list[EvalRecord]) -> list[EvalRecord]:
    """Progress measures taken at every other eval (measures_every: 2): a restricted loss a
    tenth of the validation loss (so the circuit is there before validation generalizes), an
    excluded loss that peaks mid-jump, and a Gini rising with validation accuracy."""
    nan = math.nan
    return [
        dataclasses.replace(
            r,
            restricted_loss=0.1 * r.val_loss + 1e-4 if i % 2 == 0 else nan,
            excluded_loss=1 + 20 * r.val_acc * (1 - r.val_acc) if i % 2 == 0 else nan,
            key_frequencies=float(round(5 * r.val_acc)) if i % 2 == 0 else nan,
            fourier_gini=0.1 + 0.5 * r.val_acc,
        )
        for i, r in enumerate(records)
    ]


@pytest.fixture(scope="module")
def grid_study() -> tuple[pa.Table, pa.Table]:
    return synthetic_study()


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def rendered(fig) -> np.ndarray:
    """The figure as drawn, RGB in [0, 1] (drawn once per figure)."""
    if getattr(fig, "_test_image", None) is None:
        fig.canvas.draw()
        fig._test_image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    return fig._test_image


def cell_pixels(ax, i: int, j: int, nx: int, ny: int) -> np.ndarray:
    """RGB pixels (0-1) of a patch near the lower-left corner of grid cell (i, j), as drawn: clear
    of the counts, dots and agreement labels a cell may carry."""
    image = rendered(ax.figure)
    (x0, y0), (x1, y1) = ax.transAxes.transform(
        [((i + 0.1) / nx, (j + 0.1) / ny), ((i + 0.3) / nx, (j + 0.3) / ny)]
    )
    height = image.shape[0]  # display y runs up, image rows run down
    return image[int(height - y1) : int(height - y0), int(x0) : int(x1)].reshape(-1, 3)


def is_missing(pixels: np.ndarray) -> bool:
    """The 'no finished trial' look: white with grey hatching, no colour."""
    achromatic = np.ptp(pixels, axis=1).max() < 0.02
    return achromatic and (pixels.min(axis=1) > 0.98).any() and (pixels.max(axis=1) < 0.9).any()


def is_solid(pixels: np.ndarray, colour: str | None = None) -> bool:
    """One flat fill (of `colour`, blended with white by any share, when given)."""
    flat = np.ptp(pixels, axis=0).max() < 0.02
    if colour is None or not flat:
        return flat
    fill, target = pixels.mean(axis=0), np.array(to_rgba(colour)[:3])
    share = np.dot(1 - fill, 1 - target) / np.dot(1 - target, 1 - target)  # fill = share*c + (1-share)*white
    return 0.2 <= share <= 1.01 and np.abs(share * target + (1 - share) - fill).max() < 0.03


def is_hatched(pixels: np.ndarray, colour: str) -> bool:
    """A fill of `colour` (blended with white by any share) crossed by hatching lines."""
    values, counts = np.unique(pixels.round(3), axis=0, return_counts=True)
    return not is_solid(pixels) and is_solid(values[counts.argmax()][None, :], colour)


def column_headers(fig) -> list[str]:
    """The learning-curves column headers, left to right."""
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "column header"]


def tick_labels(ax, which: str) -> list[str]:
    ax.figure.canvas.draw()
    labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def test_the_legend_names_every_phase_the_study_has_with_its_definition(grid_study) -> None:
    trials, _ = grid_study
    present = [p for p in PHASES if p in set(trials.column("phase").to_pylist())]
    assert len(present) >= 5  # the synthetic study draws all but divergence
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    censored = "censored: memorization in < 10 decay times 1/(lr·wd); could still grok"
    phases = [f"{p}: {figures.PHASE_DEFINITIONS[p]}" for p in present]
    assert legend == [*phases, censored, "no finished trial"]


def hatched_cells(fig) -> set[tuple[float, float]]:
    """(fraction, weight decay), as the nearest tick labels read, of every cell hatched as censored."""
    [ax] = fig.axes
    fig.canvas.draw()
    xs = dict(zip(ax.get_xticks(), (float(t.get_text()) for t in ax.get_xticklabels()), strict=True))
    ys = dict(zip(ax.get_yticks(), (float(t.get_text()) for t in ax.get_yticklabels()), strict=True))
    out = set()
    for patch in ax.patches:
        if patch.get_gid() == "censored":
            assert patch.get_hatch() == figures.CENSORED_HATCH
            cx, cy = patch.get_x() + patch.get_width() / 2, patch.get_y() + patch.get_height() / 2
            out.add((xs[min(xs, key=lambda t: abs(t - cx))], ys[min(ys, key=lambda t: abs(t - cy))]))
    return out


def majority_cells(trials: pa.Table, phase: str) -> set[tuple[float, float]]:
    """(fraction, weight decay) of every cell whose seeds' majority is `phase`."""
    by_cell: dict[tuple[float, float], list[str]] = {}
    for r in trials.to_pylist():
        by_cell.setdefault((r["data.fraction"], r["optimizer.weight_decay"]), []).append(r["phase"])
    return {cell for cell, phases in by_cell.items() if vote(phases).phase == phase}


def test_memorization_within_a_short_budget_is_hatched_as_censored_and_the_legend_says_so(grid_study) -> None:
    trials, _ = grid_study
    # 20k steps at lr 1e-3: 0.02 decay times at wd 0.001, 2 at wd 0.1, 200 at wd 10.
    wds, budget = trials["optimizer.weight_decay"].to_pylist(), trials["budget_decay_times"].to_pylist()
    budgets = dict(zip(wds, budget, strict=True))
    assert budgets[0.001] == pytest.approx(0.02) and budgets[0.1] == pytest.approx(2) and budgets[10.0] == 200
    memorized, confused = majority_cells(trials, "memorization"), majority_cells(trials, "confusion")
    assert (0.1, 0.001) in memorized and (0.1, 10.0) in confused
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    assert hatched_cells(fig) == memorized  # confusion at wd >= 2.15 had 43 and 200 decay times: not hatched

    # The same curves with a budget of 20 decay times everywhere: nothing is short, nothing hatched.
    long = trials.set_column(
        trials.schema.get_field_index("budget_decay_times"), "budget_decay_times",
        pa.array([20.0] * trials.num_rows),
    )  # fmt: skip
    fig = figures.phase_diagram(long, "data.fraction", "optimizer.weight_decay")
    assert hatched_cells(fig) == set() and not any("censored" in t for t in legend_texts(fig))

    # Weight decay 0 (a null budget_decay_times): an infinite time constant, so every censored
    # verdict is short, confusion too, and the legend names both.
    no_decay = trials.set_column(
        trials.schema.get_field_index("budget_decay_times"), "budget_decay_times",
        pa.nulls(trials.num_rows, pa.float64()),
    )  # fmt: skip
    fig = figures.phase_diagram(no_decay, "data.fraction", "optimizer.weight_decay")
    assert hatched_cells(fig) == memorized | confused
    assert (
        "censored: memorization or confusion in < 10 decay times 1/(lr·wd); could still grok"
        in legend_texts(fig)
    )


def test_a_table_from_before_censoring_was_recorded_is_drawn_without_hatching(grid_study, tmp_path) -> None:
    trials, curves = grid_study
    old = trials.drop_columns(["censored", "budget_decay_times", "val_acc_at_fit"])
    fig = figures.phase_diagram(old, "data.fraction", "optimizer.weight_decay")
    assert hatched_cells(fig) == set() and not any("censored" in t for t in legend_texts(fig))
    assert figures.render_study(old, curves, tmp_path, formats=("png",))


def test_render_study_writes_every_figure_in_every_format(grid_study, tmp_path: Path, artifacts_dir) -> None:
    trials, curves = grid_study
    paths = figures.render_study(
        trials, curves, tmp_path, x="data.fraction", y="optimizer.weight_decay", formats=("png", "svg", "pdf")
    )
    names = ("phase_diagram", "delay_heatmap", "t_val_heatmap", "learning_curves")
    assert sorted(p.name for p in paths) == sorted(f"{n}.{f}" for n in names for f in ("png", "svg", "pdf"))
    for p in paths:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 10_000, p
        assert {"png": head == b"\x89PNG\r\n\x1a\n", "pdf": head[:5] == b"%PDF-", "svg": b"<?xml" in head}[
            p.suffix[1:]
        ], p
        if p.suffix == ".png":
            (artifacts_dir / f"figures_{p.name}").write_bytes(p.read_bytes())


def test_phase_diagram_shows_disagreement_missing_cells_and_log_axes(grid_study) -> None:
    trials, _ = grid_study
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    ax = fig.axes[0]
    hatched = hatched_cells(fig)
    assert hatched
    skipped = {(FRACTIONS.index(f), WDS.index(w)) for w, f in ((0.1, 0.4), (10.0, 0.7))}
    rows = trials.to_pylist()
    for i, fraction in enumerate(FRACTIONS):
        for j, wd in enumerate(WDS):
            pixels = cell_pixels(ax, i, j, len(FRACTIONS), len(WDS))
            if (i, j) in skipped:
                assert is_missing(pixels), (i, j)
                continue
            v = vote(
                [
                    r["phase"]
                    for r in rows
                    if (r["data.fraction"], r["optimizer.weight_decay"]) == (fraction, wd)
                ]
            )
            if (fraction, wd) in hatched:  # memorization within a short budget
                assert is_hatched(pixels, figures.PHASE_COLORS[v.phase]), (i, j, v.phase)
            elif v.phase != TIE:  # (a tie is striped: one stripe per tied phase)
                assert is_solid(pixels, figures.PHASE_COLORS[v.phase]), (i, j, v.phase)
    assert any(t in ("1/3", "2/3") for t in texts(fig))  # seeds disagree somewhere
    assert tick_labels(ax, "y") == ["0.001", "0.00464", "0.0215", "0.1", "0.464", "2.15", "10"]  # each cell
    # fraction spans < 2 decades: linear, and a grid's linear axis is ticked at each cell too
    assert tick_labels(ax, "x") == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    assert ax.get_ylabel() == "weight decay" and ax.get_xlabel() == "training fraction"
    legend = fig.legends[0].get_texts()
    assert any(t.get_text().startswith("grokking: ") for t in legend)
    assert fig.get_suptitle() == "wd-vs-frac: phase diagram\n3 seeds per point, budget 20k steps"


def test_a_single_seed_study_has_no_agreement_marks() -> None:
    trials, _ = synthetic_study(seeds=1, wds=WDS[:4], fractions=FRACTIONS[:3], skip=frozenset())
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    assert not any("/" in t for t in texts(fig))
    assert "1 seed per point" in fig.get_suptitle()
    assert fig.legends[0].get_title().get_text() == ""


def test_a_random_sample_is_drawn_as_points_over_nearest_neighbour_regions(artifacts_dir) -> None:
    rng = np.random.default_rng(1)
    points = [(float(10 ** rng.uniform(-3, 1)), float(rng.uniform(0.1, 0.7))) for _ in range(40)]
    trials, _ = synthetic_study(name="random", points=points, seeds=1)
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    ax = fig.axes[0]
    assert not [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len([im for im in ax.get_images() if isinstance(im, AxesImage)]) == 1
    # Every sample is a point where it lies: (fraction, log10 wd) in the axes' coordinates.
    where = sorted((f, math.log10(w)) for w, f in points)
    drawn = sorted(map(tuple, np.concatenate([c.get_offsets() for c in ax.collections])))
    np.testing.assert_allclose(drawn, where, rtol=1e-12)
    fig.savefig(artifacts_dir / "figures_random_phase_diagram.png")
    delay = figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay")
    drawn = sorted(map(tuple, np.concatenate([c.get_offsets() for c in delay.axes[0].collections])))
    np.testing.assert_allclose(drawn, where, rtol=1e-12)
    assert not delay.axes[0].patches


def test_a_facet_draws_one_panel_per_value_with_shared_axes(artifacts_dir) -> None:
    trials, _ = synthetic_study(
        wds=WDS[::2], fractions=FRACTIONS[::2], seeds=2, optimizers=("adamw", "adam"), skip=frozenset()
    )
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay", facet="optimizer.name")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["optimizer = adam", "optimizer = adamw"]
    assert panels[0].get_ylim() == panels[1].get_ylim()
    fig.savefig(artifacts_dir / "figures_facet_phase_diagram.png")
    delay = figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay", facet="optimizer.name")
    assert [ax.get_title() for ax in delay.axes[:2]] == ["optimizer = adam", "optimizer = adamw"]


def test_delay_heatmap_marks_cells_that_never_generalized_and_labels_steps(grid_study) -> None:
    trials, _ = grid_study
    fig = figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay")
    assert "×" in texts(fig)
    colorbar = fig.axes[-1]
    assert "steps" in colorbar.get_ylabel()
    # A cell where most seeds never generalized (an infinite median delay) is the flat grey of
    # NEVER_COLOR, marked ×.
    delays: dict[tuple[int, int], list[float]] = {}
    for r in trials.to_pylist():
        cell = (FRACTIONS.index(r["data.fraction"]), WDS.index(r["optimizer.weight_decay"]))
        delays.setdefault(cell, []).append(math.inf if r["delay"] is None else r["delay"])
    never = [c for c, ds in delays.items() if np.median(ds) == math.inf]
    assert never and texts(fig).count("×") == len(never)
    for cell in never:
        assert is_solid(cell_pixels(fig.axes[0], *cell, len(FRACTIONS), len(WDS)), figures.NEVER_COLOR), cell
    t_val = figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay", value="t_val")
    assert t_val.axes[-1].get_ylabel().startswith("t_val (steps")
    with pytest.raises(UsageError, match="unknown heatmap value 'gap'"):
        figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay", value="gap")


def test_a_zero_on_a_log_axis_gets_its_own_tick() -> None:
    trials, _ = synthetic_study(seeds=1, wds=[0.0, 0.01, 0.1, 1.0], fractions=[0.3, 0.5], skip=frozenset())
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    ax = fig.axes[0]
    assert tick_labels(ax, "y") == ["0", "0.01", "0.1", "1"]
    # The zero's slot is one grid step below 0.01: evenly spaced with the others.
    np.testing.assert_allclose(ax.get_yticks(), [-3, -2, -1, 0])


def test_uneven_grid_values_on_a_linear_axis_become_evenly_spaced_cells() -> None:
    trials, _ = synthetic_study(seeds=1, wds=[0.0, 0.01, 0.1, 1.0], fractions=[0.3, 0.5], skip=frozenset())
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay", log_y=False)
    ax = fig.axes[0]
    assert tick_labels(ax, "y") == ["0", "0.01", "0.1", "1"]
    assert tick_labels(ax, "x") == ["0.3", "0.5"]  # two values: no scale to draw, and no cell below zero
    assert ax.get_ylim() == (-0.5, 3.5)


def test_an_axis_maps_values_to_positions_cells_and_spans() -> None:
    log = figures.Axis.build("optimizer.weight_decay", [0.1, 0, 1, 0.01, 0.1])  # repeats and a zero
    assert (log.kind, log.values) == ("log", [0, 0.01, 0.1, 1])
    np.testing.assert_allclose(log.positions(), [-3, -2, -1, 0])  # the zero one median step below 0.01
    np.testing.assert_allclose(log.cell(0), (-3.5, -2.5))
    np.testing.assert_allclose(log.span(grid=True), (-3.5, 0.5))  # a grid's outer cell edges
    np.testing.assert_allclose(log.span(grid=False), (-3.15, 0.15))  # a sample's values, 5% to spare
    assert log.with_zero([(-3.0, "1e-3"), (-2.0, "1e-2")]) == [(log.zero_pos, "0"), (-2.0, "1e-2")]
    # On a grid, linear values that are two or unevenly spaced are evenly spaced cells; a sample's stay.
    assert figures.Axis.build("data.fraction", [0.3, 0.5], grid=True).kind == "category"
    assert figures.Axis.build("data.fraction", [0.3, 0.5], grid=False).kind == "linear"
    assert figures.Axis.build("data.fraction", [0.3, 0.5, 0.7], grid=True).kind == "linear"
    uneven = figures.Axis.build("data.fraction", [0.1, 0.2, 0.7], grid=True)
    assert uneven.kind == "category" and uneven.cell(0.7) == (1.5, 2.5)
    # The study's scale wins over config.is_log_scale, a figure's log flag over both.
    assert figures.Axis.build("w", [1, 10, 100, 1000], "linear").kind == "linear"
    assert figures.Axis.build("w", [1, 2, 3], "log").kind == "log"
    assert figures.Axis.build("w", [1, 2, 4, 8], "category").kind == "category"  # a study's choice axis
    assert figures.Axis.build("w", [1, 2, 4, 8], True).kind == "log"
    assert figures.Axis.build("w", [-1, 10, 1000], "log").kind == "linear"  # no log of a negative
    one = figures.Axis.build("w", [0.5, 0.5])
    assert (one.kind, one.cell(0.5), one.span(grid=False)) == ("category", (-0.5, 0.5), (-0.5, 0.5))
    text = figures.Axis.build("optimizer.name", ["sgd", "adamw", "adam"])
    assert (text.kind, text.values, text.positions()) == ("category", ["adam", "adamw", "sgd"], [0, 1, 2])


def test_learning_curves_show_one_median_trial_per_phase(grid_study) -> None:
    trials, curves = grid_study
    fig = figures.learning_curves(trials, curves)
    columns = len(column_headers(fig))
    firsts = fig.axes[::columns]  # one row per trial: its first panel carries its title
    present = [p for p in PHASES if p in set(trials.column("phase").to_pylist())]
    assert [ax.get_title(loc="left").split("}")[0].removeprefix("$\\bf{") for ax in firsts] == present
    grokking = fig.axes[columns * PHASES.index("grokking") : columns * (PHASES.index("grokking") + 1)]
    assert all(ax.get_xscale() == "symlog" for ax in grokking)
    # The row draws one grokking trial's train and validation curves and marks its t_train and
    # t_val in every panel: find the trial by its curve and check the marks are its own.
    accuracy = grokking[0]
    drawn = {tuple(ln.get_ydata()): ln for ln in accuracy.lines if len(ln.get_xdata()) > 2}
    rows = {r["trial_id"]: r for r in trials.to_pylist() if r["phase"] == "grokking"}
    curve_rows = curves.to_pylist()
    [trial] = [t for t in rows if tuple(c["val/acc"] for c in curve_rows if c["trial_id"] == t) in drawn]
    assert tuple(c["train/acc"] for c in curve_rows if c["trial_id"] == trial) in drawn
    for panel in grokking:
        marks = sorted(ln.get_xdata()[0] for ln in panel.lines if len(set(ln.get_xdata())) == 1)
        assert marks == [rows[trial]["t_train"], rows[trial]["t_val"]]
    fig = figures.learning_curves(trials, curves, trial_ids=["adamw-0.001-0.5-0"])
    assert len(fig.axes) == columns
    with pytest.raises(UsageError, match="no trial 'nope'"):
        figures.learning_curves(trials, curves, trial_ids=["nope"])


def test_learning_curves_are_skipped_without_curves(tmp_path: Path) -> None:
    trials, _ = synthetic_study(seeds=1, wds=WDS[:3], fractions=FRACTIONS[:3], skip=frozenset())
    paths = figures.render_study(
        trials, None, tmp_path, x="data.fraction", y="optimizer.weight_decay", formats=("svg",)
    )
    assert [p.name for p in paths] == ["phase_diagram.svg", "delay_heatmap.svg", "t_val_heatmap.svg"]


def test_an_unknown_axis_is_one_line_listing_the_searched_axes_first(grid_study, tmp_path: Path) -> None:
    trials, curves = grid_study
    with pytest.raises(UsageError) as err:
        figures.render_study(trials, curves, tmp_path, x="foo", y="optimizer.weight_decay")
    assert err.value.flag == "--x"
    assert str(err.value).startswith(
        "--x: unknown axis 'foo'; the study's axes are: optimizer.weight_decay, data.fraction, study, "
    )
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="^--facet: unknown axis 'optimizer.nam'"):
        figures.render_study(trials, curves, tmp_path, x="data.fraction", y="task.p", facet="optimizer.nam")
    assert not list(tmp_path.iterdir())


def test_an_unknown_format_is_refused_before_anything_is_drawn(grid_study, tmp_path: Path) -> None:
    trials, curves = grid_study
    with pytest.raises(UsageError, match="^--format: unknown format 'jpg'; choose from: png, svg, pdf$"):
        figures.render_study(
            trials, curves, tmp_path, x="data.fraction", y="optimizer.weight_decay", formats=("png", "jpg")
        )
    assert not list(tmp_path.iterdir())


def test_failed_trials_are_left_out_and_their_cells_show_as_missing() -> None:
    trials, _ = synthetic_study(seeds=1, wds=WDS[:3], fractions=FRACTIONS[:3], skip=frozenset())
    rows = trials.to_pylist()
    rows[0] |= {"stop_reason": "error", "status": "ERROR"}
    failed = trials_table(rows).replace_schema_metadata(trials.schema.metadata)
    fig = figures.phase_diagram(failed, "data.fraction", "optimizer.weight_decay")
    xs, ys = FRACTIONS[:3], WDS[:3]
    failed_cell = (xs.index(rows[0]["data.fraction"]), ys.index(rows[0]["optimizer.weight_decay"]))
    phase = {(r["data.fraction"], r["optimizer.weight_decay"]): r["phase"] for r in rows}
    hatched = hatched_cells(fig)  # memorization within a short budget
    for i in range(3):
        for j in range(3):
            pixels = cell_pixels(fig.axes[0], i, j, 3, 3)
            if (i, j) == failed_cell:
                assert is_missing(pixels), (i, j)
            elif (xs[i], ys[j]) in hatched:
                assert is_hatched(pixels, figures.PHASE_COLORS[phase[(xs[i], ys[j])]]), (i, j)
            else:
                assert is_solid(pixels), (i, j)


def test_a_categorical_axis_is_labelled_by_its_values() -> None:
    trials, _ = synthetic_study(
        seeds=1, wds=[0.1, 1.0], fractions=[0.3, 0.5], optimizers=("adamw", "sgd"), skip=frozenset()
    )
    fig = figures.phase_diagram(trials, "optimizer.name", "optimizer.weight_decay")
    assert tick_labels(fig.axes[0], "x") == ["adamw", "sgd"]


def test_a_one_axis_sweep_draws_medians_seeds_and_never_generalized_marks(
    tmp_path: Path, artifacts_dir
) -> None:
    wds = [0.001, 0.01, 0.1, 1.0, 10.0]
    trials, curves = synthetic_study(name="sweep", wds=wds, fractions=[0.3], seeds=3, skip=frozenset())
    # A study that searched only weight decay: the sweep figure is its picture.
    meta = trials.schema.metadata | {b"grokstudy.axes": b'{"optimizer.weight_decay": "log"}'}
    trials = trials.replace_schema_metadata(meta)
    assert figures.numeric_axes(trials) == ["optimizer.weight_decay"]
    fig = figures.sweep(trials, "optimizer.weight_decay")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    # Every weight decay with a seed that never generalized gets an × on the budget line.
    rows = trials.to_pylist()
    never = sorted({r["optimizer.weight_decay"] for r in rows if r["t_val"] is None})
    assert never, "the synthetic sweep has seeds that never generalize"
    budget = max(r["max_steps"] for r in rows)
    on_budget = sorted(float(x) for c in ax.collections for x, y in c.get_offsets() if y == budget)
    assert on_budget == never
    [median] = [ln for ln in ax.lines if ln.get_linestyle() == "-"]  # one group: one median line
    assert list(median.get_xdata()) == wds
    paths = figures.render_study(trials, curves, tmp_path, formats=("png",))
    assert "sweep.png" in {p.name for p in paths}
    (artifacts_dir / "figures_sweep.png").write_bytes((tmp_path / "sweep.png").read_bytes())
    with pytest.raises(UsageError, match="unknown sweep value"):
        figures.sweep(trials, "optimizer.weight_decay", value="delay")


def test_a_diverged_trial_has_its_own_colour_and_legend_line(tmp_path: Path) -> None:
    trials, curves = synthetic_study(seeds=1, wds=WDS[:3], fractions=FRACTIONS[:3], skip=frozenset())
    rows = trials.to_pylist()
    rows[0] |= {"phase": "diverged", "stop_reason": "diverged"}
    diverged = trials_table(rows).replace_schema_metadata(trials.schema.metadata)
    fig = figures.phase_diagram(diverged, "data.fraction", "optimizer.weight_decay")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"diverged: {figures.PHASE_DEFINITIONS['diverged']}" in legend
    cell = (FRACTIONS.index(rows[0]["data.fraction"]), WDS.index(rows[0]["optimizer.weight_decay"]))
    assert is_solid(cell_pixels(fig.axes[0], *cell, 3, 3), figures.PHASE_COLORS["diverged"])
    assert len(set(figures.PHASE_COLORS.values())) == len(figures.PHASE_COLORS) == len(PHASES)
    paths = figures.render_study(diverged, curves, tmp_path, formats=("png",))
    assert {p.name for p in paths} >= {"phase_diagram.png", "learning_curves.png"}


# ---- paper-ready figures: words on axes, ticks at cells, metric columns, chosen trials, comparisons ----


def with_study_labels(trials: pa.Table, labels: dict[str, str]) -> pa.Table:
    """`trials` as a study with `diagram.labels` writes it: the labels in the diagram's metadata."""
    key = results.DIAGRAM_META.encode()
    diagram = json.loads(trials.schema.metadata[key]) | {"labels": labels}
    return trials.replace_schema_metadata(trials.schema.metadata | {key: json.dumps(diagram).encode()})


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_axes_facets_and_legends_name_keys_in_words_unless_the_call_or_the_study_renames_them() -> None:
    trials, curves = synthetic_study(
        seeds=1, wds=[0.01, 0.1, 1.0], fractions=[0.3, 0.5], optimizers=("adamw", "adam"), skip=frozenset()
    )
    axes = ("data.fraction", "optimizer.weight_decay")
    fig = figures.phase_diagram(trials, *axes, facet="optimizer.name")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("training fraction", "weight decay")
    assert fig.axes[1].get_title() == "optimizer = adamw"
    one_fraction = trials.filter(pc.equal(trials["data.fraction"], 0.3))
    sweep = figures.sweep(one_fraction, "optimizer.weight_decay", line="optimizer.name")
    assert sweep.axes[0].get_xlabel() == "weight decay"
    assert {"optimizer = adam", "optimizer = adamw"} <= set(legend_texts(sweep))
    curve_fig = figures.learning_curves(trials, curves, trial_ids=["adam-0.1-0.5-0"])
    title = curve_fig.axes[0].get_title(loc="left")
    assert title.endswith("weight decay = 0.1, training fraction = 0.5, optimizer = adam, seed = 0")

    # The study's diagram.labels win over the defaults, and a call's labels over the study's.
    study = with_study_labels(trials, {"optimizer.weight_decay": "γ", "optimizer.name": "optimiser"})
    fig = figures.phase_diagram(study, *axes, facet="optimizer.name")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("training fraction", "γ")
    assert fig.axes[1].get_title() == "optimiser = adamw"
    fig = figures.delay_heatmap(study, *axes, labels={"optimizer.weight_decay": "λ", "data.fraction": "α"})
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("α", "λ")
    assert figures.axis_label("optimizer.weight_decay", {"data.fraction": "α"}, study) == "γ"
    assert figures.axis_label("model.kind_of_thing") == "model.kind_of_thing"  # no label: the key itself


def test_a_log_grid_axis_is_ticked_at_its_cells_and_a_sampled_one_at_decades() -> None:
    many = [float(f"{v:.3g}") for v in np.logspace(-4, 1, 12)]
    trials, _ = synthetic_study(seeds=1, wds=many, fractions=[0.3, 0.5], skip=frozenset())
    tall = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay").axes[0]
    np.testing.assert_allclose(tall.get_yticks(), np.log10(many))  # a tick at every cell...
    every_other = [f"{v:.3g}" if i % 2 == 0 else "" for i, v in enumerate(many)]
    assert tick_labels(tall, "y") == every_other  # ...labelled every other one: 12 labels would crowd
    wide = figures.phase_diagram(trials, "optimizer.weight_decay", "data.fraction").axes[0]
    shown = [t for t in tick_labels(wide, "x") if t]
    assert shown[0] == "0.0001" and len(shown) <= 4  # side by side, wide labels are thinned further
    rng = np.random.default_rng(2)
    points = [(float(10 ** rng.uniform(-3, 1)), float(rng.uniform(0.1, 0.7))) for _ in range(20)]
    sampled, _ = synthetic_study(name="random", points=points, seeds=1)
    ax = figures.phase_diagram(sampled, "data.fraction", "optimizer.weight_decay").axes[0]
    lo, hi = ax.get_ylim()
    decades = range(math.ceil(lo), math.floor(hi) + 1)
    assert len(decades) >= 3 and tick_labels(ax, "y") == [f"$10^{{{k}}}$" for k in decades]


def with_fourier(curves: pa.Table, trial_id: str) -> pa.Table:
    """`curves` where one trial has a Fourier measure rising from 0.1 to 0.9."""
    i = curves.schema.get_field_index("fourier/top_k_share")
    ids = curves.column("trial_id").to_pylist()
    values = [
        0.1 + 0.8 * s / BUDGET if t == trial_id else None
        for t, s in zip(ids, curves["step"].to_pylist(), strict=True)
    ]
    return curves.set_column(i, curves.schema.field(i), pa.array(values, pa.float64()))


def test_learning_curves_draw_a_column_per_metric_and_the_fourier_one_only_where_measured(grid_study) -> None:
    trials, curves = grid_study
    ids = ["adamw-0.1-0.3-0", "adamw-10-0.3-0"]
    fig = figures.learning_curves(trials, curves, trial_ids=ids)
    assert column_headers(fig) == ["accuracy", "loss (log scale)", "weight norm (L2)"]
    assert len(fig.axes) == 2 * 3
    assert [ax.get_yscale() for ax in fig.axes[:3]] == ["linear", "log", "linear"]
    assert [bool(ax.get_title(loc="left")) for ax in fig.axes] == [True, False, False] * 2  # a title per row
    assert [ax.spines["top"].get_visible() for ax in fig.axes] == [True, False, False] * 2  # its phase colour
    assert [ax.get_xlabel() for ax in fig.axes] == [""] * 3 + ["optimizer step"] * 3
    # Each panel draws its own curves: the weight norm of the first trial, from its curve table.
    norm = [r["weights/norm"] for r in curves.to_pylist() if r["trial_id"] == ids[0]]
    assert [list(ln.get_ydata()) for ln in fig.axes[2].lines if len(ln.get_ydata()) > 2] == [norm]

    measured = with_fourier(curves, ids[1])
    fig = figures.learning_curves(trials, measured, trial_ids=ids)
    assert column_headers(fig) == [
        "accuracy",
        "loss (log scale)",
        "weight norm (L2)",
        "Fourier share (top-k frequencies)",
    ]
    assert len(fig.axes) == 2 * 4 and fig.axes[3].get_ylim() == fig.axes[7].get_ylim() == (-0.03, 1.05)
    fig = figures.learning_curves(trials, measured, trial_ids=ids[:1])  # the measured trial is not shown
    assert len(column_headers(fig)) == len(fig.axes) == 3
    fig = figures.learning_curves(trials, curves, trial_ids=ids[:1], metrics=["loss", "accuracy"])
    assert column_headers(fig) == ["loss (log scale)", "accuracy"]
    with pytest.raises(UsageError, match="^metrics: unknown metric 'norm'; choose from: accuracy, loss, "):
        figures.learning_curves(trials, curves, metrics=["norm"])


def test_select_trials_by_query_and_id_with_one_line_errors_naming_the_flag(grid_study) -> None:
    trials, _ = grid_study
    rows = trials.to_pylist()
    where = '`optimizer.weight_decay` == 0.1 and `data.fraction` < 0.35 and phase != "confusion"'
    expected = [
        r["trial_id"]
        for r in rows
        if r["optimizer.weight_decay"] == 0.1 and r["data.fraction"] < 0.35 and r["phase"] != "confusion"
    ]
    assert 0 < len(expected) <= figures.MAX_CURVE_TRIALS
    assert figures.select_trials(trials, where=where) == expected
    named = [expected[-1], rows[0]["trial_id"]]
    assert figures.select_trials(trials, trial_ids=named) == named  # in the order given
    assert figures.select_trials(trials, trial_ids=named, where=where) == [expected[-1]]  # both must hold
    grokking = sum(r["phase"] == "grokking" for r in rows)
    assert grokking > figures.MAX_CURVE_TRIALS
    bad = {
        ("phase ==", None): "--where: cannot evaluate 'phase ==' (dotted columns go in backticks",
        ("optimizer.weight_decay > 1", None): "--where: cannot evaluate",
        ("`no.such` > 1", None): "--where: cannot evaluate",
        ('phase == "nothing"', None): "--where: no trial matches 'phase == \"nothing\"'",
        ('phase == "grokking"', None): f"--where: {grokking} trials match 'phase == \"grokking\"'; learning",
        (None, ("nope",)): "--trials: no trial 'nope' in this study; ids look like 'adamw-0.001-0.1-0'",
        (None, ()): "--trials: no trial matches the named trials",
    }
    for (query, ids), message in bad.items():
        with pytest.raises(UsageError) as err:
            figures.select_trials(trials, trial_ids=ids, where=query)
        assert str(err.value).startswith(message), (query, str(err.value))
        assert err.value.flag == message.split(":")[0] and "\n" not in str(err.value)


def test_two_studies_compare_side_by_side_on_shared_axes_with_one_legend(artifacts_dir) -> None:
    before, _ = synthetic_study(
        name="before", seeds=1, wds=WDS[:4], fractions=FRACTIONS[:3], skip=frozenset()
    )
    after, _ = synthetic_study(name="after", seeds=2, wds=WDS[2:], fractions=FRACTIONS[:3], skip=frozenset())
    fig = figures.compare_phase_diagrams([("before", before), ("after", after)])
    fig.savefig(artifacts_dir / "figures_compare_phase_diagram.png")
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("before", "after")
    assert tick_labels(left, "y") == [f"{w:.3g}" for w in WDS]  # the union of both studies' values
    assert left.get_shared_y_axes().joined(left, right)  # the right panel's labels are the left's
    assert list(right.get_yticks()) == list(left.get_yticks()) and right.get_ylim() == left.get_ylim()
    assert tick_labels(left, "x") == tick_labels(right, "x") and left.get_xlim() == right.get_xlim()
    assert len(fig.legends) == 1 and left.get_legend() is None and right.get_legend() is None
    assert "no finished trial" in legend_texts(fig)  # each lacks the other's weight decays
    # A weight decay only `after` has is missing on the left and drawn on the right.
    top = len(WDS) - 1
    assert is_missing(cell_pixels(left, 0, top, 3, len(WDS)))
    assert is_solid(cell_pixels(right, 0, top, 3, len(WDS)))
    assert fig.get_suptitle().startswith("before vs after: phase diagrams\nbefore: 1 seed per point")


def write_study(directory: Path, **kwargs) -> Path:
    trials, curves = synthetic_study(**kwargs)
    results.write_tables(trials, curves, directory)
    return directory


def test_cli_plot_where_draws_only_the_chosen_learning_curves(tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path / "study", seeds=1, wds=[0.1, 1.0], fractions=[0.3, 0.5], skip=frozenset())
    out = tmp_path / "out"
    where = "`optimizer.weight_decay` == 0.1 and `data.fraction` == 0.5"
    assert main(["plot", str(study), "--where", where, "--format", "svg", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"figure: {out / 'learning_curves.svg'}"]
    assert [p.name for p in out.iterdir()] == ["learning_curves.svg"]
    svg = (out / "learning_curves.svg").read_text()  # text stays text in SVGs
    assert "weight decay = 0.1, training fraction = 0.5, seed = 0" in svg and "weight decay = 1," not in svg
    assert main(["plot", str(study), "--trials", "adamw-1-0.3-0", "--format", "svg", "--out", str(out)]) == 0
    assert "weight decay = 1, training fraction = 0.3" in (out / "learning_curves.svg").read_text()
    for args, flag in (
        (["--where", "phase =="], "--where"),
        (["--trials", "adamw-1-0.3-9"], "--trials"),
        ([str(study), str(study)], "SOURCE"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["plot", str(study), *args])
        assert exc.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"grokstudy plot: error: {flag}: "), line


def test_cli_plot_of_two_studies_draws_their_comparison(tmp_path: Path, capsys) -> None:
    a = write_study(
        tmp_path / "a", name="adamw", seeds=1, wds=[0.1, 1.0], fractions=[0.3, 0.5], skip=frozenset()
    )
    b = write_study(
        tmp_path / "b", name="adam", seeds=1, wds=[1.0, 10.0], fractions=[0.3, 0.5], skip=frozenset()
    )
    assert main(["plot", str(a), str(b), "--format", "svg"]) == 0  # into the first study's figures/
    path = a / "figures" / "compare_phase_diagram.svg"
    assert capsys.readouterr().out.splitlines() == [f"figure: {path}"]
    svg = path.read_text()
    assert "adamw vs adam: phase diagrams" in svg and "weight decay" in svg
    with pytest.raises(SystemExit):
        main(["plot", str(a), str(b), "--where", "phase == 'grokking'"])
    assert "--where: draws one study" in capsys.readouterr().err


def test_progress_measures_get_their_panels_marks_and_the_circuit_heatmap(tmp_path: Path) -> None:
    trials, curves = synthetic_study(
        seeds=2, wds=WDS[:3], fractions=FRACTIONS[:3], skip=frozenset(), progress=True
    )
    rows = [r for r in trials.to_pylist() if r["t_val"] is not None]
    assert rows and all(r["t_circuit"] is not None and r["t_circuit"] < r["t_val"] for r in rows)
    fig = figures.learning_curves(trials, curves)
    headers = column_headers(fig)
    assert headers[-2:] == ["restricted / excluded loss (log)", "Fourier Gini (embedding)"]
    assert "Fourier share (top-k frequencies)" not in headers  # the Gini replaces it
    row = next(r for r in trials.to_pylist() if r["phase"] == "grokking")
    [tid] = figures.select_trials(trials, where=f'trial_id == "{row["trial_id"]}"')
    fig = figures.learning_curves(trials, curves, trial_ids=[tid])
    panel = fig.axes[headers.index("restricted / excluded loss (log)")]
    drawn = [ln for ln in panel.lines if len(set(ln.get_xdata())) > 1]
    measured = [
        c
        for c in curves.to_pylist()
        if c["trial_id"] == tid and c["progress/restricted_loss"] is not None  # NaN is null in Parquet
    ]
    # The measures are drawn through the evals that took them, not broken by the NaNs between.
    assert sorted(len(ln.get_xdata()) for ln in drawn)[:2] == [len(measured)] * 2
    marks = sorted(ln.get_xdata()[0] for ln in panel.lines if len(set(ln.get_xdata())) == 1)
    assert marks == sorted([row["t_train"], row["t_val"], row["t_circuit"]])
    fig = figures.delay_heatmap(trials, "data.fraction", "optimizer.weight_decay", value="circuit_lead")
    assert "t_val − t_circuit" in fig.axes[-1].get_ylabel()
    paths = {p.name for p in figures.render_study(trials, curves, tmp_path, formats=("png",))}
    assert "circuit_heatmap.png" in paths
    without = {
        p.name
        for p in figures.render_study(
            *synthetic_study(seeds=1, wds=WDS[:2], fractions=FRACTIONS[:2], skip=frozenset()),
            tmp_path / "plain",
            formats=("png",),
        )
    }
    assert "circuit_heatmap.png" not in without
