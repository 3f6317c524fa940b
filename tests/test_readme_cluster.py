"""README.md's "Running on a cluster" snippets, run as written against a real multi-node cluster
on this machine (`cluster/local.sh`: head + 2 workers, token auth on, an MLflow server): the
submit block, then the "After the job" block that brings the study home. Only the placeholders
change (`PLACEHOLDERS`), so a README edit that breaks a command fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import grokstudy

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LOCAL_SH = REPO / "cluster" / "local.sh"

pytestmark = pytest.mark.integration

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


def _local_sh(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # The nodes run the Ray, MLflow and grokstudy of the environment running the tests.
    venv = ["--venv", sys.prefix] if sys.prefix != sys.base_prefix else []
    return subprocess.run(
        ["bash", str(LOCAL_SH), *args, *venv], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The env file of a running head + 2 x 1-CPU workers and MLflow server (as test_local_cluster)."""
    cluster_dir = tmp_path_factory.mktemp("readme-cluster")
    up = _local_sh("up", "--workers", "2", "--cpus-per-worker", "1", "--dir", str(cluster_dir))
    try:
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        env = {}
        for line in (cluster_dir / "env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = value
        yield env
    finally:
        down = _local_sh("down", "--dir", str(cluster_dir), timeout=120)
        assert down.returncode == 0, down.stderr


def test_the_readme_submits_a_study_and_brings_its_tables_figures_report_and_weights_home(
    cluster: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submit, after = snippets()
    script = "\n".join(["set -euo pipefail", submit, after])
    for placeholder, value in PLACEHOLDERS.items():
        script = script.replace(placeholder, value.format(**cluster))
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
