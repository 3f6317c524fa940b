"""Kill-anywhere soak: SIGKILL the driver of a small study at N seeded random moments, resume
each time, and check the end state (issue 9). Not a test: it takes minutes.

    .venv/bin/python bench/soak_resume.py                 # N = 12 kill points, seed 0
    .venv/bin/python bench/soak_resume.py --kills 20 --seed 3

First one uninterrupted run measures how long the study takes (T). Then, for each kill point,
a fresh copy of the study starts and is killed at a moment drawn uniformly from [0, 1.1 T]
(start-up, mid-trial, between a trial's last report and Tune's snapshot, table writing: the
draws cover all of them, and the phase each kill hit is printed); a quarter of the kill points
also kill the first resume at a second random moment. Then the study is resumed to the end and
its end state checked (tests/endstate.py): every point x seed once in trials.parquet, once as
COMPLETE in optuna.db, one MLflow run each with every eval step exactly once; exit 0 and no
traceback. The last line is "K of N kill points survived".
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import drivers  # noqa: E402
from endstate import problems  # noqa: E402

from grokstudy.study import load_study  # noqa: E402

# The resume tests' study (tests/drivers.py), a little shorter and with a third fraction, so
# that six trials on two cores leave room for kills between them.
STUDY = (
    drivers.STUDY.replace("name: resume", "name: soak")
    .replace("max_steps: 1500", "max_steps: 1200")
    .replace("values: [0.3, 0.8]", "values: [0.3, 0.5, 0.8]")
)


def command(study: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "grokstudy", "run", str(study), "--out", str(out), "--num-cpus", "2"]


def phase_of(out: Path) -> str:
    """Where the study stood when it was killed, read off its output directory."""
    if (out / "trials.parquet").exists():
        return "finished"
    if list(out.glob("figures/*")):
        return "writing tables and figures"
    experiment = out / "ray" / "soak"
    if not list(experiment.glob("experiment_state-*.json")):
        return "start-up (before Tune's first snapshot)"
    if list(experiment.glob("trial_*/checkpoint_*")):
        return "mid-study (trials checkpointed)"
    return "start-up (first trials)"


def kill_at(cmd: list[str], seconds: float, log: Path) -> str:
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    phase = phase_of(Path(cmd[cmd.index("--out") + 1]))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="grokstudy-soak-"))
    study_file = root / "soak.yaml"
    study_file.write_text(STUDY)
    study = load_study(study_file)

    start = time.monotonic()
    baseline = subprocess.run(command(study_file, root / "baseline"), capture_output=True, text=True)
    duration = time.monotonic() - start
    assert baseline.returncode == 0, baseline.stdout[-2000:] + baseline.stderr[-2000:]
    print(f"uninterrupted study: {duration:.1f} s; killing at U(0, {1.1 * duration:.1f}) s", flush=True)

    survived = 0
    for k in range(args.kills):
        out = root / f"kill-{k}"
        log = root / f"kill-{k}.log"
        cmd = command(study_file, out)
        moments = [rng.uniform(0, 1.1 * duration)]
        if rng.random() < 0.25:
            moments.append(rng.uniform(0, 1.1 * duration))
        hit = [kill_at(cmd, t, log) for t in moments]
        resumed = subprocess.run(cmd, capture_output=True, text=True)
        with log.open("a") as f:
            f.write(f"\n---- resumed (exit {resumed.returncode}) ----\n{resumed.stdout}{resumed.stderr}")
        found = []
        if resumed.returncode != 0:
            found.append(f"exit {resumed.returncode}: {resumed.stderr.strip().splitlines()[-1:]}")
        if "Traceback" in resumed.stdout + resumed.stderr:
            found.append("a traceback in the resumed run's output")
        if not found:
            found = problems(out, study)
        survived += not found
        when = ", ".join(f"{t:.1f} s ({h})" for t, h in zip(moments, hit, strict=True))
        print(
            f"kill point {k + 1:2d}: killed at {when}: {'ok' if not found else '; '.join(found)}", flush=True
        )
    print(f"outputs under {root}")
    print(f"{survived} of {args.kills} kill points survived")


if __name__ == "__main__":
    main()
