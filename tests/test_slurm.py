"""cluster/slurm/grokstudy.sbatch, run here as SLURM would run it, with stand-ins for srun and
scontrol (tests/slurm_standin/): a three-node "allocation" whose nodes are all this machine, each
advertising a loopback address of its own (127.0.0.2 head, .3 and .4 workers). The script itself
is the one users submit; only the environment tells it where it is.

Also: shellcheck over every shell script of the kit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "cluster" / "slurm" / "grokstudy.sbatch"
STANDIN = Path(__file__).resolve().parent / "slurm_standin"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration

STUDY = """
name: slurm
task: {op: "x+y", p: 23}
data: {fraction: 0.5}
model: {kind: mlp, embed_dim: 16, width: 64}
train: {max_steps: 1000, eval_every: 250, checkpoint_every: 500}
optimizer: {name: adamw, lr: 3.0e-3, weight_decay: 0.0, warmup_steps: 0}
phases: {confirm_steps: 100}
search:
  sampler: grid
  space:
    data.fraction: {values: [0.3, 0.4, 0.6, 0.8]}
  seeds: 1
resources: {cpu: 1}
diagram: {x: data.fraction, y: optimizer.weight_decay}
"""

HOSTS = ["gsnode1", "gsnode2", "gsnode3"]


def _slurm_env(submit_dir: Path, ray_tmp: Path, job_id: str) -> dict[str, str]:
    """What sbatch gives the script on the first of three 1-CPU nodes, plus the knobs a machine
    that hosts all three nodes needs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM", "RAY_ADDRESS", "RAY_AUTH", "RAY_API", "GROKSTUDY_", "MLFLOW_TRACKING"))
    }
    env.update(
        PATH=f"{STANDIN}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}",
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="grokstudy",
        SLURM_JOB_NODELIST="gsnode[1-3]",
        SLURM_JOB_NUM_NODES="3",
        SLURM_NNODES="3",
        SLURM_NTASKS="3",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_PER_TASK="1",
        SLURM_CPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(submit_dir),
        SLURMD_NODENAME=HOSTS[0],
        # Where the stand-in srun records each node's session (its step).
        SLURM_STANDIN_SESSIONS=str(ray_tmp / "sessions"),
        # Three Ray nodes on one host: nodes on 127.0.0.2-4 need Ray's multi-node mode on
        # loopback (cluster/local.sh's header says why), every node's temp dir under a short
        # private path, and random agent and worker ports, which would collide otherwise.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        GROKSTUDY_RAY_TMPDIR=str(ray_tmp),
        GROKSTUDY_RAY_START_ARGS="--dashboard-agent-listen-port 0 --min-worker-port 0 --max-worker-port 0 "
        "--object-store-memory 100000000",
        # Sized for two cores: trials on the two 1-CPU workers, none on the head with the driver.
        GROKSTUDY_HEAD_CPUS="0",
        GROKSTUDY_NODE_WAIT_S="150",
    )
    return env


def _proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, session id) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[3])


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[str]:
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]


def _leftovers(sessions: set[int], text: str) -> list[str]:
    """Live processes in one of `sessions`, or whose command line names `text`."""
    found = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        cmdline = _cmdline(pid)
        if st[1] in sessions or text in cmdline:
            found.append(f"{pid} (session {st[1]}): {cmdline[:160]}")
    return found


def _kill_sessions(sessions: set[int]) -> None:
    for pid in _pids():
        st = _proc_stat(pid)
        if st is not None and st[1] in sessions:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _nodes(dashboard: str, token: str) -> dict[str, str]:
    """{node id: node ip} of the ALIVE nodes, from the head's dashboard (state API, token auth)."""
    req = urllib.request.Request(
        f"{dashboard}/api/v0/nodes?detail=true", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return {}
    return {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}


@pytest.fixture
def ray_tmp():
    """A short private directory for the nodes' Ray temp dirs (unix socket paths stay short)."""
    path = Path(tempfile.mkdtemp(prefix="gsslurm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_study_runs_over_three_stand_in_nodes_with_token_auth_and_nothing_is_left_behind(tmp_path, ray_tmp):
    (tmp_path / "study.yaml").write_text(STUDY)
    job_id = str(70000 + os.getpid() % 10000)
    job_dir = tmp_path / "runs" / f"slurm-{job_id}"
    out = tmp_path / "out"
    log = (tmp_path / "job.out").open("w")
    script = subprocess.Popen(
        ["bash", str(SBATCH), "study.yaml", "--out", str(out), "--format", "png"],
        cwd=tmp_path,
        env=_slurm_env(tmp_path, ray_tmp, job_id),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sessions = {script.pid}
    token = None
    nodes: dict[str, str] = {}
    token_seen_in: list[str] = []
    try:
        # While it runs: learn the cluster's nodes from its dashboard, and look for the token in
        # every process's command line.
        deadline = time.monotonic() + 300
        while script.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if token is None and (job_dir / "auth_token").exists():
                token = (job_dir / "auth_token").read_text().strip() or None
            if token:
                token_seen_in += [f"{p}: {_cmdline(p)[:160]}" for p in _pids() if token in _cmdline(p)]
                if len(nodes) < 3 and (job_dir / "dashboard").exists():
                    nodes = _nodes((job_dir / "dashboard").read_text().strip(), token)
        assert script.poll() is not None, "the script did not finish within 300 s"
    finally:
        if script.poll() is None:
            script.send_signal(signal.SIGTERM)
            try:
                script.wait(60)
            except subprocess.TimeoutExpired:
                script.kill()
                script.wait()
        log.close()
        if (ray_tmp / "sessions").exists():
            sessions |= {int(line.split()[1]) for line in (ray_tmp / "sessions").read_text().splitlines()}
        left = _leftovers(sessions, str(ray_tmp))
        _kill_sessions(sessions)  # so that a failure leaves nothing running either
    output = (tmp_path / "job.out").read_text()
    assert script.returncode == 0, output[-6000:]

    # The head published its GCS address; every node advertised the address the stand-in srun
    # gave it (GROKSTUDY_NODE_IP), one per node.
    assert (job_dir / "head_address").read_text().strip().startswith("127.0.0.2:")
    assert sorted(nodes.values()) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"], (nodes, output[-3000:])
    assert len((ray_tmp / "sessions").read_text().splitlines()) == 3

    # Every trial ran, on the workers (the head offers no CPUs). Which worker takes which trial
    # is Tune's choice: it hands a finished trial's actor to the next pending trial, so short
    # trials may all run on the first worker whose actor started (seen once in 23 runs).
    import pyarrow.parquet as pq

    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert sorted(t["data.fraction"] for t in trials) == [0.3, 0.4, 0.6, 0.8]
    assert all(t["status"] == "TERMINATED" and t["phase"] for t in trials), trials
    trial_ips = {nodes.get(t["node"]) for t in trials}
    assert trial_ips and trial_ips <= {"127.0.0.3", "127.0.0.4"}, f"trials ran on {trial_ips}"
    # Tune's experiment went to the default run.storage, outside the job's own directory, so
    # the next submission finds it.
    assert (tmp_path / "runs" / "slurm-storage" / "slurm").is_dir()

    # The token: a fresh 256-bit secret, readable by its owner alone, never on a command line.
    token_file = job_dir / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token and len(token) == 64 and token == token_file.read_text().strip()
    assert token_seen_in == []

    # Once the script returned, nothing it started runs: no process of its session or of a
    # node's step, and none that names the nodes' Ray temp dirs.
    assert left == []


def test_a_study_that_does_not_load_is_refused_before_any_node_starts(tmp_path, ray_tmp):
    (tmp_path / "bad.yaml").write_text(STUDY.replace("max_steps: 1000", "max_stepz: 1000"))
    run = subprocess.run(
        ["bash", str(SBATCH), "bad.yaml"],
        cwd=tmp_path,
        env=_slurm_env(tmp_path, ray_tmp, "70001"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "max_stepz" in run.stderr
    assert not (ray_tmp / "sessions").exists()  # srun never ran


def test_outside_an_allocation_the_script_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    run = subprocess.run(
        ["bash", str(SBATCH), "studies/smoke.yaml"], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2 and "not inside a SLURM allocation" in run.stderr


SHELL_SCRIPTS = [
    "cluster/slurm/grokstudy.sbatch",
    "tests/slurm_standin/srun",
    "tests/slurm_standin/scontrol",
    "cluster/local.sh",
    "cluster/install.sh",
    "cluster/pin-images.sh",
    ".ci/run",
]


def test_every_shell_script_passes_shellcheck():
    shellcheck = BIN / "shellcheck"
    if not shellcheck.exists():
        pytest.fail(
            f"no {shellcheck}: install the dev extra (pip install -c cluster/constraints.txt -e '.[dev]')"
        )
    assert sorted(str(p.relative_to(REPO)) for p in (REPO / "cluster" / "slurm").glob("*.sbatch")) == [
        SHELL_SCRIPTS[0]
    ]
    run = subprocess.run([str(shellcheck), *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
