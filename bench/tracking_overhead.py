"""What MLflow tracking costs a trial: the same reference trial with and without it.

The reference trial is the quickstart study's base trial ((x + y) mod 47, MLP
64/256, full batch, an eval every 50), cut to 1000 steps: many short pairs
cancel a shared machine's drifting load better than a few long ones.
"Tracked" runs it as the runner does: a `tracking.Sender` with the trial's
nested child run on a local `mlflow server` (started here on 127.0.0.1, sqlite
store), the curve synced after every record, `finish` and `close` at the end
(with --flush-at-checkpoints also a bounded `flush` at every checkpoint step,
as the runner does before it saves one); "untracked" tracks nothing. Repetitions alternate the two (and
which goes first), so load from other processes hits both alike.

    .venv/bin/python bench/tracking_overhead.py [--reps 15] [--steps 1000] [--eval-every 50] [--flush-at-checkpoints]

Target: tracked / untracked wall time <= 1.05. The closing line is that ratio:
the median over repetitions of the ratio within each back-to-back pair; each
time covers opening the run to finishing it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    from grokstudy import tracking

    port = free_port()
    cmd = tracking.ui_command(f"sqlite:///{root / 'mlflow.db'}", port=port)
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, 9)
    raise SystemExit(f"mlflow server did not start; see {root / 'server.log'}")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by the processes of group `pgid` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(pgid: int, timeout_s: float = 60.0) -> None:
    """Wait until the process group uses under 5% of a core for a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = group_cpu_s(pgid)
        time.sleep(1.0)
        if group_cpu_s(pgid) - before < 0.05:
            return


def one_trial(cfg, where, name: str, flush_at_checkpoints: bool, server_pgid: int) -> dict[str, float]:
    """Seconds: wall (opening the tracker to finishing it), open, finish, in optimizer
    steps, CPU of this process (all threads) and CPU the tracking server spent meanwhile."""
    from grokstudy import train

    server_cpu = group_cpu_s(server_pgid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    from grokstudy import tracking
    from grokstudy.config import flatten

    sender = run = None
    if where is not None:
        sender = tracking.Sender(where)
        run = sender.open(name, name, flatten(cfg), {})
    t_open = time.perf_counter() - t0
    state = train.init_state(cfg)
    curve = []
    for record in train.run(cfg, state):
        curve.append(record)
        if run is not None:
            run.sync(curve)
            if flush_at_checkpoints and record.step % cfg.train.checkpoint_every == 0:
                sender.flush(10)
    t1 = time.perf_counter()
    if run is not None:
        run.finish("FINISHED")
        assert sender.close(60), sender.last_error
    end = time.perf_counter()
    last = curve[-1]
    return {
        "wall": end - t0,
        "open": t_open,
        "finish": end - t1,
        "train": last.elapsed_s,
        "server_cpu": group_cpu_s(server_pgid) - server_cpu,
        "cpu": time.process_time() - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--flush-at-checkpoints",
        action="store_true",
        help="flush synchronously at every checkpoint step (step 0 included) instead of keeping records in it",
    )
    args = parser.parse_args()

    import torch

    from grokstudy import tracking, train
    from grokstudy.config import with_overrides
    from grokstudy.study import load_study

    torch.set_num_threads(1)
    train.configure_process()
    # As in the tests: no usage telemetry from this client or the server it starts
    # (on a machine without a network its retries would be measured too).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    study = load_study(QUICKSTART)
    cfg = with_overrides(study.base, {"train.max_steps": args.steps, "train.eval_every": args.eval_every})
    root = Path(tempfile.mkdtemp(prefix="grokstudy-bench-tracking-"))
    proc, uri = start_server(root)
    try:
        driver = tracking.StudyTracker(uri)
        experiment_id, parent_run_id = driver.open("bench-tracking", QUICKSTART.read_text(), {}, {})
        where = tracking.Where(uri, experiment_id, parent_run_id)
        modes = {"untracked": None, "tracked": where}
        flush = args.flush_at_checkpoints
        one_trial(cfg, None, "warm-up", flush, proc.pid)  # warm-up: imports, allocator, server
        one_trial(cfg, where, "warm-up", flush, proc.pid)
        wait_idle(proc.pid)  # the server finishes lazy start-up work after its first requests
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        n_records = len(train.eval_steps(cfg.train))
        print(
            f"reference trial: quickstart base, {args.steps} steps, {n_records} eval records, 1 torch thread,"
            f" {'a flush at every checkpoint' if flush else 'no flush before finish'}"
        )
        for rep in range(args.reps):
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for mode in order:
                t = one_trial(cfg, modes[mode], f"rep{rep}", flush, proc.pid)
                runs[mode].append(t)
                print(
                    f"  rep {rep} {mode:>9}: {t['wall']:6.2f} s wall, {t['train']:5.2f} s in optimizer steps,"
                    f" open {1000 * t['open']:3.0f} ms, finish {1000 * t['finish']:3.0f} ms,"
                    f" CPU {t['cpu']:5.2f} s + server {t['server_cpu']:4.2f} s"
                )
        driver.finish("FINISHED")
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    # Load from other processes drifts over minutes; a ratio within each
    # back-to-back pair cancels most of it, the median drops the outliers.
    pairs = [t["wall"] / u["wall"] for t, u in zip(runs["tracked"], runs["untracked"], strict=True)]
    outside = {m: statistics.median(r["wall"] - r["train"] for r in runs[m]) for m in modes}
    wall = {m: statistics.median(r["wall"] for r in runs[m]) for m in modes}
    print(f"median wall: untracked {wall['untracked']:.2f} s, tracked {wall['tracked']:.2f} s")
    print(
        f"median time outside optimizer steps (init, eval, tracking): untracked {outside['untracked']:.3f} s,"
        f" tracked {outside['tracked']:.3f} s"
    )
    # CPU seconds (trial process, sender thread included, plus the server) are far
    # less sensitive to other load than wall time: what tracking costs when cores are full.
    cpu = [
        (t["cpu"] + t["server_cpu"]) / (u["cpu"] + u["server_cpu"])
        for t, u in zip(runs["tracked"], runs["untracked"], strict=True)
    ]
    print("per-pair CPU ratios (trial process + server): " + ", ".join(f"{r:.3f}" for r in cpu))
    print(f"tracked/untracked CPU (median of per-pair ratios): {statistics.median(cpu):.3f}")
    print("per-pair wall ratios: " + ", ".join(f"{r:.3f}" for r in pairs))
    print(
        f"tracked/untracked wall time (median of per-pair ratios): {statistics.median(pairs):.3f}  (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
