"""A trial's checkpoints on storage: written, found, pruned. `pyarrow.fs` only, so the same code
reads a local directory, an NFS mount, s3:// or gs://, and no Ray is needed to test it.

Ray Tune gives each checkpoint a reported directory of its own under the trial's directory and
is told to keep them all (`CheckpointConfig(num_to_keep=None)`): Tune deletes nothing, so nothing
it recorded can have been deleted by a killed driver. grokstudy owns retention instead:

- A checkpoint is a step directory, `step-<step:010d>/`, inside the directory Tune persists:
  `state.pt` (the training state of a lone member or of a pack) and `meta.json` (each member's
  curve, MLflow run id and outcome, read without loading the state). The step in the name keeps
  two checkpoints apart even when Tune writes them into one directory (a resumed trial may write
  into a directory a killed driver's trial had already filled with another step).
- A checkpoint is *whole* when its `meta.json` parses and its `state.pt` is a whole zip (the
  format of `torch.save`); a worker killed while persisting leaves a torn one, which is skipped.
- After each checkpoint the trial prunes every step directory but the `KEEP` newest whole ones
  (`prune`), leaving a small `PRUNED` marker where it emptied Tune's directory: Tune refuses to
  restore a trial whose recorded checkpoint directory is gone, and the experiment snapshot a
  killed driver left may name a pruned one.
- A trial restored from any of its checkpoints continues from the newest whole checkpoint of its
  trial directory (`newest`): Tune's own or, when that one was pruned or torn, a newer one. The
  driver reads the same (`read_members`) when the study ends, so the tables get every curve whole.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from grokstudy import records
from grokstudy.records import EvalRecord, Outcome

STATE_FILE = "state.pt"
META_FILE = "meta.json"
PRUNED_FILE = "PRUNED"
KEEP = 2
"""Whole checkpoints a trial keeps: the newest, and the one before in case the newest is torn."""
META_FORMAT = 2
_STEP_DIR = re.compile(r"step-(\d{10})$")


@dataclass(frozen=True, slots=True)
class SavedMember:
    """What a checkpoint keeps of one member besides the training state."""

    records: list[EvalRecord]
    run_id: str | None
    outcome: Outcome | None
    weights_uri: str | None = None
    """Its final weights (`weights`), once it finished with `run.save_weights: final`."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": records.to_dicts(self.records),
            "run_id": self.run_id,
            "outcome": None if self.outcome is None else self.outcome.to_dict(),
            "weights_uri": self.weights_uri,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedMember:
        outcome = d.get("outcome")
        return cls(
            records.from_dicts(d.get("records", [])),
            d.get("run_id"),
            outcome and Outcome.from_dict(outcome),
            d.get("weights_uri"),
        )


@dataclass(frozen=True, slots=True)
class Found:
    """A whole checkpoint on storage."""

    filesystem: Any
    """The `pyarrow.fs.FileSystem` it lives on."""
    path: str
    """Its step directory (or, for a checkpoint of grokstudy <= 0.1.0, Tune's directory)."""
    step: int
    members: dict[str, SavedMember]
    """{member trial id: what the checkpoint keeps of it}."""

    @contextlib.contextmanager
    def local(self) -> Iterator[Path]:
        """The checkpoint's directory on this machine (downloaded first when it is remote)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="grokstudy-checkpoint-") as d:
            pafs.copy_files(self.path, d, source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
            yield Path(d)


def write(
    directory: Path, step: int, members: dict[str, SavedMember], save_state: Callable[[Path], None]
) -> None:
    """Write a checkpoint into `directory` (which Tune then persists): its step directory with
    `save_state(path)`'s state file and the members' meta."""
    step_dir = Path(directory) / f"step-{step:010d}"
    step_dir.mkdir(parents=True)
    save_state(step_dir / STATE_FILE)
    meta = {"format": META_FORMAT, "step": step, "members": {t: m.to_dict() for t, m in members.items()}}
    (step_dir / META_FILE).write_text(json.dumps(meta))


def trial_dir(checkpoint_path: str) -> str:
    """The trial directory holding a checkpoint Tune reported (`Checkpoint.path`): its parent."""
    return checkpoint_path.rstrip("/").rsplit("/", 1)[0]


def newest(filesystem: Any, trial_directory: str, named: str | None = None) -> Found | None:
    """The newest whole checkpoint of a trial, or None when it has none. `named` (the directory
    Tune recorded) is also read in the layout of grokstudy <= 0.1.0, files at its top."""
    for step, path in sorted(_step_dirs(filesystem, trial_directory), reverse=True):
        found = _read(filesystem, path, step)
        if found is not None:
            return found
    return _read(filesystem, named, None) if named else None


def read_members(filesystem: Any, checkpoint_path: str | None) -> dict[str, SavedMember]:
    """{member trial id: what its trial's newest whole checkpoint keeps}, from a checkpoint Tune
    reported (its trial's newest, whichever that is); {} for None or when none is whole."""
    if checkpoint_path is None:
        return {}
    found = newest(filesystem, trial_dir(checkpoint_path), named=checkpoint_path)
    return {} if found is None else found.members


def prune(filesystem: Any, trial_directory: str, keep: int = KEEP) -> None:
    """Delete every step directory of a trial but the `keep` newest whole ones."""
    kept = 0
    for _, path in sorted(_step_dirs(filesystem, trial_directory), reverse=True):
        if kept < keep and _whole(filesystem, path):
            kept += 1
            continue
        parent = path.rsplit("/", 1)[0]
        with filesystem.open_output_stream(f"{parent}/{PRUNED_FILE}") as f:
            f.write(b"grokstudy pruned this checkpoint; its trial continues from a newer one\n")
        filesystem.delete_dir(path)


def _step_dirs(filesystem: Any, trial_directory: str) -> list[tuple[int, str]]:
    """(step, path) of every step directory inside the trial's checkpoint directories (one listing,
    which an object store answers in one paged request)."""
    selector = pafs.FileSelector(trial_directory, allow_not_found=True, recursive=True)
    found = []
    for info in filesystem.get_file_info(selector):
        match = _STEP_DIR.search(info.path)
        if info.type == pafs.FileType.Directory and match:
            found.append((int(match.group(1)), info.path))
    return found


def _read(filesystem: Any, path: str, step: int | None) -> Found | None:
    if not _whole(filesystem, path):
        return None
    with filesystem.open_input_stream(f"{path}/{META_FILE}") as f:
        meta = json.loads(f.read().decode())
    members = {t: SavedMember.from_dict(m) for t, m in meta.get("members", {}).items()}
    return Found(filesystem, path, meta.get("step", step if step is not None else -1), members)


def _whole(filesystem: Any, path: str) -> bool:
    """Does `path` hold a readable meta.json and a whole state file?"""
    try:
        with filesystem.open_input_stream(f"{path}/{META_FILE}") as f:
            json.loads(f.read().decode())
        with filesystem.open_input_file(f"{path}/{STATE_FILE}") as f, zipfile.ZipFile(f):
            return True
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
