"""What a stopped study keeps and refuses: a second driver, `ray job stop`, a changed study, and
checkpoints pruned or torn under Tune's record of them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from drivers import (
    assert_clean,
    checkpointed_trials,
    command,
    finish,
    parent_status,
    reap_session,
    start,
    unfinished_trial_dirs,
    wait_for,
    write_study,
)
from endstate import problems

from grokstudy.cli import main
from grokstudy.storage import LEASE_PREFIX
from grokstudy.study import load_study

pytestmark = pytest.mark.integration


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `grokstudy run ARGS` (in this process) refuses with, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["run", *args])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


def test_a_running_study_refuses_a_second_driver_a_stopped_one_a_changed_study_and_resumes_from_its_newest_whole_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One study (one member per Tune trial), interrupted on purpose:
    1. while it runs, a second driver on its --out is refused, and one on its run.storage;
    2. SIGTERM (`ray job stop`) while trials train: it stops as Ctrl-C does, exit 3, its
       parent run FAILED;
    3. stopped, it refuses a changed study with what changed, touching nothing;
    4. each unfinished trial's checkpoints are then all pruned (as `checkpoints.prune` leaves
       them: Tune's directories with a PRUNED marker, the checkpoint Tune recorded among them),
       a whole copy of its newest one is put in a new directory and a torn one of a later step
       after it; the resume continues each trial from that copy, the torn one skipped."""
    import shutil

    study_file = write_study(tmp_path)
    out, storage = tmp_path / "out", f"file://{tmp_path / 'storage'}"
    exp = tmp_path / "storage" / "resume"
    storage_flag = ("--set", f"run.storage={storage}")
    cmd = command(study_file, out, *storage_flag)
    log = tmp_path / "driver.log"
    proc = start(cmd, log)
    wait_for(lambda: (out / "study-state.json").exists(), proc, what="the first driver to start")
    line = refused(capsys, str(study_file), "--out", str(out), *storage_flag)
    assert "--out" in line and "in use by another grokstudy run" in line
    line = refused(capsys, str(study_file), "--out", str(tmp_path / "other"), *storage_flag)
    assert "run.storage" in line and "run by another driver" in line
    assert not (tmp_path / "other" / "mlflow.db").exists()

    wait_for(lambda: checkpointed_trials(exp) >= 2, proc, what="trials training")
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `ray job stop` does
    assert proc.wait(timeout=60) == 3
    assert "stopped by SIGTERM" in log.read_text() and "Traceback" not in log.read_text()
    assert parent_status(f"sqlite:///{out / 'mlflow.db'}") == "FAILED"
    reap_session(proc.pid)  # Ray processes the SIGTERMed driver left behind
    trials = unfinished_trial_dirs(exp)  # Tune's last snapshot, taken as it stopped
    assert trials

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "driver.log"}
    line = refused(capsys, str(study_file), "--out", str(out), *storage_flag, "--set", "optimizer.lr=0.01",
                   "--set", "search.space.data.fraction={values: [0.3]}")  # fmt: skip
    assert line.startswith(
        "grokstudy run: error: optimizer.lr: 0.003 -> 0.01 since the study's trials started"
    )
    assert "also changed: search.space.data.fraction" in line and "--fresh" in line
    bookkeeping = (".grokstudy.lock", f"{LEASE_PREFIX}{1:010d}.json")  # a refused run takes, drops both
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "driver.log"}
    assert {p: t for p, t in after.items() if p.name not in bookkeeping} == {
        p: t for p, t in before.items() if p.name not in bookkeeping
    }

    copied: dict[Path, int] = {}
    for directory in trials:
        steps = sorted(directory.glob("checkpoint_*/step-*"), key=lambda p: p.name)
        newest, step = steps[-1], int(steps[-1].name.removeprefix("step-"))
        index = max(int(c.name.removeprefix("checkpoint_")) for c in directory.glob("checkpoint_*"))
        shutil.copytree(newest, directory / f"checkpoint_{index + 2:06d}" / newest.name)
        torn = directory / f"checkpoint_{index + 3:06d}" / f"step-{step + 100:010d}"
        shutil.copytree(newest, torn)
        state = (torn / "state.pt").read_bytes()
        (torn / "state.pt").write_bytes(state[: len(state) // 2])
        for pruned in steps:
            (pruned.parent / "PRUNED").write_text("")
            shutil.rmtree(pruned)
        copied[directory] = step
    resumed = finish(cmd)
    assert_clean(resumed)
    for directory, step in copied.items():
        reports = [json.loads(line) for line in (directory / "result.json").read_text().splitlines()]
        assert step in {r.get("restored_from_step") for r in reports}, directory.name
    assert problems(out, load_study(study_file)) == []
