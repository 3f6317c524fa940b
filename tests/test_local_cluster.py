"""cluster/local.sh: a real multi-node Ray cluster and MLflow server on this machine.

One cluster (head + 2 workers, token auth on) is brought up for the module; the tests
talk to it only through its env file, as a user would after `source DIR/env`, and the
last test tears it down and looks for stray processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

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
    up = _local_sh("up", "--workers", "2", "--cpus-per-worker", "1", "--dir", str(cluster_dir))
    try:
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield cluster_dir, _read_env(cluster_dir / "env")
    finally:
        _local_sh("down", "--dir", str(cluster_dir), timeout=120)


def test_up_starts_a_head_without_resources_and_two_one_cpu_workers_behind_the_token(cluster):
    _, env = cluster
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
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


def test_down_leaves_no_process_of_the_cluster_behind(cluster):
    cluster_dir, env = cluster
    pids = [int(line.split()[1]) for line in (cluster_dir / "pids").read_text().splitlines()]
    ray_tmp = (cluster_dir / "state").read_text().strip().removeprefix("RAY_TMP=")
    assert len(pids) == 4  # head, two workers, mlflow: each started as its own session
    assert _live_in_sessions(set(pids)), "the recorded sessions should hold the cluster"

    down = _local_sh("down", "--dir", str(cluster_dir), timeout=120)
    assert down.returncode == 0, down.stderr

    # Everything a node started stays in its session, Ray's worker processes included
    # (they rename themselves ray::..., so no command line would find them).
    assert _live_in_sessions(set(pids)) == []
    # raylet, gcs_server, dashboard and agents name the private temp dir; MLflow the cluster dir.
    assert _processes_mentioning(ray_tmp + "/") == []
    assert _processes_mentioning(str(cluster_dir)) == []
    assert not (cluster_dir / "env").exists() and not Path(ray_tmp).exists()
