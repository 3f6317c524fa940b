"""report.py: the HTML report of a study, read as text and driven in a real headless Chromium.

The synthetic study is a 3 x 3 grid (training fraction x weight decay) of 3 seeds whose curves
are drawn so that the default phase rule judges each trial as the test says: one cell whose
seeds disagree (grokking 2/3), one three-way tie, one failed trial, trials with and without an
MLflow run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import servers
from cdp import browser

from grokstudy import report, results
from grokstudy.cli import main
from grokstudy.config import DiagramConfig, SearchConfig, SearchDim, Study, TrialConfig, with_overrides
from grokstudy.records import EvalRecord, Outcome, TrialHistory

BUDGET = 12_000
STEPS = range(0, BUDGET + 1, 200)  # 61 eval points
TIMES = {  # (t_train, t_val) the default rule (θ 0.99, grokking at t_val ≥ 5 t_train) judges so
    "comprehension": (600, 1000),
    "grokking": (600, 6000),
    "memorization": (600, None),
    "confusion": (None, None),
}
FRACTIONS, WDS = (0.3, 0.5, 0.7), (0.01, 0.1, 1.0)
DISAGREE, TIE, FAILED = (0.5, 0.1), (0.7, 1.0), (0.3, 0.01, 2)
CELL_PHASES = {
    DISAGREE: ("grokking", "grokking", "comprehension"),
    TIE: ("comprehension", "grokking", "memorization"),
    (0.3, 1.0): ("confusion",) * 3,
}
TRACKING_URI = "http://127.0.0.1:5000"


def ramp(t: int | None, low: float, seed: int) -> list[float]:
    """Accuracy at `low` until shortly before step t, then 1 (never if t is None)."""
    if t is None:
        return [low] * len(STEPS)
    t = t * (1 + 0.05 * seed)
    return [low + (1 - low) * min(1.0, max(0.0, (s - t + 400) / 400)) for s in STEPS]


def curve(phase: str, seed: int) -> tuple[EvalRecord, ...]:
    t_train, t_val = TIMES[phase]
    train = ramp(t_train, 0.6, seed)
    val = ramp(t_val, 0.3 if t_train else 0.05, seed)
    return tuple(
        EvalRecord(
            step=s,
            train_loss=-math.log(max(a, 1e-4)),
            train_acc=a,
            val_loss=-math.log(max(b, 1e-4)),
            val_acc=b,
            weights_norm=30.0,
            # progress measures at every other eval (measures_every: 2); NaN between
            restricted_loss=0.1 * -math.log(max(b, 1e-4)) + 1e-4 if k % 2 == 0 else math.nan,
            excluded_loss=1.0 + 4 * b * (1 - b) if k % 2 == 0 else math.nan,
            elapsed_s=s * 1e-3,
        )
        for k, (s, a, b) in enumerate(zip(STEPS, train, val, strict=True))
    )


def default_phase(frac: float, wd: float, seed: int) -> str:
    if (frac, wd) in CELL_PHASES:
        return CELL_PHASES[(frac, wd)][seed]
    return "memorization" if frac < 0.4 else "grokking" if wd < 0.05 else "comprehension"


def study_tables(
    name: str = "report-test",
    fractions: tuple[float, ...] = FRACTIONS,
    wds: tuple[float, ...] = WDS,
    seeds: int = 3,
    sampler: str = "grid",
    facet: str | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Trials and curves of a synthetic study, built as a real one's (`results.build_tables`).
    Seed 2 has no MLflow run; the trial at FAILED ends in an error after ten eval points."""
    space = [SearchDim("data.fraction", values=fractions), SearchDim("optimizer.weight_decay", values=wds)]
    if facet:
        space.append(SearchDim(facet, choice=("adamw", "adam")))
    study = Study(
        name,
        base=with_overrides(TrialConfig(), {"train.max_steps": BUDGET}),
        search=SearchConfig(
            sampler=sampler, space=tuple(space), seeds=seeds, num_samples=None if sampler == "grid" else 9
        ),
        diagram=DiagramConfig(x="data.fraction", y="optimizer.weight_decay", facet=facet),
    )
    histories = []
    for option in ("adamw", "adam") if facet else ("adamw",):
        for frac in fractions:
            for wd in wds:
                for seed in range(seeds):
                    point = {"data.fraction": frac, "optimizer.weight_decay": wd, "train.seed": seed}
                    point |= {facet: option} if facet else {}
                    p = default_phase(frac, wd, seed)
                    failed = (frac, wd, seed) == FAILED
                    records = curve(p, seed)
                    histories.append(
                        TrialHistory(
                            trial_id=f"{option}-{frac:g}-{wd:g}-s{seed}",
                            point=point,
                            cfg=study.trial(point),
                            records=records[:10] if failed else records,
                            outcome=None if failed else Outcome(p, None, None, None, 0.0, "budget"),
                            run_id=None if seed == 2 else f"run-{option}-{frac:g}-{wd:g}-{seed}",
                        )
                    )
    return results.build_tables(study, histories)


@pytest.fixture(scope="module")
def study() -> tuple[pa.Table, pa.Table]:
    trials, curves = study_tables()
    phases = {r["trial_id"]: r["phase"] for r in trials.to_pylist()}
    assert phases["adamw-0.5-0.1-s2"] == "comprehension" and phases["adamw-0.5-0.1-s0"] == "grokking"
    assert phases["adamw-0.3-1-s0"] == "confusion" and phases["adamw-0.7-1-s2"] == "memorization"
    return trials, curves


def page_data(text: str) -> dict:
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert found, "no data script in the page"
    return json.loads(found[1])


def cell_labels(text: str) -> list[str]:
    return re.findall(
        r'<g class="cell" data-cell="\d+" tabindex="0" role="button" aria-label="([^"]*)"', text
    )


# ---- the page as text ----------------------------------------------------------------------------


def test_cells_show_their_seeds_vote_ties_and_failed_trials(study) -> None:
    text = report.build_report_html(*study)
    labels = cell_labels(text)
    assert len(labels) == 9
    assert "frac=0.5 wd=0.1: grokking 2/3" in labels
    assert "frac=0.7 wd=1: tie: comprehension / grokking / memorization (1 of 3 each)" in labels
    assert (
        "frac=0.3 wd=0.01: memorization 2/2, 1 failed; censored: its budget ended within 10 weight-decay "
        "times 1/(lr wd), it could still grok" in labels
    )
    assert ">2/3</text>" in text and ">tie</text>" in text
    assert "<b>grokking</b>: fits, then generalizes only after a long delay</span>" in text
    assert "<b>tie</b>" in text and "<b>k/n</b>" in text


def test_memorization_within_a_short_budget_is_hatched_as_censored_and_the_legend_says_so(study) -> None:
    # 12k steps at lr 1e-3: 0.12 decay times 1/(lr wd) at wd 0.01, 1.2 at 0.1 (both under 10: the
    # memorization there could still grok), 12 at wd 1 (its confusion is no longer "not yet").
    text = report.build_report_html(*study)
    censored = {label.split(":")[0] for label in cell_labels(text) if "censored" in label}
    assert censored == {"frac=0.3 wd=0.01", "frac=0.3 wd=0.1"}
    assert text.count('fill="url(#report-censored)"') == 2 and "<b>censored</b>" in text
    assert "frac=0.3 wd=1: confusion 3/3" in cell_labels(text)
    # The same trials with 20 decay times each: nothing is short, nothing hatched.
    trials, curves = study
    long = trials.set_column(
        trials.schema.get_field_index("budget_decay_times"), "budget_decay_times",
        pa.array([20.0] * trials.num_rows),
    )  # fmt: skip
    text = report.build_report_html(long, curves)
    assert "report-censored)" not in text and "<b>censored</b>" not in text


def test_the_page_data_holds_each_trial_with_its_link_and_rounded_curve(study) -> None:
    trials, curves = study
    data = page_data(report.build_report_html(trials, curves, tracking_uri=TRACKING_URI + "/"))
    by_id = {t["id"]: t for t in data["trials"]}
    assert len(by_id) == trials.num_rows == 27
    assert by_id["adamw-0.5-0.1-s0"]["link"] == f"{TRACKING_URI}/#/runs/run-adamw-0.5-0.1-0"
    assert by_id["adamw-0.5-0.1-s2"]["link"] is None  # no run_id
    assert by_id["adamw-0.3-0.01-s2"]["phase"] == "failed"
    loss = by_id["adamw-0.3-1-s0"]["curve"]["val/loss"]
    assert len(loss) == len(STEPS) and loss[0] == float(f"{-math.log(0.05):.4g}")


def test_a_hostile_study_name_and_study_file_are_escaped(tmp_path: Path) -> None:
    name = "</script><script>alert(1)</script>"
    trials, curves = study_tables(name=name, fractions=(0.3, 0.5), wds=(0.1,), seeds=1)
    study_yaml = (
        "name: x\n# </pre><script>alert(2)</script>\nrun: {tracking_uri: 'http://me:secret@mlflow:5000'}\n"
    )
    out = report.write_report(trials, curves, tmp_path / "r.html", study_yaml=study_yaml)
    text = out.read_text(encoding="utf-8")
    assert "alert" not in text.replace("&lt;script&gt;alert", "").replace("\\u003cscript\\u003ealert", "")
    assert text.count("<script") == 2 and text.count("</script>") == 2  # the data and the code
    assert "secret" not in text and "http://me:***@mlflow:5000" in text
    assert page_data(text)["cells"][0]["title"] == "frac=0.3 wd=0.1"
    assert "<h1>&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;</h1>" in text


def test_run_links_need_a_web_tracking_uri_and_leave_credentials_out() -> None:
    assert (
        report.run_link("https://u:pw@mlflow.example:8443/base/", "abc")
        == "https://mlflow.example:8443/base/#/runs/abc"
    )
    assert report.run_link("http://[::1]:5000", "abc") == "http://[::1]:5000/#/runs/abc"
    assert report.run_link("sqlite:////tmp/mlflow.db", "abc") is None
    assert report.run_link("http://127.0.0.1:5000", None) is None
    assert report.run_link(None, "abc") is None


def test_a_sampled_study_is_drawn_as_points_and_a_facet_as_panels(study) -> None:
    sampled = report.build_report_html(*study_tables(sampler="random"))
    assert (
        sampled.count("<circle ") >= 9
        and "<rect x=" not in sampled.split('class="diagram"', 1)[1].split("</svg>")[0]
    )
    faceted = report.build_report_html(*study_tables(facet="optimizer.name"))
    assert faceted.count('<svg class="diagram"') == 2
    assert "opt=adam" in faceted and "opt=adamw" in faceted


def test_untrained_cells_show_their_inferred_phase_and_empty_grid_cells_show_as_missing(study) -> None:
    trials, curves = study
    dropped = {(0.7, 0.01), (0.7, 0.1)}
    keep = [(r["data.fraction"], r["optimizer.weight_decay"]) not in dropped for r in trials.to_pylist()]
    cells = pa.table({
        "study": ["report-test"], "data.fraction": [0.7], "optimizer.weight_decay": [0.01],
        "phase": ["grokking"], "measured": [False], "confidence": [0.5], "seeds": [0],
    })  # fmt: skip
    text = report.build_report_html(trials.filter(pa.array(keep)), curves, cells=cells)
    labels = cell_labels(text)
    assert "frac=0.7 wd=0.01: not trained: grokking, inferred from its neighbours (confidence 0.50)" in labels
    assert "frac=0.7 wd=0.1: no trial" in labels
    assert "<b>inferred</b>" in text and "<b>missing</b>" in text


def tick_labels(text: str, anchor: str) -> list[tuple[float, str]]:
    """(x or y, label) of the first panel's tick labels on one axis ("middle": x, "end": y)."""
    panel = text.split('<svg class="diagram"', 1)[1].split("</svg>", 1)[0]
    found = re.findall(
        rf'<text class="tick-label" x="([-\d.]+)" y="([-\d.]+)" text-anchor="{anchor}">([^<]*)</text>', panel
    )
    return [(float(x if anchor == "middle" else y), label) for x, y, label in found]


def test_values_sit_on_the_axes_where_the_figures_put_them() -> None:
    # A zero on a log axis gets its own slot one grid step below the smallest positive value.
    wds = (0.0, 0.01, 0.1, 1.0)
    grid = report.build_report_html(*study_tables(wds=wds, seeds=1))
    ys = tick_labels(grid, "end")
    assert [label for _, label in ys] == ["0", "0.01", "0.1", "1"]
    np.testing.assert_allclose(np.diff([y for y, _ in ys]), np.diff([y for y, _ in ys])[0])
    # A sample's log axis is ticked at decades, its zero's slot "0".
    many = (0.0, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    sampled = report.build_report_html(*study_tables(wds=many, seeds=1, sampler="random"))
    assert [label for _, label in tick_labels(sampled, "end")] == [
        "0",
        "0.001",
        "0.01",
        "0.1",
        "1",
        "10",
        "100",
    ]


def test_a_cell_with_a_trial_still_training_has_no_verdict_yet() -> None:
    look = report.cell_look(["grokking", "running", "failed"])
    assert (look.kind, look.summary) == ("running", "still training: no verdict yet, 1 failed")
    assert report.cell_look(["failed", "failed"]).summary == "no finished trial, 2 failed"


def test_the_report_of_a_40_trial_study_stays_small(tmp_path: Path) -> None:
    trials, curves = study_tables(fractions=(0.2, 0.35, 0.5, 0.65, 0.8), wds=(0.01, 0.1, 1.0, 10.0), seeds=2)
    assert trials.num_rows == 40 and curves.num_rows == 40 * len(STEPS)
    size = report.write_report(trials, curves, tmp_path / "r.html").stat().st_size
    print(f"report of 40 trials x {len(STEPS)} eval points: {size / 1000:.0f} kB")
    assert size < 250_000


# ---- the command -----------------------------------------------------------------------------------


def test_report_of_a_directory_without_tables_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"grokstudy report: error: DIR: {tmp_path} holds no trials.parquet; give a study's output directory"
    )


def test_report_writes_the_page_beside_the_tables_linking_the_study_files_server(
    study, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results.write_tables(*study, tmp_path)
    (tmp_path / "study.yaml").write_text(
        "name: report-test\nrun:\n  tracking_uri: http://mlflow.example:5000\n"
    )
    assert main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "http://mlflow.example:5000/#/runs/run-adamw-0.5-0.1-0" in text
    assert "tracking_uri: http://mlflow.example:5000\n</pre>" in text
    assert (
        main(["report", str(tmp_path), "--out", str(tmp_path / "b.html"), "--tracking-uri", TRACKING_URI])
        == 0
    )
    assert f"{TRACKING_URI}/#/runs/" in (tmp_path / "b.html").read_text(encoding="utf-8")


# ---- the page in a browser ---------------------------------------------------------------------------

CELL_BOX = """(() => {
  const g = [...document.querySelectorAll('[data-cell]')].find(g => g.getAttribute('aria-label').startsWith(%s));
  g.scrollIntoView({block: 'center'});
  const b = g.getBoundingClientRect();
  return {x: b.x + b.width / 2, y: b.y + b.height / 2};
})()"""
TOOLTIP = "(() => { const t = document.getElementById('tooltip'); return !t.hidden && t.offsetWidth > 0 && t.innerText; })()"
CURVE_PATHS = (
    """[...document.querySelectorAll('#curves path.curve')].map(p => [p.dataset.trial, p.dataset.key])"""
)
LINKS = "[...document.querySelectorAll('#curves a')].map(a => a.href)"


@pytest.mark.integration
@pytest.mark.skipif(not os.path.exists(servers.CHROMIUM), reason=f"no Chromium at {servers.CHROMIUM}")
def test_hovering_a_cell_names_its_seeds_and_clicking_it_draws_their_curves(
    study, tmp_path: Path, artifacts_dir: Path
) -> None:
    trials, curves = study
    page_file = report.write_report(trials, curves, tmp_path / "report.html", tracking_uri=TRACKING_URI,
                                    study_yaml="name: report-test\n")  # fmt: skip
    url = page_file.resolve().as_uri()
    seeds = [r for r in trials.to_pylist() if (r["data.fraction"], r["optimizer.weight_decay"]) == DISAGREE]
    with browser(tmp_path / "chromium") as chrome:
        page = chrome.page()
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.send(f"{domain}.enable")
        page.open(url)

        box = page.evaluate(CELL_BOX % json.dumps("frac=0.5 wd=0.1:"))
        page.mouse("mouseMoved", box["x"], box["y"])
        tip = page.wait_for(TOOLTIP)
        assert "grokking 2/3" in tip
        for r in seeds:
            assert r["trial_id"] in tip
        assert tip.count("grokking") == 3 and tip.count("comprehension") == 1  # the verdict, then each seed

        page.click(box["x"], box["y"])
        drawn = page.wait_for(f"(() => {{ const p = {CURVE_PATHS}; return p.length >= 18 && p; }})()")
        data = page.evaluate(
            "JSON.parse(document.getElementById('report-data').textContent).trials.map(t => t.id)"
        )
        keys = (*report.CURVE_COLUMNS, *report.PROGRESS_COLUMNS)
        assert {(data[int(i)], key) for i, key in drawn} == {
            (r["trial_id"], key) for r in seeds for key in keys
        }
        # A progress measure missing between the evals that took it does not break its line.
        moves = page.evaluate(
            "[...document.querySelectorAll('#curves path.curve')].filter(p => p.dataset.key.startsWith('progress/'))"
            ".map(p => p.getAttribute('d').split('M').length - 1)"
        )
        assert moves and set(moves) == {1}
        assert sorted(page.evaluate(LINKS)) == sorted(
            f"{TRACKING_URI}/#/runs/{r['run_id']}" for r in seeds if r["run_id"]
        )

        shot = page.send("Page.captureScreenshot", format="png")
        (artifacts_dir / "report.png").write_bytes(base64.b64decode(shot["data"]))
        requested = [e["request"]["url"] for e in page.events("Network.requestWillBeSent")]
        errors = [e["entry"]["text"] for e in page.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        thrown = page.events("Runtime.exceptionThrown")
    assert [u for u in requested if u != url] == []
    assert errors == [] and thrown == []
