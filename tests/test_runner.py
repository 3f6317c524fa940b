"""The runner: its pure helpers without Ray, and a tiny study on a real embedded Ray."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from endstate import problems, weights_problems
from ray.tune.search import Searcher

import grokstudy
from grokstudy import collect, footprint, member, packsize, points, runner, search, tracking
from grokstudy.checkpoints import SavedMember
from grokstudy.config import ResourcesConfig, Study, TrialConfig, with_overrides
from grokstudy.errors import StudyError
from grokstudy.phases import PHASES
from grokstudy.records import EvalRecord, Outcome, TrialHistory
from grokstudy.study import parse_study

TINY = {
    "name": "tiny",
    "task": {"op": "x+y", "p": 23},
    "data": {"fraction": 0.5},
    "model": {"kind": "mlp", "embed_dim": 16, "width": 64},
    "train": {"max_steps": 300, "eval_every": 50, "checkpoint_every": 100},
    "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 1.0, "warmup_steps": 0},
    "phases": {"confirm_steps": 100},
    "search": {
        "sampler": "grid",
        "space": {"optimizer.weight_decay": {"values": [0.0, 1.0]}, "data.fraction": {"values": [0.4, 0.8]}},
        "seeds": 2,
    },
    "resources": {"cpu": 1},
    "diagram": {"x": "data.fraction", "y": "optimizer.weight_decay"},
    # An arm's own setting (one that leaves training as it is, so packs still match lone runs
    # bit for bit): the weight decay 1 trials take the progress measures every second evaluation.
    "conditional": [{"when": {"optimizer.weight_decay": 1.0}, "set": {"train.measures_every": 2}}],
}


def record(step: int, train_acc: float, val_acc: float, train_loss: float = 0.1) -> EvalRecord:
    return EvalRecord(step, train_loss, train_acc, 1.0, val_acc, 10.0)


# ---- without Ray ---------------------------------------------------------------------------------


def test_a_member_stops_when_generalization_held_when_it_diverged_or_at_its_budget() -> None:
    study = parse_study(TINY)
    cfg = study.trial({})
    running = [record(s, 1.0, 0.1) for s in (0, 50, 100)]
    assert member.judge(running, cfg, study.phases) is None
    held = [record(0, 0.1, 0.0), *(record(s, 1.0, 1.0) for s in (50, 100, 150))]
    assert member.judge(held, cfg, study.phases) == Outcome(
        phase="comprehension",
        t_train=49,  # interpolated: 0.1 at step 0, 1.0 at step 50
        t_val=50,  # 0.0 at step 0, 1.0 at step 50
        t_val_loss=None,
        objective=50.0,
        stop_reason="generalized",
    )
    diverged = member.judge(
        [record(0, 0.1, 0.0), record(50, 0.04, 0.04, train_loss=math.nan)], cfg, study.phases
    )
    assert (diverged.stop_reason, diverged.phase) == ("diverged", "diverged")
    budget = [record(s, 1.0, 0.1) for s in (0, 100, 200, 300)]
    assert member.judge(budget, cfg, study.phases) == Outcome("memorization", 0, None, None, 300.0, "budget")


def test_an_outcome_survives_the_report_and_the_checkpoint_as_the_same_value() -> None:
    outcome = Outcome("grokking", 120, 2400, None, 2400.0, "generalized")
    report = {member.OUTCOMES: json.dumps([{"trial_id": "t-s0", **outcome.to_dict(), "run_id": "r"}])}
    assert member.outcomes_of(report) == [("t-s0", outcome)]
    saved = SavedMember([record(0, 0.1, 0.0)], "r", outcome)
    assert SavedMember.from_dict(json.loads(json.dumps(saved.to_dict()))) == saved
    assert member.outcomes_of({}) == [] and member.outcomes_of({member.OUTCOMES: ""}) == []


def test_packs_are_measured_by_default_where_trials_use_a_gpu_only() -> None:
    study = parse_study(TINY)
    assert runner.pack_size(study) == 1
    gpu = with_overrides(study, {"resources": ResourcesConfig(gpu=0.5)})
    assert runner.pack_size(gpu) == "auto"
    assert runner.pack_size(with_overrides(study, {"resources": ResourcesConfig(pack=4)})) == 4
    assert runner.pack_size(parse_study(dict(TINY, resources={"pack": "auto"}))) == "auto"


def test_auto_packs_take_the_smallest_k_near_the_best_rate_and_stop_past_the_knee() -> None:
    cfg = parse_study(TINY).trial({})
    timed: list[int] = []

    def timer(rate_of: dict[int, float]):
        def seconds(members: list[TrialConfig]) -> float:
            assert [m.train.seed for m in members] == list(range(len(members)))  # one pack, seeds apart
            timed.append(len(members))
            return len(members) / rate_of[len(members)]

        return seconds

    # Rates rise to a knee at 8, flatten (16 within 5%), then fall twice: measuring stops there.
    knee = {1: 100, 2: 190, 4: 350, 8: 600, 16: 610, 32: 500, 64: 400, 128: 1000}
    rates, stopped = packsize.measure(cfg, 128, 2**40, seconds_per_step=timer(knee))
    assert timed == [1, 2, 4, 8, 16, 32, 64] and "fell 2 Ks in a row" in stopped
    assert packsize.choose(rates) == 8  # 16 is faster, by less than 5%
    # The memory estimate bounds the packs tried; K = 1 is always measured.
    timed.clear()
    memory = footprint.trial_bytes(cfg, 4)
    rates, stopped = packsize.measure(cfg, 128, memory, seconds_per_step=timer(knee))
    assert timed == [1, 2, 4] and "would need" in stopped and packsize.choose(rates) == 4
    assert packsize.candidates(12) == [1, 2, 4, 8, 12] and packsize.candidates(1) == [1]
    choice = packsize.Choice(8, tuple(rates), "cpu", stopped)
    assert packsize.Choice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    assert "packs of 8" in choice.describe() and "K=2 190" in choice.describe()


@pytest.mark.integration
def test_auto_packs_are_measured_once_where_trials_run_and_kept_for_a_resume(tmp_path: Path) -> None:
    import ray

    study = parse_study(dict(TINY, resources={"cpu": 1, "pack": "auto"}))
    runner.init_ray(None, num_cpus=2)
    try:
        k, choice = runner.resolve_pack(study, tmp_path, slots=2)
        # 8 trials on 2 slots: packs of at most 4; every K up to it measured on this CPU.
        assert [r.k for r in choice.rates] == [1, 2, 4] or "fell" in choice.stopped
        assert k == packsize.choose(choice.rates) and choice.device == "cpu"
        assert all(r.member_steps_per_s > 0 for r in choice.rates)
        saved = json.loads((tmp_path / runner.PACK_FILE).read_text())
        assert packsize.Choice.from_dict(saved) == choice
    finally:
        ray.shutdown()
    # A resume packs as the study began: the saved choice, not a new measurement (Ray is down).
    assert runner.resolve_pack(study, tmp_path, slots=2) == (k, choice)


def test_the_searcher_hands_out_each_member_once_then_says_finished() -> None:
    study = parse_study(TINY)
    searcher = runner.LedgerSearcher(study, pack_size=1, slots=2)
    configs = []
    while isinstance(config := searcher.suggest(f"t{len(configs)}"), dict):
        configs.append(config)
    assert config == Searcher.FINISHED
    ids = [m["trial_id"] for c in configs for m in c["members"]]
    assert sorted(ids) == sorted({points.trial_id(p) for p in search.dry_run(study)}) and len(ids) == 8
    # A result told twice is told once; a pack that failed fails its members in the ledger.
    outcome = Outcome("grokking", 20, 120, None, 120.0, "generalized")
    result = {member.OUTCOMES: json.dumps([{"trial_id": ids[0], **outcome.to_dict()}])}
    searcher.on_trial_result("t0", result)
    searcher.on_trial_complete("t0", result)
    searcher.on_trial_complete("t1", None, error=True)
    trials = {t.user_attrs[search.TRIAL_ID]: t for t in searcher.ledger.ot.trials}
    assert trials[ids[0]].state.name == "COMPLETE" and trials[ids[0]].value == 120.0
    assert trials[ids[0]].user_attrs[search.PHASE] == "grokking"
    assert trials[ids[1]].state.name == "FAIL" and trials[ids[1]].user_attrs[search.ERROR]
    assert {t.state.name for tid, t in trials.items() if tid not in ids[:2]} == {"RUNNING"}


def test_a_single_member_trainer_yields_each_eval_step_and_stops_when_retired() -> None:
    cfg = with_overrides(TrialConfig(), {"task.p": 11, "model.width": 8, "model.embed_dim": 4, "train.max_steps": 100,
                                         "train.eval_every": 20, "train.device": "cpu"})  # fmt: skip
    trainer = member.Trainer([cfg], None)
    steps = []
    for group in trainer.steps():
        [(i, rec)] = group
        steps.append(rec.step)
        if rec.step == 20:
            trainer.retire(0)
    assert steps == [0, 1, 2, 5, 10, 20]


def test_a_history_is_read_from_a_members_checkpoint() -> None:
    study = parse_study(TINY)
    point = {"optimizer.weight_decay": 1.0, "data.fraction": 0.4, "train.seed": 1}
    entry = {"trial_id": points.trial_id(point), "point": point}
    outcome = Outcome("memorization", 0, None, None, 300.0, "budget")
    saved = SavedMember([record(0, 0.1, 0.0)], "r1", outcome)
    h = member.history(study, entry, saved, "node-1", None)
    assert (h.trial_id, h.run_id, h.outcome, h.stop_reason, h.node, h.cfg.train.seed, h.point) == (
        entry["trial_id"], "r1", outcome, "budget", "node-1", 1, point,
    )  # fmt: skip
    assert member.history(study, entry, None, None, None) is None  # unfinished: not a row
    failed = member.history(study, entry, None, None, "RuntimeError: boom")
    assert (failed.stop_reason, failed.error, failed.records, failed.outcome) == (
        "error",
        "RuntimeError: boom",
        (),
        None,
    )


def test_runs_their_trials_could_not_end_are_ended_from_the_histories_and_no_others(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    study = parse_study(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.StudyTracker(uri)
    experiment_id, parent = tracker.open("tiny", "name: tiny", {}, {})
    sender = tracking.Sender(tracking.Where(uri, experiment_id, parent), interval_s=0.05)
    curve = [record(s, 1.0, 0.1) for s in (0, 100, 200, 300)]  # ran to its budget: memorization
    outcome = member.judge(curve, study.trial({}), study.phases)
    runs = {key: sender.open(key, key, {}, {}) for key in ("cut", "ended", "failed")}
    for run in runs.values():
        run.sync(curve[:2])  # "cut" and "failed" lost the rest: MLflow was down when they ended
    runs["ended"].sync(curve)
    runs["ended"].finish("FINISHED")
    assert sender.close(60)

    def history(
        key: str, ended: Outcome | None, run_id: str | None, error: str | None = None
    ) -> TrialHistory:
        return TrialHistory(
            key, {"train.seed": 0}, study.trial({}), tuple(curve), ended, "node-1", run_id, error
        )

    # "lost" never reached MLflow (its worker died first) and its checkpoint holds no run id.
    histories = [history(k, outcome, runs[k].run_id) for k in ("cut", "ended")]
    histories += [history("failed", None, runs["failed"].run_id, "boom"), history("lost", outcome, None)]
    settled = collect.settle_runs(histories, tracker)
    assert [h.run_id for h in settled[:3]] == [runs[k].run_id for k in ("cut", "ended", "failed")]
    client = MlflowClient(uri)
    lost = client.get_run(settled[3].run_id)
    assert (lost.info.status, lost.data.tags["phase"], lost.data.tags["grokstudy.trial_key"]) == (
        "FINISHED",
        "memorization",
        "lost",
    )
    assert lost.data.params["train.max_steps"] == str(study.trial({}).train.max_steps)
    assert [m.step for m in client.get_metric_history(lost.info.run_id, "val/acc")] == [0, 100, 200, 300]
    cut, ended, failed = (client.get_run(runs[k].run_id) for k in ("cut", "ended", "failed"))
    assert (cut.info.status, cut.data.tags["phase"], cut.data.tags["stop_reason"]) == (
        "FINISHED",
        "memorization",
        "budget",
    )
    assert [m.step for m in client.get_metric_history(cut.info.run_id, "val/acc")] == [0, 100, 200, 300]
    assert ended.info.status == "FINISHED" and "phase" not in ended.data.tags  # left as it ended itself
    assert (failed.info.status, failed.data.tags[tracking.ERROR_TAG]) == ("FAILED", "boom")


# ---- a real embedded Ray -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_ray() -> Iterator[None]:
    """One embedded Ray for the module's studies: `run_study` joins a Ray that is already up and
    leaves it running, as it does in a notebook."""
    import ray

    started = runner.init_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_study(
    embedded_ray: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Study, collect.StudyOutcome]:
    """TINY run once, unpacked, for the tests that read it."""
    study = parse_study(TINY)
    return study, runner.run_study(study, out_dir=tmp_path_factory.mktemp("tiny") / "out", num_cpus=2)


@pytest.mark.integration
def test_a_tiny_grid_study_runs_every_point_and_seed_exactly_once_with_whole_curves(tiny_study) -> None:
    import pyarrow.parquet as pq

    study, outcome = tiny_study
    assert outcome.failed == [] and outcome.n_trials == 8
    assert outcome.figures and all(p.exists() for p in outcome.figures)
    assert problems(outcome.out_dir, study) == []
    # Each row's phase and stop reason are what its own whole curve says, and the summary counts them.
    rows = pq.read_table(outcome.trials_path).to_pylist()
    curves = [  # a measure not taken at an evaluation is null in the table
        EvalRecord.from_values(r["step"], {k: math.nan if v is None else v for k, v in r.items()})
        for r in pq.read_table(outcome.curves_path).to_pylist()
    ]
    trial_of = pq.read_table(outcome.curves_path).column("trial_id").to_pylist()
    for row in rows:
        curve = [c for c, t in zip(curves, trial_of, strict=True) if t == row["trial_id"]]
        cfg = study.trial(points.point_from_config(study, row))
        judged = member.judge(curve, cfg, study.phases)
        assert (judged.phase, judged.stop_reason, judged.t_val) == (
            row["phase"],
            row["stop_reason"],
            row["t_val"],
        )
    assert outcome.phase_counts == dict(Counter(r["phase"] for r in rows))
    assert {r["phase"] for r in rows} <= set(PHASES)
    # The conditional setting reached the trials that match it, in the table and in MLflow.
    from mlflow import MlflowClient

    every = {r["trial_id"]: r["train.measures_every"] for r in rows}
    assert {(r["optimizer.weight_decay"], r["train.measures_every"]) for r in rows} == {(0.0, 1), (1.0, 2)}
    client = MlflowClient(f"sqlite:///{outcome.out_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    params = {
        r.data.tags["grokstudy.trial_key"]: r.data.params
        for r in runs
        if "grokstudy.trial_key" in r.data.tags
    }
    assert set(params) == set(every)
    assert all(int(params[t]["train.measures_every"]) == e for t, e in every.items())


@pytest.mark.integration
def test_a_one_axis_study_measured_by_loss_draws_its_sweeps_and_stops_only_once_its_loss_held(
    tmp_path: Path, embedded_ray: None
) -> None:
    import pyarrow.parquet as pq

    spec = {k: v for k, v in TINY.items() if k != "conditional"} | {"name": "tiny-sweep"}  # its own axes
    # Gromov's quadratic MLP with MSE fits p = 23 in tens of steps: memorizes at 30 %,
    # groks at 60 % (accuracy ~150 steps, loss < 1e-2 ~190), comprehends at 90 %.
    spec["model"] = {"kind": "gromov", "width": 128}
    spec["optimizer"] = {"name": "adamw", "lr": 1.0e-2, "weight_decay": 1.0, "warmup_steps": 0}
    spec["train"] = {"max_steps": 400, "eval_every": 50, "checkpoint_every": 200, "loss": "mse"}
    spec["phases"] = {"confirm_steps": 100, "min_delay": 100, "early_stop": "accuracy_and_loss"}
    spec["search"] = {"sampler": "grid", "space": {"data.fraction": {"values": [0.3, 0.6, 0.9]}}, "seeds": 1}
    spec["diagram"] = {"x": "data.fraction"}
    spec["run"] = {"save_weights": "none"}
    study = parse_study(spec)
    outcome = runner.run_study(study, out_dir=tmp_path / "out", num_cpus=2)
    assert outcome.failed == [] and outcome.weights is None
    assert weights_problems(outcome.out_dir, pq.read_table(outcome.trials_path).to_pylist()) == []
    figures = tmp_path / "out" / "figures"
    assert {"sweep.png", "sweep_loss.png"} <= {p.name for p in figures.iterdir()}
    trials = {t["data.fraction"]: t for t in pq.read_table(outcome.trials_path).to_pylist()}
    assert trials[0.3]["phase"] == "memorization" and trials[0.3]["t_val_loss"] is None
    generalized = [t for t in trials.values() if t["stop_reason"] == "generalized"]
    assert {t["data.fraction"] for t in generalized} == {0.6, 0.9}
    for t in generalized:  # stopped only once both measures had held confirm_steps
        assert t["t_val_loss"] is not None and t["steps"] >= t["t_val_loss"] + 100, t


@pytest.mark.integration
def test_a_boundary_study_runs_through_the_runner_and_writes_the_whole_grid(
    tmp_path: Path, embedded_ray: None
) -> None:
    import pyarrow.parquet as pq

    spec = {k: v for k, v in TINY.items() if k != "conditional"} | {"name": "tiny-boundary"}  # its own axes
    spec["search"] = {
        "sampler": "boundary",
        "space": {
            # 9 x 3: the coarse lattice is every other weight decay (a 5 x 3 start), then the
            # boundary; a 5 x 5 grid would be coarse already (stride 1) and run dense.
            "optimizer.weight_decay": {"log": [0.01, 10.0], "points": 9},
            "data.fraction": {"values": [0.3, 0.55, 0.8]},
        },
        "seeds": 2,
    }
    study = parse_study(spec)
    outcome = runner.run_study(study, out_dir=tmp_path / "out", num_cpus=2)
    assert outcome.failed == []
    trials = pq.read_table(outcome.trials_path).to_pylist()
    cells = pq.read_table(tmp_path / "out" / "cells.parquet").to_pylist()
    assert len(cells) == 27 and len({t["point_id"] for t in trials}) < 27
    assert sum(c["measured"] for c in cells) == len({t["point_id"] for t in trials})
    assert sum(c["seeds"] for c in cells) == len(trials) == len({t["trial_id"] for t in trials})
    assert {(t["optimizer.weight_decay"], t["data.fraction"]) for t in trials} == {
        (c["optimizer.weight_decay"], c["data.fraction"]) for c in cells if c["measured"]
    }
    assert all(c["phase"] for c in cells)
    # Seeds where phases meet: a trained cell beside a cell of another phase has both its seeds.
    wds, fractions = (sorted({c[k] for c in cells}) for k in ("optimizer.weight_decay", "data.fraction"))
    grid = {(wds.index(c["optimizer.weight_decay"]), fractions.index(c["data.fraction"])): c for c in cells}
    edge = [
        c
        for (i, j), c in grid.items()
        if c["measured"]
        and any(
            grid.get(nb, c)["phase"] != c["phase"] for nb in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
        )
    ]
    assert edge and all(c["seeds"] == 2 for c in edge)
    assert (tmp_path / "out" / "figures" / "phase_diagram.png").exists()


@pytest.mark.integration
def test_an_auto_budget_gives_each_trial_its_decay_time_steps_in_one_pack(
    tmp_path: Path, embedded_ray: None
) -> None:
    import pyarrow.parquet as pq

    spec = dict(TINY, name="tiny-auto", resources={"cpu": 1, "pack": 3}, run={"save_weights": "none"})
    spec["train"] = {
        "max_steps": {"auto": {"per_decay_time": 0.45, "min": 100, "max": 300}},
        "eval_every": 50,
    }
    spec["search"] = {"sampler": "grid", "space": {"optimizer.weight_decay": {"values": [0.0, 1.0, 10.0]}}}
    study = parse_study(spec)
    outcome = runner.run_study(study, out_dir=tmp_path / "out", num_cpus=2)
    assert outcome.failed == [] and problems(outcome.out_dir, study) == []
    rows = {r["optimizer.weight_decay"]: r for r in pq.read_table(outcome.trials_path).to_pylist()}

    def formula(lr: float, wd: float) -> int:
        return 300 if wd == 0 else min(max(math.ceil(0.45 / (lr * wd) / 50) * 50, 100), 300)

    # 0.45 / (0.003 * 1) = 150 steps; 0.45 / (0.003 * 10) = 15, rounded up to 50, raised to min 100.
    assert {wd: r["max_steps"] for wd, r in rows.items()} == {0.0: 300, 1.0: 150, 10.0: 100}
    for wd, row in rows.items():
        assert row["max_steps"] == formula(row["optimizer.lr"], wd)
        assert row["steps"] == row["max_steps"] or row["stop_reason"] == "generalized", row
        assert row["steps"] <= row["max_steps"]
    assert rows[1.0]["budget_decay_times"] == pytest.approx(0.45)


@pytest.mark.integration
def test_a_packed_study_gives_the_unpacked_studys_tables_runs_phases_and_final_weights(
    tmp_path: Path, tiny_study
) -> None:
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    tables = {}
    for pack in (1, 4):
        study = parse_study(dict(TINY, resources={"cpu": 1, "pack": pack}))
        out = tmp_path / f"pack{pack}"
        outcome = tiny_study[1] if pack == 1 else runner.run_study(study, out_dir=out, num_cpus=2)
        assert outcome.failed == [] and problems(outcome.out_dir, study) == []
        tables[pack] = {r["trial_id"]: r for r in pq.read_table(outcome.trials_path).to_pylist()}
        client = MlflowClient(outcome.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        sizes = {
            r.data.tags.get("grokstudy.pack_size")
            for r in runs
            if r.data.tags.get("grokstudy.kind") == "trial"
        }
        # The one tag that tells a packed member apart: the size of its pack (the last packs
        # of a study are smaller, spreading what is left over the free slots).
        assert max(map(int, sizes)) == pack and all(1 <= int(s) <= pack for s in sizes)
    single, packed = tables[1], tables[4]
    assert single.keys() == packed.keys()
    same = ("phase", "t_train", "t_val", "stop_reason", "steps", "optimizer.weight_decay", "data.fraction")
    for tid, row in single.items():
        assert {k: packed[tid][k] for k in same} == {k: row[k] for k in same}, tid
        assert packed[tid]["final_val_acc"] == pytest.approx(row["final_val_acc"], rel=1e-4, abs=1e-5)
    # Each member's final weights, packed or not, reproduce its final accuracies on its own split
    # (a pack member's forward is bit for bit its lone model's on CPU).
    for pack, out in ((1, tiny_study[1].out_dir), (4, tmp_path / "pack4")):
        results = grokstudy.load(out)
        for tid, row in tables[pack].items():
            model = results.model(tid)
            assert not model.training and model.trial_id == tid and model.step == row["steps"]
            assert model.config == tiny_study[0].trial(points.point_from_config(tiny_study[0], row))
            with torch.no_grad():
                data = model.data
                val_acc = (model(data.val_x).argmax(-1) == data.val_y).double().mean().item()
                train_acc = (model(data.train_x).argmax(-1) == data.train_y).double().mean().item()
            assert (train_acc, val_acc) == (row["final_train_acc"], row["final_val_acc"]), (pack, tid)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (
            {"resources": {"cpu": 1024}},
            "resources.cpu",
            "asks 1024 CPU and 0 GPU per trial, and no node has that",
        ),
        ({"model": {"kind": "mlp", "width": 65536, "depth": 64}}, "model", "more than the largest node's"),
    ],
    ids=["cpus", "memory"],
)
def test_a_study_no_node_can_run_is_refused_before_a_trial_starts(
    tmp_path: Path, embedded_ray: None, change: dict, field: str, says: str
) -> None:
    study = parse_study(dict(TINY, name="cannot-run") | change)
    with pytest.raises(StudyError) as refused:
        runner.run_study(study, out_dir=tmp_path / "out", num_cpus=2)
    assert refused.value.path == field and says in str(refused.value) and "\n" not in str(refused.value)
    assert (
        not list((tmp_path / "out" / "ray").rglob("trial_*"))
        and not (tmp_path / "out" / "trials.parquet").exists()
    )


@pytest.mark.integration
def test_on_a_cluster_a_study_waits_for_a_node_that_fits_then_fails_in_one_line(
    embedded_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grokstudy import preflight

    study = parse_study(dict(TINY, name="waits", resources={"cpu": 1024}, run={"resource_wait_s": 0.5}))
    waiting = preflight.check_fits(study, pack=1, embedded=False)  # an autoscaler might add a node
    assert waiting is not None
    monkeypatch.setattr(preflight, "LOOK_EVERY_S", 0.0)
    time.sleep(0.6)
    with pytest.raises(StudyError, match=r"resources.cpu: no node could run a trial \(1024 CPU, 0 GPU\)"):
        waiting.check()
    fits = parse_study(dict(TINY, name="fits", run={"resource_wait_s": 0.5}))
    assert preflight.check_fits(fits, pack=1, embedded=False) is None


def test_the_embedded_rays_token_is_created_0600_before_ray_starts_and_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert runner.ensure_ray_token() == token
    first = token.read_text()
    assert token.stat().st_mode & 0o777 == 0o600 and len(first) == 64 and int(first, 16) >= 0
    assert not [p for p in token.parent.iterdir() if p != token]  # no temp file left beside it
    token.chmod(0o644)  # as an older Ray left it
    runner.ensure_ray_token()
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == first


@pytest.mark.integration
def test_a_driver_whose_lease_another_driver_took_stops_at_once_and_writes_nothing_more(
    tmp_path: Path, embedded_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease fencing end to end: while trials train, another driver takes the next
    generation of the lease (as after this one was paused past the TTL); this driver learns it
    at its next renewal, stops its study, and writes no tables, ledger or figures."""
    import json
    import threading

    from grokstudy import storage

    monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.5)
    store = tmp_path / "storage"
    spec = dict(TINY, name="taken-over", train=dict(TINY["train"], max_steps=20_000))
    study = parse_study(spec | {"run": {"storage": str(store)}})
    experiment = store / "taken-over"
    theirs = experiment / f"{storage.LEASE_PREFIX}{2:010d}.json"

    def take_over() -> None:
        deadline = time.monotonic() + 120
        while not list(experiment.glob("trial_*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        theirs.write_text(
            json.dumps({"driver": "theirs", "host": "elsewhere", "host_id": "x", "pid": 1, "seq": 0})
        )

    thief = threading.Thread(target=take_over, daemon=True)
    thief.start()
    out = tmp_path / "out"
    with pytest.raises(storage.LeaseLost, match="another driver holds it now"):
        runner.run_study(study, out_dir=out, num_cpus=2)
    thief.join()
    assert json.loads(theirs.read_text())["driver"] == "theirs"  # not overwritten, not removed
    assert not (out / "trials.parquet").exists() and not (out / "optuna.db").exists()
    assert not (out / "figures").exists()


# ---- a member whose Tune trial ended without an outcome for it -------------------------------------


def _tune_trial(trial_id: str, status: str, members: list[dict], outcomes: dict | None = None):
    """What tune.ExperimentAnalysis gives for a trial: its id, status, config and last result."""
    from types import SimpleNamespace

    rows = [{"trial_id": t, **o.to_dict()} for t, o in (outcomes or {}).items()]
    return SimpleNamespace(trial_id=trial_id, status=status, config={"members": members},
                           last_result={member.OUTCOMES: json.dumps(rows)} if rows else {})  # fmt: skip


def test_a_member_its_finished_trial_left_without_an_outcome_is_failed_or_run_again_in_a_new_trial() -> None:
    """Tune resumes no TERMINATED trial: such a member is failed (so the study ends, exit 1),
    and `--retry-failed` runs it in a new Tune trial rather than waiting on the old one."""
    study = parse_study(dict(TINY, name="rerun"))
    point = {"optimizer.weight_decay": 1.0, "data.fraction": 0.4, "train.seed": 0}
    m = {"trial_id": points.trial_id(point), "point": point}
    ended = [_tune_trial("old", "TERMINATED", [m])]
    assert runner.restored_members(study, ended)[m["trial_id"]].status == "failed"
    assert runner.restored_members(study, ended, retry_failed=True)[m["trial_id"]].status == "rerun"
    # A later run ran it in a new trial, to its end: that attempt is what counts.
    outcome = Outcome("grokking", 100, 900, None, 900.0, "generalized")
    again = [*ended, _tune_trial("new", "TERMINATED", [m], {m["trial_id"]: outcome})]
    assert runner.restored_members(study, again, retry_failed=True)[m["trial_id"]].status == "done"

    # The tables say the same: failed when Tune finished the trial, resumable while a newer one runs.
    failed, unfinished = collect.histories(
        study, [collect.Ended({"members": [m]}, None, None, None, done=True)]
    )
    assert unfinished == 0 and failed[0].error == collect.ENDED_WITHOUT_OUTCOME and failed[0].outcome is None
    both = [
        collect.Ended({"members": [m]}, None, None, None, done=True),
        collect.Ended({"members": [m]}, None, None, None),
    ]
    assert collect.histories(study, both) == ([], 1)
