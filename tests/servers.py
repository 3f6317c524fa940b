"""Real servers for integration tests: an MLflow tracking server, a throwaway
PostgreSQL cluster, headless Chromium. Plain functions; fixtures live in the
test files. Every process starts in its own session and is stopped by killing
that process group, so nothing outlives the test run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from grokstudy import tracking

CHROMIUM = "/usr/bin/chromium"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Children (uvicorn workers) may outlive the leader briefly.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass(frozen=True, slots=True)
class MlflowServer:
    uri: str
    """http://127.0.0.1:PORT"""
    port: int
    backend_uri: str
    log: Path


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s:\n{log.read_text()[-3000:]}")


@contextmanager
def mlflow_server(
    root: Path, backend_uri: str | None = None, port: int | None = None
) -> Iterator[MlflowServer]:
    """An `mlflow server` on 127.0.0.1:<port, default a free one> with a sqlite store
    (or `backend_uri`) and its artifacts under `root`; started with the same argv
    that `grokstudy ui` uses. The same root and port start the same server again."""
    root.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    port = port or free_port()
    cmd = tracking.ui_command(backend_uri, port=port)
    if "--artifacts-destination" not in cmd:
        cmd += ["--artifacts-destination", str(root / "mlartifacts")]
    log = root / f"server-{time.monotonic_ns()}.log"
    env = os.environ | tracking.UI_ENV | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield MlflowServer(f"http://127.0.0.1:{port}", port, backend_uri, log)
    finally:
        # Nothing to save: the store commits every request. uvicorn would wait on
        # idle keep-alive connections before exiting.
        stop_group(proc, grace_s=3)


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1:<free port>; yields a SQLAlchemy URL.

    Postgres refuses to run as root, so under root it runs as the `postgres`
    user, in a directory of its own under /tmp (pytest's tmp_path is not
    reachable by another user). The directory is removed afterwards.
    """
    root = Path(tempfile.mkdtemp(prefix="grokstudy-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    proc = None
    try:
        init = subprocess.run(
            [
                *as_user,
                str(POSTGRES_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "mlflow",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}{init.stderr}")
        port = free_port()
        log = root / "postgres.log"
        cmd = [*as_user, str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(port)]
        cmd += [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            "fsync=off",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while subprocess.run(
            [str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"postgresql://mlflow@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
"""Chromium without a screen, a sandbox (tests run as root) or any call home."""


def chromium(url: str, profile: Path, *extra: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """Run headless Chromium on `url` with `extra` flags (e.g. --dump-dom, --screenshot=...)."""
    cmd = [
        CHROMIUM,
        *HEADLESS,
        f"--user-data-dir={profile}",
        *extra,
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        stop_group(proc, grace_s=2)
    return subprocess.CompletedProcess(
        cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


class Outage:
    """A TCP proxy on 127.0.0.1:<port> to a server, for outages that start and end at once.

    Clients talk to `uri`; `cut()` closes the listening socket (new connections are refused)
    and resets every open connection, as a network outage looks to a client; `restore()` listens
    again on the same port. The server behind it keeps running, so a test pays for its start
    once (an MLflow server takes about ten seconds).
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._losing = False
        self._losing_of: bytes | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            _close(listener)
        for s in sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            except OSError:
                pass  # its pump closed it meanwhile
            _close(s)

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._open |= {client, upstream}
            lose = threading.Event()  # this connection's answer is to be lost
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, answers, lose), daemon=True).start()

    def lose_answers(self, lose: bool = True, of: str | None = None) -> None:
        """Let requests through to the server but reset each connection instead of passing the
        server's answer back: the request was stored, the client cannot know it. With `of` (a
        request path), only the answers to requests of that path are lost."""
        self._losing = lose
        self._losing_of = of.encode() if of else None

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool, lose: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if not answers and self._losing and (self._losing_of is None or self._losing_of in data):
                    lose.set()
                if answers and lose.is_set():
                    sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            _close(source)
            _close(sink)


def _close(s: socket.socket) -> None:
    """Close a socket another thread may be blocked on (close alone would not wake it)."""
    for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
        try:
            end()
        except OSError:
            pass
