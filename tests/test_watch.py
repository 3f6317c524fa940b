"""A real study watched as a user would: `grokstudy run` on a terminal (a pty), `grokstudy status`
and the partial tables while it runs, the driver killed half-way, status of the killed study,
the resume off a terminal, and the study read back from MLflow."""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import drivers
import pyarrow.parquet as pq
import pytest

from grokstudy import status

# The resume tests' study, trained longer (a few seconds a trial on one core), with results
# rewritten after every finished trial.
STUDY = (
    drivers.STUDY.replace("name: resume", "name: watch")
    .replace(
        "train: {max_steps: 1500, eval_every: 50, checkpoint_every: 100}",
        "train: {max_steps: 6000, eval_every: 50, checkpoint_every: 100}",
    )
    .replace("phases: {confirm_steps: 100}", "phases: {confirm_steps: 6000}\nrun: {results_every: 1}")
)

CHATTER = (
    "Started a local Ray instance",
    "Wrote the latest version",
    "mlflow.store.db.utils",
    "authentication_token",
)


def tree(path: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(path)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()}  # fmt: skip


class Terminal:
    """A command on a pseudo-terminal, its output collected as it comes."""

    def __init__(self, cmd: list[str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "150"})  # fmt: skip
        os.close(slave)
        self.master, self.chunks = master, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def partial_rows(out: Path) -> list[dict]:
    try:
        return pq.read_table(out / "trials.parquet").to_pylist()
    except (OSError, ValueError):  # not written yet
        return []


@pytest.mark.integration
def test_a_study_is_watched_while_it_runs_and_after_its_driver_was_killed(tmp_path: Path) -> None:
    study = drivers.write_study(tmp_path, STUDY)
    out = tmp_path / "out"
    cmd = drivers.command(study, out)
    term = Terminal(cmd)
    try:
        # Results while it runs: a trial still training is a RUNNING row without a phase.
        drivers.wait_for(  # tables are written before figures: wait for both
            lambda: {r["status"] for r in partial_rows(out)} >= {"RUNNING", "TERMINATED"}
            and (out / "figures" / "phase_diagram.png").exists(),
            term.proc, what="a table with finished and running trials, and its figures",
        )  # fmt: skip
        # The driver is paused while its study is read as running: otherwise its last trials may
        # end, and the study with them, before `grokstudy status` has even started. Stopped, its
        # process is alive and its snapshot stays as it was; the workers train on meanwhile.
        os.kill(term.proc.pid, signal.SIGSTOP)
        rows = partial_rows(out)
        assert all(r["phase"] is None and r["t_val"] is None for r in rows if r["status"] == "RUNNING")
        assert all(r["phase"] for r in rows if r["status"] == "TERMINATED")
        assert (out / "figures" / "phase_diagram.png").stat().st_size > 0

        live = status.read_directory(str(out))
        assert live.alive is True and live.snapshot.count("running") >= 1 and live.snapshot.count("done") >= 1
        shown = subprocess.run([sys.executable, "-m", "grokstudy", "status", str(out)], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0 and "running (pid" in shown.stdout and "~" in shown.stdout, shown.stderr
    finally:
        drivers.kill(term.proc)  # SIGKILL ends a stopped process too
    term.reader.join(10)

    # Killed half-way: status says so, from what the driver wrote, and changes nothing.
    killed = status.read_directory(str(out))
    done_at_kill = {m.trial_id: m.phase for m in killed.snapshot.members if m.status == "done"}
    assert killed.alive is False and 1 <= len(done_at_kill) < 4
    before = tree(out)
    shown = subprocess.run([sys.executable, "-m", "grokstudy", "status", str(out)], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0 and "stopped:" in shown.stdout, shown.stdout + shown.stderr
    assert tree(out) == before

    # On a terminal the progress was one bar redrawn in place; no library chatter there.
    tty = term.text
    assert "\r" in tty and "trials" in tty and "pending" in tty, tty[-2000:]
    assert not any(c in tty for c in CHATTER), tty[-3000:]

    # Resumed off a terminal: timestamped lines, the chatter in driver.log, one line saying where.
    resumed = drivers.finish(cmd)
    drivers.assert_clean(resumed)
    console = resumed.stdout + resumed.stderr
    assert not any(c in console for c in CHATTER), console[-3000:]
    assert "log to driver.log" in resumed.stdout
    progress_lines = [line for line in resumed.stdout.splitlines() if " trials " in line and "done" in line]
    assert progress_lines and all(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in progress_lines)
    assert "Started a local Ray instance" in (out / "driver.log").read_text()
    assert "wall-clock:" in resumed.stdout

    final = status.read_directory(str(out))
    assert final.snapshot.driver["state"] == "finished" and final.snapshot.count("done") == 4
    phases = {m.trial_id: m.phase for m in final.snapshot.members}
    assert {t: phases[t] for t in done_at_kill} == done_at_kill  # what status counted, later finished so
    table = {r["trial_id"]: r["phase"] for r in pq.read_table(out / "trials.parquet").to_pylist()}
    assert table == phases and all(r["status"] == "TERMINATED" for r in partial_rows(out))

    # The same study through MLflow: the same counts and phases.
    through_mlflow = status.read_mlflow(f"sqlite:///{out / 'mlflow.db'}", "watch")
    assert {m.trial_id: m.phase for m in through_mlflow.snapshot.members} == phases
    assert status.render(through_mlflow).splitlines()[1] == status.render(final).splitlines()[1]
