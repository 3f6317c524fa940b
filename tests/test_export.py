"""`grokstudy export`: a finished study brought home from MLflow (a real server on 127.0.0.1) or
from its Ray Tune experiment (a directory or a file:// URI), into a directory that `load`, `plot`,
`report` and `status` read like the study's own output, its models loading offline; and the bad
inputs, each one line and exit 2 with nothing written."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import drivers
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import servers
import torch

import grokstudy
from grokstudy import storage
from grokstudy.cli import main

pytestmark = pytest.mark.integration

NAME = "export-test"
FILES = ("study.yaml", "trials.parquet", "curves.parquet", "cells.parquet", "report.html", "progress.json")


@dataclass(frozen=True)
class Ran:
    out: Path
    """The study's own output directory, as `grokstudy run` left it."""
    tracking_uri: str
    artifacts: Path
    """The MLflow server's artifact store."""

    @property
    def experiment(self) -> Path:
        return self.out / "ray" / NAME


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    """A 4-trial study of 300 steps run with its embedded Ray, tracked to a server of its own (the
    tests below delete one of its artifacts)."""
    root = tmp_path_factory.mktemp("export")
    study = drivers.write_study(
        root, **{"name: resume": f"name: {NAME}", "max_steps: 1500": "max_steps: 300"}
    )
    with servers.mlflow_server(root / "mlflow") as server:
        out = root / "ran"
        drivers.assert_clean(drivers.finish(drivers.command(study, out, "--tracking-uri", server.uri)))
        yield Ran(out, server.uri, root / "mlflow" / "mlartifacts")


def _trials(out: Path) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(out / "trials.parquet").to_pylist()}


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_export_from_mlflow_writes_a_study_directory_whose_models_load_offline(
    ran: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "home"
    assert main(["export", "--experiment", NAME, "--tracking-uri", ran.tracking_uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kinds = [line.split(":", 1)[0] for line in printed.splitlines()[1:]]
    assert kinds == ["study file", "trials table", "curves table", "cells table", "figures", "report",
                     "progress", "weights"]  # fmt: skip
    assert "4 trials' final weights" in printed
    assert all((out / f).is_file() for f in FILES)
    assert {p.name for p in (out / "figures").iterdir()} >= {"phase_diagram.png", "phase_diagram.pdf"}

    own, home = _trials(ran.out), _trials(out)
    assert home.keys() == own.keys()
    for tid, row in own.items():
        keep = ("phase", "t_train", "t_val", "run_id", "steps", "final_val_acc", "data.fraction")
        assert {k: home[tid][k] for k in keep} == {k: row[k] for k in keep}, tid
        assert home[tid]["weights_uri"] == str(out / "weights" / f"{tid}.pt")
    assert (out / "study.yaml").read_text() == (ran.out / "study.yaml").read_text()

    # Offline: no tracking URI anywhere, and the server could be gone.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exported = grokstudy.load(out)
    tid = next(iter(own))
    model = exported.model(tid)
    assert _same_model(model, grokstudy.load(ran.out).model(tid))
    with torch.no_grad():
        acc = (model(model.data.val_x).argmax(-1) == model.data.val_y).double().mean().item()
    assert acc == pytest.approx(own[tid]["final_val_acc"])

    # The other readers take it as a study's own output.
    assert main(["status", str(out)]) == 0
    assert "finished" in capsys.readouterr().out.splitlines()[0]
    assert main(["report", str(out)]) == 0
    assert main(["plot", str(out), "--format", "png"]) == 0


def test_a_weights_file_that_cannot_be_fetched_is_named_and_its_trial_keeps_its_mlflow_uri(
    ran: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = sorted(_trials(ran.out))[0]
    [artifact] = ran.artifacts.rglob(f"weights/{victim}.pt")
    aside = tmp_path / "aside.pt"
    artifact.rename(aside)
    out = tmp_path / "home"
    args = ["export", NAME, "--tracking-uri", ran.tracking_uri, "--out", str(out), "--format", "png"]
    try:
        assert main(args) == 0
    finally:
        aside.rename(artifact)
    captured = capsys.readouterr()
    assert re.search(r"^weights: +3 trials' final weights, \d+ kB, in ", captured.out, re.M)
    assert re.search(
        r"^weights: +1 trial's final weights, about \d+ kB, could not be copied$", captured.out, re.M
    )
    [warning] = captured.err.strip().splitlines()
    assert (
        warning.startswith("grokstudy export: warning: 1 trial's weights could not be copied")
        and victim in warning
    )
    rows = _trials(out)
    assert rows[victim]["weights_uri"].startswith("runs:/")
    assert not (out / "weights" / f"{victim}.pt").exists()
    assert all(Path(r["weights_uri"]).is_file() for tid, r in rows.items() if tid != victim)


def test_export_from_a_tune_experiment_uri_without_weights_then_refreshed_with_them(
    ran: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "home"
    uri = ran.experiment.as_uri()  # file:///...: what s3:// and gs:// go through too (pyarrow.fs)
    assert main(["export", uri, "--out", str(out), "--no-weights", "--format", "png"]) == 0
    printed = capsys.readouterr().out
    # About 20 kB a trial (its MLP's float32 parameters and a few kB), estimated without a download.
    assert re.search(
        r"4 trials' final weights, about (7[5-9]|8[0-5]) kB, left at the source \(--no-weights\)", printed
    )
    assert not (out / "weights").exists()
    own = _trials(ran.out)
    assert {t: r["weights_uri"] for t, r in _trials(out).items()} == {
        t: r["weights_uri"] for t, r in own.items()
    }
    assert all((out / f).is_file() for f in FILES)
    # The driver's own progress snapshot, from beside the Tune experiment.
    assert (out / "progress.json").read_text() == (ran.experiment / "grokstudy-progress.json").read_text()

    # The same study again, into the same directory: every file replaced whole (a new inode),
    # the weights brought home this time.
    before = {f: (out / f).stat().st_ino for f in FILES}
    assert main(["export", uri, "--out", str(out), "--format", "png"]) == 0
    assert re.search(r"4 trials' final weights, \d+ kB, in ", capsys.readouterr().out)
    assert all((out / f).stat().st_ino != ino for f, ino in before.items())
    assert not list(out.rglob(".*.tmp"))
    assert all(r["weights_uri"] == str(out / "weights" / f"{t}.pt") for t, r in _trials(out).items())

    # A URI is a source for the readers too (api.load_tables).
    assert set(grokstudy.load(uri).trials["trial_id"]) == set(own)


@pytest.fixture
def other_study(tmp_path: Path) -> Path:
    """An --out holding another study's trials table."""
    out = tmp_path / "other"
    out.mkdir()
    pq.write_table(pa.table({"study": ["someone-else"], "trial_id": ["x-s0"], "phase": ["grokking"]}),
                   out / "trials.parquet")  # fmt: skip
    return out


BAD = [
    # (arguments, the flag the one line names, what it says); {uri}, {exp}, {dir}, {out} filled in
    (["export", "--out", "{out}"], "SOURCE", "give SOURCE"),
    (["export", "{exp}", "--experiment", NAME, "--tracking-uri", "{uri}", "--out", "{out}"], "SOURCE", "not both"),
    (["export", "--experiment", "no-such-study", "--tracking-uri", "{uri}", "--out", "{out}"],
     "--experiment", "no MLflow experiment 'no-such-study'"),
    (["export", "no-such-study", "--tracking-uri", "{uri}", "--out", "{out}"], "SOURCE", "no MLflow experiment"),
    (["export", "--experiment", NAME, "--out", "{out}"], "--tracking-uri", "needs --tracking-uri"),
    (["export", "--experiment", NAME, "--tracking-uri", "sqlite:///{out}/none.db", "--out", "{out}"],
     "--tracking-uri", "no MLflow store"),
    (["export", "ftp://host/grokstudy/ray/x", "--out", "{out}"], "SOURCE", "a URI SOURCE is a Ray Tune experiment"),
    (["export", "file://{dir}/ray/nothing", "--out", "{out}"], "SOURCE", "holds no grokstudy-study.yaml"),
    (["export", "{dir}", "--out", "{out}"], "SOURCE", "is a study's output directory"),
    (["export", "{exp}", "--out", "{other}"], "--out", "holds the trials of study 'someone-else', not"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "flag", "says"), BAD, ids=[f"{f} {s}"[:50] for _, f, s in BAD])
def test_bad_input_is_one_line_naming_the_flag_exit_2_and_nothing_written(
    ran: Ran, tmp_path: Path, other_study: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], flag: str, says: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "home"
    where = {"uri": ran.tracking_uri, "exp": ran.experiment, "dir": ran.out, "out": out, "other": other_study}
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main([a.format(**where) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith(f"grokstudy export: error: {flag}: ") and says in line, line
    assert sorted(p for p in tmp_path.rglob("*")) == before and not out.exists()


def test_an_out_in_use_by_a_running_study_is_refused(ran: Ran, tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    shutil.copytree(ran.out, out, ignore=shutil.ignore_patterns("ray", "mlartifacts", "*.db"))
    with storage.OutputLock(out), pytest.raises(SystemExit) as exc:  # as a driver holds it
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        main(["export", str(ran.experiment), "--out", str(out), "--no-weights"])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("grokstudy export: error: --out: ") and "in use by another grokstudy run" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
