"""Where a study's files live, and who may write them.

- The output directory (`--out`): files written atomically (`atomic_path`:
  temp file, fsync, replace), and an exclusive lock (`OutputLock`, `flock` on
  `<out>/.grokstudy.lock`) that a second driver on the same directory is
  refused with at once. The kernel drops the lock when its process dies,
  however it dies, so a killed driver never leaves it stuck.
- `run.storage` (a local path, an NFS mount, `s3://`, `gs://`): files beside
  the Ray Tune experiment, read and written through `pyarrow.fs`, and a fenced
  lease (`Lease`) that a driver renews while it runs there, so two drivers of
  one study on different machines (or output directories) refuse each other,
  and a driver that lost its lease (paused or cut off past `LEASE_TTL_S`)
  learns it at its next renewal instead of overwriting the new holder's.

Standard library and pyarrow only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs

from grokstudy.errors import UsageError, one_line
from grokstudy.uris import redact

log = logging.getLogger(__name__)

LOCK_FILE = ".grokstudy.lock"
LEASE_PREFIX = "grokstudy-lease."
LEASE_TTL_S = 60.0
"""A lease seen unchanged for this long (on the reader's clock) is free: a driver that died on
another host holds a study no longer."""
LEASE_RENEW_S = 10.0
LEASE_POLL_S = 1.0
LEASE_READ_TRIES = 3
LEASE_SETTLE_S = 1.0
"""On an object store, how long a new lease waits before reading itself back (no conditional put)."""
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
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; the file is as open() would make it
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
            os.replace(tmp, path)  # replaces a planted symlink itself, never the file it points to
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_dir(path: Path, flag: str) -> Path:
    """`path`, absolute, when it is a directory this process may write, or could create one
    there; a one-line UsageError naming `flag` otherwise. Creates nothing."""
    if not str(path).strip():
        raise UsageError(flag, "empty; give a directory")
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise UsageError(flag, f"{existing} is a dangling symlink")
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UsageError(flag, f"{path} {what}; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} is not writable)"
        raise UsageError(flag, f"{path} cannot be written{where}; give a directory you can write")
    return path


def check_storage(uri: str) -> None:
    """`run.storage` can be written: a local directory as `check_dir` says, a URI's filesystem
    opens and answers (credentials, network, bucket); a one-line UsageError otherwise."""
    if "://" not in uri or uri.startswith("file://"):
        check_dir(Path(uri.removeprefix("file://")), "run.storage")
        return
    try:
        fs, path = _fs(uri)
        fs.get_file_info(path)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ArrowNotImplementedError
        raise UsageError("run.storage", f"cannot use {redact(uri)}: {one_line(err, 300)}") from None


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            why = (
                "it is a symlink, which grokstudy never follows" if err.errno == errno.ELOOP else err.strerror
            )
            raise UsageError("--out", f"cannot lock {self.path}: {why}") from None
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
    """`base/part/...` for a local path or a URI (a URI's query, `?endpoint_override=...`, stays last)."""
    if "://" in base:
        path, mark, query = base.partition("?")
        return "/".join([path.rstrip("/"), *parts]) + mark + query
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


def put_file(local: Path, uri: str) -> None:
    """Copy a local file to a local path or URI whole: a reader never sees part of it (a local
    copy is renamed into place; an object store shows an upload only once it completes)."""
    if "://" not in uri:
        with atomic_path(Path(uri)) as tmp:
            shutil.copyfile(local, tmp)
        return
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)  # fmt: skip


def fetch_file(uri: str, local: Path) -> None:
    """Copy the file at a local path or URI to `local`; FileNotFoundError when there is none."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"no file at {uri}")
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip


def list_files(directory_uri: str, suffix: str) -> dict[str, int]:
    """{file name: bytes} of the files named `*<suffix>` in a directory ({} when it does not exist)."""
    fs, path = _fs(directory_uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return {
        i.base_name: i.size or 0
        for i in infos
        if i.type == pyarrow.fs.FileType.File and i.base_name.endswith(suffix)
    }


def delete_file(uri: str) -> None:
    fs, path = _fs(uri)
    fs.delete_file(path)


def move_aside(directory_uri: str, to_uri: str, keep: Callable[[str], bool]) -> int:
    """Move the contents of a directory (local path or URI) into `to_uri`, except the entries
    `keep(relative path)` names, which stay where they are (the directories holding them are
    made again at the destination and searched); returns how many entries moved. Locally an
    entry moves by rename (whole); on an object store by copy, then delete."""
    fs, src = _fs(directory_uri)
    _, dst = _fs(to_uri)
    remote = "://" in directory_uri
    moved = 0

    def walk(rel: str) -> None:
        nonlocal moved
        here = f"{src}/{rel}" if rel else src
        for info in fs.get_file_info(pyarrow.fs.FileSelector(here, allow_not_found=True)):
            sub = f"{rel}/{info.base_name}" if rel else info.base_name
            if keep(sub):
                continue
            if info.type == pyarrow.fs.FileType.Directory and any_kept(sub):
                walk(sub)
                continue
            target = f"{dst}/{sub}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if not remote:
                fs.move(info.path, target)
            elif info.type == pyarrow.fs.FileType.Directory:
                fs.create_dir(target, recursive=True)  # copy_files makes files, not their directories
                pyarrow.fs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=fs)
                fs.delete_dir(info.path)
            else:
                fs.copy_file(info.path, target)
                fs.delete_file(info.path)
            moved += 1

    def any_kept(rel: str) -> bool:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{src}/{rel}", recursive=True))
        return any(keep(i.path.removeprefix(src + "/")) for i in infos)

    walk("")
    return moved


def has_file(directory_uri: str, prefix: str, suffix: str) -> bool:
    """Does the directory hold a file named `<prefix>...<suffix>`?"""
    fs, path = _fs(directory_uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    return any(i.base_name.startswith(prefix) and i.base_name.endswith(suffix) for i in infos)


def put_if_absent(uri: str, text: str) -> bool | None:
    """Create the object at `uri` only if none is there, in one request: True when created,
    False when one existed, None where this store or this machine offers no such write.

    pyarrow.fs has no conditional put (apache/arrow#44281), so S3 (`s3://`; AWS since
    2024-08, and MinIO, R2 and the other S3-compatible stores that honour `If-None-Match: *`)
    goes through boto3 when it is installed (`pip install grokstudy[s3]`), with the endpoint and
    region the URI names (`?endpoint_override=host:port&scheme=http&region=...`) or boto3's own
    configuration. GCS (`ifGenerationMatch=0`) is not wired: without it, and without boto3, the
    caller falls back to write-then-read-back."""
    if not uri.startswith("s3://"):
        return None
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        return None
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
    try:
        client.put_object(
            Bucket=parts.netloc, Key=parts.path.lstrip("/"), Body=text.encode(), IfNoneMatch="*"
        )
    except ClientError as err:
        # 412: the object exists; 409: another conditional write to it is in flight (S3 says retry,
        # and the retry would find the other's object): either way not ours.
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise OSError(f"cannot create {uri}: {err}") from None
    return True


class LeaseLost(Exception):
    """This driver's storage lease was taken by another driver (or could not be renewed)."""


@dataclasses.dataclass(frozen=True)
class _Held:
    """One generation of the lease as read from storage."""

    gen: int
    fields: dict[str, Any]
    """{driver, host, host_id, pid, seq}; {} when the file is not a lease we can parse."""
    text: str
    """The file's text: a renewal changes it (seq), so an unchanged text means no renewal."""


class Lease:
    """A fenced, renewed claim on a study's storage (a context manager).

    The lease is a series of generations beside the Tune experiment, `grokstudy-lease.<gen>.json`
    ({driver, host, host_id, pid, seq}); the highest generation holds it. A driver takes the
    next generation with a create that fails if the file exists (a hard link on a local or NFS
    path, `put_if_absent` on S3; elsewhere, where no conditional put is at hand, a write then a
    read back after LEASE_SETTLE_S),
    renews its own file every LEASE_RENEW_S (after reading that no higher generation exists),
    and removes it in `__exit__`. A driver that finds a higher generation, or cannot renew for
    LEASE_TTL_S / 2, has lost the lease: `on_lost(reason)` is called once (the runner stops the
    study and writes nothing more).

    Taking it, a holder is judged alive or gone without comparing two hosts' clocks: on this
    host (same boot and PID namespace, so not a container that shares the host name) a dead
    process id means gone at once, a live one refuses at once; otherwise the reader watches the
    lease on its own monotonic clock and takes it over only when it has not changed for
    LEASE_TTL_S (a live holder renews every LEASE_RENEW_S: refused as soon as a renewal is
    seen). A lease that cannot be read after LEASE_READ_TRIES tries is refused in one line,
    never taken as "no lease".
    """

    def __init__(self, experiment_uri: str, on_lost: Callable[[str], None] | None = None) -> None:
        self.dir = experiment_uri
        self.driver = uuid.uuid4().hex
        self.gen: int | None = None
        self.lost: str | None = None
        """Why the lease was lost, once it was."""
        self._on_lost = on_lost
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        held = self._wait_until_free()
        gen = (held.gen if held else self._highest_gen()) + 1
        self._seq = 0
        if not self._create(gen):
            raise self._refusal(self._read_highest(), "took the lease at the same moment")
        self.gen = gen
        self._remove_older(gen)
        self._renewed_at = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="grokstudy-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is None and self.gen is not None:
            with contextlib.suppress(Exception):
                held = self._read_highest()
                if held is not None and held.gen == self.gen and held.fields.get("driver") == self.driver:
                    fs, path = _fs(self._file(self.gen))
                    fs.delete_file(path)

    # -- taking it --

    def _wait_until_free(self) -> _Held | None:
        """The lease's last generation once it is free (None: there is none); a one-line
        UsageError while another driver holds it."""
        held = self._read_highest()
        if held is None:
            return None
        verdict = _judge_locally(held.fields)
        if verdict == "alive":
            raise self._refusal(held, "it runs on this host")
        if verdict == "gone":
            return held
        log.warning(
            "grokstudy: the study's storage is leased by %s; waiting up to %.0f s for a renewal "
            "before taking it over",
            _holder(held),
            LEASE_TTL_S,
        )
        seen, since = held.text, time.monotonic()
        while time.monotonic() - since < LEASE_TTL_S:
            time.sleep(min(LEASE_POLL_S, max(0.0, LEASE_TTL_S - (time.monotonic() - since))))
            now = self._read_highest()
            if now is None:
                return held  # released meanwhile: the next generation is free
            if now.text != seen or now.gen != held.gen:
                raise self._refusal(now, "it renewed its lease just now")
        return held

    def _refusal(self, held: _Held | None, why: str) -> UsageError:
        return UsageError(
            "run.storage",
            f"the study at {self.dir} is run by another driver ({_holder(held)}; {why}); "
            f"wait for it to end; if it is dead, its lease is taken over {LEASE_TTL_S:.0f} s after "
            "its last renewal",
        )

    def _create(self, gen: int) -> bool:
        """Create generation `gen` as this driver's; False when another driver has it."""
        uri = self._file(gen)
        text = self._text()
        if "://" not in uri:
            with atomic_path(Path(uri), exclusive=True) as tmp:
                tmp.write_text(text)
        else:
            created = put_if_absent(uri, text)
            if created is False:
                return False
            if created is None:  # no conditional put here: write, then see whose object stayed
                if self._read(gen) is not None:
                    return False
                write_text(uri, text)
                time.sleep(LEASE_SETTLE_S)
        held = self._read(gen)
        return held is not None and held.fields.get("driver") == self.driver

    # -- holding it --

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                held = self._read_highest()
                if held is None or held.gen != self.gen or held.fields.get("driver") != self.driver:
                    self._lose(f"another driver holds it now ({_holder(held)})")
                    return
                self._seq += 1
                write_text(self._file(self.gen), self._text())
                self._renewed_at = time.monotonic()
            except (OSError, UsageError) as err:  # retried at the next renewal, until it may lapse
                if time.monotonic() - self._renewed_at > LEASE_TTL_S / 2:
                    self._lose(f"it could not be renewed for {LEASE_TTL_S / 2:.0f} s ({one_line(err, 200)})")
                    return

    def _lose(self, why: str) -> None:
        self.lost = f"this driver lost its lease on {self.dir}: {why}"
        log.warning("grokstudy: %s", self.lost)
        if self._on_lost is not None:
            self._on_lost(self.lost)

    # -- the files --

    def _file(self, gen: int) -> str:
        return join(self.dir, f"{LEASE_PREFIX}{gen:010d}.json")

    def _text(self) -> str:
        return json.dumps({"driver": self.driver, "host": socket.gethostname(), "host_id": host_id(),
                           "pid": os.getpid(), "seq": self._seq})  # fmt: skip

    def _gens(self) -> list[int]:
        fs, path = _fs(self.dir)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        gens = []
        for info in infos:
            name = info.base_name
            if name.startswith(LEASE_PREFIX) and name.endswith(".json"):
                with contextlib.suppress(ValueError):
                    gens.append(int(name[len(LEASE_PREFIX) : -len(".json")]))
        return sorted(gens)

    def _highest_gen(self) -> int:
        return _retried(lambda: max(self._gens(), default=0), self.dir)

    def _read(self, gen: int) -> _Held | None:
        text = read_text(self._file(gen))
        if text is None:
            return None
        try:
            fields = json.loads(text)
        except ValueError:
            fields = {}
        return _Held(gen, fields if isinstance(fields, dict) else {}, text)

    def _read_highest(self) -> _Held | None:
        """The highest generation (None: no lease); a read error is retried, then refused."""

        def read() -> _Held | None:
            for gen in reversed(self._gens()):
                held = self._read(gen)
                if held is not None:
                    return held
            return None  # removed between listing and reading: released

        return _retried(read, self.dir)

    def _remove_older(self, gen: int) -> None:
        fs, _ = _fs(self.dir)
        for old in self._gens():
            if old < gen:
                with contextlib.suppress(OSError):
                    fs.delete_file(_fs(self._file(old))[1])


def _retried(read: Callable[[], Any], where: str) -> Any:
    """`read()`, tried LEASE_READ_TRIES times; then a one-line UsageError (never "no lease")."""
    for attempt in range(LEASE_READ_TRIES):
        try:
            return read()
        except OSError as err:
            if attempt == LEASE_READ_TRIES - 1:
                raise UsageError(
                    "run.storage",
                    f"cannot read the study's lease at {where} ({one_line(err, 200)}); "
                    "refusing to start, as another driver may hold it; run the command again",
                ) from None
            time.sleep(LEASE_POLL_S * (attempt + 1))
    raise AssertionError("unreachable")


def host_id() -> str:
    """This machine and PID namespace: the boot id and the PID namespace's inode (Linux), so
    two containers with one host name differ; "" where neither can be read."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return ":".join(parts) if len(parts) == 2 else ""


def _judge_locally(fields: dict[str, Any]) -> str:
    """ "alive" or "gone" for a holder on this host and PID namespace; "unknown" otherwise."""
    here, pid = host_id(), fields.get("pid")
    if not here or fields.get("host_id") != here or type(pid) is not int or pid <= 0:
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "alive"
    except (OverflowError, ValueError):
        return "unknown"
    return "alive"


def _holder(held: _Held | None) -> str:
    if held is None or not held.fields:
        return "an unreadable lease" if held is not None else "unknown"
    return f"pid {held.fields.get('pid')} on {held.fields.get('host')}"
