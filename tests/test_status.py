"""Watching a study: the progress snapshot, `grokstudy status` (read-only), the live progress
bar and lines, tables and figures written while trials still run. The real study in the
background is in tests/test_watch.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from grokstudy import cli, console, figures, progress, results, snapshot, status
from grokstudy.records import EvalRecord, Outcome, TrialHistory
from grokstudy.snapshot import MemberState, Snapshot
from grokstudy.study import parse_study, study_to_dict

GRID_STUDY = {
    "name": "watched",
    "task": {"op": "x+y", "p": 23},
    "model": {"kind": "mlp", "embed_dim": 16, "width": 32},
    "train": {"max_steps": 400, "eval_every": 50},
    "search": {
        "sampler": "grid",
        "space": {
            "optimizer.weight_decay": {"values": [0.1, 1.0]},
            "data.fraction": {"values": [0.3, 0.5, 0.7]},
        },
        "seeds": 2,
    },
    "diagram": {"x": "data.fraction", "y": "optimizer.weight_decay"},
}


def member(wd: float, frac: float, seed: int, state: str, phase: str | None = None) -> MemberState:
    point = {"optimizer.weight_decay": wd, "data.fraction": frac, "train.seed": seed}
    return MemberState(f"{wd}-{frac}-{seed}", point, state, phase)


def snap(members: list[MemberState], **kw) -> Snapshot:
    now = time.time()
    fields = dict(study="watched", total=12, started_at=now - 100, run_started_at=now - 50, done_at_run_start=0,
                  updated_at=now, members=members, driver=snapshot.this_driver())  # fmt: skip
    return Snapshot(**fields | kw)


def grid_rows(text: str) -> dict[str, str]:
    """{y label: the row's letters} of a rendered grid."""
    lines = text.splitlines()
    start = lines.index("optimizer.weight_decay") + 1
    return {line.split()[0]: "".join(line.split()[1:]) for line in lines[start : start + 2]}


# ---- the snapshot ----------------------------------------------------------------------------------


def test_a_snapshot_round_trips_and_counts_rate_and_eta() -> None:
    members = [
        member(0.1, 0.3, 0, "done", "grokking"),
        member(0.1, 0.3, 1, "running"),
        member(1.0, 0.3, 0, "failed"),
    ]
    s = snap(members, done_at_run_start=0)
    back = Snapshot.from_json(s.to_json())
    assert back == s
    assert (back.count("done"), back.count("running"), back.count("failed"), back.pending) == (1, 1, 1, 9)
    rate = back.rate_per_s(back.run_started_at + 50)
    assert rate == pytest.approx(2 / 50)  # done and failed members count, since this driver run began
    assert back.eta_s(back.run_started_at + 50) == pytest.approx((9 + 1) / rate)
    with pytest.raises(ValueError, match="not a grokstudy progress snapshot"):
        Snapshot.from_json('{"study": "x"}')


def test_a_driver_is_alive_while_its_process_runs_and_gone_after() -> None:
    assert snapshot.driver_alive(snap([])) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = snap([], driver=snapshot.this_driver() | {"pid": child.pid})
    assert snapshot.driver_alive(gone) is False
    assert snapshot.driver_alive(snap([], driver=snapshot.this_driver("finished"))) is False
    elsewhere = {"pid": 1, "host": "other", "host_id": "other-boot:pid:[1]", "state": "running"}
    assert snapshot.driver_alive(snap([], driver=elsewhere)) is True  # a fresh heartbeat
    stale = snap([], driver=elsewhere, updated_at=time.time() - 4 * snapshot.HEARTBEAT_S)
    assert snapshot.driver_alive(stale) is None  # cannot be told from here


def test_study_progress_keeps_a_snapshot_of_every_member() -> None:
    saved: list[Snapshot] = []
    known = {
        "old": MemberState("old", {"x": 1}, "done", "grokking"),
        "back": MemberState("back", {"x": 2}, "running"),
    }
    p = progress.StudyProgress(
        4, None, 60, "u", known, every_s=0, study="s", save=saved.append, started_at=5.0
    )
    assert p.members["back"].status == "pending"  # restored: runs again once Tune starts its trial
    trial = type("T", (), {"trial_id": "T1", "config": {"members": [{"trial_id": "back", "point": {"x": 2}},
                                                                   {"trial_id": "new", "point": {"x": 3}}]}})()  # fmt: skip
    p.started(trial)
    outcome = Outcome("memorization", 10, None, None, 400.0, "budget").to_dict()
    p.reported(trial, {"outcomes": json.dumps([{"trial_id": "new", **outcome}])})
    p.errored(trial)
    p.ended("interrupted")
    last = saved[-1]
    assert {m.trial_id: (m.status, m.phase) for m in last.members} == {
        "old": ("done", "grokking"), "back": ("failed", None), "new": ("done", "memorization")
    }  # fmt: skip
    assert last.started_at == 5.0 and last.done_at_run_start == 1 and last.driver["state"] == "interrupted"
    assert p.ended_count() == 3


# ---- rendering -------------------------------------------------------------------------------------


def test_the_grid_marks_running_cells_and_never_calls_them_a_phase() -> None:
    study = parse_study(GRID_STUDY)
    members = [
        member(0.1, 0.3, 0, "done", "grokking"), member(0.1, 0.3, 1, "done", "grokking"),  # G
        member(0.1, 0.5, 0, "done", "memorization"), member(0.1, 0.5, 1, "running"),  # ~, not M
        member(1.0, 0.3, 0, "failed"),  # !
        member(1.0, 0.7, 0, "done", "comprehension"), member(1.0, 0.7, 1, "done", "grokking"),  # T(ie)
    ]  # fmt: skip
    text = status.render(status.StudyStatus(snap(members), study, "dir", True))
    assert grid_rows(text) == {"1": "!.T", "0.1": "G~."}
    assert "trials 6/12: 5 done, 1 running, 1 failed, 5 pending" in text
    assert "phases: comprehension 1, grokking 3, memorization 1" in text
    assert "ETA" in text and "running (pid" in text


def test_a_sampled_study_is_binned_on_its_axes() -> None:
    sampled = GRID_STUDY | {"search": {"sampler": "sobol", "num_samples": 8, "seeds": 1, "space": {
        "optimizer.weight_decay": {"log": [0.01, 10.0]}, "data.fraction": {"range": [0.2, 0.8]}}}}  # fmt: skip
    study = parse_study(sampled)
    members = [member(0.011, 0.21, 0, "done", "memorization"), member(9.0, 0.79, 0, "done", "grokking")]
    grid = status.phase_grid(study, members)
    rows = grid[1 : 1 + status.BINS]
    assert rows[0].split()[-1] == "G" and rows[-1].split()[1] == "M"  # top right, bottom left
    assert sum(line.split()[1:].count(".") for line in rows) == status.BINS * status.BINS - 2


def test_status_of_a_killed_driver_says_it_stopped(tmp_path: Path) -> None:
    study = parse_study(GRID_STUDY)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_study_dir(
        tmp_path,
        study,
        snap([member(0.1, 0.3, 0, "running")], driver=snapshot.this_driver() | {"pid": child.pid}),
    )
    text = status.render(status.read_directory(str(tmp_path)))
    assert "stopped:" in text and "run the same command again to resume" in text and "ETA" not in text


def write_study_dir(path: Path, study, s: Snapshot) -> None:
    import yaml

    (path / snapshot.SNAPSHOT_FILE).write_text(s.to_json())
    (path / "study.yaml").write_text(yaml.safe_dump(study_to_dict(study), sort_keys=False))


def tree(path: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(path)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip


def test_status_reads_a_study_without_writing_anything(tmp_path: Path, capsys) -> None:
    study = parse_study(GRID_STUDY)
    write_study_dir(tmp_path, study, snap([member(0.1, 0.3, 0, "done", "grokking")]))
    before = tree(tmp_path)
    assert cli.main(["status", str(tmp_path)]) == 0
    assert "study 'watched'" in capsys.readouterr().out
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["progress.json", "study.yaml"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status"], "give a study directory (or Tune experiment), or --experiment NAME"),
        (["status", "{tmp}", "--experiment", "x"], "not both"),
        (["status", "{tmp}"], "holds no progress.json"),
        (["status", "--experiment", "x"], "--experiment needs --tracking-uri"),
        (["status", "{tmp}", "--watch", "0"], "expected seconds"),
        (["status", "{tmp}/corrupt"], "not a grokstudy progress snapshot"),
    ],
)
def test_status_refuses_bad_input_in_one_line(tmp_path: Path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / snapshot.SNAPSHOT_FILE).write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---- the live bar and lines ------------------------------------------------------------------------


def test_off_a_terminal_progress_is_a_timestamped_line_at_most_every_30_s(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    view = console.ProgressView(out, tty=False)
    for done in range(5):  # five changes within 30 s: one line
        view(progress.Progress(10, done, 2, 0, Counter(grokking=done), elapsed_s=done))
        now[0] += 5
    now[0] += 30
    view(progress.Progress(10, 6, 2, 0, Counter(grokking=6), elapsed_s=61, eta_s=42))
    view(progress.Progress(10, 10, 0, 0, Counter(grokking=10), elapsed_s=70))  # the last line always shows
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[1].endswith(
        "trials 6/10 | 6 done, 2 running, 0 failed, 2 pending | grokking 6 | elapsed 1m01s, ETA 42s"
    )
    assert all(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in lines)


def test_on_a_terminal_progress_is_one_bar_redrawn_in_place(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the bar is cut to the terminal's width
    out = io.StringIO()
    view = console.ProgressView(out, tty=True)
    view(progress.Progress(40, 10, 2, 1, Counter(grokking=6, memorization=4), elapsed_s=65, eta_s=195))
    view(progress.Progress(40, 11, 2, 1, Counter(grokking=7, memorization=4), elapsed_s=70, eta_s=180,
                           warning="MLflow unreachable"))  # fmt: skip
    view.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and "\n" not in text.split("\r")[1]  # the second bar overdraws the first
    bar = text.split("\r")[1]
    assert "11/40" in bar and "01:05<03:15" in bar and "10 done, 2 running, 1 failed, 27 pending" in bar
    assert "  warning: MLflow unreachable\n" in text and text.endswith("\n")
    assert console.duration(59) == "59s" and console.duration(3725) == "1h02m"


# ---- tables and figures while trials run -----------------------------------------------------------


def record(step: int, val_acc: float) -> EvalRecord:
    return EvalRecord(step, 1 / (1 + step), min(1.0, step / 100), 2.0, val_acc, 10.0, elapsed_s=step / 100)


def test_a_running_trial_is_a_row_without_a_phase_and_a_cell_drawn_as_running() -> None:
    study = parse_study(GRID_STUDY | {"search": GRID_STUDY["search"] | {"seeds": 1}})
    histories = []
    for i, (wd, frac) in enumerate([(0.1, 0.3), (0.1, 0.5), (1.0, 0.3)]):
        point = {"optimizer.weight_decay": wd, "data.fraction": frac, "train.seed": 0}
        curve = tuple(record(s, 1.0 if s >= 100 else 0.0) for s in range(0, 401, 50))
        done = Outcome("comprehension", 100, 100, None, 100.0, "generalized")
        running = i == 1
        histories.append(TrialHistory(f"t{i}", point, study.trial(point), curve[:3] if running else curve,
                                      None if running else done, running=running))  # fmt: skip
    trials, _ = results.build_tables(study, histories)
    rows = {r["trial_id"]: r for r in trials.to_pylist()}
    assert rows["t1"]["status"] == "RUNNING" and rows["t1"]["phase"] is None and rows["t1"]["t_val"] is None
    assert rows["t1"]["stop_reason"] is None and rows["t1"]["steps"] == 100
    assert rows["t0"]["phase"] == "comprehension" and rows["t0"]["status"] == "TERMINATED"
    cells = {
        (r["optimizer.weight_decay"], r["data.fraction"]): r
        for r in results.build_cells(study, trials).to_pylist()
    }
    assert cells[(0.1, 0.5)]["phase"] is None and not cells[(0.1, 0.5)]["measured"]
    fig = figures.phase_diagram(trials, "data.fraction", "optimizer.weight_decay")
    running = [p for p in fig.axes[0].patches if p.get_gid() == "running"]
    assert len(running) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert figures.RUNNING_LABEL in labels and not any(label.startswith("grokking") for label in labels)
    assert "running" in [t.get_text() for t in fig.axes[0].texts]


def test_the_summary_sorts_numerically_and_folds_seeds_of_big_studies(capsys) -> None:
    rows = [
        {"trial_id": f"{wd}-{s}", "point_id": str(wd), "searched": ["optimizer.weight_decay"], "optimizer.weight_decay": wd,
         "train.seed": s, "phase": "grokking" if s else "memorization", "t_train": 100 + s, "t_val": 900 if s else None,
         "stop_reason": "budget", "status": "TERMINATED"}
        for wd in (10.0, 0.3, 2.0, 0.05) for s in range(3)
    ]  # fmt: skip
    rows.sort(key=cli._numeric_order)
    assert [r["optimizer.weight_decay"] for r in rows[::3]] == [0.05, 0.3, 2.0, 10.0]
    cli._print_points(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["wd=0.05", "grokking", "2/3", "101", "900", "0"]
    assert len(out) == 2 + 4


def test_a_gpu_is_sampled_under_mlflows_system_metric_names(monkeypatch) -> None:
    """No GPU here: torch's CUDA counters are stood in for, to check names and units (the real
    counters are not exercised by this suite)."""
    import torch

    from grokstudy import gpu

    assert gpu.sample() == {} or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 512 * gpu.MB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 1024 * gpu.MB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (3 * 1024 * gpu.MB, 4 * 1024 * gpu.MB))

    def no_nvml(i):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert gpu.sample() == {
        "system/gpu_0_memory_allocated_megabytes": 512.0,
        "system/gpu_0_max_memory_allocated_megabytes": 1024.0,
        "system/gpu_0_memory_usage_megabytes": 1024.0,
        "system/gpu_0_memory_usage_percentage": 25.0,
    }
    monkeypatch.setattr(torch.cuda, "utilization", lambda i: 87)
    assert gpu.sample()["system/gpu_0_utilization_percentage"] == 87.0
