"""Resume after the driver dies: killed before Tune's first snapshot, while trials train, right
after a trial finished; every study still ends with every point x seed once and every curve whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from drivers import (
    assert_clean,
    checkpointed_trials,
    command,
    finish,
    finished_trials,
    kill,
    start,
    wait_for,
    write_study,
)
from endstate import problems

from grokstudy.study import load_study

pytestmark = pytest.mark.integration


# ---- the driver dies --------------------------------------------------------------------------------


def test_a_driver_killed_at_start_up_mid_trial_and_after_a_trial_finished_resumes_exactly_once(
    tmp_path: Path,
) -> None:
    """Three kills of one study (SIGKILL of the driver's whole session: a lost machine): before
    Tune's first snapshot, while trials train, and right after a trial finished (between its last
    report and the next snapshot). Packs of 2, so a kill interrupts a pack. Resumed as
    cluster/README.md says: the same study with the same run.storage and tracking store, from a
    new --out. (One member per Tune trial, and SIGTERM from `ray job stop`, are interrupted in
    tests/test_resume_checkpoints.py.)"""
    study_file = write_study(tmp_path, **{"resources: {cpu: 1}": "resources: {cpu: 1, pack: 2}"})
    out, storage = tmp_path / "out", tmp_path / "shared-storage"
    uri = f"sqlite:///{tmp_path / 'cluster-mlflow.db'}"
    flags = ("--set", f"run.storage={storage}", "--tracking-uri", uri)
    cmd = command(study_file, out, *flags)
    log = tmp_path / "driver.log"
    exp = storage / "resume"
    kill_points = [
        ("before the first snapshot", lambda: (tmp_path / "cluster-mlflow.db").exists() and exp.exists()),
        ("mid-trial", lambda: checkpointed_trials(exp) >= 2),
        ("after a trial finished", lambda: finished_trials(exp) >= 1),
    ]
    for what, condition in kill_points:
        proc = start(cmd, log)
        wait_for(condition, proc, what=what)
        kill(proc)
        assert not (out / "trials.parquet").exists()
    resumed = finish(command(study_file, tmp_path / "new-out", *flags))
    assert_clean(resumed)
    assert "resumed study" in resumed.stdout
    assert problems(tmp_path / "new-out", load_study(study_file), tracking_uri=uri) == []


def test_a_corrupt_state_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "study-state.json").write_text('{"parent_run_id": ')
    result = finish(command(study_file, out), timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "study-state.json is corrupt" in line
