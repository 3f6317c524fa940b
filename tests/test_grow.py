"""Growing a finished study (more seeds, another axis value), refusing a change that would
relabel its trials, and starting over with --fresh: real `grokstudy run` drivers, each with its
embedded Ray, on one study directory with a sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from drivers import assert_clean, command, finish, write_study
from endstate import problems, study_as_run
from mlflow import MlflowClient

import grokstudy

pytestmark = pytest.mark.integration

STUDY = """
name: grows
task: {op: "x+y", p: 23}
data: {fraction: 0.5}
model: {kind: mlp, embed_dim: 16, width: 64}
train: {max_steps: 200, eval_every: 50, checkpoint_every: 100}
optimizer: {name: adamw, lr: 3.0e-3, weight_decay: 1.0, warmup_steps: 0}
phases: {confirm_steps: 100, min_delay: 100}
search:
  sampler: grid
  space:
    data.fraction: {values: [0.4, 0.8]}
  seeds: 1
resources: {cpu: 1}
"""


def trial_rows(out) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(out / "trials.parquet").to_pylist()}


def trial_runs(uri: str) -> dict[str, tuple[str, int, int]]:
    """{trial id: (run id, start, end)} of the study's trial runs in MLflow."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("grows").experiment_id])
    return {
        r.data.tags["grokstudy.trial_key"]: (r.info.run_id, r.info.start_time, r.info.end_time)
        for r in runs
        if r.data.tags.get("grokstudy.kind") == "trial"
    }


def tune_trial_dirs(out) -> set[str]:
    return {p.name for p in (out / "ray" / "grows").glob("trial_*")}


def test_a_finished_study_grows_by_a_seed_and_an_axis_value_running_only_the_new_trials(tmp_path):
    study_file = write_study(tmp_path, STUDY)
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert_clean(finish(command(study_file, out)))
    first_rows, first_runs, first_dirs = trial_rows(out), trial_runs(uri), tune_trial_dirs(out)
    assert len(first_rows) == 2 and set(first_runs) == set(first_rows)

    # One more seed and one more axis value, at once: the two finished trials are kept as they
    # are; only their seed-1 twins and both seeds of the new value run.
    wider = ("--set", "search.seeds=2", "--set", "search.space.data.fraction={values: [0.4, 0.6, 0.8]}")
    grown = finish(command(study_file, out, *wider))
    assert_clean(grown)
    assert "the study grew (search.seeds: 1 -> 2; search.space.data.fraction: " in grown.stdout
    rows, runs = trial_rows(out), trial_runs(uri)
    new = set(rows) - set(first_rows)
    assert {t for t in new if rows[t]["data.fraction"] != 0.6} == {
        t.replace("-s0", "-s1") for t in first_rows
    }
    assert sorted((rows[t]["data.fraction"], rows[t]["train.seed"]) for t in new if t.endswith("-s0")) == [
        (0.6, 0)
    ]
    assert len(new) == 4
    assert {t: rows[t] for t in first_rows} == first_rows, "a finished trial's row is the same"
    assert {t: runs[t] for t in first_rows} == first_runs, "a finished trial's MLflow run is untouched"
    assert len(tune_trial_dirs(out) - first_dirs) == 4, "four new Tune trials, the old ones kept"
    cells = pq.read_table(out / "cells.parquet").to_pylist()
    assert sorted({c["data.fraction"] for c in cells}) == [0.4, 0.6, 0.8]
    assert yaml.safe_load((out / "study.yaml").read_text())["search"]["seeds"] == 2
    client = MlflowClient(uri)
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name("grows").experiment_id])
                if r.data.tags.get("grokstudy.kind") == "study"]  # fmt: skip
    (tmp_path / "artifact").mkdir()
    artifact = client.download_artifacts(parent.info.run_id, "study.yaml", str(tmp_path / "artifact"))
    study_artifact = yaml.safe_load(Path(artifact).read_text())
    assert study_artifact["search"]["space"]["data.fraction"] == {"values": [0.4, 0.6, 0.8]}
    assert parent.data.tags["search.seeds"] == "2" and parent.info.status == "FINISHED"
    assert problems(out, study_as_run(out), uri) == []

    # A change that would relabel the finished trials is refused in one line, nothing written.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "driver.log"}
    refused = finish(command(study_file, out, *wider, "--set", "optimizer.lr=0.01"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(
        "grokstudy run: error: optimizer.lr: 0.003 -> 0.01 since the study's trials started"
    )
    assert "--fresh" in line
    bookkeeping = (".grokstudy.lock",)  # a refused run takes and drops the lock and the lease
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "driver.log"}
    assert {p: t for p, t in after.items() if p.name not in bookkeeping and "lease" not in p.name} == {
        p: t for p, t in written.items() if p.name not in bookkeeping and "lease" not in p.name
    }

    # --fresh starts over under the same name; the old results are set aside, whole.
    fresh = finish(command(study_file, out, "--fresh"))
    assert_clean(fresh)
    [archive] = tmp_path.glob("out.archived-*")
    assert set(trial_rows(archive)) == set(rows)
    assert len(tune_trial_dirs(archive)) == 6
    assert set(trial_rows(out)) == set(first_rows), fresh.stdout
    assert len(tune_trial_dirs(out)) == 2
    parents = {
        r.info.run_id: r
        for r in client.search_runs([client.get_experiment_by_name("grows").experiment_id])
        if r.data.tags.get("grokstudy.kind") == "study"
    }
    old = parents.pop(parent.info.run_id)
    assert "grokstudy.archived" in old.data.tags
    assert old.data.tags["grokstudy.tune_experiment"] == str(archive / "ray" / "grows")
    kept = grokstudy.load(archive)  # an archive is a whole study directory: its models load too
    assert kept.model(next(iter(rows))).trial_id == next(iter(rows))
    [new_parent] = parents.values()
    assert new_parent.info.status == "FINISHED" and "grokstudy.archived" not in new_parent.data.tags
    assert problems(out, study_as_run(out), uri) == []
