"""Every place a command writes is checked before anything is written, and no write follows a
planted symlink: bad places are one line and exit 2, and leave every file as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from servers import free_port

from grokstudy import cli, results
from grokstudy.cli import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "studies" / "smoke.yaml"


def _snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under `root`: a link's target, a file's bytes, a directory."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = ("file", p.read_bytes())
        else:
            out[str(p)] = ("dir", "")
    return out


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `grokstudy ARGS` (in this process) refuses with, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    [line] = err.splitlines()
    return line


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot write (root ignores modes: a read-only kernel tree)."""
    if os.geteuid() == 0:
        return Path("/proc/sys")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    results.write_tables(*_tables(), study_dir)
    bad_store = tmp_path / "bad-store"
    bad_store.mkdir()
    (bad_store / "mlflow.db").write_text("not a database\n")
    return {"file": a_file, "study": study_dir, "bad_store": bad_store, "unwritable": _unwritable(tmp_path)}


def _tables() -> tuple[pa.Table, pa.Table]:
    trials = pa.table({"trial_id": pa.array([], pa.string())})
    curves = pa.table({"trial_id": pa.array([], pa.string())})
    return trials, curves


CASES = [
    # (command line, what the one line must name); {file} etc. are filled from `places`
    (["run", str(SMOKE), "--out", "{file}"], "--out: {file} is a file"),
    (["run", str(SMOKE), "--out", "/dev/null"], "--out: /dev/null is a file"),
    (["run", str(SMOKE), "--out", "{unwritable}/out"], "--out: {unwritable}/out cannot be written"),
    (["run", str(SMOKE), "--out", "{file}/out"], "is a file; give a directory"),
    (["run", str(SMOKE), "--out", ""], "argument --out: empty"),
    (["run", str(SMOKE), "--set", "run.storage=ftp://host/x"], "run.storage: unsupported scheme ftp://"),
    (["run", str(SMOKE), "--set", "run.storage={file}/ray"], "run.storage: {file}/ray cannot be created"),
    (["validate", str(SMOKE), "--set", "run.storage=ftp://host/x"], "run.storage: unsupported scheme"),
    (["plot", "{study}", "--out", "{file}"], "--out: {file} is a file"),
    (["plot", "{study}", "--out", ""], "argument --out: empty"),
    (["export", "{study}", "--out", "{file}"], "--out: {file} is a file"),
    (["export", "{study}", "--out", "{unwritable}/tables"], "cannot be written"),
    (["ui", "{bad_store}", "--port", "99999"], "argument --port: expected a port"),
    (["ui", "{bad_store}"], "is not a readable MLflow store"),
]


@pytest.mark.parametrize(("args", "says"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_place_that_cannot_be_used_is_one_line_exit_2_and_nothing_is_written(
    tmp_path: Path, places: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], says: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a default --out (runs/<name>) would land here
    before = _snapshot(tmp_path)
    line = _refused(capsys, *(a.format(**places) for a in args))
    assert says.format(**places) in line
    assert _snapshot(tmp_path) == before


def test_mlflow_unreachable_at_start_is_one_line_before_ray_starts_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    out = tmp_path / "out"
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    line = _refused(capsys, "run", str(SMOKE), "--out", str(out), "--tracking-uri", uri)
    assert line.startswith("grokstudy run: error: run.tracking_uri: cannot reach MLflow at http://user:***@")
    assert "secret" not in line
    assert not ray.is_initialized() and not out.exists()


def test_a_corrupt_study_state_is_refused_before_the_study_is_written_to_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, storage_dir = tmp_path / "out", tmp_path / "storage"
    out.mkdir()
    (out / "study-state.json").write_text("{torn")
    before = _snapshot(tmp_path)
    line = _refused(capsys, "run", str(SMOKE), "--out", str(out), "--set", f"run.storage={storage_dir}")
    assert "study-state.json is corrupt" in line
    assert _snapshot(tmp_path) == before and not storage_dir.exists()


def test_a_planted_lock_symlink_is_refused_and_its_target_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".grokstudy.lock").symlink_to(victim)
    line = _refused(capsys, "run", str(SMOKE), "--out", str(out), "--tracking-uri", f"sqlite:///{out}/m.db")
    assert "is a symlink, which grokstudy never follows" in line
    assert victim.read_text() == "precious\n"


def test_a_crash_log_replaces_a_planted_symlink_and_a_crash_handler_never_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from grokstudy import runner

    def crash(*args, **kwargs):
        raise RuntimeError("boom at http://bob:hunter2@mlflow.example:5000")

    monkeypatch.setattr(runner, "run_study", crash)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "crash.log").symlink_to(victim)
    assert main(["run", str(SMOKE), "--out", str(out)]) == cli.EXIT_CRASHED
    err = capsys.readouterr().err
    assert f"traceback in {out / 'crash.log'}" in err and "hunter2" not in err
    assert victim.read_text() == "precious\n"
    log = out / "crash.log"
    assert (
        not log.is_symlink() and "RuntimeError: boom" in log.read_text() and "hunter2" not in log.read_text()
    )

    log.unlink()
    log.mkdir()  # crash.log cannot be written now: the traceback goes to stderr instead
    assert main(["run", str(SMOKE), "--out", str(out)]) == cli.EXIT_CRASHED
    err = capsys.readouterr().err
    assert "crash.log could not be written" in err and "RuntimeError: boom" in err


def test_tables_replace_planted_symlinks_and_never_write_through_them(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in (results.TRIALS_FILE, f".{results.TRIALS_FILE}.tmp", f".{results.CURVES_FILE}.tmp"):
        (out / name).symlink_to(victim)
    trials_path, _ = results.write_tables(*_tables(), out)
    assert victim.read_text() == "precious\n"
    assert not trials_path.is_symlink() and pq.read_table(trials_path).num_rows == 0


def test_a_lost_lease_exits_4_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from grokstudy import runner, storage

    def taken(*args, **kwargs):
        raise storage.LeaseLost(
            "this driver lost its lease on s3://b/x: another driver holds it now (pid 7 on h)"
        )

    monkeypatch.setattr(runner, "run_study", taken)
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "out")]) == cli.EXIT_LEASE_LOST == 4
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("grokstudy run: stopped: this driver lost its lease") and "nothing more" in line
