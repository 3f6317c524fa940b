"""A study's results as one self-contained HTML page: open it in any browser, offline.

`grokstudy report DIR` writes `DIR/report.html`: a header with the study's phase counts, the
phase diagram, its legend, a table with one row per point and the study file. Hovering a cell
names its trials and their timings; clicking it draws their learning curves, each linked to its
MLflow run when the tracking URI is a web server. No server, no network, no CDN: the static
parts are rendered here as HTML and inline SVG, and the trials and their curves travel as JSON
in a `<script type="application/json">` tag that a little hand-written JavaScript
(`report_template.html`) draws from. Hand-written rather than plotly or Vega: plotly.js alone
is about 3.5 MB, while a 40-trial study with 60 eval points a trial makes a report of about
90 kB (floats rounded to 4 significant digits).

Cells mean what they mean in `figures.phase_diagram`: the majority phase of a point's seeds
(`phases.vote`), a tie striped in its phases, "k/n" where seeds disagree, opacity the majority's
share; failed trials left out of the vote, a point with a trial still training drawn as running,
a boundary study's untrained cells (cells.parquet) in their inferred phase, lighter and dotted.
Sobol, random and tpe samples are drawn as points. Values sit on the axes where the figures put
them (`figures.Axis`: the study's log or linear scale, a zero's own slot on a log axis, a grid's
uneven linear values as evenly spaced cells); only the ticks are chosen here, at every value of
a grid or a category axis and at decades or a few round numbers of a sample's numeric axis.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pyarrow as pa
import yaml

from grokstudy import __version__, results
from grokstudy.config import LATTICE_SAMPLERS, is_number, value_key
from grokstudy.errors import UsageError
from grokstudy.figures import (
    CENSORED_BELOW_DECAY_TIMES,
    CENSORED_PHASES,
    PHASE_COLORS,
    Axis,
    axis_label,
    short_budget,
)
from grokstudy.phases import PHASE_DEFINITIONS, PHASES, TIE, phase_order, vote
from grokstudy.points import SEED, point_label, value_text
from grokstudy.storage import atomic_path
from grokstudy.uris import redact

REPORT_FILE = "report.html"
STUDY_FILE = "study.yaml"
"""The study file the runner writes beside the tables."""
TEMPLATE = "report_template.html"
DIGITS = 4
"""Significant digits of every float in the page's data: more than a curve on a screen can show."""
CURVE_COLUMNS = ("train/acc", "val/acc", "train/loss", "val/loss")
PROGRESS_COLUMNS = ("progress/restricted_loss", "progress/excluded_loss")
"""Nanda et al.'s progress measures: the curves panel draws them where a study took them."""
FAILED, RUNNING = "failed", "running"
"""A trial's verdict when it has no phase: it ended in an error, or it still trains."""
STATE_COLORS = {FAILED: "#9E9E9E", RUNNING: "#5B7A99"}
CELL_PX, MAX_PLOT_PX, MIN_PLOT_PX = 64, 520, 260
MARGIN = {"left": 72, "right": 14, "top": 28, "bottom": 48}
WEB_SCHEMES = ("http", "https")


def write_study_report(directory: Path, out: Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """Read a study's output directory (its tables, cells.parquet and study.yaml when there)
    and write its report to `out` (default `DIR/report.html`). Runs are linked to
    `tracking_uri`, else to the study file's `run.tracking_uri`. A directory without a trials
    table is a UsageError naming DIR."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError("DIR", f"{directory} is not a directory; give a study's output directory")
    if not (directory / results.TRIALS_FILE).is_file():
        raise UsageError(
            "DIR", f"{directory} holds no {results.TRIALS_FILE}; give a study's output directory"
        )
    try:
        trials, curves = results.load_source(directory)
        cells_file = directory / results.CELLS_FILE
        cells = results.read_cells(cells_file) if cells_file.is_file() else None
    except UsageError as e:  # load_source names its argument SOURCE; here it is DIR
        raise UsageError("DIR", e.msg) from None
    study_file = directory / STUDY_FILE
    study_yaml = study_file.read_text(encoding="utf-8") if study_file.is_file() else None
    return write_report(
        trials,
        curves,
        out or directory / REPORT_FILE,
        study_yaml=study_yaml,
        tracking_uri=tracking_uri or study_tracking_uri(study_yaml),
        cells=cells,
    )


def write_report(
    trials: pa.Table,
    curves: pa.Table | None,
    out: Path,
    *,
    study_yaml: str | None = None,
    tracking_uri: str | None = None,
    cells: pa.Table | None = None,
) -> Path:
    """Write `build_report_html` to `out` atomically (a browser reloading it never sees half)."""
    text = build_report_html(trials, curves, study_yaml=study_yaml, tracking_uri=tracking_uri, cells=cells)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def build_report_html(
    trials: pa.Table,
    curves: pa.Table | None,
    *,
    study_yaml: str | None = None,
    tracking_uri: str | None = None,
    cells: pa.Table | None = None,
) -> str:
    """The report of a trials table (and its curves, its cells table, its study file) as one
    HTML document. Every text from the tables or the study file is escaped; passwords in the
    study file are redacted (`uris.redact`)."""
    diagram = _Diagram(trials, cells)
    parts = {
        "title": html.escape(f"{diagram.study}: grokstudy report"),
        "header": _header_html(diagram),
        "diagram": _diagram_html(diagram),
        "legend": _legend_html(diagram),
        "summary": _summary_html(diagram),
        "study": _study_html(study_yaml),
        "data": script_json(_payload(diagram, curves, tracking_uri)),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m[1]], _template())


def _template() -> str:
    return resources.files("grokstudy").joinpath(TEMPLATE).read_text(encoding="utf-8")


def script_json(data: Any) -> str:
    """`data` as JSON that is safe inside a <script> element: no `<`, `>` or `&` in it at all
    (escaped as \\u003c ..., which JSON.parse reads back), so no `</script>` or `<!--` either."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def run_link(tracking_uri: str | None, run_id: str | None) -> str | None:
    """MLflow's page of a run, `<uri>/#/runs/<run_id>`, when the tracking URI is a web server
    (http or https); None otherwise. A user name and password in the URI are left out."""
    if not tracking_uri or not run_id:
        return None
    parts = urlsplit(tracking_uri)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number
        return None
    if parts.scheme not in WEB_SCHEMES or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}/#/runs/{quote(run_id, safe='')}"


def study_tracking_uri(study_yaml: str | None) -> str | None:
    """The `run.tracking_uri` a study file names, if any (None for text that is not a study)."""
    try:
        study = yaml.safe_load(study_yaml or "")
    except yaml.YAMLError:
        return None
    run = study.get("run") if isinstance(study, dict) else None
    uri = run.get("tracking_uri") if isinstance(run, dict) else None
    return uri if isinstance(uri, str) else None


# ---- what the page shows -----------------------------------------------------------------------


def verdict(row: dict[str, Any]) -> str:
    """A trial's phase, or FAILED (it ended in an error, or without a phase) or RUNNING."""
    if row.get("status") == "RUNNING":
        return RUNNING
    if row.get("status") == "ERROR" or row.get("stop_reason") == "error" or row.get("phase") is None:
        return FAILED
    return row["phase"]


@dataclass
class _Cell:
    """The trials at one (x, y, facet) point of the diagram."""

    key: tuple[Any, Any, Any]
    trials: list[int] = field(default_factory=list)
    inferred: tuple[str, float] | None = None
    """A boundary study's untrained cell: (inferred phase, confidence)."""


def _sort_key(v: Any) -> tuple[int, float, str]:
    """Facet, grid and table order: a missing value, then numbers by value, then text by name."""
    if v is None:
        return (0, 0.0, "")
    return (1, float(v), "") if is_number(v) else (2, 0.0, str(v))


class _Diagram:
    """The trials of a study grouped into the diagram's cells, with its axes."""

    def __init__(self, trials: pa.Table, cells: pa.Table | None) -> None:
        sampler, scales, diagram = results.table_info(trials)
        self.rows: list[dict[str, Any]] = trials.to_pylist()
        self.searched = list(
            dict.fromkeys(k for r in self.rows for k in r.get("searched") or () if k != SEED)
        )
        fallback = self.searched + [None, None]  # tables without the study's diagram (older ones)
        self.x_name = diagram.get("x") or fallback[0]
        self.y_name = diagram.get("y") or fallback[1]
        self.facet_name = diagram.get("facet")
        for flag, name in (("x", self.x_name), ("y", self.y_name), ("facet", self.facet_name)):
            if name is not None and name not in trials.column_names:
                raise UsageError("DIR", f"the trials table has no column {name!r}, the diagram's {flag}")
        self.study = ", ".join(sorted({r["study"] for r in self.rows})) or "study"
        self.sampler = sampler
        self.grid = sampler in (None, *LATTICE_SAMPLERS)
        self.cells = self._group(cells)
        self.short_budget = short_budget(trials)
        self.looks = [cell_look(self.verdicts(c), c.inferred, self._censored(c)) for c in self.cells]
        keys = [c.key for c in self.cells]
        self.x = Axis.build(self.x_name, [k[0] for k in keys], scales.get(self.x_name), self.grid)
        self.y = Axis.build(self.y_name, [k[1] for k in keys], scales.get(self.y_name), self.grid)
        self.facets = sorted({k[2] for k in keys}, key=_sort_key) or [None]
        self.pooled = [k for k in self.searched if k not in (self.x_name, self.y_name, self.facet_name)]
        self.x_label, self.y_label = (
            axis_label(n, trials=trials) if n else "" for n in (self.x_name, self.y_name)
        )

    def key(self, row: dict[str, Any]) -> tuple[Any, Any, Any]:
        return tuple(
            value_key(row.get(n)) if n else None for n in (self.x_name, self.y_name, self.facet_name)
        )

    def _group(self, cells: pa.Table | None) -> list[_Cell]:
        """Every (x, y, facet) point with trials, and every untrained cell of a boundary study;
        on a grid, every other cell of the axes' grid too (drawn as missing)."""
        by_key: dict[tuple[Any, Any, Any], _Cell] = {}
        for i, row in enumerate(self.rows):
            key = self.key(row)
            by_key.setdefault(key, _Cell(key)).trials.append(i)
        for key, (phase, confidence) in self._inferred(cells).items():
            by_key.setdefault(key, _Cell(key)).inferred = (phase, confidence)
        if self.grid and by_key:
            xs, ys, fs = (sorted({k[a] for k in by_key}, key=_sort_key) for a in range(3))
            for key in ((x, y, f) for f in fs for y in ys for x in xs):
                by_key.setdefault(key, _Cell(key))
        return sorted(by_key.values(), key=lambda c: [_sort_key(v) for v in reversed(c.key)])

    def _inferred(self, cells: pa.Table | None) -> dict[tuple[Any, Any, Any], tuple[str, float]]:
        """{key: (phase, confidence)} of the cells a boundary study inferred and never trained."""
        if cells is None or "measured" not in cells.column_names:
            return {}
        found: dict[tuple[Any, Any, Any], list[tuple[str, float]]] = defaultdict(list)
        for row in cells.to_pylist():
            if (
                not row["measured"]
                and row.get("phase")
                and all(n is None or n in row for n in (self.x_name, self.y_name, self.facet_name))
            ):
                found[self.key(row)].append((row["phase"], row.get("confidence") or 0.0))
        out = {}
        for key, inferred in found.items():
            v = vote([p for p, _ in inferred])
            if v.phase != TIE:
                out[key] = (v.phase, min(c for p, c in inferred if p == v.phase))
        return out

    def label(self, key: tuple[Any, Any, Any]) -> str:
        names = (self.x_name, self.y_name, self.facet_name)
        return point_label({n: v for n, v in zip(names, key, strict=True) if n}) or "all trials"

    def verdicts(self, cell: _Cell) -> list[str]:
        return [verdict(self.rows[i]) for i in cell.trials]

    def _censored(self, cell: _Cell) -> bool:
        """The cell's majority is memorization or confusion, and every seed of that verdict spent a
        budget under CENSORED_BELOW_DECAY_TIMES weight-decay time constants (the figures' rule)."""
        phases = [v for v in self.verdicts(cell) if v not in (FAILED, RUNNING)]
        if self.short_budget is None or not phases:
            return False
        v = vote(phases)
        return v.phase in CENSORED_PHASES and all(
            self.short_budget[i] for i in cell.trials if verdict(self.rows[i]) == v.phase
        )


# ---- the diagram as SVG --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Look:
    """How one cell is drawn and announced."""

    kind: str  # "phase" | "partial" (seeds disagree) | "tie" | "inferred" | "running" | "missing"
    fills: tuple[str, ...]  # one colour, or one band per tied phase; "url(#...)" for a pattern
    opacity: float
    mark: str  # text drawn in the cell: "k/n", "tie", "…"
    summary: str  # the cell's verdict in words (tooltip and aria-label)
    overlay: str | None = None  # a pattern drawn over the fill
    censored: bool = False  # hatched: its verdict could still change with a longer budget


def cell_look(
    verdicts: Sequence[str], inferred: tuple[str, float] | None = None, censored: bool = False
) -> _Look:
    """A cell's look from its trials' verdicts: the seeds' vote (`phases.vote`) unless a trial
    still runs (no verdict yet) or none finished; a `censored` verdict is hatched."""
    phases = [v for v in verdicts if v not in (FAILED, RUNNING)]
    failed = verdicts.count(FAILED)
    also = f", {failed} failed" if failed else ""
    if RUNNING in verdicts:
        summary = f"still training: no verdict yet{also}"
        return _Look("running", ("url(#report-running)",), 1.0, "…", summary)
    if not phases and inferred:
        phase, confidence = inferred
        note = f"not trained: {phase}, inferred from its neighbours (confidence {confidence:.2f})"
        return _Look("inferred", (_color(phase),), 0.35, "", note, overlay="url(#report-inferred)")
    if not phases:
        summary = f"no finished trial{also}" if failed else "no trial"
        return _Look("missing", ("url(#report-missing)",), 1.0, "", summary)
    v = vote(phases)
    n = len(phases)
    if v.phase == TIE:
        summary = f"tie: {' / '.join(v.tied)} ({v.count} of {n} each){also}"
        return _Look("tie", tuple(_color(p) for p in v.tied), 1.0, "tie", summary)
    kind, mark = ("partial", f"{v.count}/{n}") if v.count < n else ("phase", "")
    summary = f"{v.phase} {v.count}/{n}{also}"
    if censored:
        summary += f"; censored: its budget ended within {CENSORED_BELOW_DECAY_TIMES:g} weight-decay times 1/(lr wd), it could still grok"
        return _Look(
            kind, (_color(v.phase),), 0.35 + 0.65 * v.share, mark, summary, "url(#report-censored)", True
        )
    return _Look(kind, (_color(v.phase),), 0.35 + 0.65 * v.share, mark, summary)


def _color(phase: str) -> str:
    return PHASE_COLORS.get(phase) or STATE_COLORS.get(phase, "#999999")


def _ink(fill: str, opacity: float) -> str:
    """Black or white text, whichever reads on `fill` at `opacity` over white."""
    if not fill.startswith("#"):
        return "#1A1A1A"
    rgb = [int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    luminance = sum(w * (opacity * c + 1 - opacity) for w, c in zip((0.299, 0.587, 0.114), rgb, strict=True))
    return "#1A1A1A" if luminance > 0.55 else "#FFFFFF"


def _attrs(**attrs: Any) -> str:
    return " ".join(f'{k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items())


def _diagram_html(d: _Diagram) -> str:
    if not d.cells:
        return '<p class="hint">No trials yet.</p>'
    panels = [_panel_svg(d, f) for f in d.facets]
    return f'<div class="panels">{"".join(panels)}</div>'


def _panel_svg(d: _Diagram, facet: Any) -> str:
    """One facet's panel: cells (or points), ticks at the values, the axes' dotted names."""
    nx, ny = len(d.x.values), len(d.y.values)
    w = min(MAX_PLOT_PX, max(MIN_PLOT_PX, CELL_PX * nx))
    h = min(MAX_PLOT_PX, max(MIN_PLOT_PX * 0.8, CELL_PX * 0.8 * ny))
    m = MARGIN
    (x0, x1), (y0, y1) = d.x.span(d.grid), d.y.span(d.grid)

    def px(v: float) -> float:
        return m["left"] + (v - x0) / (x1 - x0) * w

    def py(v: float) -> float:
        return m["top"] + (y1 - v) / (y1 - y0) * h

    out = [f'<rect class="frame" {_attrs(x=m["left"], y=m["top"], width=w, height=h)}/>']
    for i, (cell, look) in enumerate(zip(d.cells, d.looks, strict=True)):
        if cell.key[2] != facet:
            continue
        label = f"{d.label(cell.key)}: {look.summary}"
        if d.grid:
            (a, b), (c, e) = d.x.cell(cell.key[0]), d.y.cell(cell.key[1])
            shape = _grid_cell(px(a), py(e), px(b) - px(a), py(c) - py(e), look)
        else:
            shape = _point(px(d.x.pos(cell.key[0])), py(d.y.pos(cell.key[1])), look)
        out.append(
            f'<g class="cell" {_attrs(data_cell=i, tabindex=0, role="button", aria_label=label)}>{shape}</g>'
        )
    out += _ticks(_tick_marks(d.x, d.grid), lambda p: (px(p), m["top"] + h), "x", w)
    out += _ticks(_tick_marks(d.y, d.grid), lambda p: (m["left"], py(p)), "y", h)
    out.append(_text(m["left"] + w / 2, m["top"] + h + 38, d.x_label, "axis-name", "middle"))
    out.append(
        f'<text class="axis-name" text-anchor="middle" transform="translate(16 {m["top"] + h / 2}) rotate(-90)">'
        f"{html.escape(d.y_label)}</text>"
    )
    if d.facet_name:
        out.append(_text(m["left"] + w / 2, 18, point_label({d.facet_name: facet}), "panel-title", "middle"))
    width, height = round(m["left"] + w + m["right"]), round(m["top"] + h + m["bottom"])
    title = f"phase diagram of {d.study}" + (
        f", {point_label({d.facet_name: facet})}" if d.facet_name else ""
    )
    size = _attrs(width=width, height=height, viewBox=f"0 0 {width} {height}", role="group", aria_label=title)
    return f'<svg class="diagram" {size}>{"".join(out)}</svg>'


def _grid_cell(x: float, y: float, w: float, h: float, look: _Look) -> str:
    """A cell's rect, or one vertical band per tied phase, its overlay and its mark."""
    band = w / len(look.fills)
    opacity = _r(look.opacity)
    out = [
        f"<rect {_attrs(x=_r(x + k * band), y=_r(y), width=_r(band), height=_r(h), fill=f, fill_opacity=opacity)}/>"
        for k, f in enumerate(look.fills)
    ]
    if look.overlay:
        out.append(f"<rect {_attrs(x=_r(x), y=_r(y), width=_r(w), height=_r(h), fill=look.overlay)}/>")
    out.append(f'<rect class="outline" {_attrs(x=_r(x), y=_r(y), width=_r(w), height=_r(h))}/>')
    if look.mark:
        ink = _ink(look.fills[0], look.opacity) if len(look.fills) == 1 else "#1A1A1A"
        halo = ' class="halo"' if len(look.fills) > 1 else ""
        out.append(
            f'<text{halo} {_attrs(x=_r(x + w / 2), y=_r(y + h / 2), fill=ink)} text-anchor="middle" '
            f'dominant-baseline="central">{html.escape(look.mark)}</text>'
        )
    return "".join(out)


def _point(x: float, y: float, look: _Look, r: float = 7.0) -> str:
    """A sample's point: a disc, or one wedge per tied phase; its mark beside it."""
    if len(look.fills) == 1:
        out = [
            f"<circle {_attrs(cx=_r(x), cy=_r(y), r=r, fill=look.fills[0], fill_opacity=_r(look.opacity))}/>"
        ]
    else:
        n = len(look.fills)
        out = []
        for k, fill in enumerate(look.fills):
            a, b = 2 * math.pi * k / n, 2 * math.pi * (k + 1) / n
            arc = f"M{_r(x)},{_r(y)} L{_r(x + r * math.sin(a))},{_r(y - r * math.cos(a))} "
            arc += f"A{r},{r} 0 0 1 {_r(x + r * math.sin(b))},{_r(y - r * math.cos(b))} Z"
            out.append(f"<path {_attrs(d=arc, fill=fill)}/>")
    if look.overlay:
        out.append(f"<circle {_attrs(cx=_r(x), cy=_r(y), r=r, fill=look.overlay)}/>")
    out.append(f'<circle class="outline" {_attrs(cx=_r(x), cy=_r(y), r=r)}/>')
    if look.mark:
        out.append(_text(x + r + 3, y + 4, look.mark, "mark", "start"))
    return "".join(out)


def _tick_marks(axis: Axis, grid: bool) -> list[tuple[float, str]]:
    """(position, label) of an axis's ticks: at every value on a grid or a category axis; at
    decades (or a few round numbers) of a sample's numeric axis, where values are many and
    arbitrary, with a zero's slot on a log axis ticked "0"."""
    if grid or axis.kind == "category" or len(axis.values) <= 6:
        return [(axis.pos(v), value_text(v) if axis.name else "") for v in axis.values]
    lo, hi = axis.span(grid)
    log = axis.kind == "log"
    if log and math.floor(hi) - math.ceil(lo) >= 1:
        ticks = [(float(k), value_text(10.0**k)) for k in range(math.ceil(lo), math.floor(hi) + 1)]
    else:
        spread = [lo + (hi - lo) * (i + 0.5) / 5 for i in range(5)]
        rounded = [float(f"{10**p if log else p:.2g}") for p in spread]
        ticks = [(math.log10(v) if log else v, value_text(v)) for v in rounded]
    return axis.with_zero(ticks)


def _ticks(ticks: list[tuple[float, str]], at: Any, which: str, length: float) -> list[str]:
    """Tick marks and labels along an axis `length` pixels long, every k-th one where labels
    would overlap; `at` maps a position to its (x, y) on the axis line."""
    room = 44 if which == "x" else 16
    every = max(1, math.ceil(len(ticks) * room / length))
    out = []
    for pos, text in ticks[::every]:
        x, y = at(pos)
        if which == "x":
            out.append(f'<line class="tick" {_attrs(x1=_r(x), x2=_r(x), y1=_r(y), y2=_r(y + 4))}/>')
            out.append(_text(x, y + 16, text, "tick-label", "middle"))
        else:
            out.append(f'<line class="tick" {_attrs(x1=_r(x - 4), x2=_r(x), y1=_r(y), y2=_r(y))}/>')
            out.append(_text(x - 7, y + 4, text, "tick-label", "end"))
    return out


def _text(x: float, y: float, text: str, cls: str, anchor: str) -> str:
    return f'<text {_attrs(class_=cls, x=_r(x), y=_r(y))} text-anchor="{anchor}">{html.escape(text)}</text>'


def _r(v: float) -> float:
    return round(v, 1)


# ---- the rest of the page --------------------------------------------------------------------------


def _header_html(d: _Diagram) -> str:
    counts = Counter(verdict(r) for r in d.rows)
    order = sorted(counts, key=lambda p: (p in (FAILED, RUNNING), phase_order(p)))
    chips = "".join(
        f'<li><span class="swatch" style="background:{_color(p)}"></span>{html.escape(p)} <b>{counts[p]}</b></li>'
        for p in order
    )
    axes = " × ".join(html.escape(n) for n in (d.x_name, d.y_name) if n)
    facet = f", one panel per {html.escape(d.facet_name)}" if d.facet_name else ""
    return (
        f"<header><h1>{html.escape(d.study)}</h1>"
        f'<p class="meta">{len(d.rows)} trials · sampler {html.escape(d.sampler or "unknown")} · '
        f"diagram {axes}{facet} · report by grokstudy {html.escape(__version__)}</p>"
        f'<ul class="counts">{chips}</ul></header>'
    )


LEGEND_KINDS = {
    "tie": ("tie", "seeds tie for the most votes: one band per tied phase"),
    "partial": ("k/n", "k of the n finished seeds share the majority phase; opacity: k/n"),
    "inferred": ("inferred", "not trained: the phase inferred from its neighbours"),
    "running": ("running", "a trial still trains: no verdict yet"),
    "missing": ("missing", "no finished trial"),
}
"""The legend's lines for the cells that are not one plain phase, in this order."""
CENSORED_LEGEND = (
    f"hatched: memorization or confusion whose every such seed spent its budget within "
    f"{CENSORED_BELOW_DECAY_TIMES:g} weight-decay time constants 1/(lr wd): not yet, rather than never"
)


def _legend_html(d: _Diagram) -> str:
    """The phases the diagram shows, with their definitions, then the kinds of cell it has."""
    kinds = {look.kind for look in d.looks}
    shown = {v for c in d.cells for v in d.verdicts(c)} | {c.inferred[0] for c in d.cells if c.inferred}
    items = [(f'style="background:{_color(p)}"', p, PHASE_DEFINITIONS[p]) for p in PHASES if p in shown]
    items += [(f'data-kind="{k}"', *LEGEND_KINDS[k]) for k in LEGEND_KINDS if k in kinds]
    if any(look.censored for look in d.looks):
        items.append(('data-kind="censored"', "censored", CENSORED_LEGEND))
    rows = "".join(
        f'<li><span class="swatch" {swatch}></span><span><b>{html.escape(name)}</b>: {html.escape(text)}</span></li>'
        for swatch, name, text in items
    )
    return f'<ul class="legend">{rows}</ul>'


def _summary_html(d: _Diagram) -> str:
    """One row per point (its seeds): its values, its vote, its phase counts, median timings."""
    points: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in d.rows:
        points[r.get("point_id") or r["trial_id"]].append(r)
    keys = list(dict.fromkeys(d.searched + [n for n in (d.x_name, d.y_name, d.facet_name) if n]))
    seen = sorted({verdict(r) for r in d.rows}, key=lambda p: (p in (FAILED, RUNNING), phase_order(p)))
    head = [*keys, "trials", "vote", *seen, "median t_train", "median t_val"]
    body = []
    for rows in sorted(points.values(), key=lambda rs: [_sort_key(value_key(rs[0].get(k))) for k in keys]):
        verdicts = [verdict(r) for r in rows]
        counts = Counter(verdicts)
        cells = [value_text(rows[0].get(k)) for k in keys]
        cells += [str(len(rows)), cell_look(verdicts).summary, *(str(counts[p] or "") for p in seen)]
        cells += [_median(rows, "t_train"), _median(rows, "t_val")]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    table = f'<table class="summary"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _median(rows: list[dict[str, Any]], column: str) -> str:
    """The median over the seeds that reached it (so "–" only when none did)."""
    values = [r[column] for r in rows if r.get(column) is not None]
    return str(round(statistics.median(values))) if values else "–"


def _study_html(study_yaml: str | None) -> str:
    if study_yaml is None:
        return '<p class="hint">No study.yaml beside the tables.</p>'
    return f"<pre>{html.escape(redact(study_yaml))}</pre>"


# ---- the data the page's script draws from -----------------------------------------------------------


def _payload(d: _Diagram, curves: pa.Table | None, tracking_uri: str | None) -> dict[str, Any]:
    """The cells (title, verdict, trial indices) and the trials (timings, link, curve) that the
    tooltip and the curves panel show."""
    by_trial = _curves(curves)
    cells = [
        {"title": d.label(cell.key), "verdict": look.summary, "trials": cell.trials}
        for cell, look in zip(d.cells, d.looks, strict=True)
    ]
    trials = [
        {
            "id": r["trial_id"],
            "label": point_label({k: r.get(k) for k in [*d.pooled, SEED] if k in r}),
            "phase": verdict(r),
            "t_train": r.get("t_train"),
            "t_val": r.get("t_val"),
            "t_circuit": r.get("t_circuit"),
            "val_acc": _round(r.get("final_val_acc")),
            "link": run_link(tracking_uri, r.get("run_id")),
            "curve": by_trial.get(r["trial_id"]),
        }
        for r in d.rows
    ]
    return {"cells": cells, "trials": trials, "colors": PHASE_COLORS | STATE_COLORS}


def _curves(curves: pa.Table | None) -> dict[str, dict[str, list[Any]]]:
    """{trial_id: {"step": [...], "train/acc": [...], ...}}, by step, floats rounded to DIGITS."""
    if curves is None:
        return {}
    columns = [c for c in CURVE_COLUMNS if c in curves.column_names]
    columns += [
        c for c in PROGRESS_COLUMNS if c in curves.column_names and curves.column(c).null_count < len(curves)
    ]
    data = curves.select(["trial_id", "step", *columns]).to_pydict()
    rows: dict[str, list[int]] = defaultdict(list)
    for i, trial_id in enumerate(data["trial_id"]):
        rows[trial_id].append(i)
    out = {}
    for trial_id, idx in rows.items():
        idx.sort(key=lambda i: data["step"][i])
        out[trial_id] = {"step": [data["step"][i] for i in idx]} | {
            c: [_round(data[c][i]) for i in idx] for c in columns
        }
    return out


def _round(v: float | None) -> float | None:
    """`v` to DIGITS significant digits; None for a value that is missing or not finite."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{DIGITS}g}")
