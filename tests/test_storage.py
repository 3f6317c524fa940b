"""The output lock and the storage lease: who may write a study's files (storage.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grokstudy import storage
from grokstudy.errors import UsageError


@pytest.fixture
def quick_lease(monkeypatch) -> None:
    """Lease timings a test can wait out: TTL 1.5 s, renewals every 0.2 s."""
    monkeypatch.setattr(storage, "LEASE_TTL_S", 1.5)
    monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.2)
    monkeypatch.setattr(storage, "LEASE_POLL_S", 0.05)


def _lease_file(experiment: Path, gen: int = 1, text: str | None = None, **fields) -> Path:
    path = experiment / f"{storage.LEASE_PREFIX}{gen:010d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields) if text is None else text)
    return path


def _leases(experiment: Path) -> list[str]:
    return sorted(p.name for p in experiment.glob(f"{storage.LEASE_PREFIX}*"))


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )


def test_a_live_driver_on_this_host_is_refused_at_once_in_one_line(tmp_path: Path) -> None:
    path = _lease_file(tmp_path, driver="other", host=socket.gethostname(), host_id=storage.host_id(),
                       pid=os.getpid(), seq=0)  # fmt: skip
    before = path.read_text()
    started = time.monotonic()
    with pytest.raises(UsageError) as refused, storage.Lease(str(tmp_path)):
        pass
    assert time.monotonic() - started < 1  # no watching: the process is alive here
    assert refused.value.flag == "run.storage" and "\n" not in str(refused.value)
    assert f"pid {os.getpid()}" in str(refused.value)
    assert _leases(tmp_path) == [path.name] and path.read_text() == before


def test_a_dead_driver_on_this_host_is_taken_over_at_once_and_released_on_exit(tmp_path: Path) -> None:
    _lease_file(tmp_path, driver="other", host=socket.gethostname(), host_id=storage.host_id(),
                pid=_dead_pid(), seq=3)  # fmt: skip
    started = time.monotonic()
    with storage.Lease(str(tmp_path)) as lease:
        assert time.monotonic() - started < 1
        assert lease.gen == 2 and _leases(tmp_path) == [f"{storage.LEASE_PREFIX}{2:010d}.json"]
    assert _leases(tmp_path) == []


@pytest.mark.parametrize("text", [None, "{not json", "[1, 2]"], ids=["elsewhere", "corrupt", "not-an-object"])
def test_a_lease_seen_unchanged_for_the_ttl_on_the_readers_clock_is_taken_over(
    tmp_path: Path, quick_lease: None, text: str | None
) -> None:
    _lease_file(tmp_path, text=text, driver="other", host="elsewhere", host_id="x", pid=1, seq=7)
    started = time.monotonic()
    with storage.Lease(str(tmp_path)) as lease:
        assert time.monotonic() - started >= storage.LEASE_TTL_S
        assert json.loads((tmp_path / _leases(tmp_path)[0]).read_text())["driver"] == lease.driver


class _Renewer:
    """Another driver's lease, renewed every 0.1 s by a thread, with the given fields."""

    def __init__(self, experiment: Path, **fields) -> None:
        self.path = _lease_file(experiment, **fields, seq=0)
        self.fields = fields
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        seq = 0
        while not self._stop.wait(0.1):
            seq += 1
            storage.write_atomic(self.path, json.dumps(self.fields | {"seq": seq}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize(
    "holder",
    [
        # Another container with this host name (Ray's Docker launcher): its process id means
        # nothing here, and this host's process with that id is dead.
        {"host_id": "another-boot:pid:[4026531836]", "pid_is_dead_here": True},
        # A host whose clock runs two minutes behind: its timestamps look lapsed, it is not.
        {"host_id": "elsewhere", "renewed_at_s_ago": 120},
    ],
    ids=["other-pid-namespace", "skewed-clock"],
)
def test_a_renewed_lease_is_refused_whatever_its_pid_or_clock_say(
    tmp_path: Path, quick_lease: None, holder: dict
) -> None:
    fields = {"driver": "other", "host": socket.gethostname(), "host_id": holder["host_id"],
              "pid": _dead_pid() if holder.get("pid_is_dead_here") else 1,
              "renewed_at": time.time() - holder.get("renewed_at_s_ago", 0)}  # fmt: skip
    renewer = _Renewer(tmp_path, **fields)
    try:
        with pytest.raises(UsageError, match="renewed its lease just now"), storage.Lease(str(tmp_path)):
            pass
    finally:
        renewer.close()
    assert _leases(tmp_path) == [renewer.path.name]


def test_a_lease_that_cannot_be_read_is_refused_not_taken(tmp_path: Path, monkeypatch) -> None:
    path = _lease_file(tmp_path, driver="other", host="elsewhere", host_id="x", pid=1, seq=0)
    monkeypatch.setattr(storage, "LEASE_POLL_S", 0.01)

    def flaky(uri: str) -> str | None:
        raise OSError("When reading information for key 'grokstudy-lease': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(storage, "read_text", flaky)
    with (
        pytest.raises(UsageError, match="cannot read the study's lease") as refused,
        storage.Lease(str(tmp_path)),
    ):
        pass
    assert "\n" not in str(refused.value) and "NETWORK_CONNECTION" in str(refused.value)
    assert _leases(tmp_path) == [path.name]


def _race(experiment: Path | str) -> tuple[list[storage.Lease], list[bool]]:
    """Two drivers creating generation 1 at the same moment: (drivers, which won)."""
    drivers = [storage.Lease(str(experiment)) for _ in range(2)]
    barrier = threading.Barrier(2)
    won = [False, False]

    def take(i: int) -> None:
        barrier.wait()
        won[i] = drivers[i]._create(1)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return drivers, won


def test_only_one_of_two_drivers_racing_for_a_generation_takes_it(tmp_path: Path) -> None:
    for attempt in range(20):
        experiment = tmp_path / str(attempt)
        experiment.mkdir()
        drivers, won = _race(experiment)
        assert sorted(won) == [False, True], attempt
        holder = json.loads((experiment / _leases(experiment)[0]).read_text())["driver"]
        assert holder == drivers[won.index(True)].driver


HOLDER = """
import os, sys, time
from grokstudy import storage
storage.LEASE_TTL_S, storage.LEASE_RENEW_S, storage.LEASE_POLL_S = 1.5, 0.2, 0.05
storage.host_id = lambda: "another-host"  # as if on another machine: its liveness is its renewals
def lost(why):
    print(why, flush=True)
    os._exit(4)
with storage.Lease(sys.argv[1], on_lost=lost):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_driver_paused_past_the_ttl_finds_its_lease_taken_and_stops_without_writing(
    tmp_path: Path, quick_lease: None
) -> None:
    """The fencing defect: a driver stopped (SIGSTOP, a long GC pause, a cut network) past the
    TTL comes back; it must not overwrite the new holder's lease, and must stop."""
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        os.kill(first.pid, signal.SIGSTOP)
        with storage.Lease(str(tmp_path)) as second:  # waits out the TTL of an unchanging lease
            ours = tmp_path / _leases(tmp_path)[-1]
            assert json.loads(ours.read_text())["driver"] == second.driver
            os.kill(first.pid, signal.SIGCONT)
            assert first.wait(timeout=30) == 4
            assert "another driver holds it now" in first.stdout.read()
            time.sleep(3 * storage.LEASE_RENEW_S)
            assert second.lost is None
            assert _leases(tmp_path) == [ours.name]
            assert json.loads(ours.read_text())["driver"] == second.driver
    finally:
        first.kill()
        first.wait()


def test_a_holder_that_cannot_renew_for_half_the_ttl_gives_the_lease_up(
    tmp_path: Path, quick_lease: None, monkeypatch
) -> None:
    lost: list[str] = []
    with storage.Lease(str(tmp_path), on_lost=lost.append) as lease:

        def down(uri: str) -> str | None:
            raise OSError("connection reset")

        monkeypatch.setattr(storage, "read_text", down)
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost and "could not be renewed" in lost[0] and lease.lost == lost[0]
        monkeypatch.undo()
    assert len(lost) == 1
    assert _leases(tmp_path) == [f"{storage.LEASE_PREFIX}{1:010d}.json"]  # a lost lease is left as it is


def test_a_second_driver_on_one_output_directory_is_refused_until_the_first_exits(tmp_path: Path) -> None:
    with storage.OutputLock(tmp_path):
        holder = "import sys; from grokstudy import storage; storage.OutputLock(sys.argv[1]).__enter__()"
        second = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True)
        assert second.returncode != 0 and "is in use by another grokstudy run" in second.stderr
    again = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr


# ---- S3: the lease by conditional put (a moto S3 server on loopback) --------------------------------

moto_server = pytest.importorskip(
    "moto.server", reason="moto is not installed (pip install 'moto[s3,server]')"
)


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3 endpoint on 127.0.0.1 (moto's server, which honours If-None-Match since 5.0) with a
    bucket: (uri prefix with the endpoint in its query, boto3 client)."""
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="grokstudy-leases")
    try:
        yield (
            f"s3://grokstudy-leases/{{}}?endpoint_override={host}:{port}&scheme=http&region=us-east-1",
            client,
        )
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_an_s3_object_is_created_only_if_absent_in_one_request(s3_bucket) -> None:
    prefix, client = s3_bucket
    uri = storage.join(prefix.format("put"), "once.json")
    assert uri.endswith("/put/once.json?" + uri.split("?", 1)[1])  # the query stays last
    assert storage.put_if_absent(uri, "first") is True
    assert storage.put_if_absent(uri, "second") is False
    assert storage.read_text(uri) == "first"
    assert storage.put_if_absent("gs://bucket/x.json", "x") is None  # no conditional put wired there


def test_on_s3_one_of_two_drivers_racing_for_a_generation_takes_it_without_a_settle_delay(
    s3_bucket, monkeypatch
) -> None:
    """With a conditional put the race is decided by S3 itself: the write-then-read-back fallback
    (and its LEASE_SETTLE_S sleep) must not run."""
    prefix, _ = s3_bucket

    def no_fallback(*_):
        raise AssertionError("the write-then-read-back fallback ran on S3")

    monkeypatch.setattr(storage, "write_text", no_fallback)
    for attempt in range(10):
        drivers, won = _race(prefix.format(f"race-{attempt}"))
        assert sorted(won) == [False, True], attempt


def test_an_s3_lease_is_taken_refused_to_a_second_driver_and_released(s3_bucket, quick_lease) -> None:
    prefix, client = s3_bucket
    experiment = prefix.format("study")
    with storage.Lease(experiment) as first:
        assert first.gen == 1
        with pytest.raises(UsageError, match="is run by another driver"):
            with storage.Lease(experiment):
                pass
    listed = client.list_objects_v2(Bucket="grokstudy-leases", Prefix="study/").get("Contents", [])
    # Released: its generation removed (pyarrow keeps an empty "study/" directory marker).
    assert [o["Key"] for o in listed if storage.LEASE_PREFIX in o["Key"]] == []


def test_status_reads_a_cluster_studys_progress_from_s3(s3_bucket) -> None:
    """What `grokstudy status s3://...` reads: the copies a driver keeps beside its Tune experiment."""
    import yaml

    from grokstudy import preflight, snapshot, status
    from grokstudy.study import parse_study, study_to_dict

    prefix, _ = s3_bucket
    experiment = prefix.format("runs/cluster-study")
    study = parse_study({"name": "cluster-study", "search": {"sampler": "grid", "seeds": 1, "space": {
        "optimizer.weight_decay": {"values": [0.1, 1.0]}, "data.fraction": {"values": [0.3, 0.6]}}}})  # fmt: skip
    done = snapshot.MemberState(
        "a", {"optimizer.weight_decay": 1.0, "data.fraction": 0.6, "train.seed": 0}, "done", "grokking"
    )
    snap = snapshot.Snapshot("cluster-study", 4, time.time() - 60, time.time() - 60, 0, time.time(), [done],
                             {"pid": 1, "host": "head", "host_id": "elsewhere", "state": "running"})  # fmt: skip
    storage.write_text(storage.join(experiment, snapshot.STORAGE_SNAPSHOT_FILE), snap.to_json())
    storage.write_text(storage.join(experiment, preflight.STUDY_FILE), yaml.safe_dump(study_to_dict(study)))
    read = status.read_directory(experiment)
    assert read.snapshot == snap and read.alive is True  # a fresh heartbeat from another machine
    text = status.render(read)
    assert "trials 1/4: 1 done, 0 running, 0 failed, 3 pending" in text and "phases: grokking 1" in text


# ---- a trial's weights file on any storage ---------------------------------------------------------


@pytest.mark.parametrize("place", ["local", "s3"])
def test_a_weights_file_is_put_whole_read_back_and_pruned_once_its_trial_is_not_finished(
    place: str, tmp_path: Path, s3_bucket
) -> None:
    import torch

    from grokstudy import weights
    from grokstudy.config import TrialConfig
    from grokstudy.errors import UsageError
    from grokstudy.models import build_model

    cfg = TrialConfig()
    model = build_model(cfg.model, 99, 97)
    local = tmp_path / "w.pt"
    weights.write_local(local, "abc-s0", 120, cfg, model.state_dict())
    base = str(tmp_path / "exp") if place == "local" else s3_bucket[0].format("exp")
    directory = weights.directory(base)
    uri = storage.join(directory, weights.file_name("abc-s0"))
    storage.put_file(local, uri)
    storage.put_file(local, storage.join(directory, weights.file_name("lost-s1")))

    read_cfg, state, meta = weights.load(uri)
    assert read_cfg == cfg and meta == {"format": weights.FORMAT, "trial_id": "abc-s0", "step": 120}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert weights.prune(directory, finished={"abc-s0"}) == (1, local.stat().st_size)
    assert storage.list_files(directory, weights.SUFFIX) == {"abc-s0.pt": local.stat().st_size}
    with pytest.raises(UsageError, match="^weights_uri: .*lost-s1"):
        weights.load(storage.join(directory, weights.file_name("lost-s1")))


@pytest.mark.parametrize(
    "as_uri", [False, True], ids=["local path (renames)", "file:// URI (copies, deletes)"]
)
def test_move_aside_moves_everything_but_what_stays_and_keeps_the_tree(tmp_path: Path, as_uri: bool) -> None:
    src = tmp_path / "out"
    for rel in ["trials.parquet", ".grokstudy.lock", "figures/a.png", "ray/s/grokstudy-lease.0000000001.json",
                "ray/s/trial_1/checkpoint/state.pt", "ray/s/tuner.pkl", "mlflow.db"]:  # fmt: skip
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    stays = {".grokstudy.lock", "mlflow.db", "ray/s/grokstudy-lease.0000000001.json"}
    dest = tmp_path / "out.archived"
    uri = (lambda p: p.as_uri()) if as_uri else str
    moved = storage.move_aside(uri(src), uri(dest), lambda rel: rel in stays)

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert files(src) == stays
    assert files(dest) == {
        "trials.parquet",
        "figures/a.png",
        "ray/s/trial_1/checkpoint/state.pt",
        "ray/s/tuner.pkl",
    }
    assert (dest / "ray/s/tuner.pkl").read_text() == "ray/s/tuner.pkl"
    assert moved == 4  # trials.parquet, figures/, ray/s/trial_1/, ray/s/tuner.pkl
