"""Where a study's files live, and who may write them.

- The output directory (`--out`): files written atomically (`atomic_path`:
  temp file, fsync, replace), and an exclusive lock (`OutputLock`, `flock` on
  `<out>/.grokstudy.lock`) that a second driver on the same directory is
  refused with at once. The kernel drops the lock when its process dies,
  however it dies, so a killed driver never leaves it stuck.
- `run.storage` (a local path, an NFS mount, `s3://`, `gs://`): files beside
  the Ray Tune experiment, read and written through `pyarrow.fs`, and a lease
  (`Lease`) that a driver renews while it runs there, so two drivers of one
  study on different machines (or output directories) refuse each other too.
  A lease that is not renewed for `LEASE_TTL_S` lapses; a dead driver on the
  same host is recognised at once by its process id.

Standard library and pyarrow only.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs

from grokstudy.errors import UsageError

LOCK_FILE = ".grokstudy.lock"
LEASE_FILE = "grokstudy-lease.json"
LEASE_TTL_S = 60.0
"""A lease not renewed for this long is free: a driver that died on another host holds a study no longer."""
LEASE_RENEW_S = 10.0
STALE_TMP_S = 600.0
"""A temporary file of `atomic_path` this old was left by a killed writer."""


@contextlib.contextmanager
def atomic_path(path: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write a file into; when the block ends without an
    error, the file is fsynced and renamed onto `path`, so a reader sees the old file or the
    new one, never half. On an error the temporary file is removed and `path` is untouched.
    With `exclusive`, the new file takes `path` only if nothing is there yet (another writer's
    whole file wins). The one way this package replaces a file (texts, Parquet tables, sqlite
    databases); temporary files older than STALE_TMP_S, left by killed writers, go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.lstat().st_mtime > STALE_TMP_S:
                stale.unlink()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or {} if there is none; a corrupt one is a one-line UsageError."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(what, f"{path} is corrupt ({e}); delete it to start that file afresh") from None
    if not isinstance(value, dict):
        raise UsageError(what, f"{path} is corrupt (not a JSON object); delete it to start that file afresh")
    return value


class OutputLock:
    """An exclusive `flock` on `<out>/.grokstudy.lock`, held while a driver runs (a context manager)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                "--out",
                f"{self.path.parent} is in use by another grokstudy run ({holder}); "
                "wait for it to end, or give this run its own --out",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# ---- files under run.storage ------------------------------------------------------------------------


def _fs(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        return pyarrow.fs.FileSystem.from_uri(uri)
    return pyarrow.fs.LocalFileSystem(), str(Path(uri).resolve())


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def read_text(uri: str) -> str | None:
    """The text of a file under a local path or URI, or None if it does not exist."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a file under a local path (atomically) or a URI (one object put)."""
    if "://" not in uri:
        write_atomic(Path(uri), text)
        return
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def has_file(directory_uri: str, prefix: str, suffix: str) -> bool:
    """Does the directory hold a file named `<prefix>...<suffix>`?"""
    fs, path = _fs(directory_uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    return any(i.base_name.startswith(prefix) and i.base_name.endswith(suffix) for i in infos)


class Lease:
    """A renewed claim on a study's storage (a context manager): `grokstudy-lease.json`
    beside the Tune experiment holds {driver, host, pid, renewed_at}; a thread renews it
    every LEASE_RENEW_S while the driver runs, and `__exit__` removes it.

    Taking it fails with a one-line UsageError while another driver's lease is
    fresh; a lease older than LEASE_TTL_S, or one whose holder is a dead process
    on this host, is taken over. Object stores offer no compare-and-swap here,
    so two drivers starting within the same second could both win; the output
    lock and this lease together cover what happens in practice (a resubmitted
    job, a second terminal).
    """

    def __init__(self, experiment_uri: str) -> None:
        self.uri = join(experiment_uri, LEASE_FILE)
        self.driver = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        held = self._read()
        if held and held.get("driver") != self.driver and self._alive(held):
            age = time.time() - held["renewed_at"]
            raise UsageError(
                "run.storage",
                f"the study at {self.uri.rsplit('/', 1)[0]} is run by another driver (pid {held.get('pid')} "
                f"on {held.get('host')}, lease renewed {age:.0f} s ago); if it is dead, its lease lapses "
                f"{LEASE_TTL_S:.0f} s after its last renewal",
            )
        self._write()
        self._thread = threading.Thread(target=self._renew, name="grokstudy-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if self._read().get("driver") == self.driver:
                fs, path = _fs(self.uri)
                fs.delete_file(path)

    def _read(self) -> dict[str, Any]:
        """The lease on storage, or {} when there is none or it cannot be read (it is taken over)."""
        try:
            held = json.loads(read_text(self.uri) or "{}")
            if held:
                held["renewed_at"], held["pid"] = float(held.get("renewed_at", 0)), int(held.get("pid", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return {}
        return held

    def _write(self) -> None:
        lease = {
            "driver": self.driver,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": time.time(),
        }
        write_text(self.uri, json.dumps(lease))

    def _alive(self, held: dict[str, Any]) -> bool:
        if time.time() - held["renewed_at"] > LEASE_TTL_S:
            return False
        if held.get("host") == socket.gethostname():
            try:
                os.kill(held["pid"], 0)
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:
                return True
        return True

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the TTL is 6 renewals
                self._write()
