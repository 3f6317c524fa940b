"""cluster/local.sh: a real multi-node Ray cluster and MLflow server on this machine.

One cluster (head + 2 workers, token auth on) is brought up for the module; the tests
talk to it only through its env file, as a user would after `source DIR/env`, and the
last test tears it down and looks for stray processes. The README's cluster lines run against
it too, as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import grokstudy

REPO = Path(__file__).resolve().parent.parent
LOCAL_SH = REPO / "cluster" / "local.sh"

pytestmark = pytest.mark.integration


def _local_sh(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # The nodes run the Ray, MLflow and grokstudy of the environment running the tests.
    venv = ["--venv", sys.prefix] if sys.prefix != sys.base_prefix else []
    return subprocess.run(
        ["bash", str(LOCAL_SH), *args, *venv], capture_output=True, text=True, timeout=timeout
    )


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
    return env


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (never this test process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def _live_in_sessions(sessions: set[int]) -> list[str]:
    """Live (non-zombie) processes whose session id is one of `sessions`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, session = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(session) in sessions and state != "Z":
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(cluster dir, env file contents) of a running head + 2 x 1-CPU workers."""
    cluster_dir = tmp_path_factory.mktemp("local-cluster")
    # A world-readable token left by an earlier cluster: `up` must not reuse the file.
    (cluster_dir / "auth_token").write_text("stale\n")
    (cluster_dir / "auth_token").chmod(0o644)
    up = _local_sh("up", "--workers", "2", "--cpus-per-worker", "1", "--dir", str(cluster_dir))
    try:
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield cluster_dir, _read_env(cluster_dir / "env")
    finally:
        _local_sh("down", "--dir", str(cluster_dir), timeout=120)


def test_up_starts_a_head_without_resources_and_two_one_cpu_workers_behind_the_token(cluster):
    _, env = cluster
    token_path = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    token = token_path.read_text().strip()
    assert len(token) == 64 and token != "stale"
    nodes_url = f"{env['RAY_API_SERVER_ADDRESS']}/api/v0/nodes?detail=true"

    status, _ = _get(nodes_url)
    assert status == 401, "the dashboard answered without the token"
    status, body = _get(nodes_url, token)
    assert status == 200
    nodes = json.loads(body)["data"]["result"]["result"]
    assert [n["state"] for n in nodes] == ["ALIVE"] * 3
    [head] = [n for n in nodes if n["is_head_node"]]
    workers = [n for n in nodes if not n["is_head_node"]]
    assert head["resources_total"].get("CPU", 0) == 0 and head["resources_total"].get("GPU", 0) == 0
    assert [w["resources_total"]["CPU"] for w in workers] == [1.0, 1.0]
    # Three nodes with three loopback addresses: a multi-node cluster that stays on this host.
    ips = {n["node_ip"] for n in nodes}
    assert len(ips) == 3 and all(ip.startswith("127.") for ip in ips)
    assert env["RAY_ADDRESS"] == f"{head['node_ip']}:{env['RAY_ADDRESS'].rsplit(':', 1)[1]}"


def test_up_starts_an_mlflow_server_that_answers_health(cluster):
    _, env = cluster
    status, body = _get(f"{env['MLFLOW_TRACKING_URI']}/health")
    assert (status, body.strip()) == (200, b"OK")
    assert Path(env["GROKSTUDY_STORAGE"]).is_dir()


JOB = """
import json, os, shutil, time
import ray

ray.init()

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def where():
    time.sleep(1)
    return ray.util.get_node_ip_address()

ips = sorted(set(ray.get([where.remote() for _ in range(4)])))
print("RESULT", json.dumps({
    "cpus": ray.cluster_resources().get("CPU"),
    "task_ips": ips,
    "grokstudy": shutil.which("grokstudy"),
    "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
}))
"""


def test_a_submitted_job_runs_its_tasks_on_the_workers_with_the_venv_and_mlflow(cluster, tmp_path):
    _, env = cluster
    (tmp_path / "job.py").write_text(JOB)
    ray_cli = Path(sys.executable).parent / "ray"
    submit = subprocess.run(
        [str(ray_cli), "job", "submit", "--working-dir", str(tmp_path), "--", "python", "job.py"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    [line] = [ln for ln in submit.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    head_ip = env["RAY_ADDRESS"].rsplit(":", 1)[0]
    assert result["cpus"] == 2.0
    assert len(result["task_ips"]) == 2 and head_ip not in result["task_ips"]
    # Entrypoints find the venv's console scripts and log to the cluster's MLflow.
    assert result["grokstudy"] and Path(result["grokstudy"]).parent == Path(sys.executable).parent
    assert result["tracking_uri"] == env["MLFLOW_TRACKING_URI"]


SUBMITTED_STUDY = """
name: {name}
task: {{op: "x+y", p: 23}}
data: {{fraction: 0.5}}
model: {{kind: mlp, embed_dim: 16, width: 64}}
train: {{max_steps: {max_steps}, eval_every: {eval_every}, checkpoint_every: {checkpoint_every}}}
optimizer: {{name: adamw, lr: 3.0e-3, weight_decay: 0.0, warmup_steps: 0}}
phases: {{confirm_steps: 100}}
search:
  sampler: grid
  space:
    data.fraction: {{values: {fractions}}}
  seeds: 1
resources: {{cpu: 1}}
run: {{max_failures: 3}}
diagram: {{x: data.fraction, y: optimizer.weight_decay}}
"""


def _submit_study(env: dict[str, str], workdir: Path, name: str, out: str = "out", **kw) -> subprocess.Popen:
    """`ray job submit --working-dir DIR -- grokstudy run study.yaml` (written from `kw`
    unless empty), streaming its logs."""
    if kw:
        (workdir / "study.yaml").write_text(SUBMITTED_STUDY.format(name=name, **kw))
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_cli),
        "job",
        "submit",
        "--working-dir",
        str(workdir),
        "--",
        "grokstudy",
        "run",
        "study.yaml",
        "--out",
        str(workdir / out),
        "--set",
        f"run.storage={env['GROKSTUDY_STORAGE']}",
    ]
    return subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _nodes(env: dict[str, str]) -> dict[str, str]:
    """{node id: node ip} of every node the cluster has known."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    _, body = _get(f"{env['RAY_API_SERVER_ADDRESS']}/api/v0/nodes?detail=true", token)
    return {n["node_id"]: n["node_ip"] for n in json.loads(body)["data"]["result"]["result"]}


def _child_runs(env: dict[str, str], experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment on the cluster's MLflow server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on the cluster's server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if r not in children], children


def test_a_study_submitted_with_ray_job_submit_runs_trials_on_both_workers_and_logs_to_mlflow(
    cluster, tmp_path
):
    _, env = cluster
    # Trials of a few seconds: sub-second ones may all finish on the first worker's actor
    # (Tune reuses actors) before the second worker's actor has started.
    job = _submit_study(
        env,
        tmp_path,
        "submitted",
        max_steps=3000,
        eval_every=250,
        checkpoint_every=500,
        fractions="[0.3, 0.4, 0.6, 0.8]",
    )
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-4000:]
    assert "succeeded" in output

    trials = pq.read_table(tmp_path / "out" / "trials.parquet").to_pylist()
    assert sorted(t["data.fraction"] for t in trials) == [0.3, 0.4, 0.6, 0.8]
    nodes = _nodes(env)
    head_ip = env["RAY_ADDRESS"].rsplit(":", 1)[0]
    trial_ips = {nodes[t["node"]] for t in trials}
    assert len(trial_ips) == 2 and head_ip not in trial_ips, f"trials ran on {trial_ips}"

    parents, children = _child_runs(env, "submitted")
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" and r.data.tags.get("phase") for r in children)
    # The parent run carries the tables and figures, uploaded through the server's artifact proxy.
    from mlflow.tracking import MlflowClient

    artifacts = {
        a.path
        for a in MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(parents[0].info.run_id, "results")
    }
    assert {"results/trials.parquet", "results/curves.parquet"} <= artifacts

    # Submitted again with a fresh --out (as a job whose default output dir was temporary):
    # the study is restored from run.storage, nothing reruns, and its parent run continues.
    again = _submit_study(env, tmp_path, "submitted", out="out-again")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output[-4000:]
    assert "resumed study" in output
    assert pq.read_table(tmp_path / "out-again" / "trials.parquet").num_rows == 4
    parents_again, children_again = _child_runs(env, "submitted")
    assert [r.info.run_id for r in parents_again] == [parents[0].info.run_id]
    assert sorted(r.info.run_id for r in children_again) == sorted(r.info.run_id for r in children)


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_session(session: int) -> None:
    """SIGKILL every process of a node's session: the node dies as a lost machine would."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- README.md's "Running on a cluster" lines, run as written ------------------------------------
# The submit block, then the "After the job" block that brings the study home. Only the
# placeholders change (`PLACEHOLDERS`), so a README edit that breaks a command fails here.

README = REPO / "README.md"

PLACEHOLDERS = {
    # the README's placeholder: what stands for it here ({...}: from the cluster's DIR/env)
    "http://HEAD:8265": "{RAY_API_SERVER_ADDRESS}",  # the head's dashboard
    "$HOME/.ray/HEAD.token": "{RAY_AUTH_TOKEN_PATH}",  # the cluster's token file (0600)
    "http://mlflow:5000": "{MLFLOW_TRACKING_URI}",
    "s3://bucket/grokstudy/ray": "file://{GROKSTUDY_STORAGE}",  # a URI, read through pyarrow.fs as s3:// is
    "studies/wd_vs_frac_transformer.yaml": "studies/smoke.yaml",  # 4 trials of seconds, not 243 on GPUs
    "wd-vs-frac-transformer": "smoke",  # the study's name: its MLflow experiment, runs/<name>
}
CLEAN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "MLFLOW_TRACKING_URI")  # fmt: skip
"""What the snippets must set themselves: none of it comes from the test's environment."""


def bash_block_after(text: str, heading: str) -> str:
    """The first ```bash block after the line `heading`, within its `## ` section."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(r"\n```bash\n(.*?)\n```\n", text[start : end if end > 0 else None], re.S)
    assert found, f"no bash block under {heading!r} in README.md"
    return found.group(1)


def snippets() -> tuple[str, str]:
    text = README.read_text()
    return bash_block_after(text, "## Running on a cluster"), bash_block_after(text, "### After the job")


def test_the_snippet_keeps_the_dashboard_out_of_ray_address_and_turns_token_auth_on() -> None:
    submit, after = snippets()
    assert not re.search(r"RAY_ADDRESS=['\"]?https?://", submit + after), (
        "ray.init() rejects an http RAY_ADDRESS"
    )
    assert re.search(r"^export RAY_AUTH_MODE=token\b", submit, re.M)
    assert re.search(r"^export RAY_AUTH_TOKEN_PATH=", submit, re.M) and "RAY_AUTH_TOKEN=" not in submit
    assert re.search(r"^export RAY_API_SERVER_ADDRESS=http://HEAD:8265\b", submit, re.M)
    for placeholder in PLACEHOLDERS:  # the mapping below stays complete as the README changes
        assert placeholder in submit + after, f"README.md's cluster snippets no longer use {placeholder!r}"


def test_the_readme_submits_a_study_and_brings_its_tables_figures_report_and_weights_home(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cluster_env = cluster
    submit, after = snippets()
    script = "\n".join(["set -euo pipefail", submit, after])
    for placeholder, value in PLACEHOLDERS.items():
        script = script.replace(placeholder, value.format(**cluster_env))
    work = tmp_path / "work"  # `--working-dir .` uploads it: the study file, nothing else
    (work / "studies").mkdir(parents=True)
    shutil.copy(REPO / "studies" / "smoke.yaml", work / "studies" / "smoke.yaml")
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # ray, grokstudy
    ran = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=480
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-5000:]
    assert re.search(r"Job '\S+' succeeded", output), output[-3000:]
    assert "study 'smoke' (runs/smoke): finished" in output  # `grokstudy status` on what came home

    out = work / "runs" / "smoke"
    for name in (
        "study.yaml",
        "trials.parquet",
        "curves.parquet",
        "report.html",
        "figures/phase_diagram.png",
    ):
        assert (out / name).is_file(), name
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 4 and all(t["phase"] for t in trials)
    assert sorted(p.name for p in (out / "weights").iterdir()) == sorted(
        f"{t['trial_id']}.pt" for t in trials
    )
    assert all(t["weights_uri"] == str(out / "weights" / f"{t['trial_id']}.pt") for t in trials)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # offline: the files alone
    row = trials[0]
    model = grokstudy.load(out).model(row["trial_id"])
    with torch.no_grad():
        acc = (model(model.data.val_x).argmax(-1) == model.data.val_y).double().mean().item()
    assert acc == pytest.approx(row["final_val_acc"])


def test_trials_of_a_killed_worker_node_resume_from_their_checkpoints_on_the_other(cluster, tmp_path):
    # Runs after the other cluster tests, before `down`: it leaves one worker dead.
    cluster_dir, env = cluster
    job = _submit_study(
        env,
        tmp_path,
        "node-loss",
        max_steps=16000,
        eval_every=250,
        checkpoint_every=500,
        fractions="[0.4, 0.6]",
    )
    experiment = Path(env["GROKSTUDY_STORAGE"]) / "node-loss"
    nodes: dict[str, str] = {}
    victim_dir = None
    deadline = time.monotonic() + 180
    # Polled often and taken at its first half: a fast CPU trains 8,000 steps of this trial in
    # about 3 s (a 0.5 s poll for a trial under step 5,000 of 8,000 missed it there).
    while victim_dir is None and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
        for trial_dir in experiment.glob("trial_*"):
            results = _results(trial_dir)
            checkpointed = list(trial_dir.glob("checkpoint_*"))
            if results and checkpointed and results[-1]["step"] <= 8000:
                nodes = nodes or _nodes(env)
                if nodes.get(results[-1]["node"], "").startswith("127.0.0.4"):  # worker2
                    victim_dir = trial_dir
    assert victim_dir is not None, "no trial checkpointed on worker2 in time"
    sessions = dict(line.split() for line in (cluster_dir / "pids").read_text().splitlines())
    _kill_session(int(sessions["worker2"]))

    output, _ = job.communicate(timeout=400)
    assert job.returncode == 0, output[-4000:]

    trials = pq.read_table(tmp_path / "out" / "trials.parquet").to_pylist()
    assert sorted(t["data.fraction"] for t in trials) == [0.4, 0.6]
    assert all(t["steps"] == 16000 and t["stop_reason"] == "budget" for t in trials)

    results = _results(victim_dir)
    steps = [r["step"] for r in results]
    restarts = [i for i, r in enumerate(results) if i and r["iterations_since_restore"] == 1]
    assert restarts, f"{victim_dir.name} was never restored: {steps}"
    first_after, restored_from = steps[restarts[0]], results[restarts[0]]["restored_from_step"]
    assert 0 < restored_from < first_after, f"{victim_dir.name} restarted from step 0: {steps}"
    assert {nodes.get(r["node"], "") for r in results[restarts[0] :]} == {"127.0.0.3"}  # worker1

    # The resumed trial continued its own MLflow run: two runs, no step logged twice.
    from mlflow.tracking import MlflowClient

    _, children = _child_runs(env, "node-loss")
    assert len(children) == 2
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in children:
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert logged == sorted(set(logged)) and logged[-1] == 16000, logged


def test_down_leaves_no_process_of_the_cluster_behind(cluster):
    cluster_dir, env = cluster
    pids = [int(line.split()[1]) for line in (cluster_dir / "pids").read_text().splitlines()]
    ray_tmp = (cluster_dir / "state").read_text().strip().removeprefix("RAY_TMP=")
    assert len(pids) == 4  # head, two workers, mlflow: each started as its own session
    assert _live_in_sessions(set(pids)), "the recorded sessions should hold the cluster"

    down = _local_sh("down", "--dir", str(cluster_dir), timeout=120)
    assert down.returncode == 0, down.stderr
    # Every live recorded process was recognised as the one `up` started (worker2 was
    # killed by the node-loss test, so its PID names no process at all).
    assert "not stopping" not in down.stderr and "refusing" not in down.stderr, down.stderr

    # Everything a node started stays in its session, Ray's worker processes included
    # (they rename themselves ray::..., so no command line would find them).
    assert _live_in_sessions(set(pids)) == []
    # raylet, gcs_server, dashboard and agents name the private temp dir; MLflow the cluster dir.
    assert _processes_mentioning(ray_tmp + "/") == []
    assert _processes_mentioning(str(cluster_dir)) == []
    assert not (cluster_dir / "env").exists() and not Path(ray_tmp).exists()
