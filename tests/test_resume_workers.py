"""A trial's worker dies: its trial is retried from its checkpoint, or failed for good."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from drivers import (
    STUDY,
    checkpointed_trials,
    command,
    experiment,
    finish,
    start,
    trial_workers,
    wait_for,
    write_study,
)
from endstate import problems

from grokstudy.study import load_study

pytestmark = pytest.mark.integration


# A lone trial's retry runs the same restore as a resumed one (tests/test_resume.py); a pack's
# retry and a failure beyond max_failures are what a dead worker adds.
@pytest.mark.parametrize(("max_failures", "pack"), [(0, 1), (1, 2)])
def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint_or_marked_failed(
    tmp_path: Path, max_failures: int, pack: int
) -> None:
    from mlflow import MlflowClient

    text = STUDY.replace(
        "resources: {cpu: 1}", f"resources: {{cpu: 1, pack: {pack}}}\nrun: {{max_failures: {max_failures}}}"
    )
    study_file = write_study(tmp_path, text, **{"values: [0.3, 0.8]": "values: [0.5]"})
    out = tmp_path / "out"
    proc = start(command(study_file, out), tmp_path / "driver.log")
    wait_for(
        lambda: checkpointed_trials(experiment(out)) >= 1 and trial_workers(proc.pid),
        proc,
        what="a training worker",
    )
    victim = trial_workers(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(timeout=400)
    log = (tmp_path / "driver.log").read_text()
    study = load_study(study_file)
    if max_failures:
        assert code == 0, log[-3000:]
        assert problems(out, study) == []
        return
    assert code == 1, log[-3000:]
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "trials.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["stop_reason"] == "error" and failed[0]["error"]
    assert f"FAILED trials (1, beyond run.max_failures retries): {failed[0]['trial_id']}" in log
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(failed[0]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags.get("grokstudy.error")
    import optuna

    ot = optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'optuna.db'}")
    states = {
        t.user_attrs.get("grokstudy.trial_id"): t.state.name
        for t in ot.trials
        if t.user_attrs.get("grokstudy.trial_id")
    }
    assert states[failed[0]["trial_id"]] == "FAIL"
    assert sorted(states.values()) == ["COMPLETE", "FAIL"]

    # --retry-failed runs the failed trial again (from its last checkpoint), in the same study
    retried = finish([*command(study_file, out), "--retry-failed"])
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
    assert "ran again 1 trial(s) that had failed" in retried.stdout
    assert problems(out, study) == []
    assert client.get_run(failed[0]["run_id"]).info.status == "FINISHED"
    ot = optuna.load_study(study_name="resume", storage=f"sqlite:///{out / 'optuna.db'}")
    again = [t for t in ot.trials if t.user_attrs.get("grokstudy.trial_id") == failed[0]["trial_id"]]
    assert [t.state.name for t in again] == ["FAIL", "COMPLETE"]
    assert again[1].user_attrs["grokstudy.retry_of"] == again[0].number
