"""tracking.py against a real `mlflow server` (and a real browser on its UI), without Ray.

The tests do what the runner does: the driver opens the study, each "trial"
opens its nested run, streams hand-built EvalRecords, tags and ends it.
"""

from __future__ import annotations

import html
import inspect
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import servers
import yaml

from grokstudy import results, tracking
from grokstudy.config import OptimConfig, TrainConfig, TrialConfig, flatten, param_text
from grokstudy.errors import StudyError
from grokstudy.records import ELAPSED_KEY, METRIC_KEYS, EvalRecord
from grokstudy.study import parse_study

GRID = [0, 1, 2, 5, 10, 20, *range(50, 1001, 50)]
"""An eval grid shaped like train.eval_steps(max_steps=1000, eval_every=50)."""

STUDY = """
name: {name}
task: {{op: "x+y", p: 23}}
model: {{kind: mlp, embed_dim: 16, width: 64}}
train: {{max_steps: 1000, eval_every: 50}}
search:
  sampler: grid
  space:
    optimizer.weight_decay: {{values: [0.1, 1.0]}}
  seeds: 1
diagram: {{x: optimizer.weight_decay, y: data.fraction}}
"""


def synthetic_record(step: int, wd: float = 1.0) -> EvalRecord:
    """A deterministic, grokking-shaped eval point (fits at ~400, generalizes later)."""
    return EvalRecord(
        step=step,
        train_loss=1.0 / (1 + step),
        train_acc=min(1.0, step / 400),
        val_loss=2.0 / (1 + step * wd),
        val_acc=min(1.0, max(0.0, (step - 500) / 300)),
        weights_norm=10.0 + step / 1000,
        fourier_top_k_share=0.1 + step / 2000,
        fourier_gini=0.05 + step / 3000,
        restricted_loss=4.0 / (1 + step),
        excluded_loss=1.0 + step / 1000,
        key_frequencies=float(min(5, step // 200)),
        elapsed_s=step / 1000,
    )


def tracked_value(record: EvalRecord, key: str) -> float:
    return record.values()[key]


TRACKED = (*METRIC_KEYS, ELAPSED_KEY)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def open_study(uri: str, name: str, **kwargs) -> tuple[tracking.StudyTracker, str, str]:
    study = tracking.StudyTracker(uri)
    text = STUDY.format(name=name)
    params = {"base.train.max_steps": 1000, "search.sampler": "grid"} | kwargs.pop("params", {})
    tags = {"search.sampler": "grid", "search.points": "2", "search.seeds": "1"}
    experiment_id, parent_run_id = study.open(name, text, params, tags, **kwargs)
    return study, experiment_id, parent_run_id


class Trial:
    """One trial as the runner drives it: a Sender of its own, one run, the curve so far."""

    def __init__(self, uri, experiment_id, parent_run_id, key: str, params: dict, run_id: str | None = None):
        self.sender = tracking.Sender(tracking.Where(uri, experiment_id, parent_run_id), interval_s=0.05)
        self.run = self.sender.open(key, key, params, {"grokstudy.point_id": f"p-{key}"}, run_id=run_id)
        self.curve: list[EvalRecord] = []

    @property
    def run_id(self) -> str | None:
        return self.run.run_id

    def log_records(self, records: list[EvalRecord]) -> None:
        self.curve = sorted({r.step: r for r in [*self.curve, *records]}.values(), key=lambda r: r.step)
        self.run.sync(self.curve)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.set_tags(tags)

    def flush(self) -> None:
        assert self.sender.flush(60), self.sender.last_error

    def finish(self, status: str, error: str | None = None) -> None:
        self.run.finish(status, error)
        assert self.sender.close(60), self.sender.last_error


def start_trial(uri, experiment_id, parent_run_id, key: str, cfg: TrialConfig, **kwargs) -> Trial:
    trial = Trial(uri, experiment_id, parent_run_id, key, flatten(cfg), **kwargs)
    trial.flush()  # the run exists (as the runner's first checkpoint makes sure)
    return trial


# ---- no server -----------------------------------------------------------------------------


def test_default_tracking_uri_is_an_absolute_sqlite_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri(Path("runs/x")) == f"sqlite:///{tmp_path}/runs/x/mlflow.db"


def test_tracking_uri_precedence_is_flag_then_env_then_study_then_default(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    out = tmp_path / "out"
    assert tracking.resolve_tracking_uri("http://flag:5000", "http://study:5000", out) == "http://flag:5000"
    assert tracking.resolve_tracking_uri(None, "http://study:5000", out) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None, "http://study:5000", out) == "http://study:5000"
    assert tracking.resolve_tracking_uri(None, None, out) == f"sqlite:///{out}/mlflow.db"
    # Relative local stores are pinned to where the driver stands (trials change cwd).
    assert tracking.resolve_tracking_uri("sqlite:///db/m.db", None, out) == f"sqlite:///{tmp_path}/db/m.db"
    assert tracking.resolve_tracking_uri(None, "sqlite:////abs/m.db", out) == "sqlite:////abs/m.db"
    assert tracking.resolve_tracking_uri("./mlruns", None, out) == (tmp_path / "mlruns").as_uri()


def test_logged_params_read_back_as_the_same_trial_config() -> None:
    cfg = TrialConfig(
        optimizer=OptimConfig(name="sgd", lr=0.01, betas=(0.8, 0.95), weight_decay=0.3),
        train=TrainConfig(batch_size=512, max_steps=2000),
    )
    params = {k: v if isinstance(v, str) else param_text(v) for k, v in flatten(cfg).items()}
    assert params["optimizer.betas"] == "[0.8, 0.95]" and params["model.layer_norm"] == "false"
    assert tracking.trial_config_from_params(params) == cfg
    assert tracking.trial_config_from_params(params | {"model.gone_field": "1"}) == cfg
    # What grokstudy 0.1 logged (Python reprs) reads back the same.
    assert tracking.trial_config_from_params({k: str(v) for k, v in flatten(cfg).items()}) == cfg
    full = TrialConfig(train=TrainConfig(batch_size=None))
    assert tracking.trial_config_from_params({"train.batch_size": "full"}) == full
    assert tracking.trial_config_from_params({"train.batch_size": "None"}) == full


def test_ui_command_serves_the_store_on_loopback_with_artifacts_beside_the_database(tmp_path: Path) -> None:
    cmd = tracking.ui_command(f"sqlite:///{tmp_path}/mlflow.db", port=5123)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    args = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "5123")
    assert args["--artifacts-destination"] == str(tmp_path / "mlartifacts")


def test_a_local_study_keeps_its_runs_and_artifacts_in_the_output_directory(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    uri = tracking.default_tracking_uri(out)
    study, experiment_id, parent_run_id = open_study(uri, "local-study")
    # A trial runs in its own working directory, as under Ray Tune.
    (tmp_path / "trial_dir").mkdir()
    monkeypatch.chdir(tmp_path / "trial_dir")
    trial = start_trial(uri, experiment_id, parent_run_id, "t0", TrialConfig())
    trial.log_records([synthetic_record(s) for s in GRID])
    trial.finish("FINISHED")
    table = tmp_path / "trials.parquet"
    table.write_bytes(b"PAR1 not really")
    study.log_artifacts([table], "results")
    study.finish("FINISHED")

    assert sorted(p.name for p in (tmp_path / "trial_dir").iterdir()) == []
    assert (out / "mlflow.db").exists()
    stored = list((out / "mlartifacts").rglob("*"))
    assert {p.name for p in stored if p.is_file()} == {"study.yaml", "trials.parquet"}
    assert [s for s, _ in history(uri, trial.run_id, "val/acc")] == GRID
    fetched = tracking.fetch_results(uri, "local-study")
    assert [t["run_id"] for t in fetched.trials] == [trial.run_id]
    assert set(fetched.trials[0]["metrics"]) == set(TRACKED)


# ---- a real server --------------------------------------------------------------------------


@pytest.mark.integration
def test_trials_nest_under_the_study_run_with_params_metrics_tags_and_artifacts(
    mlflow_server: servers.MlflowServer, tmp_path: Path
) -> None:
    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, "nested")
    runs = {}
    for wd in (0.1, 1.0):
        cfg = TrialConfig(optimizer=OptimConfig(weight_decay=wd))
        trial = start_trial(uri, experiment_id, parent_run_id, f"wd={wd}", cfg)
        trial.log_records([synthetic_record(s, wd) for s in GRID])
        trial.set_tags({"phase": "grokking", "t_train": "400", "t_val": "800", "delay": "400"})
        trial.set_tags({"stop_reason": "budget", "ray.node": "node-1"})
        trial.finish("FINISHED")
        runs[wd] = trial.run_id
    figure = tmp_path / "phase_diagram.png"
    figure.write_bytes(b"\x89PNG fake")
    study.log_artifacts([figure], "figures")
    study.set_tags({"phases.grokking": "2"})
    study.finish("FINISHED")

    c = client(uri)
    experiment = c.get_experiment(experiment_id)
    assert experiment.name == "nested"
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    parent = c.get_run(parent_run_id)
    assert parent.info.run_name == "nested" and parent.info.status == "FINISHED"
    assert parent.data.tags["grokstudy.kind"] == "study"
    assert parent.data.tags["grokstudy.version"]
    assert parent.data.tags["search.sampler"] == "grid" and parent.data.tags["phases.grokking"] == "2"
    assert parent.data.params["base.train.max_steps"] == "1000"
    artifacts = {a.path for a in c.list_artifacts(parent_run_id)} | {
        a.path for a in c.list_artifacts(parent_run_id, "figures")
    }
    assert {"study.yaml", "figures/phase_diagram.png"} <= artifacts
    study_file = c.download_artifacts(parent_run_id, "study.yaml", str(tmp_path))
    assert yaml.safe_load(Path(study_file).read_text())["name"] == "nested"

    children = c.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    assert {r.info.run_id for r in children} == set(runs.values())
    for wd, run_id in runs.items():
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {
            k: v if isinstance(v, str) else param_text(v)
            for k, v in flatten(TrialConfig(optimizer=OptimConfig(weight_decay=wd))).items()
        }
        assert run.data.tags["phase"] == "grokking" and run.data.tags["ray.node"] == "node-1"
        assert (
            run.data.tags["grokstudy.trial_key"] == f"wd={wd}" and run.data.tags["grokstudy.kind"] == "trial"
        )
        assert set(run.data.metrics) == set(TRACKED)
        for key in TRACKED:
            points = history(uri, run_id, key)
            assert [s for s, _ in points] == GRID
            assert [v for _, v in points] == pytest.approx(
                [tracked_value(synthetic_record(s, wd), key) for s in GRID]
            )
    assert tracking.find_trial_runs(uri, experiment_id, parent_run_id) == {
        f"wd={wd}": r for wd, r in runs.items()
    }


@pytest.mark.integration
@pytest.mark.parametrize("flush", [True, False], ids=["flushed before the checkpoint", "not flushed"])
def test_a_killed_trial_continues_its_own_run_with_no_repeated_or_missing_step(
    mlflow_server: servers.MlflowServer, flush: bool
) -> None:
    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, f"crash-{flush}")
    # The first attempt logs steps 0..500 with a checkpoint at 300 and is SIGKILLed:
    # whatever was still queued is lost.
    script = "\n".join(
        [
            "import os, signal, sys",
            "from grokstudy import tracking",
            "from grokstudy.records import EvalRecord",
            textwrap.dedent(inspect.getsource(synthetic_record)),
            "uri, eid, pid, grid = sys.argv[1], sys.argv[2], sys.argv[3], list(map(int, sys.argv[4].split(',')))",
            "s = tracking.Sender(tracking.Where(uri, eid, pid), interval_s=0.05)",
            "run = s.open('trial', 'trial', {'train.seed': 0}, {})",
            "assert s.flush(60)",
            "print(run.run_id, flush=True)",
            "curve = []",
            "for step in (x for x in grid if x <= 500):",
            "    curve.append(synthetic_record(step))",
            "    run.sync(curve)",
            f"    if step == 300 and {flush}:",
            "        assert s.flush(60)",
            "os.kill(os.getpid(), signal.SIGKILL)",
        ]
    )
    grid = ",".join(map(str, GRID))
    crashed = subprocess.run(
        [sys.executable, "-c", script, uri, experiment_id, parent_run_id, grid],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    run_id = crashed.stdout.strip()
    c = client(uri)
    assert c.get_run(run_id).info.status == "RUNNING"
    logged = [s for s, _ in history(uri, run_id, "val/acc")]
    assert logged == GRID[: len(logged)] and all(s <= 500 for s in logged)
    if flush:
        assert logged[-1] >= 300

    # The retry restores the step-300 checkpoint: its curve (the records it holds) and its
    # run id. It re-opens the run, learns its last step, replays what MLflow lacks, trains on.
    trial = start_trial(uri, experiment_id, parent_run_id, "trial", TrialConfig(), run_id=run_id)
    trial.log_records([synthetic_record(s) for s in GRID if s <= 300])
    for step in (s for s in GRID if s > 300):
        trial.log_records([synthetic_record(step)])
    trial.finish("FINISHED")

    children = c.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    assert [r.info.run_id for r in children] == [run_id]
    assert c.get_run(run_id).info.status == "FINISHED"
    for key in TRACKED:
        points = history(uri, run_id, key)
        assert [s for s, _ in points] == GRID, key
    assert [v for _, v in history(uri, run_id, "train/acc")] == [synthetic_record(s).train_acc for s in GRID]


@pytest.mark.integration
def test_a_trial_started_again_without_its_run_id_finds_its_run_by_trial_key(
    mlflow_server: servers.MlflowServer,
) -> None:
    # A trial lost before its first checkpoint, run again by a resumed study.
    uri = mlflow_server.uri
    _, experiment_id, parent_run_id = open_study(uri, "by-key")
    first = start_trial(uri, experiment_id, parent_run_id, "k", TrialConfig())
    first.log_records([synthetic_record(s) for s in GRID[:5]])
    first.flush()
    again = start_trial(uri, experiment_id, parent_run_id, "k", TrialConfig())
    again.log_records([synthetic_record(s) for s in GRID])
    again.finish("FINISHED")
    assert again.run_id == first.run_id
    assert [s for s, _ in history(uri, first.run_id, "val/acc")] == GRID


@pytest.mark.integration
def test_an_mlflow_outage_delays_metrics_but_loses_none(mlflow_server: servers.MlflowServer) -> None:
    """The network to the server goes down for ~6 s while a trial logs, then comes back."""
    outage = servers.Outage(mlflow_server.port)
    try:
        _, experiment_id, parent_run_id = open_study(outage.uri, "outage")
        trial = start_trial(outage.uri, experiment_id, parent_run_id, "t", TrialConfig())
        trial.log_records([synthetic_record(s) for s in GRID[:10]])
        trial.flush()
        outage.cut()
        # Down: the trial keeps going and nothing raises.
        for s in GRID[10:20]:
            trial.log_records([synthetic_record(s)])
            time.sleep(0.3)
        assert not trial.sender.flush(3)
        assert trial.sender.down_s > 5 and trial.sender.last_error
        outage.restore()
        for s in GRID[20:]:
            trial.log_records([synthetic_record(s)])
        trial.finish("FINISHED")
        assert trial.sender.down_s == 0 and trial.sender.last_error is None
    finally:
        outage.close()
    assert [s for s, _ in history(mlflow_server.uri, trial.run_id, "val/acc")] == GRID
    assert client(mlflow_server.uri).get_run(trial.run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_a_request_stored_whose_answer_was_lost_is_not_stored_twice(
    mlflow_server: servers.MlflowServer,
) -> None:
    """The server stores a batch but the connection drops before its answer: the sender retries,
    and must first learn what the run already holds (an outage found steps logged twice)."""
    outage = servers.Outage(mlflow_server.port)
    try:
        _, experiment_id, parent_run_id = open_study(outage.uri, "lost-answers")
        trial = start_trial(outage.uri, experiment_id, parent_run_id, "t", TrialConfig())
        trial.log_records([synthetic_record(s) for s in GRID[:5]])
        trial.flush()
        outage.lose_answers()
        trial.log_records([synthetic_record(s) for s in GRID[5:12]])
        deadline = time.monotonic() + 30
        while not trial.sender.down_s and time.monotonic() < deadline:
            time.sleep(0.1)
        assert trial.sender.down_s > 0  # it sent, the server stored, the answer never came
        outage.lose_answers(False)
        trial.log_records([synthetic_record(s) for s in GRID[12:]])
        trial.finish("FINISHED")
    finally:
        outage.close()
    for key in TRACKED:
        assert [s for s, _ in history(mlflow_server.uri, trial.run_id, key)] == GRID, key


@pytest.mark.integration
def test_a_run_created_whose_answer_was_lost_is_found_by_its_trial_key_not_created_twice(
    mlflow_server: servers.MlflowServer,
) -> None:
    """create_run is stored, its answer lost: the retry must find the run by trial key."""
    outage = servers.Outage(mlflow_server.port)
    try:
        _, experiment_id, parent_run_id = open_study(outage.uri, "lost-create")
        outage.lose_answers(of="/api/2.0/mlflow/runs/create")
        trial = Trial(outage.uri, experiment_id, parent_run_id, "t", flatten(TrialConfig()))
        trial.log_records([synthetic_record(s) for s in GRID[:3]])
        store = client(mlflow_server.uri)  # straight to the server, past the proxy

        def created() -> list:
            return store.search_runs([experiment_id], f"tags.{tracking.TRIAL_KEY_TAG} = 't'")

        deadline = time.monotonic() + 60
        while not created() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert created() and trial.run_id is None  # stored, and the sender does not know it
        outage.lose_answers(False)
        trial.log_records([synthetic_record(s) for s in GRID[3:]])
        trial.finish("FINISHED")
    finally:
        outage.close()
    [run] = created()
    assert run.info.run_id == trial.run_id and run.info.status == "FINISHED"
    for key in TRACKED:
        assert [s for s, _ in history(mlflow_server.uri, trial.run_id, key)] == GRID, key


@pytest.mark.integration
def test_a_resumed_study_reopens_its_parent_run_and_refuses_a_changed_study(
    mlflow_server: servers.MlflowServer,
) -> None:
    uri = mlflow_server.uri
    _, experiment_id, parent_run_id = open_study(uri, "resume")  # the driver dies here: no finish

    again, experiment_again, parent_again = open_study(uri, "resume", parent_run_id=parent_run_id)
    assert (experiment_again, parent_again) == (experiment_id, parent_run_id)
    c = client(uri)
    assert c.get_run(parent_run_id).info.status == "RUNNING"
    again.finish("FINISHED")
    assert len(c.search_runs([experiment_id])) == 1
    assert c.get_run(parent_run_id).info.status == "FINISHED"

    with pytest.raises(StudyError, match="base.train.max_steps"):
        open_study(uri, "resume", parent_run_id=parent_run_id, params={"base.train.max_steps": 5})
    with pytest.raises(StudyError, match="tracking URI it started with"):
        open_study(uri, "resume", parent_run_id="0" * 32)


@pytest.mark.integration
def test_runs_end_with_the_status_they_are_given(mlflow_server: servers.MlflowServer) -> None:
    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, "statuses")
    c = client(uri)
    for status in tracking.RUN_STATUSES:
        trial = start_trial(uri, experiment_id, parent_run_id, status, TrialConfig())
        trial.log_records([synthetic_record(0)])
        trial.finish(status, error="RuntimeError: boom" if status == "FAILED" else None)
        run = c.get_run(trial.run_id)
        assert run.info.status == status
        assert run.data.tags.get(tracking.ERROR_TAG) == ("RuntimeError: boom" if status == "FAILED" else None)
    with pytest.raises(ValueError, match="FINISHED"):
        trial.run.finish("DONE")
    study.finish("KILLED")
    assert c.get_run(parent_run_id).info.status == "KILLED"


@pytest.mark.integration
def test_the_driver_ends_the_runs_of_trials_that_finished_while_mlflow_was_down(
    mlflow_server: servers.MlflowServer,
) -> None:
    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, "settle")
    # Both trials stored steps up to 300, then lost the rest when their processes exited
    # with MLflow unreachable: their runs stay RUNNING with a curve cut short.
    cut = [s for s in GRID if s <= 300]
    trials = {}
    for key in ("finished", "failed"):
        trials[key] = start_trial(uri, experiment_id, parent_run_id, key, TrialConfig())
        trials[key].log_records([synthetic_record(s) for s in cut])
        trials[key].flush()
        assert trials[key].sender.close(5)
    assert study.trial_runs() == {key: (t.run_id, "RUNNING") for key, t in trials.items()}

    # A third never reached MLflow at all (its worker died first): the driver creates its run.
    whole = [synthetic_record(s) for s in GRID]
    ends = [
        tracking.TrialEnd(
            "finished", trials["finished"].run_id, "f", {}, {"phase": "grokking"}, whole, "FINISHED"
        ),
        tracking.TrialEnd("failed", None, "x", {}, {}, whole[:12], "FAILED", "RuntimeError: boom"),
        tracking.TrialEnd("unseen", None, "u", {"train.seed": 3}, {}, whole[:3], "FAILED", "killed"),
    ]
    run_ids = study.settle_trial_runs(ends, 60)
    assert run_ids == {key: t.run_id for key, t in trials.items()} | {"unseen": run_ids["unseen"]}
    c = client(uri)
    finished, failed, unseen = (c.get_run(run_ids[k]) for k in ("finished", "failed", "unseen"))
    assert (finished.info.status, finished.data.tags["phase"]) == ("FINISHED", "grokking")
    assert (failed.info.status, failed.data.tags[tracking.ERROR_TAG]) == ("FAILED", "RuntimeError: boom")
    assert (unseen.info.status, unseen.data.params, unseen.info.run_name) == (
        "FAILED",
        {"train.seed": "3"},
        "u",
    )
    assert unseen.data.tags[tracking.PARENT_TAG] == parent_run_id
    for key in TRACKED:  # the tail arrived, nothing twice
        assert [s for s, _ in history(uri, finished.info.run_id, key)] == GRID, key
        assert [s for s, _ in history(uri, failed.info.run_id, key)] == GRID[:12], key
        assert [s for s, _ in history(uri, unseen.info.run_id, key)] == GRID[:3], key
    assert {status for _, status in study.trial_runs().values()} == {"FINISHED", "FAILED"}


@pytest.mark.integration
def test_more_than_a_request_of_params_and_metrics_all_arrive(mlflow_server: servers.MlflowServer) -> None:
    uri = mlflow_server.uri
    _, experiment_id, parent_run_id = open_study(uri, "limits")
    params = {f"p.k{i:03d}": i for i in range(250)}
    tags = {f"t.k{i:03d}": str(i) for i in range(150)}
    trial = Trial(uri, experiment_id, parent_run_id, "big", params)
    steps = range(0, 300)  # 300 records x 7 metrics: at least three requests
    trial.log_records([synthetic_record(s) for s in steps])
    trial.set_tags(tags)
    trial.finish("FINISHED")
    run = client(uri).get_run(trial.run_id)
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert tags.items() <= run.data.tags.items()
    assert [s for s, _ in history(uri, trial.run_id, "weights/norm")] == list(steps)


@pytest.mark.integration
def test_fetch_results_pages_through_more_runs_than_fit_in_a_page(
    mlflow_server: servers.MlflowServer,
) -> None:
    from mlflow.entities import Metric

    uri = mlflow_server.uri
    _, experiment_id, parent_run_id = open_study(uri, "many")
    # The runs go straight into the server's database (fast); the reading under test goes through the server.
    c = client(mlflow_server.backend_uri)
    expected = {}
    for i in range(120):
        key = f"t{i:03d}"
        tags = {"mlflow.parentRunId": parent_run_id, "grokstudy.kind": "trial", "grokstudy.trial_key": key}
        run_id = c.create_run(experiment_id, tags=tags, run_name=key).info.run_id
        c.log_batch(run_id, metrics=[Metric("val/acc", i / 1000 + s, 0, s) for s in (0, 1)])
        expected[key] = run_id

    fetched = tracking.fetch_results(uri, "many", page_size=50)
    assert fetched.parent_run_id == parent_run_id
    assert yaml.safe_load(fetched.study_yaml)["name"] == "many"
    assert len(fetched.trials) == 120
    assert {t["tags"]["grokstudy.trial_key"]: t["run_id"] for t in fetched.trials} == expected
    for t in fetched.trials:
        i = int(t["tags"]["grokstudy.trial_key"][1:])
        assert t["metrics"] == {"val/acc": [(0, pytest.approx(i / 1000)), (1, pytest.approx(i / 1000 + 1))]}
    assert tracking.find_trial_runs(uri, experiment_id, parent_run_id) == expected


@pytest.mark.integration
def test_a_study_read_back_from_mlflow_becomes_its_trial_histories(
    mlflow_server: servers.MlflowServer,
) -> None:
    from grokstudy.study import study_to_dict

    uri = mlflow_server.uri
    name = "histories"
    spec = parse_study(yaml.safe_load(STUDY.format(name=name)))
    study = tracking.StudyTracker(uri)
    experiment_id, parent_run_id = study.open(name, yaml.safe_dump(study_to_dict(spec)), {}, {})
    logged = {}
    for wd in (0.1, 1.0):
        cfg = spec.trial({"optimizer.weight_decay": wd, "train.seed": 0})
        trial = start_trial(uri, experiment_id, parent_run_id, f"wd={wd}", cfg)
        records = [synthetic_record(s, wd) for s in GRID]
        trial.log_records(records)
        trial.set_tags({"stop_reason": "budget", "ray.node": "n1"})
        trial.finish("FINISHED")
        logged[f"wd={wd}"] = (trial.run_id, cfg, records)
    failed = start_trial(uri, experiment_id, parent_run_id, "broken", spec.trial({"train.seed": 0}))
    failed.finish("FAILED", error="RuntimeError: boom")
    # A trial still training (the study runs): read as running, never as a budget-ended trial.
    running = start_trial(uri, experiment_id, parent_run_id, "training", spec.trial({"train.seed": 1}))
    running.log_records([synthetic_record(s) for s in GRID[:8]])
    running.flush()

    read_back, histories = tracking.fetch_histories(uri, name)
    assert read_back == spec
    by_id = {h.trial_id: h for h in histories}
    assert set(by_id) == {*logged, "broken", "training"}
    h = by_id.pop("training")
    assert h.running and h.outcome is None and h.stop_reason is None and len(h.records) == 8
    trials, _ = results.build_tables(spec, [h])
    assert trials.to_pylist()[0]["status"] == "RUNNING" and trials.to_pylist()[0]["phase"] is None
    running.finish("FINISHED")
    study.finish("FINISHED")
    for key, (run_id, cfg, records) in logged.items():
        h = by_id[key]
        assert (h.run_id, h.cfg, h.stop_reason, h.node, h.error) == (run_id, cfg, "budget", "n1", None)
        assert h.point == {"optimizer.weight_decay": cfg.optimizer.weight_decay, "train.seed": 0}
        assert [r.step for r in h.records] == GRID
        assert [r.val_loss for r in h.records] == pytest.approx([r.val_loss for r in records])
    assert (by_id["broken"].stop_reason, by_id["broken"].error, by_id["broken"].records) == (
        "error", "RuntimeError: boom", (),
    )  # fmt: skip


# ---- a real browser on the real UI ---------------------------------------------------------------


def visible_text(dom: str) -> str:
    """The text of an HTML dump, tags and scripts stripped, whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.mark.integration
@pytest.mark.skipif(not os.path.exists(servers.CHROMIUM), reason=f"no Chromium at {servers.CHROMIUM}")
def test_the_mlflow_ui_shows_the_study_run_with_its_trials_nested_under_it(
    mlflow_server: servers.MlflowServer, tmp_path: Path, artifacts_dir: Path
) -> None:
    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, "browser-study")
    names = [f"wd={wd} seed=0" for wd in (0.01, 0.1, 1.0)]
    for name in names:
        trial = start_trial(uri, experiment_id, parent_run_id, name, TrialConfig())
        trial.log_records([synthetic_record(s) for s in GRID])
        trial.finish("FINISHED")
    study.finish("FINISHED")
    # MLflow 3.17's UI picks its GenAI or model-training layout by `workflowType`.
    url = f"{uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    flags = ["--virtual-time-budget=20000", "--window-size=1400,900", "--dump-dom"]

    # As a user lands on it: the runs table (not the GenAI overview) with the study
    # run and its trials folded under it.
    nested = servers.chromium(
        url, tmp_path / "profile", *flags, f"--screenshot={artifacts_dir / 'mlflow-ui-nested.png'}"
    )
    (artifacts_dir / "mlflow-ui-nested.html").write_text(nested.stdout)
    text = visible_text(nested.stdout)
    assert "browser-study" in text, nested.stderr[-2000:]
    assert "4 matching runs" in text
    assert not any(name in text for name in names), "trials should be folded under the study run"
    # The study run's name cell carries the expand button of a run with children
    # (mlflow 3.17's RunNameCellRenderer renders it only for parents).
    name_cells = nested.stdout.split('col-id="attributes.`Run Name`"')[1:]
    [study_cell] = [c for c in name_cells if ">browser-study</span></a>" in c.split('col-id="', 1)[0]]
    assert "runnamecellrenderer" in study_cell.split('col-id="', 1)[0], "no expander on the study run"

    # Sorted by name the UI lists runs flat: every trial is there by name.
    flat = servers.chromium(
        url + "&orderByKey=attributes.run_name&orderByAsc=true",
        tmp_path / "profile",
        *flags,
        f"--screenshot={artifacts_dir / 'mlflow-ui-runs.png'}",
    )
    (artifacts_dir / "mlflow-ui-runs.html").write_text(flat.stdout)
    text = visible_text(flat.stdout)
    assert all(name in text for name in ["browser-study", *names]), flat.stderr[-2000:]


# ---- PostgreSQL as the backend store ---------------------------------------------------------------


def _psycopg2_missing() -> bool:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.integration
@pytest.mark.skipif(
    not (servers.POSTGRES_BIN / "postgres").exists(), reason=f"no PostgreSQL under {servers.POSTGRES_BIN}"
)
@pytest.mark.skipif(_psycopg2_missing(), reason="psycopg2 is not installed (pip install psycopg2-binary)")
def test_a_postgres_backend_store_holds_a_resumable_study(tmp_path: Path) -> None:
    with servers.postgres_cluster() as url:
        uri = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        study, experiment_id, parent_run_id = open_study(uri, "pg-study")
        trial = start_trial(uri, experiment_id, parent_run_id, "t0", TrialConfig())
        trial.log_records([synthetic_record(s) for s in GRID if s <= 300])
        trial.finish("KILLED")
        resumed = start_trial(uri, experiment_id, parent_run_id, "t0", TrialConfig(), run_id=trial.run_id)
        resumed.log_records([synthetic_record(s) for s in GRID])
        resumed.finish("FINISHED")
        study.finish("FINISHED")
        fetched = tracking.fetch_results(uri, "pg-study")
        assert [t["run_id"] for t in fetched.trials] == [trial.run_id]
        assert [s for s, _ in fetched.trials[0]["metrics"]["val/acc"]] == GRID
        assert not any(math.isnan(v) for _, v in fetched.trials[0]["metrics"]["train/acc"])
        assert fetched.trials[0]["tags"]["grokstudy.trial_key"] == "t0"


@pytest.mark.integration
@pytest.mark.skipif(not os.path.exists(servers.CHROMIUM), reason=f"no Chromium at {servers.CHROMIUM}")
def test_the_compare_view_offers_each_trials_outcome_as_metrics_beside_its_params(
    mlflow_server: servers.MlflowServer, tmp_path: Path, artifacts_dir: Path
) -> None:
    """The UI's compare view (parallel coordinates, contour, scatter) plots params against
    metrics: a trial's outcome must be metrics for t_val to be plotted against weight decay."""
    import json
    from urllib.parse import quote

    from grokstudy import member
    from grokstudy.records import Outcome

    uri = mlflow_server.uri
    study, experiment_id, parent_run_id = open_study(uri, "compare-study")
    run_ids = []
    for i, wd in enumerate((0.1, 0.3, 1.0)):
        cfg = TrialConfig(
            optimizer=OptimConfig(weight_decay=wd, betas=(0.9, 0.98)), train=TrainConfig(batch_size=None)
        )
        trial = start_trial(uri, experiment_id, parent_run_id, f"wd={wd}", cfg)
        curve = [synthetic_record(s, wd) for s in GRID]
        trial.log_records(curve)
        outcome = Outcome("grokking", 400, 800 + 100 * i, None, 800.0 + 100 * i, "generalized")
        trial.run.log_metrics(curve[-1].step, member.outcome_metrics(outcome, curve))
        trial.finish("FINISHED")
        run_ids.append(trial.run_id)
    study.finish("FINISHED")

    run = client(uri).get_run(run_ids[2])
    assert run.data.metrics["t_val"] == 1000 and run.data.metrics["delay"] == 600
    assert run.data.metrics["phase_code"] == 1 and "t_val_loss" not in run.data.metrics  # never reached
    assert run.data.metrics["censored"] == 0 and 0 <= run.data.metrics["val_acc_at_fit"] <= 1
    assert (
        run.data.params["optimizer.betas"] == "[0.9, 0.98]" and run.data.params["train.batch_size"] == "full"
    )
    assert [(m.step, m.value) for m in client(uri).get_metric_history(run_ids[2], "t_val")] == [
        (1000, 1000.0)
    ]

    url = f"{uri}/#/compare-runs?runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([experiment_id]))}"
    shown = servers.chromium(
        url, tmp_path / "profile", "--virtual-time-budget=20000", "--window-size=1400,2200", "--dump-dom",
        f"--screenshot={artifacts_dir / 'mlflow-compare.png'}",
    )  # fmt: skip
    (artifacts_dir / "mlflow-compare.html").write_text(shown.stdout)
    text = visible_text(shown.stdout)
    assert "Comparing 3 Runs" in text, shown.stderr[-2000:]
    assert all(plot in text for plot in ("Parallel Coordinates Plot", "Scatter Plot", "Contour Plot"))
    # The metrics the plots offer are the runs' metrics: the outcome is among them, by name.
    assert all(key in text for key in ("t_val", "t_train", "delay", "phase_code", "final_val_acc")), text[
        -3000:
    ]
    # Params as the study file writes them (the UI pretty-prints a JSON list), not Python reprs.
    assert re.search(r"optimizer\.betas \[ ?0\.9, 0\.98 ?\]", text) and "train.batch_size full" in text, text
