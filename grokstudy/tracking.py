"""MLflow tracking: the only module that imports mlflow (checked against mlflow 3.17.2).

Layout in MLflow: one experiment per study (named after it), one parent run
per study, one nested child run per trial (tag `mlflow.parentRunId`, which is
what the UI nests by). Everything a trial needs crosses process and node
boundaries as plain strings: tracking URI, experiment id, parent run id and,
for a restored trial, its own run id.

Only `MlflowClient` is used, never the fluent `mlflow.start_run` stack: that
stack is per process, a reused Ray actor would inherit the previous trial's
run, and `MLFLOW_RUN_ID` in the environment silently overrides
`parent_run_id` (mlflow#15713). So this module never sets `MLFLOW_RUN_ID`.

Crash contract of a trial run (what makes "nothing lost, nothing duplicated"):
- metrics go out in `log_batch` requests that each carry whole records, and
  the SQL store commits one request's metrics together, so the run's highest
  logged step says exactly which records arrived;
- a restored trial re-opens its run by id, learns that step and skips every
  record at or below it (training is deterministic, so they are identical);
- so that a restart from a checkpoint at step C leaves no gap when records up
  to C were still queued at the crash, the caller either keeps the trial's
  records in the checkpoint and passes them to `log_records` again after the
  restore (cheap: the ones already stored are skipped), or calls `flush()`
  before it saves the checkpoint (a synchronous request on the training
  thread, ~0.1 s against a sqlite-backed server).

mlflow itself is imported lazily (about 2 s), so `grokstudy train`,
`grokstudy ui` and unit tests that only need `NullTracker` do not pay for it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import grokstudy
from grokstudy.config import TrialConfig, flatten, trial_from_dict
from grokstudy.errors import StudyError
from grokstudy.records import METRIC_KEYS, EvalRecord

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Metric, Param, Run, RunTag

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow's UI nests child runs by (what `start_run(nested=True)` sets)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
"""Experiment tag value that marks a model-training (not GenAI) experiment; key and
value read from the 3.17.2 UI bundle. 3.17.2's UI itself picks its layout from
`?workflowType=` or a browser setting (see `ui_url`); the tag is for UIs and
tools that go by it."""
GIT_COMMIT_TAG = "mlflow.source.git.commit"
KIND_TAG = "grokstudy.kind"
TUNE_EXPERIMENT_TAG = "grokstudy.tune_experiment"
"""On the parent run: where the study's Ray Tune experiment lives (storage path/name)."""
"""'study' on a parent run, 'trial' on a child run."""
TRIAL_KEY_TAG = "grokstudy.trial_key"
"""The runner's stable key of a trial; `find_trial_runs` maps it back to a run id."""
ELAPSED_KEY = "time/elapsed_s"
TRACKED_METRICS: tuple[str, ...] = (*METRIC_KEYS, ELAPSED_KEY)
"""Every metric key a trial run may carry."""
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
STUDY_ARTIFACT = "study.yaml"

# REST LogBatch limits (mlflow docs; mlflow/utils/validation.py in 3.17.2).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100


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


def ui_command(tracking_uri: str, port: int = 5000, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """argv of an MLflow UI (`mlflow server`) on `tracking_uri`, bound to `host:port`.

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


def ui_url(server_url: str, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI at `server_url`.

    MLflow 3.17's UI decides between its GenAI and model-training layouts by
    the `workflowType` query parameter, else by a browser-local setting that
    defaults to GenAI (the `mlflow.experimentKind` tag only counts when its
    workflow selector is off), so the link names the layout explicitly.
    """
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///"))
    return None if not path or path == ":memory:" else Path(path)


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    # Against a server, MLflow prints "View run ... at: URL" to stdout whenever a
    # run ends; that would interleave with the CLI's own output and every trial's log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=tracking_uri)


# ---- one trial -------------------------------------------------------------------------


class Tracker(Protocol):
    """Where a trial's curve goes. The runner calls these from the trial process."""

    @property
    def run_id(self) -> str | None:
        """The trial's run (None when nothing is tracked); store it in checkpoints."""
        ...

    def log_records(self, records: Sequence[EvalRecord]) -> None:
        """Queue eval points; returns at once. Steps at or below the last one already
        logged are skipped, so replaying after a restore never duplicates."""
        ...

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set string tags on the run (e.g. phase, t_train, stop_reason); may be queued,
        but stored by the next `flush` or `finish` at the latest."""
        ...

    def flush(self) -> None:
        """Block until everything queued is stored (see the module's crash contract)."""
        ...

    def finish(self, status: str) -> None:
        """Flush, then end the run as FINISHED, FAILED or KILLED. Later calls do nothing."""
        ...


class NullTracker:
    """Tracks nothing: `grokstudy train`, unit tests, studies without MLflow."""

    run_id: str | None = None

    def log_records(self, records: Sequence[EvalRecord]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowTrialTracker:
    """A trial's nested MLflow run, logged off the training loop.

    Only `start` talks to the store on the caller's thread (one request for a
    new run). Params, tags and records are queued; a background thread sends
    them with `MlflowClient.log_batch` every `flush_every` records or
    `flush_interval_s` seconds, whichever comes first (and soon after
    `set_tags`). A failed send keeps what it could not send, records with their
    original timestamps (so a retried request that did reach the store is
    deduplicated by MLflow's metric primary key), for the next round.
    `flush()` and `finish()` send on the caller's thread and raise if the store
    cannot be reached.

    MLflow's own async logging (`log_batch(..., synchronous=False)`, experimental
    in 3.17) was not used: it is one queue per process shared by all runs, and
    its flush tears down and restarts that queue's thread pools.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        last_step: int,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        flush_every: int = 100,
        flush_interval_s: float = 5.0,
    ) -> None:
        """Use `start`; this attaches to an open run whose records up to `last_step` are
        stored, and queues `params` and `tags` for it."""
        self._client = client
        self._run_id = run_id
        self._last_step = last_step
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._outbox = _Outbox(params=_str_dict(params or {}), tags=_str_dict(tags or {}))
        self._lock = threading.Lock()  # guards _outbox and _last_step
        self._send_lock = threading.Lock()  # one sender at a time keeps steps in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._loop, name=f"grokstudy-mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        if self._outbox.params or self._outbox.tags:
            self._wake.set()

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def last_step(self) -> int:
        """The highest step accepted so far (queued or stored); -1 before any."""
        return self._last_step

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id: str | None = None,
        *,
        flush_every: int = 100,
        flush_interval_s: float = 5.0,
    ) -> MlflowTrialTracker:
        """Open a trial's run: a new child of `parent_run_id`, or, given `run_id`
        (a trial restored from a checkpoint), that same run again.

        `params` is the resolved TrialConfig flattened to dotted keys (values
        are stringified); they are sent in the background, by at most 100 per
        request. Re-opening sets the run RUNNING, sends params and tags again
        (identical values are a no-op in MLflow, and a crash between creating
        the run and sending them leaves nothing missing) and reads the last
        logged step so that `log_records` continues right after it.
        """
        client = _client(tracking_uri)
        all_tags = {**tags, KIND_TAG: "trial"}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        if run_id is None:
            run = client.create_run(experiment_id, tags=_str_dict(all_tags), run_name=run_name)
            return cls(
                client,
                run.info.run_id,
                -1,
                params,
                flush_every=flush_every,
                flush_interval_s=flush_interval_s,
            )
        run = _get_run(client, run_id, tracking_uri)
        if run.info.experiment_id != experiment_id:
            raise StudyError(
                "run.tracking_uri",
                f"run {run_id} belongs to experiment {run.info.experiment_id}, not {experiment_id}",
            )
        client.update_run(run_id, status="RUNNING")
        last_step = _last_logged_step(client, run_id)
        return cls(
            client,
            run_id,
            last_step,
            params,
            all_tags,
            flush_every=flush_every,
            flush_interval_s=flush_interval_s,
        )

    def log_records(self, records: Sequence[EvalRecord]) -> None:
        now_ms = int(time.time() * 1000)
        with self._lock:
            for record in records:
                if record.step <= self._last_step:
                    continue
                self._outbox.records.append((record, now_ms))
                self._last_step = record.step
            full = len(self._outbox.records) >= self._flush_every
        if full:
            self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags; the sender sends them within moments, `flush`/`finish` for sure."""
        if self._finished:
            _log_tags(self._client, self._run_id, tags)
            return
        with self._lock:
            self._outbox.tags |= _str_dict(tags)
        self._wake.set()

    def flush(self) -> None:
        self._send()

    def finish(self, status: str) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, not {status!r}")
        if self._finished:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        # If this raises, the run stays RUNNING: a retry from the last checkpoint
        # re-opens it and logs what is missing.
        self._send()
        self._client.set_terminated(self._run_id, status=status)
        self._finished = True

    # -- the background sender --

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return  # finish() sends the rest itself
            try:
                self._send()
            except Exception as err:  # kept for the next round; flush()/finish() raise
                log.warning("MLflow logging to run %s failed, will retry: %s", self._run_id, err)

    def _send(self) -> None:
        with self._send_lock:
            with self._lock:
                outbox, self._outbox = self._outbox, _Outbox()
            requests = outbox.requests()
            sent = 0
            try:
                for request in requests:
                    self._client.log_batch(self._run_id, *request.entities())
                    sent += 1
            finally:
                if sent < len(requests):
                    unsent = _Outbox.merge(requests[sent:])
                    with self._lock:
                        self._outbox = unsent.then(self._outbox)


@dataclass(slots=True)
class _Outbox:
    """What a trial tracker has yet to send: params, tags, (record, timestamp ms)."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    records: list[tuple[EvalRecord, int]] = field(default_factory=list)

    def entities(self) -> tuple[list[Metric], list[Param], list[RunTag]]:
        """(metrics, params, tags) as MLflow entities, the arguments of `log_batch`."""
        from mlflow.entities import Param, RunTag

        metrics = [m for record, ts in self.records for m in _record_metrics(record, ts)]
        return (
            metrics,
            [Param(k, v) for k, v in self.params.items()],
            [RunTag(k, v) for k, v in self.tags.items()],
        )

    def requests(self) -> list[_Outbox]:
        """log_batch requests within MLflow's limits (100 params, 100 tags, 1000
        entities) that never split a record between two requests."""
        params, tags = list(self.params.items()), list(self.tags.items())
        out: list[_Outbox] = []
        while params or tags or not out:
            head = _Outbox(dict(params[:MAX_PARAMS_TAGS_PER_BATCH]), dict(tags[:MAX_PARAMS_TAGS_PER_BATCH]))
            params, tags = params[MAX_PARAMS_TAGS_PER_BATCH:], tags[MAX_PARAMS_TAGS_PER_BATCH:]
            out.append(head)
        room = MAX_METRICS_PER_BATCH - len(out[-1].params) - len(out[-1].tags)
        for record, ts in self.records:
            size = len(record.metrics()) + 1  # + ELAPSED_KEY
            if size > room and out[-1].records:
                out.append(_Outbox())
                room = MAX_METRICS_PER_BATCH
            out[-1].records.append((record, ts))
            room -= size
        return [r for r in out if r.params or r.tags or r.records]

    @staticmethod
    def merge(parts: Sequence[_Outbox]) -> _Outbox:
        out = _Outbox()
        for part in parts:
            out.params |= part.params
            out.tags |= part.tags
            out.records += part.records
        return out

    def then(self, later: _Outbox) -> _Outbox:
        """This outbox followed by `later` (later tag values win)."""
        return _Outbox(self.params | later.params, self.tags | later.tags, self.records + later.records)


def _record_metrics(record: EvalRecord, timestamp_ms: int) -> list[Metric]:
    from mlflow.entities import Metric

    values = record.metrics() | {ELAPSED_KEY: float(record.elapsed_s)}
    return [Metric(key, value, timestamp_ms, record.step) for key, value in values.items()]


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
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
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
            _log_tags(self._client, parent_run_id, all_tags)
        _log_params(self._client, parent_run_id, params)
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

    def set_tags(self, tags: dict[str, str]) -> None:
        _log_tags(self._client, self._require_open(), tags)

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
    for key, value in _str_dict(params).items():
        if key in old and old[key] != value:
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


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _str_dict(params).items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def _log_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in _str_dict(tags).items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


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


def find_study_run(tracking_uri: str, study_name: str, tune_experiment: str) -> str | None:
    """The parent run of an earlier execution of this study whose Ray Tune experiment is
    `tune_experiment` (its `grokstudy.tune_experiment` tag), latest first; None if none.

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
        f"tags.`{KIND_TAG}` = 'study' and tags.`{TUNE_EXPERIMENT_TAG}` = '{tune_experiment}'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def find_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str | None) -> dict[str, str]:
    """{grokstudy.trial_key: run_id} of the trial runs under `parent_run_id`
    (or, without one, of the whole experiment), so a retried trial re-attaches
    to its run instead of creating another. If a key has several runs, the
    earliest started wins."""
    filter_string = (
        f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{KIND_TAG}` = 'trial'"
    )
    runs = _search_all(
        _client(tracking_uri), experiment_id, filter_string, order_by=["attributes.start_time ASC"]
    )
    out: dict[str, str] = {}
    for run in runs:
        key = run.data.tags.get(TRIAL_KEY_TAG)
        if key is not None:
            out.setdefault(key, run.info.run_id)
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


def fetch_results(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    *,
    page_size: int = 1000,
    workers: int = 8,
) -> FetchedStudy:
    """Read every trial run of a study's experiment (by name or id) with its
    params, tags and full metric histories.

    Runs are listed with paged `search_runs`, so any number works. Histories
    cost one `get_metric_history` request per run per metric (7 per trial),
    sent from `workers` threads: 100 trials of 61 eval points took 12 s from a
    local one-worker `mlflow server` on 2 busy cores (about 0.1 s a trial;
    minutes for thousands). For big studies prefer the Parquet tables the
    study writes. A step logged twice keeps its latest value.
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
    filter_string = (
        f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{KIND_TAG}` = 'trial'"
    )
    runs = _search_all(client, exp.experiment_id, filter_string, page_size, ["attributes.start_time ASC"])

    jobs = [(run.info.run_id, key) for run in runs for key in run.data.metrics]
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
    return FetchedStudy(exp.experiment_id, exp.name, parent_run_id, study_yaml, trials)


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
        raise StudyError(
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


# ---- a study read back as result tables -------------------------------------------------------

_STATUS_AS_TUNE = {"FINISHED": "TERMINATED", "FAILED": "ERROR"}


def fetch_tables(tracking_uri: str, experiment: str) -> tuple[Any, Any, dict[str, str]]:
    """(trials table, curves table, diagram axes) of a study read back from MLflow,
    for `grokstudy plot/export <experiment>`.

    The study comes from the parent run's `study.yaml`, each trial's config from
    its params (the flattened TrialConfig), its curve from its metric histories;
    phases are classified afresh with the study's phase rule. Trials without an
    eval point are left out.
    """
    import yaml

    from grokstudy import phases, results
    from grokstudy.study import parse_study

    fetched = fetch_results(tracking_uri, experiment)
    if fetched.study_yaml is None:
        raise StudyError(
            "SOURCE",
            f"MLflow experiment {fetched.experiment_name!r} has no study run with a {STUDY_ARTIFACT} artifact",
        )
    study = parse_study(yaml.safe_load(fetched.study_yaml), f"{fetched.experiment_name}/{STUDY_ARTIFACT}")
    searched = tuple(d.key for d in study.search.space)
    trial_rows, curve_rows = [], []
    for trial in fetched.trials:
        records = records_from_metrics(trial["metrics"])
        if not records:
            continue
        cfg = trial_config_from_params(trial["params"])
        tags = trial["tags"]
        trial_id = tags.get("ray.trial_id") or tags.get(TRIAL_KEY_TAG) or trial["run_id"]
        failed = trial["status"] == "FAILED"
        stop_reason = "error" if failed else tags.get("stop_reason") or "budget"
        trial_rows.append(
            results.trial_row(
                study.name,
                trial_id,
                tags.get("grokstudy.point_id", ""),
                cfg,
                searched,
                phases.classify_records(records, study.phases, cfg.train.max_steps),
                final_train_loss=records[-1].train_loss,
                final_val_loss=records[-1].val_loss,
                stop_reason=stop_reason if stop_reason in results.STOP_REASONS else "budget",
                wall_s=records[-1].elapsed_s,
                node=tags.get("ray.node"),
                run_id=trial["run_id"],
                status=_STATUS_AS_TUNE.get(trial["status"], trial["status"]),
            )
        )
        curve_rows.extend(results.curve_rows(study.name, trial_id, records))
    diagram = {
        k: v for k, v in (("x", study.diagram.x), ("y", study.diagram.y), ("facet", study.diagram.facet)) if v
    }
    return results.trials_table(trial_rows), results.curves_table(curve_rows), diagram


def records_from_metrics(metrics: dict[str, list[tuple[int, float]]]) -> list[EvalRecord]:
    """A fetched run's metric histories joined by step back into `EvalRecord`s
    (a metric missing at a step is NaN; steps without train/acc or val/acc are dropped)."""
    by_step: dict[int, dict[str, float]] = {}
    for key, history in metrics.items():
        for step, value in history:
            by_step.setdefault(step, {})[key] = value
    nan = float("nan")
    return [
        EvalRecord(
            step=step,
            train_loss=m.get("train/loss", nan),
            train_acc=m["train/acc"],
            val_loss=m.get("val/loss", nan),
            val_acc=m["val/acc"],
            weights_norm=m.get("weights/norm", nan),
            fourier_top_k_share=m.get("fourier/top_k_share", nan),
            elapsed_s=m.get(ELAPSED_KEY, 0.0),
        )
        for step, m in sorted(by_step.items())
        if "train/acc" in m and "val/acc" in m
    ]


def trial_config_from_params(params: dict[str, str]) -> TrialConfig:
    """The TrialConfig a trial run logged as params (`str` of each flattened value).

    Unknown keys (another grokstudy version) are ignored and missing ones take
    their defaults; string fields keep their text as is.
    """
    import ast

    defaults = flatten(TrialConfig())
    nested: dict[str, dict[str, Any]] = {}
    for key, default in defaults.items():
        if key not in params:
            continue
        text = params[key]
        if isinstance(default, str):
            value: Any = text
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return trial_from_dict(nested)
