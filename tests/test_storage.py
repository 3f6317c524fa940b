"""The output lock and the storage lease: who may write a study's files (storage.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grokstudy import storage
from grokstudy.errors import UsageError


def _lease_file(experiment: Path, **fields) -> Path:
    path = experiment / storage.LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields) if fields else "")
    return path


def test_a_fresh_lease_of_a_live_driver_is_refused_in_one_line(tmp_path: Path) -> None:
    _lease_file(tmp_path, driver="other", host=socket.gethostname(), pid=os.getpid(), renewed_at=time.time())
    with pytest.raises(UsageError) as refused, storage.Lease(str(tmp_path)):
        pass
    assert refused.value.flag == "run.storage" and "\n" not in str(refused.value)
    assert f"pid {os.getpid()}" in str(refused.value)


def test_a_lapsed_lease_or_one_of_a_dead_process_is_taken_over_and_removed_on_exit(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    host = socket.gethostname()
    for held in (
        {
            "driver": "other",
            "host": "elsewhere",
            "pid": 1,
            "renewed_at": time.time() - 2 * storage.LEASE_TTL_S,
        },
        {"driver": "other", "host": host, "pid": int(dead.stdout), "renewed_at": time.time()},
    ):
        path = _lease_file(tmp_path, **held)
        with storage.Lease(str(tmp_path)) as lease:
            assert json.loads(path.read_text())["driver"] == lease.driver
        assert not path.exists()


@pytest.mark.parametrize(
    "text", ["[1, 2]", '"text"', '{"renewed_at": "soon"}', '{"pid": null}', "{not json"], ids=repr
)
def test_an_unreadable_lease_is_taken_over_not_a_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / storage.LEASE_FILE
    path.write_text(text)
    with storage.Lease(str(tmp_path)) as lease:
        assert json.loads(path.read_text())["driver"] == lease.driver


def test_a_second_driver_on_one_output_directory_is_refused_until_the_first_exits(tmp_path: Path) -> None:
    with storage.OutputLock(tmp_path):
        holder = "import sys; from grokstudy import storage; storage.OutputLock(sys.argv[1]).__enter__()"
        second = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True)
        assert second.returncode != 0 and "is in use by another grokstudy run" in second.stderr
    again = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
