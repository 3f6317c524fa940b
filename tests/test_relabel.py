"""relabel.py and `grokstudy plot --rule`: a study's curves read by another phase rule, on the
synthetic wd × fraction study of test_figures (test_cli runs it on a real study's tables)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest
from test_figures import synthetic_study, write_study

from grokstudy import figures, relabel, results
from grokstudy.cli import main
from grokstudy.config import PHASE_RULES, PhaseConfig
from grokstudy.errors import UsageError
from grokstudy.phases import classify_records, vote
from grokstudy.records import from_dicts


@pytest.fixture(scope="module")
def study() -> tuple[pa.Table, pa.Table]:
    return synthetic_study(seeds=2)


def direct_phases(trials: pa.Table, curves: pa.Table, cfg: PhaseConfig) -> dict[str, str]:
    """{trial id: phase} by `classify_records` on each trial's curve rows, read here."""
    rows = defaultdict(list)
    for r in curves.to_pylist():
        rows[r["trial_id"]].append(r)
    return {
        t["trial_id"]: classify_records(from_dicts(rows[t["trial_id"]]), cfg, t["max_steps"]).phase
        for t in trials.to_pylist()
    }


def test_every_trial_is_read_again_by_the_named_rule_and_its_changed_cells_listed(study) -> None:
    trials, curves = study
    done = relabel.relabel(trials, curves, "liu2022")
    liu = PhaseConfig(rule="liu2022", **PHASE_RULES["liu2022"])
    assert done.phases == liu
    expected = direct_phases(trials, curves, liu)
    after = {r["trial_id"]: r for r in done.trials.to_pylist()}
    assert {t: r["phase"] for t, r in after.items()} == expected
    before = dict(zip(trials["trial_id"].to_pylist(), trials["phase"].to_pylist(), strict=True))
    assert done.finished_trials == trials.num_rows
    assert done.changed_trials == sum(before[t] != expected[t] for t in before) > 0
    # Timings move with the rule too: t_train at accuracy 0.9 comes no later than at 0.99.
    assert all(
        a["t_train"] <= b["t_train"]
        for b in trials.to_pylist()
        if b["t_train"] is not None and (a := after[b["trial_id"]])["t_train"] is not None
    )
    # A cell changed iff its seeds' vote did.
    by_cell: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for t in trials.to_pylist():
        key = (("optimizer.weight_decay", t["optimizer.weight_decay"]), ("data.fraction", t["data.fraction"]))
        by_cell[key].append((before[t["trial_id"]], expected[t["trial_id"]]))
    changed = {
        cell: (vote([b for b, _ in seeds]).phase, vote([a for _, a in seeds]).phase)
        for cell, seeds in by_cell.items()
        if vote([b for b, _ in seeds]).phase != vote([a for _, a in seeds]).phase
    }
    assert {c.point: (c.before, c.after) for c in done.changes} == changed and changed
    assert done.n_cells == len(by_cell)
    assert relabel.rule_of(done.trials) == "liu2022" and relabel.rule_of(trials) is None
    assert done.trials.schema.metadata[results.SAMPLER_META.encode()] == b"grid"  # the study's metadata stays
    fig = figures.phase_diagram(done.trials, "data.fraction", "optimizer.weight_decay")
    assert fig.get_suptitle().startswith("wd-vs-frac (phases by rule liu2022): phase diagram")


def test_the_study_s_own_rule_changes_nothing_and_a_running_trial_keeps_no_verdict(study) -> None:
    trials, curves = study
    same = relabel.relabel(trials, curves, "default")
    assert same.changed_trials == 0 and same.changes == ()
    for name in ("phase", "t_train", "t_val", "delay", "censored", "val_acc_at_fit"):
        assert same.trials[name].to_pylist() == trials[name].to_pylist(), name
    rows = trials.to_pylist()
    rows[0] |= {"status": "RUNNING", "stop_reason": None, "phase": None, "t_val": None, "delay": None}
    running = results.trials_table(rows).replace_schema_metadata(trials.schema.metadata)
    done = relabel.relabel(running, curves, "liu2022")
    assert done.trials.to_pylist()[0]["phase"] is None and done.finished_trials == trials.num_rows - 1


def test_a_rule_keeps_the_settings_that_say_how_the_trials_ran() -> None:
    own = PhaseConfig(threshold=0.95, min_delay=200, plateau_max=0.2, confirm_steps=300, early_stop="never")
    liu = relabel.rule_phases("liu2022", own)
    assert (liu.threshold, liu.min_delay, liu.grok_delay_factor, liu.margin) == (0.9, 1001, 1.0, 0.9)
    assert liu.plateau_max is None  # the rule's, not the study's
    assert (liu.confirm_steps, liu.early_stop) == (300, "never")
    assert relabel.rule_phases("default") == PhaseConfig()
    with pytest.raises(UsageError, match=r"--rule: unknown phase rule 'liu'; did you mean 'liu2022'\?"):
        relabel.rule_phases("liu")
    with pytest.raises(UsageError, match="no curves table"):
        relabel.relabel(synthetic_study(seeds=1, wds=[0.1], fractions=[0.5])[0], None, "liu2022")


def test_cli_plot_rule_draws_into_a_directory_of_its_own_and_prints_what_changed(
    tmp_path: Path, capsys
) -> None:
    directory = write_study(tmp_path / "study", seeds=2)
    assert main(["plot", str(directory), "--format", "png"]) == 0
    own = {p: p.read_bytes() for p in (directory / "figures").iterdir()}
    capsys.readouterr()
    assert main(["plot", str(directory), "--rule", "liu2022", "--format", "png,svg"]) == 0
    printed = capsys.readouterr().out.splitlines()
    trials, curves = results.load_source(directory)
    done = relabel.relabel(trials, curves, "liu2022")
    assert printed[0] == (
        f"rule liu2022: {done.changed_trials} of {trials.num_rows} trials and {len(done.changes)} of "
        f"{done.n_cells} cells changed phase ({directory})"
    )
    assert printed[1 : 1 + len(done.changes)] == [f"  {c.describe()}" for c in done.changes]
    redrawn = directory / "figures" / "rule-liu2022"
    assert {p.name for p in redrawn.iterdir()} >= {"phase_diagram.png", "phase_diagram.svg"}
    assert all(line == f"figure: {redrawn / Path(line).name}" for line in printed[1 + len(done.changes) :])
    assert "(phases by rule liu2022)" in (redrawn / "phase_diagram.svg").read_text()
    assert {p: p.read_bytes() for p in (directory / "figures").iterdir() if p.is_file()} == own

    with pytest.raises(SystemExit) as exc:
        main(["plot", str(directory), "--rule", "liu-2022"])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "grokstudy plot: error: --rule: unknown phase rule 'liu-2022'; did you mean 'liu2022'? "
        "choose from: default, liu2022"
    )


def test_a_plateau_rule_setting_is_kept_off_by_the_named_rules(study) -> None:
    trials, curves = study
    plateau = dataclasses.replace(PhaseConfig(), plateau_max=0.05)
    assert relabel.rule_phases("default", plateau).plateau_max is None
    strict = relabel.reclassify(trials, curves, plateau)
    # The synthetic validation curve sits at ~0.01-0.03 until it rises: every grokking run had a plateau.
    assert strict["phase"].to_pylist() == trials["phase"].to_pylist()
