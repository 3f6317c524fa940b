"""Drivers of real studies for the resume tests: a small study, started, killed and resumed as
a user (or a lost machine) would, and what its files on disk say while it runs. Each driver runs
`grokstudy run` in a session of its own with its embedded Ray, so killing the session is losing
the machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    data.fraction: {values: [0.3, 0.8]}
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


def experiment(out: Path, name: str = "resume") -> Path:
    """The Tune experiment of a study run with the default run.storage (`<out>/ray/<name>`)."""
    return out / "ray" / name


def checkpointed_trials(experiment_dir: Path) -> int:
    """Trials with at least one checkpoint on disk."""
    return len({p.parent.parent for p in experiment_dir.glob("trial_*/checkpoint_*/step-*")})


def snapshot_trials(experiment_dir: Path) -> list[tuple[dict, bool]]:
    """(trial, whether it has a checkpoint recorded) of each trial Tune's latest experiment
    snapshot holds ([] before the first one). Reads Tune's own file: test code only."""
    import pickle

    snapshots = sorted(experiment_dir.glob("experiment_state-*.json"))
    try:
        state = json.loads(snapshots[-1].read_text()) if snapshots else {"trial_data": []}
    except (json.JSONDecodeError, OSError):
        return []
    found = []
    for trial_json, meta_json in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        manager = (json.loads(meta_json) if isinstance(meta_json, str) else meta_json).get(
            "checkpoint_manager"
        )
        recorded = (
            bool(manager)
            and pickle.loads(bytes.fromhex(manager["value"])).latest_checkpoint_result is not None
        )
        found.append((trial, recorded))
    return found


def finished_trials(experiment_dir: Path) -> int:
    """Tune trials whose last report the driver has processed says all their members finished
    (Tune's result.json; the next experiment snapshot may not record it yet)."""
    n = 0
    for results in experiment_dir.glob("trial_*/result.json"):
        lines = results.read_text().splitlines()
        try:
            last = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:  # being written
            continue
        n += bool(last) and last.get("members_done") == last.get("members")
    return n


def unfinished_trial_dirs(experiment_dir: Path) -> list[Path]:
    """Directories of the trials the latest snapshot records as not finished but checkpointed
    (a trial with none recorded starts afresh on resume, whatever its directory holds)."""
    return [
        experiment_dir / f"trial_{trial['trial_id']}"
        for trial, recorded in snapshot_trials(experiment_dir)
        if trial["status"] != "TERMINATED" and recorded
    ]


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr


def parent_status(tracking_uri: str, name: str = "resume") -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
                if r.data.tags.get("grokstudy.kind") == "study"]  # fmt: skip
    return parent.info.status


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
