"""MLflow tracking: the only module that imports mlflow (checked against mlflow 3.17.2).

Layout in MLflow: one experiment per study (named after it), one parent run
per study, one nested child run per trial (tag `mlflow.parentRunId`, which is
what the UI nests by), keyed by its trial id (tag `grokstudy.trial_key`), so a
trial run again after a crash, a retry or a lost driver re-attaches to its run.
Everything a trial needs crosses process and node boundaries as plain strings:
tracking URI, experiment id, parent run id and, for a restored trial, its run id.

Only `MlflowClient` is used, never the fluent `mlflow.start_run` stack: that
stack is per process, a reused Ray actor would inherit the previous trial's
run, and `MLFLOW_RUN_ID` in the environment silently overrides
`parent_run_id` (mlflow#15713). So this module never sets `MLFLOW_RUN_ID`.

**MLflow is best effort; it is never the reason a trial fails.** A trial
process has one `Sender`: one background thread and one client for all the
runs of its trial (a packed trial has one run per member). Everything, the
creation of a run included, happens on that thread; the training loop only
queues. When the store cannot be reached the sender keeps what it has, retries
with exponential backoff (0.5 s doubling to 30 s), and reports how long it has
been down (`Sender.down_s`) and why (`Sender.last_error`), so the driver can
show it and end a study that stays cut off longer than `run.tracking_outage_s`.
The queue is bounded by the trial's own curve: `TrialRun.sync(records)` is
given the whole curve (which the trial keeps anyway, in memory and in every
checkpoint) and sends what the run does not hold yet.

Crash contract of a trial run (what makes "nothing lost, nothing duplicated"):
- metrics go out in `log_batch` requests that each carry whole records, and
  the SQL store commits one request's metrics together, so the run's highest
  logged step says exactly which records arrived;
- a restored trial re-opens its run and learns that step before it sends, so
  it skips what is stored (training is deterministic, so the rest is identical)
  and replays from its checkpoint's curve what a crash lost: no gap, no repeat;
- the runner also flushes (bounded) before each checkpoint, so little is replayed.

mlflow itself is imported lazily (about 2 s), so `grokstudy train`,
`grokstudy ui` and unit tests that track nothing do not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import grokstudy
from grokstudy import compat, storage, weights
from grokstudy.config import Study, TrialConfig, flatten, get_path, param_text, param_value, trial_from_dict
from grokstudy.errors import StudyError, UsageError, one_line
from grokstudy.points import SEED
from grokstudy.records import CURVE_KEYS, ELAPSED_KEY, EvalRecord, Outcome, TrialHistory
from grokstudy.uris import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Metric, Run

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow's UI nests child runs by (what `start_run(nested=True)` sets)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
"""Experiment tag value that marks a model-training (not GenAI) experiment; key and
value read from the 3.17.2 UI bundle."""
GIT_COMMIT_TAG = "mlflow.source.git.commit"
KIND_TAG = "grokstudy.kind"
"""'study' on a parent run, 'trial' on a child run."""
TUNE_EXPERIMENT_TAG = "grokstudy.tune_experiment"
"""On the parent run: where the study's Ray Tune experiment lives (storage path/name)."""
TRIAL_KEY_TAG = "grokstudy.trial_key"
"""A trial run's trial id (`<point_id>-s<seed>`); `find_trial_runs` maps it back to the run."""
ERROR_TAG = "grokstudy.error"
"""On a FAILED trial run: why it failed."""
WEIGHTS_TAG = "grokstudy.weights_uri"
"""A finished trial's weights file on the study's storage (`grokstudy.weights`); the run holds a
copy as its artifact `weights/<trial_id>.pt`."""
ARCHIVED_TAG = "grokstudy.archived"
"""On a parent run that `grokstudy run --fresh` set aside: when."""
NOTE_TAG = "mlflow.note.content"
"""A run's description in the MLflow UI (markdown)."""
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
STUDY_ARTIFACT = "study.yaml"

# REST LogBatch limits (mlflow docs; mlflow/utils/validation.py in 3.17.2).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
BACKOFF_S = (0.5, 30.0)
"""First and longest wait between retries of an unreachable store."""


# ---- where the runs go ---------------------------------------------------------------


def default_tracking_uri(out_dir: Path) -> str:
    """`sqlite:///<absolute out_dir>/mlflow.db`.

    Absolute on purpose: Ray Tune runs each trial in its own working directory,
    and MLflow >= 3.7 defaults to a *relative* `sqlite:///mlflow.db`, which would
    scatter one database per trial.
    """
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(cli_value: str | None, study_value: str | None, out_dir: Path) -> str:
    """The tracking URI a study uses: `--tracking-uri` > `MLFLOW_TRACKING_URI` >
    the study's `run.tracking_uri` > `default_tracking_uri(out_dir)`.

    Relative sqlite and file paths are made absolute (against the current
    directory), for the same reason as in `default_tracking_uri`.
    """
    for value in (cli_value, os.environ.get("MLFLOW_TRACKING_URI"), study_value):
        if value:
            return absolute_uri(value)
    return default_tracking_uri(out_dir)


def absolute_uri(uri: str) -> str:
    """`uri` with a relative sqlite or local-file path made absolute; others unchanged."""
    if uri.startswith("sqlite:///"):
        path = unquote(uri.removeprefix("sqlite:///"))
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file://"):
        return Path(unquote(uri.removeprefix("file:"))).resolve().as_uri()
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return Path(uri).resolve().as_uri()
    return uri


UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""Environment of an MLflow UI: no server-side job execution (MLflow's GenAI jobs: six more
processes of about 240 MB each, which grokstudy never uses)."""


def ui_command(tracking_uri: str, port: int = 5000, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """argv of an MLflow UI (`mlflow server`) on `tracking_uri`, bound to `host:port`; run it
    with `UI_ENV` in its environment.

    One uvicorn worker by default (mlflow's default is 4 processes, each
    importing mlflow: slow to start and pointless for one person browsing).
    For a sqlite store the served-artifacts root sits next to the database, so
    nothing lands in the caller's working directory.
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    cmd += ["--host", host, "--port", str(port), "--workers", str(workers)]
    db = _sqlite_path(tracking_uri)
    if db is not None:
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///"))
    return None if not path or path == ":memory:" else Path(path)


def _create_sqlite_store(uri: str) -> None:
    """Create a missing sqlite store whole, or not at all.

    MLflow builds a new store's schema through dozens of Alembic migrations; a
    driver killed in the middle leaves a database that every later open refuses
    ("table _alembic_tmp_tags already exists"). So the schema is built in a temp
    file beside it, which takes the store's name only when complete.
    """
    db = _sqlite_path(uri)
    if db is None or db.exists():
        return
    with storage.atomic_path(db, exclusive=True) as tmp:
        tmp.unlink()  # MLflow creates its own database file
        compat.create_sqlite_store(tmp, db.parent / "mlartifacts")


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Before a study starts anything: a server answers its health check, a sqlite store's
    directory can be written; a one-line StudyError naming run.tracking_uri otherwise.
    Other stores (PostgreSQL, Databricks) are first reached when the parent run opens."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            parts = urlsplit(tracking_uri)  # the health check needs no user: drop it from the URL
            netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
            url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/health"
            with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - http(s) only
                answer.read(64)
        except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
            raise StudyError(
                "run.tracking_uri",
                f"cannot reach MLflow at {redact(tracking_uri)} ({one_line(err, 200)}); start the server "
                "or pass another --tracking-uri",
            ) from None
        return
    db = _sqlite_path(tracking_uri)
    if db is not None:
        try:
            storage.check_dir(db.parent, "run.tracking_uri")
        except UsageError as err:
            raise StudyError("run.tracking_uri", err.msg) from None
        if db.exists() and not db.is_file():
            raise StudyError("run.tracking_uri", f"{db} is not a sqlite file")


def check_store(db: Path) -> None:
    """`db` is a readable MLflow sqlite store (before an MLflow UI is started on it); a one-line
    UsageError otherwise, instead of the server's own traceback."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            conn.execute("SELECT version_num FROM alembic_version").fetchone()
            conn.execute("SELECT count(*) FROM experiments").fetchone()
    except sqlite3.Error as err:
        raise UsageError("STUDY_DIR", f"{db} is not a readable MLflow store ({one_line(err, 200)})") from None


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    # Against a server, MLflow prints "View run ... at: URL" to stdout whenever a
    # run ends; that would interleave with the CLI's own output and every trial's log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's own HTTP retries (7, backoff factor 2: minutes per call) resend a POST whose
    # answer was lost, so a run is created or a batch stored twice. None here: the sender
    # retries by itself, first asking the store what it holds (tests/test_tracking.py).
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    _create_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


# ---- the trials of one process -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Where:
    """Where a trial's runs go: plain strings, picklable to any node."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


@dataclass(frozen=True, slots=True)
class TrialEnd:
    """How a finished trial's run must end: `StudyTracker.settle_trial_runs`."""

    trial_id: str
    run_id: str | None
    """None: the trial never reached MLflow (the run is found by trial key, or created)."""
    name: str
    params: dict[str, Any]
    tags: dict[str, str]
    records: Sequence[EvalRecord]
    status: str
    error: str | None = None
    summary: dict[str, float] | None = None
    """Its outcome as metrics at its last step (`TrialRun.log_metrics`)."""
    weights_uri: str | None = None
    """Its weights file, stored as the run's artifact before the run ends (`grokstudy.weights`)."""


@dataclass(frozen=True, slots=True)
class DataSplit:
    """A trial's train/validation split as an MLflow dataset input: runs that share a split
    show the same dataset (name and digest) in the UI."""

    name: str
    digest: str
    source: dict[str, Any]
    """What decides the split (task, fraction, split seed): the same values give the same split."""
    profile: dict[str, Any]

    def as_input(self) -> Any:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(self.name, self.digest, "code", json.dumps(self.source, sort_keys=True),
                          profile=json.dumps(self.profile, sort_keys=True))  # fmt: skip
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


class TrialRun:
    """One trial's run, fed by a `Sender`'s thread. The trial calls `sync`, `set_tags`
    and `finish`; each returns at once."""

    def __init__(
        self,
        sender: Sender,
        key: str,
        name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id: str | None,
        dataset: DataSplit | None = None,
    ) -> None:
        self._sender = sender
        self._dataset = dataset
        self.key = key
        self.name = name
        self.run_id = run_id
        """None until the sender has found or created the run."""
        self._params = _param_dict(params)
        self._tags = _str_dict(tags) | {KIND_TAG: "trial", TRIAL_KEY_TAG: key}
        self._extra: list[tuple[int, dict[str, float]]] = []  # metrics beside the curve, by step
        self._artifacts: list[tuple[str, str]] = []  # (local file, artifact directory)
        self._opened = False
        self._stored_step: int | None = None  # the run's last stored step, once known
        self._queued: list[EvalRecord] = []  # records past the stored step, in step order
        self._status: str | None = None
        self._done = False

    def sync(self, records: Sequence[EvalRecord]) -> None:
        """Make the run hold `records` (a curve by increasing step, typically the trial's
        whole curve so far): queues those past what is queued or stored."""
        with self._sender.lock:
            last = self._queued[-1].step if self._queued else self._stored_step
            if last is None:
                last = -1
            self._queued += [r for r in records if r.step > last]
        # No wake: records go out on the sender's interval, a few per request, so a fast trial
        # does not pay one store transaction (an fsync with sqlite) per evaluation.

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._sender.lock:
            self._tags |= _str_dict(tags)
        self._sender.wake()

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Metrics beside the curve at `step`: how the trial ended (`member.outcome_metrics`, so
        the MLflow UI can plot it), a GPU's system metrics; stored after the curve records
        queued before them, and before the run ends."""
        if values:
            with self._sender.lock:
                self._extra.append((step, dict(values)))
            self._sender.wake()

    def log_artifact(self, local: Path, artifact_path: str) -> None:
        """Store a local file (kept until then) under `artifact_path`, before the run ends."""
        with self._sender.lock:
            self._artifacts.append((str(local), artifact_path))
        self._sender.wake()

    def finish(self, status: str, error: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED once everything queued is stored."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, not {status!r}")
        tags = {ERROR_TAG: error[:4000]} if error else {}
        with self._sender.lock:
            self._tags |= tags
            self._status = status
        self._sender.wake()

    @property
    def idle(self) -> bool:
        """Nothing queued for this run (finished, if asked to)."""
        return (
            self._opened and not self._queued and not self._params and not self._tags and self._status is None
            and not self._extra and not self._artifacts
        )  # fmt: skip

    # -- on the sender's thread --

    def _step(self, client: MlflowClient, where: Where, existing: Callable[[], dict[str, str]]) -> None:
        if not self._opened:
            self._open(client, where, existing)
        with self._sender.lock:
            params, tags = self._params, self._tags
            records, status, extra = list(self._queued), self._status, list(self._extra)
            artifacts = list(self._artifacts)
        requests = _requests(params, tags, records)
        for p, t, recs in requests:
            client.log_batch(self.run_id, metrics=_metrics(recs), params=_params(p), tags=_tags(t))
            with self._sender.lock:
                for k in p:
                    self._params.pop(k, None)
                for k, v in t.items():
                    if self._tags.get(k) == v:
                        del self._tags[k]
                if recs:
                    self._stored_step = recs[-1].step
                    self._queued = [r for r in self._queued if r.step > recs[-1].step]
        if extra and not self._queued:
            now_ms = int(time.time() * 1000)
            metrics = [_metric(k, v, now_ms, step) for step, values in extra for k, v in values.items()]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
            with self._sender.lock:
                del self._extra[: len(extra)]  # only appended to since: the first ones were sent
        for local, artifact_path in artifacts:
            client.log_artifact(self.run_id, local, artifact_path)
            with self._sender.lock:
                self._artifacts.remove((local, artifact_path))
        if status is not None and not self._queued and not self._extra and not self._artifacts:
            client.set_terminated(self.run_id, status=status)
            with self._sender.lock:
                if self._status == status:
                    self._status = None
                    self._done = True

    def _open(self, client: MlflowClient, where: Where, existing: Callable[[], dict[str, str]]) -> None:
        from mlflow.exceptions import MlflowException

        tags = {PARENT_TAG: where.parent_run_id, **self._tags}
        run_id = self.run_id or existing().get(self.key)
        stored = -1
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                stored = _last_logged_step(client, run_id)
                logged = client.get_run(run_id).data.params
                with self._sender.lock:  # MLflow refuses a param logged again with other text
                    self._params = {k: v for k, v in self._params.items() if k not in logged}
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run_id = None  # a checkpoint from another store: start the run afresh here
        if run_id is None:
            run_id = client.create_run(where.experiment_id, tags=tags, run_name=self.name).info.run_id
        if self._dataset is not None:  # MLflow keeps one input per dataset: logging it again is a no-op
            client.log_inputs(run_id, datasets=[self._dataset.as_input()])
        with self._sender.lock:
            self.run_id = run_id
            self._stored_step = stored
            self._queued = [r for r in self._queued if r.step > stored]
            self._opened = True


class Sender:
    """One background thread that keeps a process's trial runs in step with the store.

    `open` a run per trial (member), feed them through their `TrialRun`; `wait_opened`
    before a checkpoint and `close` at the end, both bounded by a timeout. What is queued goes
    out every `interval_s`, or at once on `wake` (a tag, a finish, an artifact, a flush). Never
    raises into the caller for a store that cannot be reached: see `down_s`.
    """

    def __init__(self, where: Where, *, interval_s: float = 5.0) -> None:
        self.where = where
        self.lock = threading.Lock()
        self._runs: list[TrialRun] = []
        self._wake = threading.Event()
        self._stop = False
        self._closing = threading.Event()
        self._idle = threading.Condition(self.lock)
        self._interval_s = interval_s
        self._existing: dict[str, str] | None = None
        self._down_since: float | None = None
        self._reached_at: float | None = None
        self.last_error: str | None = None
        """The last failure to reach the store (None once a request succeeds again)."""
        self._thread = threading.Thread(target=self._loop, name="grokstudy-mlflow", daemon=True)
        self._thread.start()

    def open(
        self, key: str, name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
        dataset: DataSplit | None = None,
    ) -> TrialRun:  # fmt: skip
        """The run of trial `key`: `run_id` (from a checkpoint), else the parent's existing run
        with that trial key, else a new child run; params and tags are (re)sent either way; a new
        run gets `dataset` as its input."""
        run = TrialRun(self, key, name, params, tags, run_id, dataset)
        with self.lock:
            self._runs.append(run)
        self.wake()
        return run

    @property
    def down_s(self) -> float:
        """Seconds since the store stopped answering (0 while it answers)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def reached_s(self) -> float | None:
        """Seconds since the store last stored a request of this sender (None: never yet)."""
        at = self._reached_at
        return None if at is None else time.monotonic() - at

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every run holds what it was given (True), or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        self.wake()
        with self.lock:
            while not all(r.idle or r._done for r in self._runs):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def wait_opened(self, timeout_s: float) -> bool:
        """Wait until every run exists in the store, so its id can go into a checkpoint (True),
        or `timeout_s` passes (False). Records still queued are not waited for: the checkpoint's
        curve replays them on resume (`TrialRun.sync`)."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while not all(r._opened or r._done for r in self._runs):
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> bool:
        """`flush(timeout_s)`, then stop the thread; what is still queued is dropped (the
        checkpoint's curve replays it on resume). True when nothing was dropped."""
        flushed = self.flush(timeout_s)
        self._stop = True
        self._closing.set()
        self.wake()
        self._thread.join(timeout=5)
        return flushed

    def _existing_runs(self) -> dict[str, str]:
        if self._existing is None:
            w = self.where
            self._existing = find_trial_runs(w.tracking_uri, w.experiment_id, w.parent_run_id)
        return self._existing

    def _loop(self) -> None:
        client = None
        delay = BACKOFF_S[0]
        while not self._stop:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            runs: list[TrialRun] = []
            try:
                client = client or _client(self.where.tracking_uri)
                with self.lock:
                    runs = [r for r in self._runs if not (r.idle or r._done)]
                for run in runs:
                    run._step(client, self.where, self._existing_runs)
            except Exception as err:  # the store is down or refused: keep everything, retry later
                # A request that failed may still have been stored (the answer was lost, not the
                # request): each run re-learns what its run holds before it sends again, and a
                # run being created is looked up again, so nothing is stored twice.
                self._existing = None
                for run in runs:
                    run._opened = False
                if self._down_since is None:
                    self._down_since = time.monotonic()
                self.last_error = one_line(err)
                log.warning(
                    "MLflow at %s: %s; retrying in %.1f s",
                    redact(self.where.tracking_uri),
                    self.last_error,
                    delay,
                )
                self._closing.wait(delay)  # a backoff that `close` cuts short
                delay = min(2 * delay, BACKOFF_S[1])
                self._wake.set()
                continue
            if runs:  # requests went through: the store answers
                self._down_since, self.last_error, delay = None, None, BACKOFF_S[0]
                self._reached_at = time.monotonic()
            with self.lock:
                self._idle.notify_all()


def _requests(
    params: dict[str, str], tags: dict[str, str], records: Sequence[EvalRecord]
) -> list[tuple[dict[str, str], dict[str, str], list[EvalRecord]]]:
    """log_batch requests within MLflow's limits (100 params, 100 tags, 1000 entities)
    that never split a record between two requests."""
    p, t = list(params.items()), list(tags.items())
    out: list[tuple[dict[str, str], dict[str, str], list[EvalRecord]]] = []
    while p or t or not out:
        out.append((dict(p[:MAX_PARAMS_TAGS_PER_BATCH]), dict(t[:MAX_PARAMS_TAGS_PER_BATCH]), []))
        p, t = p[MAX_PARAMS_TAGS_PER_BATCH:], t[MAX_PARAMS_TAGS_PER_BATCH:]
    room = MAX_METRICS_PER_BATCH - len(out[-1][0]) - len(out[-1][1])
    for record in records:
        size = len(record.metrics()) + 1  # + ELAPSED_KEY
        if size > room and out[-1][2]:
            out.append(({}, {}, []))
            room = MAX_METRICS_PER_BATCH
        out[-1][2].append(record)
        room -= size
    return [r for r in out if r[0] or r[1] or r[2]]


def _metrics(records: Sequence[EvalRecord]) -> list[Metric]:
    now_ms = int(time.time() * 1000)
    out = []
    for record in records:
        values = record.metrics() | {ELAPSED_KEY: float(record.elapsed_s)}
        out += [_metric(key, value, now_ms, record.step) for key, value in values.items()]
    return out


def _metric(key: str, value: float, timestamp_ms: int, step: int) -> Metric:
    from mlflow.entities import Metric

    return Metric(key, value, timestamp_ms, step)


def _params(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in params.items()]


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _last_logged_step(client: MlflowClient, run_id: str) -> int:
    # Every record carries ELAPSED_KEY and requests never split a record, so its
    # history's last step is the run's last complete record.
    history = client.get_metric_history(run_id, ELAPSED_KEY)
    return max((m.step for m in history), default=-1)


# ---- the study -------------------------------------------------------------------------


class StudyTracker:
    """The driver's side: the study's experiment and its parent run.

    Only the driver creates the experiment (concurrent creation from trials
    races: mlflow#10334); trials get its id as a string.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._client = _client(tracking_uri)
        self._finished = False

    def open(
        self,
        study_name: str,
        study_yaml: str,
        params: dict[str, Any],
        tags: dict[str, str],
        parent_run_id: str | None = None,
    ) -> tuple[str, str]:
        """Get or create the experiment `study_name` and open the study's parent run.

        Returns (experiment_id, parent_run_id). With `parent_run_id` (a resumed
        study) that run is set RUNNING again instead of creating another; its
        params must equal `params` (a resumed study is the same study). The
        resolved study is stored as the artifact `study.yaml`. Tags added here:
        grokstudy.kind=study, grokstudy.study, grokstudy.version and, when the
        working directory is a git checkout, mlflow.source.git.commit.
        """
        experiment_id = _get_or_create_experiment(self._client, study_name, self.tracking_uri)
        all_tags = {
            KIND_TAG: "study",
            "grokstudy.study": study_name,
            "grokstudy.version": grokstudy.__version__,
        }
        if commit := _git_commit():
            all_tags[GIT_COMMIT_TAG] = commit
        all_tags |= tags
        if parent_run_id is None:
            run = self._client.create_run(experiment_id, tags=_str_dict(all_tags), run_name=study_name)
            parent_run_id = run.info.run_id
        else:
            run = _get_run(self._client, parent_run_id, self.tracking_uri)
            if run.info.experiment_id != experiment_id:
                raise StudyError(
                    "name",
                    f"parent run {parent_run_id} belongs to experiment {run.info.experiment_id}, "
                    f"not to the study's experiment {experiment_id}",
                )
            _check_same_params(run, params)
            self._client.update_run(parent_run_id, status="RUNNING")
        _log(self._client, parent_run_id, params, all_tags)  # a resumed run's tags are set afresh
        self._client.log_text(parent_run_id, study_yaml, STUDY_ARTIFACT)
        self.experiment_id, self.run_id = experiment_id, parent_run_id
        self._finished = False
        return experiment_id, parent_run_id

    def log_artifacts(self, paths: Sequence[Path], artifact_path: str | None = None) -> None:
        """Attach files (and directories, under their own name) to the parent run."""
        run_id = self._require_open()
        for path in map(Path, paths):
            if path.is_dir():
                sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self._client.log_artifacts(run_id, str(path), sub)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path)

    def where(self) -> Where:
        """Where this study's trial runs go (once `open`)."""
        assert self.experiment_id is not None
        return Where(self.tracking_uri, self.experiment_id, self._require_open())

    def set_tags(self, tags: dict[str, str]) -> None:
        _log(self._client, self._require_open(), {}, tags)

    def trial_runs(self) -> dict[str, tuple[str, str]]:
        """{trial key: (run_id, status)} of this study's trial runs."""
        assert self.experiment_id is not None
        runs = _trial_runs(self._client, self.experiment_id, self._require_open())
        return {key: (run.info.run_id, run.info.status) for key, run in runs.items()}

    def settle_trial_runs(self, ends: Sequence[TrialEnd], timeout_s: float) -> dict[str, str]:
        """Make each trial's run exist, hold its whole curve and end as given, for trials
        whose own process could not (MLflow was down when they finished, or their worker
        died before it reached MLflow): the curve is sent from the step the run holds on
        (nothing twice), then the tags, then the status. Returns {trial_id: run_id};
        raises TimeoutError unless all of it was stored within `timeout_s`."""
        sender = Sender(self.where(), interval_s=0.5)
        runs = []
        with tempfile.TemporaryDirectory(prefix="grokstudy-settle-") as scratch:
            for end in ends:
                run = sender.open(end.trial_id, end.name, end.params, end.tags, run_id=end.run_id)
                run.sync(end.records)
                if end.summary and end.records:
                    run.log_metrics(end.records[-1].step, end.summary)
                if end.weights_uri:
                    local = Path(scratch) / end.weights_uri.rsplit("/", 1)[-1]
                    storage.fetch_file(end.weights_uri, local)
                    run.log_artifact(local, weights.ARTIFACT_PATH)
                run.finish(end.status, end.error)
                runs.append(run)
            closed = sender.close(timeout_s)
        if not closed:
            raise TimeoutError(
                f"MLflow at {redact(self.tracking_uri)} did not store the ends of {len(ends)} trial runs "
                f"within {timeout_s:g} s ({sender.last_error})"
            )
        return {run.key: run.run_id for run in runs if run.run_id is not None}

    def finish(self, status: str) -> None:
        """End the parent run as FINISHED, FAILED or KILLED (once; later calls do nothing)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, not {status!r}")
        if self._finished:
            return
        self._client.set_terminated(self._require_open(), status=status)
        self._finished = True

    def _require_open(self) -> str:
        if self.run_id is None:
            raise RuntimeError("StudyTracker.open() has not been called")
        return self.run_id


def _get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_path(tracking_uri)
        # A sqlite store's client-side default artifact root is ./mlruns of
        # whichever process creates the experiment; keep artifacts beside the db.
        location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT}
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # another driver won the race
            assert exp is not None
    if exp.lifecycle_stage == "deleted":
        raise StudyError(
            "name",
            f"MLflow experiment {name!r} ({exp.experiment_id}) is deleted; restore it with "
            f"`mlflow experiments restore --experiment-id {exp.experiment_id}` or rename the study",
        )
    if exp.tags.get(EXPERIMENT_KIND_TAG) != CUSTOM_MODEL_DEVELOPMENT:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, CUSTOM_MODEL_DEVELOPMENT)
    return exp.experiment_id


def _check_same_params(run: Run, params: dict[str, Any]) -> None:
    old = run.data.params
    for key, value in _param_dict(params).items():
        # Read back, so the text of an earlier grokstudy (Python reprs) compares by value
        if key in old and param_value(old[key]) != param_value(value):
            raise StudyError(
                key,
                f"is {value} but the study's MLflow run {run.info.run_id} was started with {old[key]}; "
                "a resumed study must be the same study (use a new name or output directory)",
            )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


# ---- shared helpers -------------------------------------------------------------------


def _str_dict(d: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in d.items()}


def _param_dict(d: dict[str, Any]) -> dict[str, str]:
    """Params as the study file writes their values (`config.param_text`)."""
    return {str(k): v if isinstance(v, str) else param_text(v) for k, v in d.items()}


def _log(client: MlflowClient, run_id: str, params: dict[str, Any], tags: dict[str, str]) -> None:
    """Log params and tags in as few `log_batch` requests as MLflow's limits allow."""
    for p, t, _ in _requests(_param_dict(params), _str_dict(tags), []):
        client.log_batch(run_id, params=_params(p), tags=_tags(t))


def _get_run(client: MlflowClient, run_id: str, tracking_uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise StudyError(
                "run.tracking_uri",
                f"MLflow run {run_id} is not in {tracking_uri}; a resumed study must use the "
                "tracking URI it started with",
            ) from err
        raise


def _search_all(
    client: MlflowClient,
    experiment_id: str,
    filter_string: str,
    page_size: int = 1000,
    order_by: list[str] | None = None,
) -> list[Run]:
    """Every matching run, page by page (search_runs returns at most `page_size`)."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=page_size, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_study_run(
    tracking_uri: str, study_name: str, tune_experiment: str, running_only: bool = False
) -> str | None:
    """The parent run of an earlier execution of this study whose Ray Tune experiment is
    `tune_experiment` (its `grokstudy.tune_experiment` tag), latest first; None if none.
    With `running_only`, only a run still RUNNING (its driver died) counts.

    A resumed study continues that run even when the output directory that remembers
    it is gone (a Ray job's default `--out` lies in its temporary working directory).
    """
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None or "'" in tune_experiment:  # a quote cannot be matched in a filter
        return None
    runs = _search_all(
        client,
        experiment.experiment_id,
        f"tags.`{KIND_TAG}` = 'study' and tags.`{TUNE_EXPERIMENT_TAG}` = '{tune_experiment}'"
        + (" and attributes.status = 'RUNNING'" if running_only else ""),
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def archive_study_runs(tracking_uri: str, study_name: str, tune_experiment: str, archived_to: str) -> int:
    """Mark the parent runs of an earlier execution of this study as archived (`run --fresh`):
    they now name `archived_to` as their Ray Tune experiment, so no later run of the study
    continues them, and a RUNNING one (its driver died) ends KILLED; their trial runs' weights
    tags follow the move. Returns how many parent runs were archived."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None or "'" in tune_experiment:
        return 0
    runs = _search_all(
        client,
        experiment.experiment_id,
        f"tags.`{KIND_TAG}` = 'study' and tags.`{TUNE_EXPERIMENT_TAG}` = '{tune_experiment}'",
    )
    for run in runs:
        run_id = run.info.run_id
        client.set_tag(run_id, TUNE_EXPERIMENT_TAG, archived_to)
        client.set_tag(run_id, ARCHIVED_TAG, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        for trial in _trial_runs(client, experiment.experiment_id, run_id).values():
            uri = trial.data.tags.get(WEIGHTS_TAG, "")
            if uri.startswith(tune_experiment + "/"):
                client.set_tag(trial.info.run_id, WEIGHTS_TAG, archived_to + uri[len(tune_experiment) :])
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    return len(runs)


def find_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str | None) -> dict[str, str]:
    """{grokstudy.trial_key: run_id} of the trial runs under `parent_run_id`
    (or, without one, of the whole experiment), so a retried trial re-attaches
    to its run instead of creating another. If a key has several runs, the
    earliest started wins."""
    runs = _trial_runs(_client(tracking_uri), experiment_id, parent_run_id)
    return {key: run.info.run_id for key, run in runs.items()}


def _child_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str | None, page_size: int = 1000
) -> list[Run]:
    """The trial runs under `parent_run_id` (without one: all of the experiment's), earliest first."""
    filter_string = (
        f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{KIND_TAG}` = 'trial'"
    )
    return _search_all(client, experiment_id, filter_string, page_size, ["attributes.start_time ASC"])


def _trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str | None) -> dict[str, Run]:
    out: dict[str, Run] = {}
    for run in _child_runs(client, experiment_id, parent_run_id):
        key = run.data.tags.get(TRIAL_KEY_TAG)
        if key is not None:
            out.setdefault(key, run)
    return out


# ---- reading a study back ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedStudy:
    """A study read back from MLflow, as plain values (no MLflow objects)."""

    experiment_id: str
    experiment_name: str
    parent_run_id: str | None
    """The study run the trials hang under (the latest one when the experiment holds several)."""
    study_yaml: str | None
    """The parent run's `study.yaml` artifact, if present."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """Per child run: {"run_id", "run_name", "status", "params": {dotted: str},
    "tags": {str: str}, "metrics": {key: [(step, value), ...] by increasing step}}."""
    parent_status: str | None = None
    parent_started_s: float | None = None
    """Unix time the study run started."""
    parent_ended_s: float | None = None


def fetch_results(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    *,
    page_size: int = 1000,
    workers: int = 8,
    histories: bool = True,
) -> FetchedStudy:
    """Read every trial run of a study's experiment (by name or id) with its
    params, tags and full metric histories.

    Runs are listed with paged `search_runs`, so any number works. Histories
    cost one `get_metric_history` request per run per metric (7 per trial),
    sent from `workers` threads: about 0.1 s a trial from a local server, so
    minutes for thousands (bench/README.md). For big studies prefer the Parquet
    tables the study writes. A step logged twice keeps its latest value. Without `histories`,
    only each metric's latest value is read (one request per page of runs: `grokstudy status`).
    """
    client = _client(tracking_uri)
    exp = _find_experiment(client, experiment, tracking_uri)
    if parent_run_id is None:
        parents = _search_all(
            client,
            exp.experiment_id,
            f"tags.`{KIND_TAG}` = 'study'",
            page_size,
            ["attributes.start_time DESC"],
        )
        parent_run_id = parents[0].info.run_id if parents else None
    runs = _child_runs(client, exp.experiment_id, parent_run_id, page_size)

    jobs = [(run.info.run_id, key) for run in runs for key in run.data.metrics] if histories else []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        histories = list(pool.map(lambda job: _history(client, *job), jobs))
    metrics: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for (run_id, key), history in zip(jobs, histories, strict=True):
        metrics.setdefault(run_id, {})[key] = history

    trials = [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "params": dict(run.data.params),
            "tags": dict(run.data.tags),
            "metrics": metrics.get(run.info.run_id, {}),
        }
        for run in runs
    ]
    study_yaml = _read_text_artifact(client, parent_run_id, STUDY_ARTIFACT) if parent_run_id else None
    parent = client.get_run(parent_run_id).info if parent_run_id else None
    return FetchedStudy(
        exp.experiment_id, exp.name, parent_run_id, study_yaml, trials,
        parent_status=parent.status if parent else None,
        parent_started_s=parent.start_time / 1000 if parent and parent.start_time else None,
        parent_ended_s=parent.end_time / 1000 if parent and parent.end_time else None,
    )  # fmt: skip


def _find_experiment(client: MlflowClient, experiment: str, tracking_uri: str) -> Experiment:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except MlflowException:
            exp = None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UsageError(
            "SOURCE", f"no MLflow experiment {experiment!r} at {tracking_uri}; it has: {', '.join(names)}"
        )
    return exp


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def _read_text_artifact(client: MlflowClient, run_id: str, path: str) -> str | None:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        return Path(local).read_text()


# ---- a study read back as trial histories --------------------------------------------------------


def fetch_histories(tracking_uri: str, experiment: str) -> tuple[Study, list[TrialHistory]]:
    """(the study, one `TrialHistory` per trial run) of a study read back from MLflow, for
    `grokstudy plot/export <experiment>` (`results.build_tables` turns them into the tables).

    The study comes from the parent run's `study.yaml`; each trial's config from its params (the
    flattened TrialConfig), its curve from its metric histories, how it ended from its tags and
    status (a FAILED run has no outcome; a RUNNING one is still training, drawn as running).
    """
    _, study, histories = fetch_study(tracking_uri, experiment)
    return study, histories


def fetch_study(tracking_uri: str, experiment: str) -> tuple[FetchedStudy, Study, list[TrialHistory]]:
    """`fetch_histories`, with what was fetched (the study file's text, the parent run's times)."""
    import yaml

    from grokstudy.study import parse_study

    fetched = fetch_results(tracking_uri, experiment)
    if fetched.study_yaml is None:
        raise UsageError(
            "SOURCE",
            f"MLflow experiment {fetched.experiment_name!r} has no study run with a {STUDY_ARTIFACT} artifact",
        )
    study = parse_study(yaml.safe_load(fetched.study_yaml), f"{experiment}/{STUDY_ARTIFACT}")
    histories = []
    for trial in fetched.trials:
        tags = trial["tags"]
        cfg = trial_config_from_params(trial["params"])
        curve = tuple(records_from_metrics(trial["metrics"]))
        ended = trial["status"] not in ("FAILED", "RUNNING", "SCHEDULED")
        histories.append(
            TrialHistory(
                trial_id=tags.get(TRIAL_KEY_TAG) or trial["run_id"],
                point={d.key: get_path(cfg, d.key) for d in study.search.space} | {SEED: cfg.train.seed},
                cfg=cfg,
                records=curve,
                outcome=_outcome_of(tags, cfg) if ended else None,
                node=tags.get("ray.node"),
                run_id=trial["run_id"],
                error=tags.get(ERROR_TAG),
                running=trial["status"] in ("RUNNING", "SCHEDULED"),  # still training: no verdict
                weights_uri=_weights_artifact(trial["run_id"], tags) if ended else None,
            )
        )
    return fetched, study, histories


def _weights_artifact(run_id: str, tags: dict[str, str]) -> str | None:
    """A finished trial run's weights as its artifact (`runs:/...`): the copy that travels with
    MLflow, wherever the study's storage was."""
    stored = tags.get(WEIGHTS_TAG)
    if not stored:
        return None
    return f"runs:/{run_id}/{weights.ARTIFACT_PATH}/{stored.rsplit('/', 1)[-1]}"


def download_artifact(uri: str, directory: Path, tracking_uri: str | None) -> Path:
    """A `runs:/<run_id>/<path>` artifact, downloaded into `directory`: its local path."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(directory), tracking_uri=tracking_uri))


def download_run_artifact(uri: str, directory: Path, tracking_uri: str) -> Path:
    """`download_artifact` through a client of its own, so several threads may download at once
    (`mlflow.artifacts` swaps the process-wide tracking URI while it downloads)."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    return Path(_client(tracking_uri).download_artifacts(run_id, path, str(directory)))


def check_readable(tracking_uri: str) -> None:
    """Before a study is read back: a server answers, a sqlite store exists and is one (reading
    a missing one would create it empty); a one-line UsageError naming --tracking-uri otherwise."""
    try:
        check_reachable(tracking_uri)
        db = _sqlite_path(tracking_uri)
        if db is not None:
            if not db.is_file():
                raise UsageError("--tracking-uri", f"no MLflow store at {db}")
            check_store(db)
    except (StudyError, UsageError) as err:
        raise UsageError("--tracking-uri", err.msg) from None


def _outcome_of(tags: dict[str, str], cfg: TrialConfig) -> Outcome:
    """A trial run's outcome from its final tags (`member.final_tags`)."""
    steps = {
        k: int(tags[k]) if tags.get(k) else None for k in ("t_train", "t_val", "t_val_loss", "t_circuit")
    }
    return Outcome(
        phase=tags.get("phase") or "",
        **steps,
        objective=float(steps["t_val"] if steps["t_val"] is not None else cfg.train.max_steps),
        stop_reason=tags.get("stop_reason") or "budget",
    )


def records_from_metrics(metrics: dict[str, list[tuple[int, float]]]) -> list[EvalRecord]:
    """A fetched run's metric histories joined by step back into `EvalRecord`s
    (a metric missing at a step is NaN; steps without train/acc or val/acc are dropped)."""
    by_step: dict[int, dict[str, float]] = {}
    for key, history in metrics.items():
        if key in CURVE_KEYS:
            for step, value in history:
                by_step.setdefault(step, {})[key] = value
    return [
        EvalRecord.from_values(step, m)
        for step, m in sorted(by_step.items())
        if "train/acc" in m and "val/acc" in m
    ]


def trial_config_from_params(params: dict[str, str]) -> TrialConfig:
    """The TrialConfig a trial run logged as params (`config.param_text` of each flattened value).

    Unknown keys (another grokstudy version) are ignored and missing ones take
    their defaults; string fields keep their text as is.
    """
    defaults = flatten(TrialConfig())
    nested: dict[str, dict[str, Any]] = {}
    for key, default in defaults.items():
        if key not in params:
            continue
        text = params[key]
        value = text if isinstance(default, str) else param_value(text)
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return trial_from_dict(nested)
