"""A trial's final weights: one file per finished trial, on the study's storage.

    <storage>/<study>/weights/<trial_id>.pt     (`run.save_weights: final`, the default)

A file is `torch.save` of {"format", "trial_id", "step", "config" (`config.to_dict`, as JSON text),
"model" (the member's state dict on CPU)}, loadable with `weights_only=True`. The trial writes it
when it ends, packed or not (a pack's member leaves the stack at the next step), before its
checkpoint records the ending: the checkpoint's `SavedMember.weights_uri` names it, and so does
`trials.parquet`'s `weights_uri` column. A trial killed between the two writes it again when it
resumes (training is deterministic, so the file is the same); `prune` removes a file whose trial
did not finish, so a weights file exists iff its trial finished.

The file also goes to the trial's MLflow run as the artifact `weights/<trial_id>.pt`; a study read
back from MLflow names it as `runs:/<run_id>/weights/<trial_id>.pt`. `load` reads either.

Files go through `storage` (a local path, NFS, s3://, gs://); torch is imported only where a file
is written or read, so the driver never imports it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grokstudy import storage
from grokstudy.config import TrialConfig, to_dict, trial_from_dict
from grokstudy.errors import UsageError, one_line

FORMAT = 1
DIRECTORY = "weights"
ARTIFACT_PATH = "weights"
"""Where the file goes in the trial's MLflow run."""
SUFFIX = ".pt"


def directory(experiment_path: str) -> str:
    """Where a study's weights live: beside its Ray Tune experiment, on the same storage."""
    return storage.join(experiment_path, DIRECTORY)


def file_name(trial_id: str) -> str:
    return f"{trial_id}{SUFFIX}"


def write_local(path: Path, trial_id: str, step: int, cfg: TrialConfig, state_dict: dict[str, Any]) -> None:
    """The weights file of a trial that ended at `step`, written to a local `path`."""
    import torch

    payload = {
        "format": FORMAT,
        "trial_id": trial_id,
        "step": int(step),
        "config": json.dumps(to_dict(cfg)),
        "model": state_dict,
    }
    torch.save(payload, path)


def load(uri: str, tracking_uri: str | None = None) -> tuple[TrialConfig, dict[str, Any], dict[str, Any]]:
    """(the trial's config, its state dict on CPU, the file's other fields) from a weights file:
    a path, an s3://, gs:// or file:// URI, or `runs:/<run_id>/weights/<file>` in MLflow at
    `tracking_uri`. UsageError when there is none there."""
    import torch

    with _local_copy(uri, tracking_uri) as path:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise UsageError("weights_uri", f"cannot read {uri} as a weights file ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError("weights_uri", f"{uri} is not a grokstudy weights file of format {FORMAT}")
    cfg = trial_from_dict(json.loads(payload["config"]))
    meta = {k: v for k, v in payload.items() if k not in ("model", "config")}
    return cfg, payload["model"], meta


@contextlib.contextmanager
def _local_copy(uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """The weights file as a local path (downloaded to a temporary directory first when remote)."""
    if not uri.startswith("runs:/") and ("://" not in uri or uri.startswith("file://")):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise UsageError("weights_uri", f"no weights file at {uri}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="grokstudy-weights-") as tmp:
        local = Path(tmp) / "weights.pt"
        try:
            if uri.startswith("runs:/"):
                from grokstudy import tracking

                local = tracking.download_artifact(uri, Path(tmp), tracking_uri)
            else:
                storage.fetch_file(uri, local)
        except Exception as err:
            raise UsageError("weights_uri", f"cannot fetch {uri} ({one_line(err, 300)})") from None
        yield local


def copy_to(uri: str, path: Path, tracking_uri: str | None = None) -> int:
    """Copy the weights file at `uri` (what `load` reads) to the local `path`, atomically; its
    bytes. Safe to call from several threads at once."""
    if uri.startswith("runs:/") and not tracking_uri:
        raise UsageError("weights_uri", f"{uri} is an MLflow artifact: give its tracking URI")
    with storage.atomic_path(path) as tmp:
        if uri.startswith("runs:/"):
            from grokstudy import tracking

            with tempfile.TemporaryDirectory(prefix="grokstudy-weights-") as d:
                shutil.copyfile(tracking.download_run_artifact(uri, Path(d), str(tracking_uri)), tmp)
        else:
            storage.fetch_file(uri, tmp)
    return path.stat().st_size


FILE_OVERHEAD_BYTES = 3_500
"""A weights file beyond its float32 parameters: torch.save's zip, the config, the names."""


def estimated_bytes(cfg: TrialConfig) -> int:
    """About how large a trial's weights file is, from its config alone (no torch, no download)."""
    from grokstudy import footprint

    n = footprint.parameters(cfg.model, footprint.vocabulary(cfg.task))
    return n * footprint.FLOAT32 + FILE_OVERHEAD_BYTES


def prune(weights_directory: str, finished: set[str]) -> tuple[int, int]:
    """Remove the weights files of trials not in `finished` (a trial killed after writing its
    weights that never finished since); (files kept, their bytes)."""
    kept = size = 0
    for name, n_bytes in storage.list_files(weights_directory, SUFFIX).items():
        if name.removesuffix(SUFFIX) in finished:
            kept, size = kept + 1, size + n_bytes
        else:
            storage.delete_file(storage.join(weights_directory, name))
    return kept, size
