"""The command line: exit codes, one-line errors naming the dotted path, real trials."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from grokstudy.cli import main
from grokstudy.config import PHASE_RULES, PhaseConfig
from grokstudy.phases import classify_records
from grokstudy.records import from_dicts

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "studies" / "smoke.yaml"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "grokstudy", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


BAD_INPUT = [
    # (arguments, dotted path the error must name)
    (["train", "--set", "task.op=x/y", "--set", "task.p=48"], "task.p"),
    (["train", "--set", "data.fraction=1.5"], "data.fraction"),
    (["train", "--set", "data.fraction=0"], "data.fraction"),
    (["train", "--set", "task.op=x**y"], "task.op"),
    (["train", "--set", "model.kind=rnn"], "model.kind"),
    (["train", "--set", "optimizer.name=lion"], "optimizer.name"),
    (["train", "--set", "optimizer.weight_decy=0.1"], "optimizer.weight_decy"),
    (["train", "--set", "train.max_steps=lots"], "train.max_steps"),
    (["train", "--set", "nonsense"], "--set"),
    (["validate", "no/such/study.yaml"], "no/such/study.yaml"),
    (["plot", "runs/never-ran", "--format", "png"], "SOURCE"),
    (["plot", "runs/never-ran", "--rule", "liu"], "--rule"),
]


@pytest.mark.parametrize(("args", "path"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_gives_one_line_naming_the_key_and_exit_code_2(
    args: list[str], path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert path in err


def test_misspelt_key_in_a_study_file_suggests_the_right_one(tmp_path: Path) -> None:
    study = tmp_path / "typo.yaml"
    study.write_text(SMOKE.read_text().replace("weight_decay:", "weight_decy:", 1))
    result = run_cli("validate", str(study))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "weight_decy" in result.stderr and "did you mean" in result.stderr
    assert result.stdout == ""


def test_validate_prints_the_resolved_study_and_trial_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SMOKE)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "4 points x 1 seed = 4 trials"
    assert "  optimizer.weight_decay  2 log-spaced values: 0.1, 1" in out
    assert "  data.fraction           2 values: 0.4, 0.8" in out
    assert yaml.safe_load("\n".join(out[: out.index("")]))["name"] == "smoke"


def test_train_json_ends_with_one_json_object_of_the_result() -> None:
    result = run_cli(
        "train",
        "--set", "task.p=23",
        "--set", "model.embed_dim=16",
        "--set", "model.width=32",
        "--set", "train.max_steps=100",
        "--set", "train.eval_every=50",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"phase", "t_train", "t_val", "steps", "final_train_acc", "final_val_acc"} <= summary.keys()
    assert summary["steps"] == 100
    assert 0.0 <= summary["final_val_acc"] <= 1.0


def test_a_diverged_run_stops_and_its_json_is_strict() -> None:
    result = run_cli(
        "train",
        "--set", "task.p=23",
        "--set", "model.embed_dim=16",
        "--set", "model.width=32",
        "--set", "optimizer.name=sgd",
        "--set", "optimizer.lr=1000",
        "--set", "train.max_steps=2000",
        "--set", "train.eval_every=50",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert summary["phase"] == "diverged" and summary["final_train_loss"] is None
    assert summary["steps"] < 2000  # it stopped when its loss became non-finite


def test_help_of_every_subcommand_shows_examples() -> None:
    for command in ("run", "train", "plot"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert "examples:" in result.stdout
    top = run_cli("--help")
    assert all(c in top.stdout for c in ("run", "train", "validate", "plot", "export", "ui"))


@pytest.mark.integration
def test_run_of_the_smoke_study_prints_and_tracks_its_tables_and_figures_and_bad_input_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    result = run_cli("run", str(SMOKE), "--out", str(out), "--num-cpus", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout
    for name in ("trials.parquet", "curves.parquet", "phase_diagram.png", "phase_diagram.pdf"):
        [line] = [ln for ln in printed.splitlines() if ln.rstrip().endswith(name)]
        assert Path(line.split()[-1]).is_file(), line

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 1 + 4 and parent.info.status == "FINISHED"
    attached = {
        a.path for folder in ("results", "figures") for a in client.list_artifacts(parent.info.run_id, folder)
    }
    assert {
        "results/trials.parquet",
        "results/curves.parquet",
        "figures/phase_diagram.png",
        "figures/phase_diagram.pdf",
    } <= attached

    # `grokstudy export` rebuilds the runner's tables from MLflow and from Tune's experiment.
    import pyarrow.parquet as pq

    def by_trial(table) -> dict:
        return {r["trial_id"]: r for r in table.to_pylist()}

    ran = by_trial(pq.read_table(out / "trials.parquet"))
    ran_curves = {(r["trial_id"], r["step"]): r for r in pq.read_table(out / "curves.parquet").to_pylist()}
    assert len(ran) == 4 and all(r["run_id"] for r in ran.values())
    sources = {
        "mlflow": ["smoke", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"],
        "tune": [str(out / "ray" / "smoke")],
    }
    same = ("point_id", "run_id", "phase", "t_train", "t_val", "delay", "steps", "stop_reason", "status")
    same += ("optimizer.weight_decay", "data.fraction", "train.seed", "final_train_acc", "final_val_acc")
    for kind, source in sources.items():  # in this process: `main` is the same entry point
        assert main(["export", *source, "--out", str(tmp_path / kind)]) == 0
        rebuilt = by_trial(pq.read_table(tmp_path / kind / "trials.parquet"))
        assert rebuilt.keys() == ran.keys(), kind
        for trial_id, row in ran.items():
            assert {k: rebuilt[trial_id][k] for k in same} == {k: row[k] for k in same}, (kind, trial_id)
        curves = {
            (r["trial_id"], r["step"]): r
            for r in pq.read_table(tmp_path / kind / "curves.parquet").to_pylist()
        }
        assert curves.keys() == ran_curves.keys(), kind
        for key, row in ran_curves.items():
            assert curves[key]["val/acc"] == pytest.approx(row["val/acc"]), (kind, key)
            assert curves[key]["train/loss"] == pytest.approx(row["train/loss"]), (kind, key)

    # The same curves read by Liu et al.'s rule, drawn beside the study's own figures, which stay.
    own = {p: p.read_bytes() for p in (out / "figures").iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["plot", str(out), "--rule", "liu2022", "--format", "png"]) == 0
    printed = capsys.readouterr().out.splitlines()
    liu = PhaseConfig(**PHASE_RULES["liu2022"], rule="liu2022", confirm_steps=100)  # smoke.yaml's hold
    ran_curves_by_trial = defaultdict(list)
    for (trial_id, _), row in sorted(ran_curves.items()):
        ran_curves_by_trial[trial_id].append(row)
    relabelled = {
        t: classify_records(from_dicts(ran_curves_by_trial[t]), liu, row["max_steps"]).phase
        for t, row in ran.items()
    }
    n = sum(row["phase"] != relabelled[t] for t, row in ran.items())
    assert printed[0] == f"rule liu2022: {n} of 4 trials and {n} of 4 cells changed phase ({out})"
    for t, row in ran.items():  # one seed a cell: a trial's change is its cell's
        wd, fraction = row["optimizer.weight_decay"], row["data.fraction"]
        line = f"  optimizer.weight_decay={wd}, data.fraction={fraction}: {row['phase']} -> {relabelled[t]}"
        assert (line in printed) == (row["phase"] != relabelled[t])
    assert (out / "figures" / "rule-liu2022" / "phase_diagram.png").is_file()
    assert {p: p.read_bytes() for p in (out / "figures").iterdir() if p.is_file()} == own

    # A typo on the next run is one line and exit 2, before anything is touched.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    typo = run_cli("run", str(SMOKE), "--out", str(out), "--set", "optimizer.weight_decy=0.1")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1 and "optimizer.weight_decy" in typo.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert len(client.search_runs([experiment.experiment_id])) == 5


def test_train_refuses_a_trial_larger_than_the_machine_before_it_allocates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--set", "model.width=65536", "--set", "model.depth=64"])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("grokstudy train: error: model: this trial needs about") and "GiB" in line


OUT_OF_MEMORY = {
    "cuda": lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu-allocator": lambda: RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"
    ),
    "python": MemoryError,
}


@pytest.mark.parametrize("error", OUT_OF_MEMORY.values(), ids=OUT_OF_MEMORY.keys())
def test_train_out_of_memory_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, error
) -> None:
    from grokstudy import train

    def run_out(*args, **kwargs):
        raise error()

    monkeypatch.setattr(train, "init_state", run_out)
    assert main(["train", "--set", "train.max_steps=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("grokstudy train: error: out of memory")
