"""The runner on a real embedded Ray: every point x seed once, phases, resume after driver death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grokstudy import runner
from grokstudy.phases import PHASES
from grokstudy.study import load_study

pytestmark = pytest.mark.integration

TINY_STUDY = """
name: tiny
task: {op: "x+y", p: 23}
data: {fraction: 0.5}
model: {kind: mlp, embed_dim: 16, width: 64}
train: {max_steps: 300, eval_every: 50, checkpoint_every: 100}
optimizer: {name: adamw, lr: 3.0e-3, weight_decay: 1.0, warmup_steps: 0}
phases: {confirm_steps: 100}
search:
  sampler: grid
  space:
    optimizer.weight_decay: {values: [0.0, 1.0]}
    data.fraction: {values: [0.4, 0.8]}
  seeds: 1
resources: {cpu: 1}
diagram: {x: data.fraction, y: optimizer.weight_decay}
"""


def write_study(tmp_path: Path, text: str = TINY_STUDY, **replace: str) -> Path:
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def child_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_tiny_grid_study_runs_every_point_and_seed_exactly_once(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path), ["search.seeds=2"])
    outcome = runner.run_study(study, out_dir=tmp_path / "out", num_cpus=2)

    trials = pq.read_table(outcome.trials_path).to_pylist()
    assert outcome.n_failed == 0
    assert len(trials) == 8
    points = sorted((t["optimizer.weight_decay"], t["data.fraction"], t["train.seed"]) for t in trials)
    expected = sorted((wd, f, s) for wd in (0.0, 1.0) for f in (0.4, 0.8) for s in (0, 1))
    assert points == expected
    assert len({t["trial_id"] for t in trials}) == 8
    for t in trials:
        assert t["phase"] in PHASES
        assert t["steps"] <= 300
        assert t["stop_reason"] in ("generalized", "budget")
    # A point with enough data and decay fits its training set within the budget.
    assert any(t["t_train"] is not None for t in trials)

    curves = pq.read_table(outcome.curves_path)
    assert set(curves.column("trial_id").to_pylist()) == {t["trial_id"] for t in trials}
    assert outcome.figures and all(p.exists() for p in outcome.figures)

    children = child_runs(outcome.tracking_uri, "tiny")
    assert len(children) == 8
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {outcome.parent_run_id}
    assert {r.data.tags["phase"] for r in children} <= set(PHASES)


def _finished_trials(experiment_dir: Path) -> set[str]:
    """Trial dirs of the trials Tune's latest experiment snapshot records as finished.

    That snapshot is what a restarted driver restores. A trial that finished after it
    (seconds before the kill) is, to the restored study, unfinished: it continues from
    its last checkpoint, which repeats at most the steps after that checkpoint.
    """
    snapshots = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not snapshots:
        return set()
    try:
        state = json.loads(snapshots[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return set()
    done = set()
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        if trial["status"] == "TERMINATED":
            done.add(f"trial_{trial['trial_id']}")
    return done


def _steps_reported(experiment_dir: Path, trial_dir: str) -> list[int]:
    lines = (experiment_dir / trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    study_file = write_study(
        tmp_path,
        **{"max_steps: 300": "max_steps: 1500", "values: [0.4, 0.8]": "values: [0.3, 0.5, 0.8]"},
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "grokstudy", "run", str(study_file), "--out", str(out), "--num-cpus", "2"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    experiment_dir = out / "ray" / "tiny"

    driver = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    finished_before: set[str] = set()
    while time.monotonic() < deadline and driver.poll() is None:
        finished_before = _finished_trials(experiment_dir) if experiment_dir.exists() else set()
        if finished_before:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the study finished before it could be interrupted"
    assert finished_before, "no trial finished within the time limit"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "trials.parquet").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout

    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 6
    assert len({(t["optimizer.weight_decay"], t["data.fraction"]) for t in trials}) == 6
    for trial_dir in finished_before:
        steps = _steps_reported(experiment_dir, trial_dir)
        assert steps == sorted(set(steps)), f"{trial_dir} ran again after the restart: {steps}"

    children = child_runs(f"sqlite:///{out / 'mlflow.db'}", "tiny")
    assert len(children) == 6
    assert all(r.info.status == "FINISHED" for r in children)
