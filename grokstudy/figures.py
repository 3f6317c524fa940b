"""Figures from result tables: phase diagrams (one study's, or two side by side), delay heatmaps,
sweeps, learning curves.

Reads only the tables of `results.py` and the phase names of `phases.py`.
Matplotlib (checked against 3.11.2) is used through `matplotlib.figure.Figure`
and the Agg canvas, never `pyplot`: nothing global is switched (a notebook's
backend stays as it was), no figure registry grows, and rendering is
thread-safe. PNG goes through Agg; PDF and SVG through matplotlib's vector
backends, with TrueType fonts embedded in PDFs and text kept as text in SVGs.

Conventions shared by every figure:

- Phase colours (`PHASE_COLORS`) come from the Okabe–Ito palette, which stays
  distinguishable under the common colour-vision deficiencies. A cell or panel
  without finished trials is white with grey hatching.
- Trials that ended in an error (`stop_reason == "error"`) are left out: their
  curve stopped for a reason other than the science. Trials still training (status RUNNING,
  in tables written while a study runs) are never drawn as a phase or a time: a point with one
  is drawn as running (`RUNNING_STYLE`, an open marker off the grid) until all its seeds end.
- A verdict a longer budget could overturn is marked: a grid cell of memorization or confusion
  whose budget was under `CENSORED_BELOW_DECAY_TIMES` time constants 1/(lr*wd) is cross-hatched
  (the trials table's `censored` and `budget_decay_times`), and the legend says so.
- Axes, facets and legend lines name a config key in words (`axis_label`: a
  figure call's `labels`, else the study's `diagram.labels`, else
  `AXIS_LABELS`, else the dotted key itself).
- `Axis` is the one rule of where a value sits on a diagram's axis, here and in
  `report`'s HTML diagram. A numeric axis is drawn in log10 space as the study
  drew it: the scale of each searched axis is in the trials table's metadata
  (`results.AXES_META`, from `SearchDim.is_log`); an axis the study did not
  search follows the same rule (`config.is_log_scale`); `log_x`/`log_y`
  override. A zero on a log axis gets its own slot one median grid step below
  the smallest positive value, ticked "0". Non-numeric columns (optimizer.name,
  ...), a study's choice axes and a single value become categorical axes, one
  slot per value; on a grid, so do linear values that are only two or unevenly
  spaced (cells sized by value would be lopsided). A grid's log axis is ticked at
  its cells' values, a sampled study's at decades.
- The table's metadata also names the study's sampler (`results.SAMPLER_META`):
  a grid study is drawn as cells; sobol, random and tpe samples as points
  scattered over regions shaded by their nearest sample in (log-)axis space,
  each axis scaled to [0, 1]. The x, y and facet axes default to the study's
  `diagram` (`results.DIAGRAM_META`).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib as mpl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from grokstudy.config import LATTICE_SAMPLERS, is_log_scale, value_key
from grokstudy.errors import UsageError, one_line
from grokstudy.phases import PHASE_DEFINITIONS, PHASES, TIE, phase_order, vote
from grokstudy.relabel import rule_of
from grokstudy.results import table_info
from grokstudy.storage import atomic_path

PHASE_COLORS: dict[str, str] = {
    "comprehension": "#0072B2",  # Okabe–Ito blue
    "grokking": "#D55E00",  # vermillion
    "memorization": "#CC79A7",  # reddish purple
    "confusion": "#3B3B3B",  # near black
    "unstable": "#F0E442",  # yellow
    "diverged": "#E69F00",  # orange
}
"""One colour per phase, the same in every figure."""

TRAIN_COLOR, VAL_COLOR = "#1A1A1A", "#009E73"  # Okabe–Ito black and bluish green
NEVER_COLOR = "#D4D4D4"
MISSING_HATCH = dict(facecolor="white", edgecolor="#BBBBBB", hatch="////", linewidth=0)
INFERRED_STYLE = dict(edgecolor="white", hatch="....", linewidth=0.8)
"""A cell a boundary study did not train: its inferred phase, lighter and dotted."""
RUNNING_STYLE = dict(facecolor="#EEF3F8", edgecolor="#5B7A99", hatch="\\\\", linewidth=0)
"""A point with a trial still training: no verdict yet."""
RUNNING_LABEL = "still training: no verdict yet"
CENSORED_BELOW_DECAY_TIMES = 10.0
"""A memorization (or confusion) cell whose seeds spent a budget shorter than this many weight-decay
time constants 1/(lr*wd) (`budget_decay_times`) is hatched: it could still grok. Decoupled decay
shrinks what the loss does not hold by e^-k after k time constants, and the memorization-to-grokking
delay is Θ(log(|θ_mem|²/|θ_post|²)/(lr*wd)) (arXiv 2603.13331; Omnigrok, arXiv 2210.01117: the
delay scales as 1/wd). Nanda et al. 2023's run (AdamW lr 1e-3, wd 1, 30% of x+y mod 113) reaches
test loss < 1e-2 at ~8.3k steps, 8.3 time constants: below 10, "memorizes" cannot be told from
"groks later". At weight decay or lr 0 the time constant is infinite and any budget is short."""
CENSORED_PHASES = ("memorization", "confusion")
"""The verdicts a longer budget could overturn (`phases.PhaseResult.censored`)."""
CENSORED_HATCH = "xx"
RESTRICTED_COLOR, EXCLUDED_COLOR = "#0072B2", "#D55E00"  # Okabe–Ito blue and vermillion
MEASURE_COLOR = "#4D4D4D"  # a curve that is neither train nor validation (weight norm, Fourier share)
FORMATS = ("png", "svg", "pdf")
MAX_DOTS = 5  # disagreeing seeds drawn as dots in a grid cell; more are only counted
MAX_TICK_LABELS = 10  # a grid axis with more values labels every 2nd (3rd, ...) tick: labels never collide
X_TICK_CHARS = 48  # characters of 8-point tick labels (and gaps) side by side under a 3.4-inch panel
MAX_CURVE_TRIALS = 12  # rows of a learning-curves figure chosen by --trials/--where

AXIS_LABELS: dict[str, str] = {
    "task.op": "operation",
    "task.p": "modulus p",
    "task.n": "degree n of S_n",
    "data.fraction": "training fraction",
    "data.split_seed": "split seed",
    "model.kind": "model",
    "model.embed_dim": "embedding width",
    "model.width": "width",
    "model.depth": "depth",
    "model.heads": "attention heads",
    "model.activation": "activation",
    "model.layer_norm": "layer norm",
    "model.init_scale": "initialisation scale",
    "optimizer.name": "optimizer",
    "optimizer.lr": "learning rate",
    "optimizer.betas": "Adam betas",
    "optimizer.eps": "Adam ε",
    "optimizer.momentum": "momentum",
    "optimizer.weight_decay": "weight decay",
    "optimizer.decay_to": "decay toward",
    "optimizer.warmup_steps": "warm-up steps",
    "optimizer.grokfast": "Grokfast",
    "optimizer.grokfast_alpha": "Grokfast α",
    "optimizer.grokfast_lamb": "Grokfast λ",
    "optimizer.grokfast_window": "Grokfast window",
    "optimizer.orthograd": "⊥Grad",
    "train.max_steps": "step budget",
    "train.batch_size": "batch size",
    "train.loss": "loss",
    "train.seed": "seed",
}
"""Words for the config keys a study may put on an axis; a key without one is shown dotted."""


def axis_label(key: str, labels: Mapping[str, str] | None = None, trials: pa.Table | None = None) -> str:
    """How a figure names the dotted config key `key` on an axis, a facet title or a legend line.

    A figure call's `labels` win over the study's own (`diagram.labels`, kept in the metadata
    of `trials`), which win over AXIS_LABELS: a paper can rename an axis without a rerun.
    """
    study = table_info(trials)[2].get("labels") if trials is not None else None
    for names in (labels, study, AXIS_LABELS):
        if names and key in names:
            return names[key]
    return key


def study_title(trials: pa.Table) -> str:
    """The study's name as a figure's title starts, naming the phase rule when the table was
    relabelled under another one (`relabel`): a redraw is never taken for the study's own."""
    name = ", ".join(sorted(set(trials.column("study").to_pylist()))) or "study"
    rule = rule_of(trials)
    return name if rule is None else f"{name} (phases by rule {rule})"


def parse_formats(text: str) -> tuple[str, ...]:
    """`--format png,svg` -> ("png", "svg"); UsageError("--format", ...) for anything else."""
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    check_formats(formats, given=text)
    return formats


def check_formats(formats: Sequence[str], given: str | None = None) -> None:
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        shown = bad[0] if bad else (given or "")
        raise UsageError("--format", f"unknown format {shown!r}; choose from: {', '.join(FORMATS)}")


STYLE = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8.5,
    "figure.titlesize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,
    "svg.fonttype": "none",
    "hatch.linewidth": 0.6,
}


# ---- public figures ----------------------------------------------------------------------


@mpl.rc_context(STYLE)
def phase_diagram(
    trials: pa.Table,
    x: str,
    y: str,
    *,
    facet: str | None = None,
    log_x: bool | None = None,
    log_y: bool | None = None,
    ax: Any = None,
    cells: pa.Table | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Majority phase over seeds at each (x, y) point, one panel per `facet` value.

    Grid studies: a coloured cell per point, opacity = share of seeds in the
    majority phase, and where seeds disagree "k/n" plus one dot per other
    seed in that seed's phase colour. A tie between phases is drawn as one
    stripe per tied phase and labelled "tie", never as one of them. A
    memorization or confusion cell whose seeds of that verdict spent a budget of
    fewer than CENSORED_BELOW_DECAY_TIMES weight-decay time constants is
    cross-hatched: censored, it could still grok (no hatching for a trials table
    written before grokstudy recorded `censored` and `budget_decay_times`). Other
    searched keys not on an axis are pooled into the cell, and the title says
    so. With `cells` (a boundary study's cells.parquet), a cell that was not
    trained shows its inferred phase, lighter and dotted. A cell with fewer
    trials than the fullest cell (a boundary study's one-seed cells, failed
    seeds) shows its count in a corner. Sampled studies: points coloured by
    majority phase over nearest-neighbour phase regions. `ax` draws a single
    panel (no facet) into an existing Axes; the legend then goes beside it.
    `labels` names config keys in words (see `axis_label`).
    """
    data = _Data(trials, x, y, facet, log_x, log_y, cells, labels)
    fig, axes = _panels(data, ax)
    drawn = [
        _draw_phase_panel(axis, data, value) for axis, value in zip(axes, data.facet_values, strict=True)
    ]
    _phase_legend(fig, axes, [data], drawn, own_axes=ax is not None)
    if ax is None:
        _suptitle(fig, f"{data.study}: phase diagram", data.seeds_text())
    return fig


@mpl.rc_context(STYLE)
def compare_phase_diagrams(
    studies: Sequence[tuple[str, pa.Table]],
    x: str | None = None,
    y: str | None = None,
    *,
    log_x: bool | None = None,
    log_y: bool | None = None,
    cells: Sequence[pa.Table | None] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """The phase diagrams of (name, trials) studies side by side, one panel each, titled by name.

    The panels share their axes: the union of the studies' values, on the scales and with
    the sampler (cells or points) and diagram axes of the first study, so that a cell
    sits at the same place in every panel and a value only one study has shows as missing
    in the other. Facets are not drawn: a study's other keys are pooled, and the title
    says so. `cells` holds each study's cells.parquet (or None), in the studies' order.
    """
    if not studies:
        raise UsageError("SOURCE", "no study to compare")
    cells = list(cells) if cells is not None else [None] * len(studies)
    first = studies[0][1]
    x, y, _ = _diagram_axes(first, x, y, None)
    datas = [_Data(t, x, y, None, log_x, log_y, c, labels) for (_, t), c in zip(studies, cells, strict=True)]
    _share_axes(datas)
    fig = _figure((3.4 * len(datas) + 1.8, 5.4))
    axes = fig.subplots(1, len(datas), sharex=True, sharey=True, squeeze=False).ravel().tolist()
    drawn = []
    for axis, data, (name, _) in zip(axes, datas, studies, strict=True):
        drawn.append(_draw_phase_panel(axis, data, None))
        axis.set_title(name)
    _phase_legend(fig, axes, datas, drawn, own_axes=False)
    details = "; ".join(
        f"{name}: {data.seeds_text()}" for (name, _), data in zip(studies, datas, strict=True)
    )
    _suptitle(fig, f"{' vs '.join(name for name, _ in studies)}: phase diagrams", details)
    return fig


@mpl.rc_context(STYLE)
def delay_heatmap(
    trials: pa.Table,
    x: str,
    y: str,
    *,
    value: str = "delay",
    facet: str | None = None,
    log_x: bool | None = None,
    log_y: bool | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Median over seeds of `delay` (t_val − t_train), `t_val`, or `circuit_lead` (t_val −
    t_circuit: how long before validation generalized the key-frequency circuit was there,
    Nanda et al. 2023; `phases.circuit_time`), on a log10 colour scale in steps.

    A seed that never generalized (no t_val) counts as infinitely late, so a
    cell shows a finite median only when most seeds generalized, and "k/n"
    when only k of n did. Cells whose median is infinite are grey with "×",
    never zero. Delays ≤ 0 (validation first) are clipped to the scale's
    bottom; the colourbar then has an arrow at that end. A circuit lead without a t_circuit
    (no progress measures, or the circuit never formed) is left out, like a delay without
    t_train.
    """
    if value not in HEATMAP_VALUES:
        raise UsageError(
            "value", f"unknown heatmap value {value!r}; choose one of: {', '.join(HEATMAP_VALUES)}"
        )
    if value == "circuit_lead" and "t_circuit" not in trials.column_names:
        raise UsageError("value", "this trials table has no t_circuit (written before progress measures)")
    data = _Data(trials, x, y, facet, log_x, log_y, labels=labels)
    if value == "circuit_lead":
        t_val = np.array(data.column("t_val"), dtype=float)
        values = t_val - np.array(data.column("t_circuit"), dtype=float)
    else:
        values = np.array(data.column(value), dtype=float)  # None (a delay without t_train) -> NaN: left out
    values[[t is None for t in data.t_val]] = math.inf
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    lo = float(positive.min()) if positive.size else 1.0
    hi = float(positive.max()) if positive.size else 10.0
    if hi <= lo * 1.5:
        lo, hi = lo / 2, hi * 2
    norm, cmap = LogNorm(lo, hi), mpl.colormaps["viridis"]

    fig, axes = _panels(data, None)
    draw = _draw_value_cells if data.grid else _draw_value_scatter
    for axis, fv in zip(axes, data.facet_values, strict=True):
        draw(axis, data, data.cells(fv), values, norm, cmap, fv)
        _finish_axes(axis, data, fv)
    label = HEATMAP_VALUES[value]
    fig.colorbar(
        mpl.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=axes,
        extend="min" if (finite <= 0).any() else "neither",
        shrink=0.9,
        pad=0.02,
        label=f"{label} (steps, median over seeds)",
    )
    never = "most seeds never generalized"
    handles = [
        Patch(facecolor=NEVER_COLOR, edgecolor="#888888", label=f"× {never}")
        if data.grid
        else Line2D([], [], ls="", marker="x", color="#777777", markeredgewidth=1.2, label=never)
    ]
    handles += _running_handles(data)
    if data.grid and data.has_missing():
        handles.append(Patch(**MISSING_HATCH, label="no finished trial"))
    _legend(fig, axes, handles, title=None, own_axes=False)
    what = {
        "delay": "delay to generalize",
        "t_val": "steps to generalize",
        "circuit_lead": "how long before the jump the circuit was there",
    }[value]
    _suptitle(fig, f"{data.study}: {what}", data.seeds_text())
    return fig


HEATMAP_VALUES: dict[str, str] = {
    "delay": "t_val − t_train",
    "t_val": "t_val",
    "circuit_lead": "t_val − t_circuit",
}
"""What `delay_heatmap` can show, with its colourbar label."""


# Long on purpose: one figure drawn top to bottom (points, medians, never-marks, budget, legend).
@mpl.rc_context(STYLE)
def sweep(
    trials: pa.Table,
    x: str,
    *,
    line: str | None = None,
    log_x: bool | None = None,
    value: str = "t_val",
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Steps to generalize (`value`: t_val or t_val_loss) and to fit (t_train) against one axis,
    one line per value of `line` (an op, an optimizer, a loss...).

    Each seed is a dot; the line joins the medians over seeds, solid for
    generalization, dashed for fitting. A seed that never generalized within its
    budget is an "×" on the budget line (dotted), and a median that is not finite
    (most seeds never generalized) breaks the line there: never zero, never hidden.
    """
    if value not in ("t_val", "t_val_loss"):
        raise UsageError("value", f"unknown sweep value {value!r}; choose one of: t_val, t_val_loss")
    _check_columns(trials, {"--x": x, "--facet": line})
    label = partial(axis_label, labels=labels, trials=trials)
    rows = _finished(trials).to_pylist()
    scales = table_info(trials)[1]
    if log_x is None:
        log_x = scales[x] == "log" if x in scales else is_log_scale(sorted({r[x] for r in rows}))
    groups = sorted({value_key(r[line]) for r in rows}, key=_sort_key) if line else [None]
    budget = max((r["max_steps"] for r in rows), default=1)
    fig = _figure((6.4, 4.4))
    ax = fig.subplots()
    palette = mpl.colormaps["tab10"].colors
    for k, group in enumerate(groups):
        color = palette[k % len(palette)]
        members = [r for r in rows if line is None or value_key(r[line]) == group]
        xs = sorted({r[x] for r in members})
        for key, style, width in ((value, "-", 1.8), ("t_train", (0, (4, 2)), 1.1)):
            medians = []
            for xv in xs:
                ts = [r[key] for r in members if r[x] == xv]
                finite = np.array([t for t in ts if t is not None], dtype=float)
                jitter = np.full(len(finite), xv, dtype=float)
                ax.scatter(jitter, finite, s=10, color=color, alpha=0.35, linewidths=0, zorder=2)
                never = len(ts) - len(finite)
                if never and key == value:
                    ax.scatter([xv], [budget], marker="x", s=36, color=color, zorder=3)
                    if never < len(ts):
                        ax.annotate(f"{never}/{len(ts)}", (xv, budget), textcoords="offset points",
                                    xytext=(0, 6), ha="center", fontsize=7, color=color)  # fmt: skip
                # The median counts a never-generalized seed as infinitely late.
                medians.append(float(np.median(np.append(finite, [math.inf] * never))) if ts else math.nan)
            m = np.array(medians)
            m[~np.isfinite(m)] = np.nan  # break the line where most seeds never generalized
            legend = f"{label(line)} = {_fmt(group)}" if line and key == value else None
            marker = "o" if key == value else None
            ax.plot(xs, m, ls=style, lw=width, color=color, marker=marker, ms=4, label=legend)
    ax.axhline(budget, color="#888888", lw=0.8, ls=":", zorder=1)
    ax.text(
        0.005, budget, "budget", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7, color="#666666"
    )
    ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(label(x))
    ax.set_ylabel("steps")
    median = "median over seeds"
    handles = [
        Line2D([], [], color="#333333", lw=1.8, marker="o", ms=4, label=f"{value}: {median} (dots: seeds)"),
        Line2D([], [], color="#333333", lw=1.1, ls=(0, (4, 2)), label=f"t_train: {median}"),
        Line2D([], [], color="#333333", ls="", marker="x", label="never generalized within the budget"),
    ]
    if line:
        handles += ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    study = study_title(trials)
    detail = (
        "generalized: validation accuracy holds above the phase threshold"
        if value == "t_val"
        else "generalized: validation loss holds below phases.loss_threshold"
    )
    _suptitle(fig, f"{study}: steps to generalize against {label(x)}", detail)
    return fig


def numeric_axes(trials: pa.Table) -> list[str]:
    """The searched axes of a trials table whose values are numbers (the rest are categories)."""
    scales = table_info(trials)[1]
    return [k for k, scale in scales.items() if scale != "category" and k in trials.column_names]


@dataclass(frozen=True, slots=True)
class CurvePanel:
    """One column of a learning-curves figure: its header and the curves it draws."""

    header: str
    lines: tuple[tuple[str, str, float], ...]
    """(curves-table column, colour, line width) of each curve."""
    log_y: bool = False
    share: bool = False
    """Values are shares in [0, 1]: the y axis shows all of [0, 1], in every row alike."""


CURVE_PANELS: dict[str, CurvePanel] = {
    "accuracy": CurvePanel(
        "accuracy", (("train/acc", TRAIN_COLOR, 1.3), ("val/acc", VAL_COLOR, 2.0)), share=True
    ),
    "loss": CurvePanel(
        "loss (log scale)", (("train/loss", TRAIN_COLOR, 1.3), ("val/loss", VAL_COLOR, 2.0)), log_y=True
    ),
    "weight_norm": CurvePanel("weight norm (L2)", (("weights/norm", MEASURE_COLOR, 1.6),)),
    # Nanda et al. 2023: the generalizing circuit uses a few key frequencies of the embedding.
    "fourier": CurvePanel(
        "Fourier share (top-k frequencies)", (("fourier/top_k_share", MEASURE_COLOR, 1.6),), share=True
    ),
    # Their progress measures: the restricted loss falls while validation is still flat (the
    # circuit forms), the excluded loss rises, then clean-up; validation loss drawn thin beside.
    "progress": CurvePanel(
        "restricted / excluded loss (log)",
        (
            ("val/loss", VAL_COLOR, 0.9),
            ("progress/restricted_loss", RESTRICTED_COLOR, 1.6),
            ("progress/excluded_loss", EXCLUDED_COLOR, 1.6),
        ),
        log_y=True,
    ),
    "gini": CurvePanel("Fourier Gini (embedding)", (("fourier/gini", MEASURE_COLOR, 1.6),), share=True),
}
"""The columns `learning_curves` can draw, by the name its `metrics` take, in default order."""


@mpl.rc_context(STYLE)
def learning_curves(
    trials: pa.Table,
    curves: pa.Table,
    *,
    trial_ids: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Each trial's curves against optimizer steps: one row per trial, one column per metric.

    `metrics` are names of CURVE_PANELS; by default accuracy, loss and weight norm, then the
    progress measures (restricted/excluded loss, Fourier Gini; the top-k Fourier share where a
    table has no Gini) when a shown trial has them (modular operations only). By
    default the trials are one representative per phase present, in `PHASES` order: the
    trial with the median delay (comprehension, grokking; t_val when a trial has no t_train)
    or the median best_val_acc (the other phases). A row's first panel names the trial's
    phase (its colour on the panel's top edge), t_train, t_val and point; dashed lines mark
    t_train, t_val and t_circuit in every panel. The step axis is symlog (linear in [0, 1], log
    above), so step 0 is shown at its true value without shifting any step. `labels` names
    the config keys of each point in words (see `axis_label`).
    """
    if metrics is not None and (not metrics or not set(metrics) <= CURVE_PANELS.keys()):
        bad = next((m for m in metrics if m not in CURVE_PANELS), "")
        raise UsageError("metrics", f"unknown metric {bad!r}; choose from: {', '.join(CURVE_PANELS)}")
    chosen = trial_ids is not None
    rows = {r["trial_id"]: r for r in (trials if chosen else _finished(trials)).to_pylist()}
    curve_ids = set(curves.column("trial_id").to_pylist())
    if chosen:
        for tid in trial_ids:
            if tid not in rows or tid not in curve_ids:
                raise UsageError("--trials", f"no trial {tid!r} with a curve in these tables")
    else:
        trial_ids = _representatives([r for tid, r in rows.items() if tid in curve_ids])
    if not trial_ids:
        raise UsageError("SOURCE", "no finished trial with a curve to draw")

    shown = curves.filter(pc.is_in(curves.column("trial_id"), value_set=pa.array(list(trial_ids))))
    ids = np.asarray(shown.column("trial_id").to_pylist(), dtype=object)
    values = {
        column: shown.column(column).to_numpy(zero_copy_only=False).astype(float)  # null -> NaN
        for column in {"step"} | {c for panel in CURVE_PANELS.values() for c, _, _ in panel.lines}
    }
    if metrics is None:  # a measure no shown trial has would be a column of empty panels
        metrics = [m for m, panel in CURVE_PANELS.items() if np.isfinite(values[panel.lines[-1][0]]).any()]
        if "gini" in metrics:  # the Gini reads the same spectrum as the top-k share, without a k
            metrics = [m for m in metrics if m != "fourier"]
    panels = [CURVE_PANELS[m] for m in metrics]

    label = partial(axis_label, labels=labels, trials=trials)
    width = 2.6 * len(panels) + 0.5
    titles = [_row_title(rows[tid], label, chars=int(width * 15)) for tid in trial_ids]
    lines = max(t.count("\n") + 1 for t in titles)
    fig = _figure((width, (1.9 + 0.17 * lines) * len(trial_ids) + 1.2))
    fig.get_layout_engine().set(w_pad=0.06, wspace=0.06)
    axes = fig.subplots(len(trial_ids), len(panels), squeeze=False)
    for r, (axes_row, tid, title) in enumerate(zip(axes, trial_ids, titles, strict=True)):
        mask = ids == tid
        order = np.argsort(values["step"][mask])
        curve = {column: v[mask][order] for column, v in values.items()}
        row_title = _draw_curve_row(axes_row, panels, rows[tid], curve, title)
        if r == 0:
            _column_headers(axes_row, panels, row_title)
    for axis in axes[-1]:
        axis.set_xlabel("optimizer step")
    handles = [
        Line2D([], [], color=TRAIN_COLOR, lw=1.3, label="train"),
        Line2D([], [], color=VAL_COLOR, lw=2.0, label="validation"),
        Line2D([], [], color="#555555", lw=0.9, ls=(0, (4, 3)), label="t_train (black), t_val (green)"),
    ]
    if "progress" in metrics:
        handles += [
            Line2D([], [], color=RESTRICTED_COLOR, lw=1.6, label="restricted loss; t_circuit (dashed)"),
            Line2D([], [], color=EXCLUDED_COLOR, lw=1.6, label="excluded loss"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    study = study_title(trials)
    which = "selected trials" if chosen else "one representative trial per phase"
    fig.suptitle(f"{study}: learning curves ({which})")
    return fig


def select_trials(
    trials: pa.Table,
    trial_ids: Sequence[str] | None = None,
    where: str | None = None,
    *,
    limit: int | None = MAX_CURVE_TRIALS,
    allow_empty: bool = False,
) -> list[str]:
    """The ids of the trials whose learning curves to draw: `trial_ids` (in their order), those
    of the trials table for which `where` holds (in table order), or those of both.

    `where` is a pandas `DataFrame.query` expression over the trials table, e.g.
    'phase == "grokking"'; dotted column names go in backticks: '`optimizer.weight_decay` > 0.1'.
    Raises UsageError("--trials" or "--where", one line) for an unknown id, an expression
    pandas cannot evaluate, no trial at all (unless `allow_empty`), or more than `limit` trials.
    """
    table_ids = trials.column("trial_id").to_pylist()
    ids = table_ids if trial_ids is None else list(dict.fromkeys(trial_ids))
    known = set(table_ids)
    for tid in ids:
        if tid not in known:
            example = f"; ids look like {table_ids[0]!r}" if table_ids else ""
            raise UsageError("--trials", f"no trial {tid!r} in this study{example}")
    flag, wanted = "--trials", "the named trials"
    if where is not None:
        matched = set(_query(trials, where))
        ids = [tid for tid in ids if tid in matched]
        flag, wanted = "--where", repr(where)
    if not ids and not allow_empty:
        raise UsageError(flag, f"no trial matches {wanted}")
    if limit is not None and len(ids) > limit:
        raise UsageError(
            flag,
            f"{len(ids)} trials match {wanted}; learning curves show at most {limit}: narrow it",
        )
    return ids


def _query(trials: pa.Table, where: str) -> list[str]:
    """The trial ids of the rows for which the pandas query `where` holds."""
    frame = trials.to_pandas()  # pandas comes with mlflow; only --where needs it
    try:
        matched = frame.query(where)
    except Exception as e:  # the expression is the user's: any failure of it is a usage error
        hint = "dotted columns go in backticks: `optimizer.weight_decay` > 0.1"
        raise UsageError("--where", f"cannot evaluate {where!r} ({hint}): {one_line(e)}") from None
    return matched["trial_id"].tolist()


def render_study(
    trials: pa.Table,
    curves: pa.Table | None,
    out_dir: Path,
    *,
    x: str | None = None,
    y: str | None = None,
    facet: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    log_x: bool | None = None,
    log_y: bool | None = None,
    cells: pa.Table | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write phase_diagram, delay_heatmap, t_val_heatmap, circuit_heatmap (when a trial has a
    t_circuit), learning_curves (and, for a study with one numeric axis, sweep and sweep_loss)
    in each format; return the written paths.

    `x`, `y` and `facet` default to the study's diagram axes (the table's metadata; else
    data.fraction and optimizer.weight_decay). `cells` (a grid study's cells.parquet) adds the
    inferred phase of untrained cells to the phase diagram. Learning curves are skipped when
    `curves` is None or no finished trial has a curve. Raises UsageError("--format", ...) for a
    format other than png, svg, pdf, and UsageError("--x"/"--y"/"--facet", ...) for a column the
    tables lack, listing the study's searched axes first; both before anything is drawn or
    written. PNGs are 200 dpi; PDFs embed TrueType fonts (pdf.fonttype 42), as journals ask.
    """
    check_formats(formats)
    x, y, facet = _diagram_axes(trials, x, y, facet)
    _check_columns(trials, {"--x": x, "--y": y, "--facet": facet})
    axes = dict(x=x, y=y, facet=facet, log_x=log_x, log_y=log_y, labels=labels)
    figures: list[tuple[str, Figure]] = [
        ("phase_diagram", phase_diagram(trials, **axes, cells=cells)),
        ("delay_heatmap", delay_heatmap(trials, value="delay", **axes)),
        ("t_val_heatmap", delay_heatmap(trials, value="t_val", **axes)),
    ]
    if "t_circuit" in trials.column_names and trials.column("t_circuit").null_count < trials.num_rows:
        figures.append(("circuit_heatmap", delay_heatmap(trials, value="circuit_lead", **axes)))
    numeric = numeric_axes(trials)
    if len(numeric) == 1:  # a sweep over one axis (categorical axes become its lines)
        others = [k for k in table_info(trials)[1] if k not in numeric]
        line = others[0] if len(others) == 1 else None
        figures.append(("sweep", sweep(trials, numeric[0], line=line, labels=labels)))
        if "t_val_loss" in trials.column_names and trials.column("t_val_loss").null_count < trials.num_rows:
            figures.append(
                ("sweep_loss", sweep(trials, numeric[0], line=line, value="t_val_loss", labels=labels))
            )
    curve_ids = set(curves.column("trial_id").to_pylist()) if curves is not None else set()
    if curve_ids & set(_finished(trials).column("trial_id").to_pylist()):
        figures.append(("learning_curves", learning_curves(trials, curves, labels=labels)))
    return [path for name, fig in figures for path in save_figure(fig, out_dir, name, formats)]


def save_figure(fig: Figure, out_dir: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Write `fig` as out_dir/<name>.<format> for each format; return the paths.

    Atomically: figures are rewritten while a study runs, and a viewer may have one open.
    """
    check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{fmt}" for fmt in formats]
    with mpl.rc_context(STYLE):  # constrained layout already fits titles and legends
        for path, fmt in zip(paths, formats, strict=True):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt)
    return paths


def _diagram_axes(
    trials: pa.Table, x: str | None, y: str | None, facet: str | None
) -> tuple[str, str, str | None]:
    """The x, y and facet to draw: those given, else the study's diagram (in the table's metadata)."""
    diagram = table_info(trials)[2]
    return (
        x or diagram.get("x") or "data.fraction",
        y or diagram.get("y") or "optimizer.weight_decay",
        facet or diagram.get("facet"),
    )


# ---- the data behind a diagram ----------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """How one column's values map to positions along a diagram's axis: the one rule of the
    diagrams here and of `report`'s HTML diagram.

    A position is a plain number on a linear axis: log10 of the value on a log axis, the value
    on a linear one, its index on a category axis. A zero on a log axis gets its own slot one
    median grid step below the smallest positive value (`zero_pos`).
    """

    name: str | None
    kind: str  # "log" | "linear" | "category"
    values: list[Any]  # distinct keys, in axis order
    zero_pos: float | None = None
    scale: str | None = None
    """The scale asked for (see `build`): an axis rebuilt over more values keeps it."""

    @classmethod
    def build(
        cls, name: str | None, raw: Iterable[Any], scale: str | bool | None = None, grid: bool = False
    ) -> Axis:
        """The axis of a column's values `raw` (repeats and all).

        `scale` is the study's scale of the column ("log", "linear" or "category", from
        `results.AXES_META`), or a figure's `log_x`/`log_y` (True/False); None leaves it to
        `config.is_log_scale`. Fewer than two values, any value that is not a number, or a
        "category" scale make a category axis; a negative value, or none above zero, a linear
        one. On a grid the axis goes through `for_grid`.
        """
        if isinstance(scale, bool):
            scale = "log" if scale else "linear"
        keys = sorted({value_key(v) for v in raw}, key=_sort_key)
        # One value has no scale to show: label it like a category.
        if len(keys) < 2 or scale == "category" or not all(_is_number(k) for k in keys):
            axis = cls(name, "category", keys, scale=scale)
        elif any(k < 0 for k in keys) or not any(k > 0 for k in keys):
            axis = cls(name, "linear", keys, scale=scale)
        elif not (scale == "log" if scale in ("log", "linear") else is_log_scale(keys)):
            axis = cls(name, "linear", keys, scale=scale)
        else:
            logs = [math.log10(k) for k in keys if k > 0]
            gap = statistics.median(b - a for a, b in pairwise(logs)) if len(logs) > 1 else 1.0
            axis = cls(name, "log", keys, logs[0] - gap if 0 in keys else None, scale)
        return axis.for_grid() if grid else axis

    def for_grid(self) -> Axis:
        """A linear axis whose grid values are few or unevenly spaced becomes evenly spaced cells.

        Cells sized by value would otherwise be lopsided, or reach below zero
        (weight decay {0.1, 1}: cells from -0.35 to 1.45).
        """
        if self.kind != "linear":
            return self
        gaps = np.diff(self.positions())
        if len(self.values) > 2 and gaps.max() <= 1.05 * gaps.min():
            return self
        return replace(self, kind="category")

    def pos(self, key: Any) -> float:
        if self.kind == "category":
            return float(self.values.index(key))
        if self.kind == "log":
            return self.zero_pos if key == 0 else math.log10(key)
        return float(key)

    def positions(self) -> list[float]:
        """The position of each value, in axis order."""
        return [self.pos(k) for k in self.values]

    def edges(self) -> list[float]:
        """Grid cell boundaries around each value: midpoints, half a gap beyond the ends."""
        p = self.positions()
        if len(p) <= 1:  # a single value (build() makes it a category): a unit-wide cell
            middle = p[0] if p else 0.0
            return [middle - 0.5, middle + 0.5]
        mids = [(a + b) / 2 for a, b in pairwise(p)]
        return [p[0] - (p[1] - p[0]) / 2, *mids, p[-1] + (p[-1] - p[-2]) / 2]

    def cell(self, key: Any) -> tuple[float, float]:
        """The (low, high) edges of the grid cell around the value `key`."""
        e, i = self.edges(), self.values.index(key)
        return e[i], e[i + 1]

    def span(self, grid: bool) -> tuple[float, float]:
        """The axis's limits: a grid's outer cell edges; a sample's values with 5% to spare (half
        a slot beyond a category's ends)."""
        if grid or self.kind == "category":
            e = self.edges()
            return e[0], e[-1]
        p = self.positions()
        pad = (p[-1] - p[0]) * 0.05 or 0.5
        return p[0] - pad, p[-1] + pad

    def with_zero(self, ticks: list[tuple[float, str]]) -> list[tuple[float, str]]:
        """A log axis's (position, label) ticks with its zero's slot ticked "0" first, and the
        ticks below or just above the slot left out (they would collide with it)."""
        if self.zero_pos is None:
            return ticks
        return [(self.zero_pos, "0")] + [t for t in ticks if t[0] > self.zero_pos + 0.3]

    def decorate(self, axis: Any, which: str, grid: bool) -> None:
        """Limits and ticks: a category or grid cell is ticked at its value, a sampled log axis at decades."""
        set_lim, set_ticks = getattr(axis, f"set_{which}lim"), getattr(axis, f"set_{which}ticks")
        lo, hi = self.span(grid)
        set_lim(lo, hi)
        if self.kind == "category":
            set_ticks(range(len(self.values)), [_fmt(v) for v in self.values])
        elif grid:  # a cell per value, ticked at its value (a log grid's zero slot reads "0")
            labels = [_fmt(v) for v in self.values]
            every = math.ceil(len(labels) / MAX_TICK_LABELS)
            if which == "x":  # side by side, labels also need their width
                every = max(every, math.ceil(len(labels) * (max(map(len, labels)) + 2) / X_TICK_CHARS))
            set_ticks(self.positions(), [text if i % every == 0 else "" for i, text in enumerate(labels)])
        elif self.kind == "log":
            decades = list(range(math.ceil(lo), math.floor(hi) + 1))
            if len(decades) < 2:  # too narrow for decade ticks: label the values themselves
                ticks = [(self.pos(v), _fmt(v)) for v in self.values]
            else:
                ticks = [(float(k), f"$10^{{{k}}}$") for k in decades]
                minor = [
                    math.log10(m) + k
                    for k in range(decades[0] - 1, decades[-1] + 1)
                    for m in range(2, 10)
                    if lo <= math.log10(m) + k <= hi
                ]
                set_ticks(minor, minor=True)
            ticks = self.with_zero(ticks)
            set_ticks([t[0] for t in ticks], [t[1] for t in ticks])


class _Data:
    """Finished trials with their positions on the two axes and the facet."""

    def __init__(
        self,
        trials: pa.Table,
        x: str,
        y: str,
        facet: str | None,
        log_x: bool | None,
        log_y: bool | None,
        cells: pa.Table | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        _check_columns(trials, {"--x": x, "--y": y, "--facet": facet})
        sampler, scales, _ = table_info(trials)
        self.label: Callable[[str], str] = partial(axis_label, labels=labels, trials=trials)
        self.study = study_title(trials)
        self.inferred: dict[tuple[Any, Any, Any], tuple[str, float]] = _inferred(cells, x, y, facet)
        """(x, y, facet) of a cell that was not trained -> (inferred phase, confidence)."""
        self.grid = sampler in (None, *LATTICE_SAMPLERS)
        # Axes span every trial, finished or not, so that failed points still show as missing
        # cells, and every point of the grid a boundary study inferred. log_x/log_y override
        # the study's scales.
        self.x = Axis.build(
            x,
            _keys(trials, x) + [k[0] for k in self.inferred],
            scales.get(x) if log_x is None else log_x,
            self.grid,
        )
        self.y = Axis.build(
            y,
            _keys(trials, y) + [k[1] for k in self.inferred],
            scales.get(y) if log_y is None else log_y,
            self.grid,
        )
        self.facet = facet
        self.facet_values: list[Any] = [None]
        if facet:
            self.facet_values = sorted(
                set(_keys(trials, facet)) | {k[2] for k in self.inferred}, key=_sort_key
            )
        self.running = _running_keys(trials, x, y, facet)
        """(x, y, facet) of the points with a trial still training: drawn as running."""
        table = _finished(trials)
        if self.running:  # a point is a verdict only once every seed of it ended
            keep = [
                k not in self.running
                for k in zip(_keys(table, x), _keys(table, y), _keys(table, facet), strict=True)
            ]
            table = table.filter(pa.array(keep, pa.bool_()))
        self.table = table
        self.xs, self.ys, self.fs = _keys(table, x), _keys(table, y), _keys(table, facet)
        self.phase: list[str] = table.column("phase").to_pylist()
        self.t_val = _keys(table, "t_val" if "t_val" in table.column_names else None)
        self.short_budget = short_budget(table)
        """Per row: censored within fewer than CENSORED_BELOW_DECAY_TIMES decay time constants
        (None: a table written before grokstudy recorded censoring: nothing is hatched)."""
        self.seeds = (
            len(set(trials.column("train.seed").to_pylist())) if "train.seed" in trials.column_names else 1
        )
        self.aggregated = sorted(set(_searched(trials)) - {x, y, facet, "train.seed"})

    def column(self, name: str) -> list[Any]:
        return self.table.column(name).to_pylist()

    def cells(self, facet_value: Any) -> dict[tuple[Any, Any], list[int]]:
        """{(x key, y key): row indices} of one facet panel."""
        out: dict[tuple[Any, Any], list[int]] = defaultdict(list)
        for i, (xv, yv, fv) in enumerate(zip(self.xs, self.ys, self.fs, strict=True)):
            if fv == facet_value:
                out[(xv, yv)].append(i)
        return out

    @property
    def max_per_cell(self) -> int:
        return max(Counter(zip(self.xs, self.ys, self.fs, strict=True)).values(), default=0)

    def has_missing(self) -> bool:
        full = len(self.x.values) * len(self.y.values)
        return any(
            len(self.cells(fv)) + sum(k[2] == fv for k in self.inferred | dict.fromkeys(self.running)) < full
            for fv in self.facet_values
        )

    def seeds_text(self) -> str:
        counts = set(Counter(zip(self.xs, self.ys, self.fs, strict=True)).values())
        if counts == {self.seeds} and not self.aggregated:
            text = f"{self.seeds} seed{'s' if self.seeds != 1 else ''} per point"
        elif counts:
            lo, hi = min(counts), max(counts)
            trials = "trial" if lo == hi == 1 else "trials"
            text = f"{lo}{'' if lo == hi else f'–{hi}'} {trials} per {'cell' if self.grid else 'point'}"
        else:
            text = "no finished trials"
        if self.aggregated:
            text += f", pooled over {', '.join(map(self.label, self.aggregated))}"
        budgets = set(self.column("max_steps")) if "max_steps" in self.table.column_names else set()
        if len(budgets) == 1:
            text += f", budget {_steps_text(budgets.pop())} steps"
        return text


def _finished(trials: pa.Table) -> pa.Table:
    """The trials that ended (neither failed nor still running)."""
    if "status" in trials.column_names:
        keep = pc.invert(pc.is_in(trials.column("status"), pa.array(["ERROR", "RUNNING"])))
        trials = trials.filter(pc.fill_null(keep, True))
    if "stop_reason" not in trials.column_names:
        return trials
    keep = pc.not_equal(trials.column("stop_reason"), "error")
    return trials.filter(pc.fill_null(keep, True))


def short_budget(table: pa.Table) -> list[bool] | None:
    """Per row: it spent its budget without generalizing, and that budget was under
    CENSORED_BELOW_DECAY_TIMES time constants 1/(lr*wd) (a null `budget_decay_times` is weight
    decay 0: an infinite time constant). None when the table lacks either column."""
    if not {"censored", "budget_decay_times"} <= set(table.column_names):
        return None
    return [
        bool(censored) and (budget is None or budget < CENSORED_BELOW_DECAY_TIMES)
        for censored, budget in zip(
            table.column("censored").to_pylist(), table.column("budget_decay_times").to_pylist(), strict=True
        )
    ]


def _running_keys(trials: pa.Table, x: str, y: str, facet: str | None) -> set[tuple[Any, Any, Any]]:
    """(x, y, facet) of every point with a trial still training."""
    if "status" not in trials.column_names:
        return set()
    running = trials.filter(pc.fill_null(pc.equal(trials.column("status"), "RUNNING"), False))
    return set(zip(_keys(running, x), _keys(running, y), _keys(running, facet), strict=True))


def _check_columns(trials: pa.Table, columns: dict[str, str | None]) -> None:
    """Raise UsageError(flag, ...) for the first named column the table lacks."""
    for flag, name in columns.items():
        if name is not None and name not in trials.column_names:
            axes = ", ".join(dict.fromkeys(_searched(trials) + trials.column_names))  # searched first
            raise UsageError(flag, f"unknown axis {name!r}; the study's axes are: {axes}")


def _searched(trials: pa.Table) -> list[str]:
    """The keys the study searched, in the order the trials table first lists them."""
    if "searched" not in trials.column_names:
        return []
    return list(dict.fromkeys(k for s in trials.column("searched").to_pylist() for k in s or ()))


def _keys(table: pa.Table, column: str | None) -> list[Any]:
    """`value_key` of each value of `column`; None for each row when there is no column."""
    return [value_key(v) for v in table.column(column).to_pylist()] if column else [None] * table.num_rows


# ---- drawing ---------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(data: _Data, ax: Any) -> tuple[Figure, list[Any]]:
    if ax is not None:
        if data.facet is not None:
            raise UsageError("--facet", "a faceted diagram needs its own figure; leave ax unset")
        return ax.figure, [ax]
    n = len(data.facet_values)
    fig = _figure((3.4 * n + 1.8, 5.4 if n == 1 else 4.8))
    return fig, fig.subplots(1, n, sharex=True, sharey=True, squeeze=False).ravel().tolist()


def _finish_axes(axis: Any, data: _Data, facet_value: Any) -> None:
    data.x.decorate(axis, "x", data.grid)
    data.y.decorate(axis, "y", data.grid)
    axis.set_xlabel(data.label(data.x.name))
    if axis.get_subplotspec() is None or axis.get_subplotspec().is_first_col():
        axis.set_ylabel(data.label(data.y.name))
    if data.facet is not None:
        axis.set_title(f"{data.label(data.facet)} = {_fmt(facet_value)}")
    axis.tick_params(which="minor", length=2)
    if data.grid:
        axis.spines[["top", "right"]].set_visible(True)


class _Marks(NamedTuple):
    """What a phase panel drew besides its phases, for the legend to explain."""

    inferred: bool = False
    """A cell a boundary study did not train, inferred."""
    fewer: bool = False
    """A cell with fewer trials than the fullest (its count in a corner)."""
    censored: frozenset[str] = frozenset()
    """The phases of the cells hatched as censored within a short budget."""


def _draw_phase_panel(axis: Any, data: _Data, facet_value: Any) -> _Marks:
    """One panel of a phase diagram; what it drew besides phases."""
    cells = data.cells(facet_value)
    drawn = _Marks()
    if data.grid:
        drawn = _draw_phase_cells(axis, data, cells, facet_value)
    else:
        _draw_phase_scatter(axis, data, cells)
        _draw_running_points(axis, data, facet_value)
    _finish_axes(axis, data, facet_value)
    return drawn


def _phase_legend(
    fig: Figure, axes: list[Any], datas: Sequence[_Data], drawn: Sequence[_Marks], own_axes: bool
) -> None:
    """One legend for the panels of one or more diagrams: the phases shown, then each mark drawn."""
    drew_inferred, drew_fewer = any(m.inferred for m in drawn), any(m.fewer for m in drawn)
    censored = frozenset().union(*(m.censored for m in drawn))
    shown = {p for d in datas for p in d.phase} | {p for d in datas for p, _ in d.inferred.values()}
    present = [p for p in PHASES if p in shown]
    handles = [Patch(facecolor=_color(p), label=f"{p}: {PHASE_DEFINITIONS[p]}") for p in present]
    if drew_inferred:
        handles.append(
            Patch(**INFERRED_STYLE, facecolor="#DDDDDD", label="not trained: inferred from its neighbours")
        )
    if censored:
        handles.append(_censored_handle(censored))
    running = [d for d in datas if d.running]
    handles += _running_handles(running[0]) if running else []
    grid = datas[0].grid
    if grid and any(d.has_missing() for d in datas):
        handles.append(Patch(**MISSING_HATCH, label="no finished trial"))
    unit = "trials" if any(d.aggregated for d in datas) else "seeds"
    fullest = max(d.max_per_cell for d in datas)
    agreement = None
    if fullest > 1 and grid:
        agreement = f"cell: majority phase over {unit} (k/n and opacity: its share)"
        agreement += f"\ndot: one disagreeing {unit[:-1]}"
    elif fullest > 1:
        agreement = f"marker opacity: share of {unit} in the majority phase"
    if drew_fewer:  # drawn only in grid cells, so `agreement` is set
        agreement += f"\ncorner number: {unit} in a cell with fewer than {fullest}"
    _legend(fig, axes, handles, title=agreement, own_axes=own_axes)


def _share_axes(datas: Sequence[_Data]) -> None:
    """Put every diagram on the same axes: the union of their values, drawn as the first is."""
    first = datas[0]
    x = Axis.build(first.x.name, [v for d in datas for v in d.x.values], first.x.scale, first.grid)
    y = Axis.build(first.y.name, [v for d in datas for v in d.y.values], first.y.scale, first.grid)
    for d in datas:
        d.x, d.y, d.grid = x, y, first.grid


def _suptitle(fig: Figure, title: str, detail: str) -> None:
    # Constrained layout does not shrink a suptitle, so the detail line wraps to the figure's width.
    chars = int(fig.get_figwidth() * 13)
    fig.suptitle("\n".join([title, *textwrap.wrap(detail, chars)]), linespacing=1.4)


def _legend(fig: Figure, axes: list[Any], handles: list[Any], title: str | None, own_axes: bool) -> None:
    common = dict(handles=handles, title=title, frameon=False)
    if own_axes:
        axes[0].legend(**common, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        fig.legend(**common, loc="outside lower center", ncols=1 if len(axes) == 1 else 2)


def _inferred(
    cells: pa.Table | None, x: str, y: str, facet: str | None
) -> dict[tuple[Any, Any, Any], tuple[str, float]]:
    """(x, y, facet) -> (phase, confidence) of the inferred (untrained) cells of a cells table,
    when the grid's axes are the diagram's (a pooled diagram has no single inferred cell)."""
    if cells is None:
        return {}
    axes = {f.name for f in cells.schema} - {"study", "phase", "measured", "confidence", "seeds"}
    if not axes <= {x, y, facet} or x not in axes or y not in axes:
        return {}
    return {
        (value_key(r[x]), value_key(r[y]), value_key(r[facet]) if facet else None): (
            r["phase"],
            r["confidence"],
        )
        for r in cells.to_pylist()
        if not r["measured"] and r["phase"] is not None
    }


def _draw_phase_cells(axis: Any, data: _Data, cells: dict, facet_value: Any) -> _Marks:
    """Draw one panel's cells; what it drew besides phases."""
    ex, ey = data.x.edges(), data.y.edges()
    fs, fullest = _cell_fontsize(data), data.max_per_cell
    drew_inferred = drew_fewer = False
    censored: set[str] = set()
    for i, xv in enumerate(data.x.values):
        for j, yv in enumerate(data.y.values):
            cx, w, h = (ex[i] + ex[i + 1]) / 2, ex[i + 1] - ex[i], ey[j + 1] - ey[j]
            box = (ex[i], ey[j]), w, h
            if (xv, yv, facet_value) in data.running:
                _draw_running(axis, box, cx, ey[j] + 0.5 * h, fs)
                continue
            rows = cells.get((xv, yv))
            if not rows:
                guess = data.inferred.get((xv, yv, facet_value))
                if guess is None or guess[0] not in PHASE_COLORS:
                    axis.add_patch(Rectangle(*box, **MISSING_HATCH))
                    continue
                rgb = _blend(_color(guess[0]), 0.35)
                axis.add_patch(Rectangle(*box, facecolor=rgb, **INFERRED_STYLE))
                drew_inferred = True
                continue
            phases = [data.phase[r] for r in rows]
            v = vote(phases)
            phase, k, n, share = v.phase, v.count, len(rows), v.share
            rgb = _blend(_color(phase), max(share, 0.25))
            if n < fullest:
                drew_fewer = True
                axis.text(ex[i + 1] - 0.06 * w, ey[j] + 0.06 * h, str(n), ha="right", va="bottom",
                          fontsize=fs - 1, zorder=4, gid="count", color=_ink(rgb))  # fmt: skip
            if phase == TIE:  # one stripe per tied phase: a tie is not a verdict
                tied = v.tied
                for t, p in enumerate(tied):
                    stripe = (ex[i] + t * w / len(tied), ey[j]), w / len(tied), h
                    axis.add_patch(Rectangle(*stripe, facecolor=_blend(_color(p), 0.6), linewidth=0))
                axis.add_patch(Rectangle(*box, facecolor="none", edgecolor="white", linewidth=0.8))
                axis.text(cx, ey[j] + 0.5 * h, f"tie {k}/{n}", ha="center", va="center", fontsize=fs,
                          color="#111111")  # fmt: skip
                continue
            axis.add_patch(Rectangle(*box, facecolor=rgb, edgecolor="white", linewidth=0.8))
            if _censored_cell(data, rows, phase):
                axis.add_patch(Rectangle(*box, **_censored_style(rgb), gid="censored"))
                axis.add_patch(Rectangle(*box, facecolor="none", edgecolor="white", linewidth=0.8))
                censored.add(phase)
            if share < 1:
                axis.text(
                    cx, ey[j] + 0.6 * h, f"{k}/{n}", ha="center", va="center", fontsize=fs, color=_ink(rgb)
                )
                # One dot per disagreeing seed, in its own phase's colour.
                others = sorted((p for p in phases if p != phase), key=phase_order)
                if len(others) <= MAX_DOTS:
                    dots = cx + w * 0.16 * (np.arange(len(others)) - (len(others) - 1) / 2)
                    colors = [_color(o) for o in others]
                    axis.scatter(dots, np.full(len(others), ey[j] + 0.27 * h), s=16, c=colors,
                                 edgecolors="white", linewidths=0.6, zorder=3)  # fmt: skip
    return _Marks(drew_inferred, drew_fewer, frozenset(censored))


def _censored_cell(data: _Data, rows: list[int], phase: str) -> bool:
    """A memorization or confusion cell whose every seed of that verdict spent a short budget."""
    if data.short_budget is None or phase not in CENSORED_PHASES:
        return False
    return all(data.short_budget[r] for r in rows if data.phase[r] == phase)


def _censored_style(rgb: Sequence[float]) -> dict[str, Any]:
    """Hatching in the cell's ink, mixed halfway into the cell's colour: visible on a light or a
    dark cell, quiet enough to read "k/n" over, and opaque (the same in PNG, PDF and SVG)."""
    ink = to_rgb(_ink(rgb))
    return dict(
        facecolor="none",
        edgecolor=tuple(0.5 * a + 0.5 * b for a, b in zip(ink, rgb, strict=True)),
        hatch=CENSORED_HATCH,
        linewidth=0,
    )


def _censored_handle(phases: Iterable[str]) -> Patch:
    """The legend line of censored hatching, naming the phases hatched."""
    shown = sorted(phases, key=phase_order)
    rgb = _blend(_color(shown[0]), 0.6)
    label = (
        f"censored: {' or '.join(shown)} in < {CENSORED_BELOW_DECAY_TIMES:g} decay times "
        "1/(lr·wd); could still grok"
    )
    hatching = {k: v for k, v in _censored_style(rgb).items() if k != "facecolor"}
    return Patch(facecolor=rgb, **hatching, label=label)


def _draw_running(axis: Any, box: tuple, cx: float, cy: float, fs: float) -> None:
    axis.add_patch(Rectangle(*box, **RUNNING_STYLE, gid="running"))
    axis.add_patch(Rectangle(*box, facecolor="none", edgecolor="white", linewidth=0.8))
    axis.text(cx, cy, "running", ha="center", va="center", fontsize=fs - 1, color="#3D5A78", style="italic")


def _draw_running_points(axis: Any, data: _Data, facet_value: Any) -> None:
    """Off the grid: an open marker at each point still training."""
    here = [(x, y) for x, y, f in data.running if f == facet_value]
    if here:
        axis.scatter([data.x.pos(x) for x, _ in here], [data.y.pos(y) for _, y in here], s=34, facecolors="white",
                     edgecolors="#5B7A99", linewidths=1.2, zorder=3, gid="running")  # fmt: skip


def _draw_phase_scatter(axis: Any, data: _Data, cells: dict) -> None:
    points = [
        (xv, yv, (v := vote([data.phase[r] for r in rows])).phase, v.count, len(rows))
        for (xv, yv), rows in cells.items()
    ]
    if not points:
        return
    px = np.array([data.x.pos(p[0]) for p in points])
    py = np.array([data.y.pos(p[1]) for p in points])
    (x0, x1), (y0, y1) = data.x.span(False), data.y.span(False)
    # Nearest sample in axis space scaled to [0, 1] on a 200 x 200 raster; categories never
    # borrow from a neighbour. One raster row at a time keeps memory at 200 x samples.
    sx = _scaled_distance(np.linspace(x0, x1, 200), px, data.x, x1 - x0)
    sy = _scaled_distance(np.linspace(y0, y1, 200), py, data.y, y1 - y0)
    nearest = np.stack([np.argmin(sx + row[None, :], axis=1) for row in sy])  # (ny, nx)
    palette = np.array([_blend(_color(p[2]), 0.28) for p in points])
    region = palette[nearest]
    axis.imshow(
        region, extent=(x0, x1, y0, y1), origin="lower", aspect="auto", interpolation="nearest", zorder=0
    )
    for (_, _, phase, k, n), xp, yp in zip(points, px, py, strict=True):
        color = (*to_rgb(_color(phase)), max(k / n, 0.35))
        axis.scatter(xp, yp, s=34, color=color, edgecolors="#222222", linewidths=0.6, zorder=3)


def _scaled_distance(grid: np.ndarray, pts: np.ndarray, ax: Axis, extent: float) -> np.ndarray:
    """(len(grid), len(pts)) squared distances in [0, 1]-scaled axis units."""
    if ax.kind == "category":
        return np.where(np.rint(grid)[:, None] == pts[None, :], 0.0, np.inf)
    return ((grid[:, None] - pts[None, :]) / (extent or 1.0)) ** 2


def _running_handles(data: _Data) -> list[Any]:
    if not data.running:
        return []
    if data.grid:
        return [Patch(**RUNNING_STYLE, label=RUNNING_LABEL)]
    return [
        Line2D(
            [], [], ls="", marker="o", markerfacecolor="white", markeredgecolor="#5B7A99", label=RUNNING_LABEL
        )
    ]


def _draw_value_cells(
    axis: Any, data: _Data, cells: dict, values: np.ndarray, norm, cmap, facet_value: Any
) -> None:
    ex, ey = data.x.edges(), data.y.edges()
    fs = _cell_fontsize(data)
    for i, xv in enumerate(data.x.values):
        for j, yv in enumerate(data.y.values):
            box = (ex[i], ey[j]), ex[i + 1] - ex[i], ey[j + 1] - ey[j]
            rows = cells.get((xv, yv))
            cx, cy = (ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2
            if (xv, yv, facet_value) in data.running:
                _draw_running(axis, box, cx, cy, fs)
                continue
            if not rows:
                axis.add_patch(Rectangle(*box, **MISSING_HATCH))
                continue
            cell = values[rows]
            cell = cell[~np.isnan(cell)]
            generalized = int(np.isfinite(cell).sum())
            median = float(np.median(cell)) if cell.size else math.inf
            if not math.isfinite(median):
                axis.add_patch(Rectangle(*box, facecolor=NEVER_COLOR, edgecolor="white", linewidth=0.8))
                axis.text(cx, cy, "×", ha="center", va="center", fontsize=fs + 2, color="#6E6E6E")
                continue
            rgb = cmap(norm(max(median, norm.vmin)))[:3]
            axis.add_patch(Rectangle(*box, facecolor=rgb, edgecolor="white", linewidth=0.8))
            text = _steps_text(median) + ("" if generalized == len(cell) else f"\n{generalized}/{len(cell)}")
            if len(data.x.values) * len(data.y.values) <= 144:
                axis.text(
                    cx, cy, text, ha="center", va="center", fontsize=fs, color=_ink(rgb), linespacing=0.95
                )


def _draw_value_scatter(
    axis: Any, data: _Data, cells: dict, values: np.ndarray, norm, cmap, facet_value: Any
) -> None:
    _draw_running_points(axis, data, facet_value)
    for (xv, yv), rows in cells.items():
        cell = values[rows]
        cell = cell[~np.isnan(cell)]
        median = float(np.median(cell)) if cell.size else math.inf
        xp, yp = data.x.pos(xv), data.y.pos(yv)
        if math.isfinite(median):
            rgb = cmap(norm(max(median, norm.vmin)))
            axis.scatter(xp, yp, s=40, color=rgb, edgecolors="#222222", linewidths=0.5, zorder=3)
        else:
            axis.scatter(xp, yp, s=30, marker="x", color="#777777", linewidths=1.2, zorder=3)


def _cell_fontsize(data: _Data) -> float:
    n = max(len(data.x.values) * len(data.facet_values), len(data.y.values))
    return 7.0 if n <= 8 else (6.0 if n <= 14 else 5.0)


def _color(phase: str) -> str:
    """The phase's colour; grey for a label without one (a tie)."""
    return PHASE_COLORS.get(phase, "#999999")


def _blend(color: str, alpha: float) -> tuple[float, float, float]:
    """`color` at opacity `alpha` over white, as an opaque RGB (identical in PNG, PDF and SVG)."""
    return tuple(1 - alpha + alpha * c for c in to_rgb(color))


def _ink(rgb: Sequence[float]) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#111111" if luminance > 0.5 else "white"


# ---- learning-curve helpers --------------------------------------------------------------------


def _representatives(rows: list[dict[str, Any]]) -> list[str]:
    """The median trial of each phase present, in PHASES order."""
    out = []
    for phase in PHASES:
        members = [r for r in rows if r["phase"] == phase]
        if not members:
            continue
        if phase in ("comprehension", "grokking"):
            members.sort(key=lambda r: (r["delay"] if r["delay"] is not None else r["t_val"], r["trial_id"]))
        else:
            members.sort(key=lambda r: (r["best_val_acc"], r["trial_id"]))
        out.append(members[(len(members) - 1) // 2]["trial_id"])
    return out


def _timings(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {'—' if row.get(k) is None else _steps_text(row[k])}" for k in ("t_train", "t_val")
    )


def _row_title(row: dict[str, Any], label: Callable[[str], str], chars: int) -> str:
    """A learning-curves row's title: the phase in bold (mathtext), its timings, then its point
    wrapped to `chars` characters a line."""
    keys = [k for k in (row.get("searched") or []) if k != "train.seed"] + ["train.seed"]
    point = ", ".join(f"{label(k)} = {_fmt(row.get(k))}" for k in keys if k in row)
    return "\n".join(
        [f"$\\bf{{{row['phase'] or 'running'}}}$   {_timings(row)}", *textwrap.wrap(point, chars)]
    )


def _draw_curve_row(
    axes_row: Sequence[Any], panels: Sequence[CurvePanel], row: dict[str, Any], curve: dict, title: str
) -> Any:
    """One trial's panels, from its `curve` ({column: values in step order}); returns its title."""
    steps = curve["step"]
    top = max(float(steps.max()) if steps.size else 1.0, row.get("max_steps") or 1)
    for axis, panel in zip(axes_row, panels, strict=True):
        for column, color, width in panel.lines:
            taken = np.isfinite(curve[column])  # progress measures: every measures_every-th eval
            axis.plot(steps[taken], curve[column][taken], color=color, lw=width)
        marks = (
            (row["t_train"], TRAIN_COLOR),
            (row["t_val"], VAL_COLOR),
            (row.get("t_circuit"), RESTRICTED_COLOR),
        )
        for t, color in marks:
            if t is not None:
                axis.axvline(t, color=color, lw=0.9, ls=(0, (4, 3)), alpha=0.8)
        _step_axis(axis, top)
        if panel.log_y:
            axis.set_yscale("log")
        if panel.share:
            axis.set_ylim(-0.03, 1.05)
        axis.grid(axis="y", color="#E6E6E6", lw=0.6)
    first = axes_row[0]
    first.spines["top"].set(visible=True, color=_color(row["phase"]), linewidth=5)
    return first.set_title(title, loc="left", fontsize=8, pad=8, linespacing=1.5)


def _column_headers(axes_row: Sequence[Any], panels: Sequence[CurvePanel], row_title: Any) -> None:
    """Each column's header, set above the first row's title (which may run across the row)."""
    for axis, panel in zip(axes_row, panels, strict=True):
        axis.annotate(
            panel.header,
            xy=(0.5, 1),
            xycoords=(axis.transAxes, row_title),  # y: the top of the row's title
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontweight="bold",
            gid="column header",
        )


def _step_axis(axis: Any, top: float) -> None:
    """Symlog steps from 0 to a little past `top` (the budget), ticked at 0 and each decade."""
    axis.set_xscale("symlog", linthresh=1, linscale=0.5)
    axis.set_xticks([0] + [10.0**k for k in range(1, int(math.log10(top)) + 1)])
    axis.set_xlim(0, top * 1.1)


# ---- values --------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if _is_number(v) else (1, str(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _steps_text(v: float) -> str:
    """Compact step counts for cells: 850, 1.2k, 35k, 1.5M."""
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}k"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.2g}k"
    return f"{v:.0f}"
