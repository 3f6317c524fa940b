"""Resume you can trust (issue 9): real drivers killed, real MLflow servers stopped, real
workers lost; every study still ends with every point x seed once and every curve whole."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
from endstate import problems

from grokstudy.study import load_study

pytestmark = pytest.mark.integration

STUDY = """
name: resume
task: {op: "x+y", p: 23}
data: {fraction: 0.5}
model: {kind: mlp, embed_dim: 16, width: 64}
train: {max_steps: 1500, eval_every: 50, checkpoint_every: 100}
optimizer: {name: adamw, lr: 3.0e-3, weight_decay: 1.0, warmup_steps: 0}
phases: {confirm_steps: 100}
search:
  sampler: grid
  space:
    optimizer.weight_decay: {values: [0.0, 1.0]}
    data.fraction: {values: [0.3, 0.5, 0.8]}
  seeds: 1
resources: {cpu: 1}
diagram: {x: data.fraction, y: optimizer.weight_decay}
"""


def write_study(tmp_path: Path, text: str = STUDY, **replace: str) -> Path:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def command(study: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "grokstudy",
        "run",
        str(study),
        "--out",
        str(out),
        "--num-cpus",
        "2",
        "--format",
        "png",  # the figures are not what these tests check; PDFs cost a second a run
        *extra,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A driver in a session of its own (its embedded Ray too), output to `log`."""
    with log.open("ab") as f:
        return subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )


def finish(cmd: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the driver ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its session (its embedded Ray), as a lost machine would."""
    with contextlib.suppress(ProcessLookupError):  # the driver may have ended on its own
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reap_session(proc.pid)


def reap_session(session: int) -> None:
    """SIGKILL what is left of a session until nothing is: Ray's processes may sit in process
    groups of their own, and any of them may exit between being listed and being killed."""
    for _ in range(100):
        pids = session_pids(session)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} outlived SIGKILL: {session_pids(session)}")


def session_pids(session: int) -> list[int]:
    """Live processes of a session (zombies, already dead, are not counted)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session and fields[0] != "Z":
                    found.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def checkpointed_trials(out: Path) -> int:
    """Trials with at least one checkpoint on disk."""
    return len(list((out / "ray" / "resume").glob("trial_*/checkpoint_*")))


def finished_trials(out: Path) -> int:
    """Members Tune's latest experiment snapshot records as finished."""
    snapshots = sorted((out / "ray" / "resume").glob("experiment_state-*.json"))
    if not snapshots:
        return 0
    try:
        state = json.loads(snapshots[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return 0
    n = 0
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        n += trial["status"] == "TERMINATED"
    return n


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr


# ---- the driver dies --------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [1, 3], ids=["one trial per Tune trial", "packs of 3"])
def test_a_driver_killed_at_start_up_mid_trial_and_after_a_trial_finished_resumes_exactly_once(
    tmp_path: Path, pack: int
) -> None:
    """Three kills in one study: before Tune's first snapshot, while trials train, and right
    after a trial finished (between its last report and the next snapshot)."""
    study_file = write_study(tmp_path, **{"resources: {cpu: 1}": f"resources: {{cpu: 1, pack: {pack}}}"})
    out = tmp_path / "out"
    cmd = command(study_file, out)
    log = tmp_path / "driver.log"
    kill_points = [
        (
            "before the first snapshot",
            lambda: (out / "mlflow.db").exists() and (out / "ray" / "resume").exists(),
        ),
        ("mid-trial", lambda: checkpointed_trials(out) >= 2),
        ("after a trial finished", lambda: finished_trials(out) >= 1),
    ]
    for what, condition in kill_points:
        proc = start(cmd, log)
        wait_for(condition, proc, what=what)
        kill(proc)
        assert not (out / "trials.parquet").exists()
    resumed = finish(cmd)
    assert_clean(resumed)
    assert "resumed study" in resumed.stdout
    assert problems(out, load_study(study_file)) == []


def recorded_checkpoints(out: Path) -> dict[Path, Path]:
    """{trial directory: the checkpoint Tune's latest snapshot records as its latest} of the
    trials that snapshot records as not finished."""
    import pickle

    experiment = out / "ray" / "resume"
    snapshots = sorted(experiment.glob("experiment_state-*.json"))
    if not snapshots:
        return {}
    try:
        state = json.loads(snapshots[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    found = {}
    for trial_json, meta_json in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        meta = json.loads(meta_json) if isinstance(meta_json, str) else meta_json
        manager = meta.get("checkpoint_manager")
        if trial["status"] == "TERMINATED" or not manager:
            continue
        latest = pickle.loads(bytes.fromhex(manager["value"])).latest_checkpoint_result  # Tune's cloudpickle
        if latest is not None:
            found[experiment / f"trial_{trial['trial_id']}"] = Path(latest.checkpoint.path)
    return found


def test_a_resume_whose_recorded_checkpoints_the_killed_driver_deleted_uses_the_newest_whole_one(
    tmp_path: Path,
) -> None:
    """Tune's snapshot names a trial's latest checkpoint; the killed driver may have registered
    newer ones since and deleted that one (`num_to_keep`), and the worker may have left a
    half-copied one. Made here on purpose: each unfinished trial's checkpoints, the recorded one
    included, are replaced by a copy of its newest one numbered past them and a truncated one
    after that. The resume continues each from that copy (a soak found Tune's restore of the
    recorded checkpoint failing every retry instead, and the study crashing)."""
    import shutil

    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    cmd = command(study_file, out)
    log = tmp_path / "driver.log"
    recorded: dict[Path, Path] = {}
    for _ in range(5):  # the trials seen unfinished may all finish before the kill lands
        proc = start(cmd, log)
        wait_for(
            lambda: recorded_checkpoints(out), proc, what="a snapshot naming a training trial's checkpoint"
        )
        kill(proc)
        recorded = recorded_checkpoints(out)
        if recorded:
            break
    assert recorded
    first_new: dict[Path, int] = {}
    for directory in recorded:  # a recorded checkpoint may be gone already: the very case
        checkpoints = sorted(directory.glob("checkpoint_*"))
        newest = int(checkpoints[-1].name.split("_")[1])
        shutil.copytree(checkpoints[-1], directory / f"checkpoint_{newest + 2:06d}")
        torn = directory / f"checkpoint_{newest + 3:06d}"
        shutil.copytree(checkpoints[-1], torn)
        state = (torn / "state.pt").read_bytes()
        (torn / "state.pt").write_bytes(state[: len(state) // 2])
        for c in checkpoints:
            shutil.rmtree(c)
        first_new[directory] = newest + 3
    resumed = finish(cmd)
    assert_clean(resumed)
    assert resumed.stderr.count("last recorded checkpoint is gone") == len(recorded)
    for directory, index in first_new.items():  # continued from the copy: numbered after it
        assert max(int(c.name.split("_")[1]) for c in directory.glob("checkpoint_*")) >= index
    assert problems(out, load_study(study_file)) == []


def test_sigterm_from_ray_job_stop_ends_the_parent_run_failed_and_a_resume_finishes(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    cmd = command(study_file, out)
    proc = start(cmd, tmp_path / "driver.log")
    wait_for(lambda: checkpointed_trials(out) >= 1, proc, what="a checkpoint")
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as `ray job stop` does
    assert proc.wait(timeout=60) == 3
    log = (tmp_path / "driver.log").read_text()
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name("resume").experiment_id])
                if r.data.tags.get("grokstudy.kind") == "study"]  # fmt: skip
    assert parent.info.status == "FAILED"
    reap_session(proc.pid)  # Ray processes the SIGTERMed driver left behind
    resumed = finish(cmd)
    assert_clean(resumed)
    assert problems(out, load_study(study_file)) == []


def test_the_documented_cluster_flow_resumes_with_a_new_out_and_the_same_storage(tmp_path: Path) -> None:
    """cluster/README.md: resubmit the same study with the same run.storage; --out may be new."""
    study_file = write_study(tmp_path)
    storage = tmp_path / "shared-storage"
    first, second = tmp_path / "first-out", tmp_path / "second-out"
    uri = f"sqlite:///{tmp_path / 'cluster-mlflow.db'}"  # one tracking server for both submissions
    flags = ("--set", f"run.storage={storage}", "--tracking-uri", uri)
    proc = start(command(study_file, first, *flags), tmp_path / "driver.log")
    wait_for(lambda: len(list(storage.glob("resume/trial_*/checkpoint_*"))) >= 2, proc, what="checkpoints")
    kill(proc)
    resumed = finish(command(study_file, second, *flags))
    assert_clean(resumed)
    assert "resumed study" in resumed.stdout
    assert problems(second, load_study(study_file), tracking_uri=uri) == []


# ---- a second driver, a changed study, a corrupt state file --------------------------------------------


def test_a_second_driver_on_the_same_study_is_refused_at_once(tmp_path: Path) -> None:
    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    storage = f"file://{tmp_path / 'storage'}"
    proc = start(command(study_file, out, "--set", f"run.storage={storage}"), tmp_path / "driver.log")
    try:
        wait_for(lambda: (out / "study-state.json").exists(), proc, what="the first driver to start")
        same_out = finish(command(study_file, out, "--set", f"run.storage={storage}"), timeout=60)
        assert same_out.returncode == 2
        [line] = same_out.stderr.strip().splitlines()
        assert "--out" in line and "in use by another grokstudy run" in line
        other_out = finish(
            command(study_file, tmp_path / "other", "--set", f"run.storage={storage}"), timeout=60
        )
        assert other_out.returncode == 2
        [line] = other_out.stderr.strip().splitlines()
        assert "run.storage" in line and "run by another driver" in line
        assert not (tmp_path / "other" / "mlflow.db").exists()
    finally:
        kill(proc)


def test_a_changed_study_is_refused_on_resume_with_what_changed(tmp_path: Path) -> None:
    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    proc = start(command(study_file, out), tmp_path / "driver.log")
    wait_for(lambda: checkpointed_trials(out) >= 1, proc, what="a checkpoint")
    kill(proc)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    changed = finish(
        command(
            study_file,
            out,
            "--set",
            "optimizer.lr=0.01",
            "--set",
            "search.space.data.fraction={values: [0.3]}",
        )
    )
    assert changed.returncode == 2
    [line] = changed.stderr.strip().splitlines()
    assert line.startswith("grokstudy run: error: study: changed since its trials started")
    assert "optimizer.lr: 0.003 -> 0.01" in line and "search.space.data.fraction" in line
    bookkeeping = (".grokstudy.lock", "grokstudy-lease.json")  # the killed driver's lease is taken over
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in bookkeeping}
    assert after == {p: t for p, t in before.items() if p.name not in bookkeeping}


def test_a_corrupt_state_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    study_file = write_study(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "study-state.json").write_text('{"parent_run_id": ')
    result = finish(command(study_file, out), timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "study-state.json is corrupt" in line


# ---- MLflow goes away -----------------------------------------------------------------------------


def test_an_mlflow_outage_mid_study_delays_the_curves_and_loses_nothing(tmp_path: Path) -> None:
    root, port = tmp_path / "mlflow", servers.free_port()
    study_file = write_study(tmp_path, **{"max_steps: 1500": "max_steps: 3000"})
    out = tmp_path / "out"
    uri = f"http://127.0.0.1:{port}"
    cmd = command(study_file, out, "--tracking-uri", uri)
    log = tmp_path / "driver.log"
    with servers.mlflow_server(root, port=port):
        proc = start(cmd, log)
        wait_for(lambda: checkpointed_trials(out) >= 1, proc, what="a checkpoint")
    down_at = time.monotonic()
    wait_for(
        lambda: "unreachable" in log.read_text(), proc, timeout=60, what="the driver to notice the outage"
    )
    time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
    with servers.mlflow_server(root, port=port):
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        assert problems(out, load_study(study_file), tracking_uri=uri) == []


def test_mlflow_down_longer_than_the_limit_stops_the_study_and_a_resume_finishes(tmp_path: Path) -> None:
    root, port = tmp_path / "mlflow", servers.free_port()
    study_file = write_study(
        tmp_path, **{"resources: {cpu: 1}": "resources: {cpu: 1}\nrun: {tracking_outage_s: 5}"}
    )
    out = tmp_path / "out"
    uri = f"http://127.0.0.1:{port}"
    cmd = command(study_file, out, "--tracking-uri", uri)
    log = tmp_path / "driver.log"
    with servers.mlflow_server(root, port=port):
        proc = start(cmd, log)
        wait_for(lambda: checkpointed_trials(out) >= 1, proc, what="a checkpoint")
    assert proc.wait(timeout=180) == 3
    [line] = [ln for ln in log.read_text().splitlines() if ln.startswith("grokstudy run:")]
    assert line.startswith(f"grokstudy run: stopped: MLflow at {uri} was unreachable for")
    assert "run.tracking_outage_s" in line
    assert checkpointed_trials(out) >= 1
    with servers.mlflow_server(root, port=port):
        resumed = finish(cmd)
        assert_clean(resumed)
        assert problems(out, load_study(study_file), tracking_uri=uri) == []


# ---- a trial's worker dies ---------------------------------------------------------------------


def trial_workers(session: int) -> list[int]:
    """PIDs of the Ray worker processes running trials in a driver's session."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat[3]) == session and cmdline.startswith("ray::ImplicitFunc"):
            pids.append(int(p.name))
    return pids


@pytest.mark.parametrize(("max_failures", "pack"), [(0, 1), (1, 1), (1, 2)])
def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint_or_marked_failed(
    tmp_path: Path, max_failures: int, pack: int
) -> None:
    from mlflow import MlflowClient

    text = STUDY.replace(
        "resources: {cpu: 1}", f"resources: {{cpu: 1, pack: {pack}}}\nrun: {{max_failures: {max_failures}}}"
    )
    study_file = write_study(tmp_path, text, **{"values: [0.3, 0.5, 0.8]": "values: [0.5]"})
    out = tmp_path / "out"
    proc = start(command(study_file, out), tmp_path / "driver.log")
    wait_for(
        lambda: checkpointed_trials(out) >= 1 and trial_workers(proc.pid), proc, what="a training worker"
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
