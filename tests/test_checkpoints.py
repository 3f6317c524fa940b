"""A trial's checkpoints on storage: written as step directories, the newest whole one found
whatever Tune recorded, old ones pruned to a marker; on a real local filesystem through pyarrow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from grokstudy import checkpoints
from grokstudy.checkpoints import SavedMember
from grokstudy.records import EvalRecord, Outcome

FS = pafs.LocalFileSystem()


def state_writer(payload: bytes = b"weights"):
    """A stand-in for `Trainer.save`: a whole zip, the format of torch.save."""
    import zipfile

    def save(path: Path) -> None:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data.pkl", payload)

    return save


def member(step: int, outcome: Outcome | None = None) -> dict[str, SavedMember]:
    return {
        "t-s0": SavedMember(
            [EvalRecord(s, 1.0, 0.5, 2.0, 0.1, 3.0) for s in range(0, step + 1, 50)], "r", outcome
        )
    }


def persist(trial: Path, index: int, step: int, **kw) -> Path:
    """What Tune does with a reported checkpoint: its directory under the trial's, `checkpoint_NNNNNN`."""
    directory = trial / f"checkpoint_{index:06d}"
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints.write(directory, step, member(step, **kw), state_writer())
    return directory


def test_the_newest_whole_checkpoint_wins_whatever_tune_recorded(tmp_path: Path) -> None:
    trial = tmp_path / "trial_a"
    recorded = persist(trial, 0, 100)
    persist(trial, 1, 200)
    torn = persist(trial, 2, 300)
    (torn / "step-0000000300" / checkpoints.STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    found = checkpoints.newest(FS, str(trial), named=str(recorded))
    assert (found.step, [r.step for r in found.members["t-s0"].records][-1]) == (200, 200)
    with found.local() as d:
        assert (d / checkpoints.STATE_FILE).exists()
    assert checkpoints.read_members(FS, str(recorded))["t-s0"].run_id == "r"


def test_two_steps_written_into_one_of_tunes_directories_stay_apart(tmp_path: Path) -> None:
    """A resumed trial may write a later step into a directory a killed run already filled."""
    trial = tmp_path / "trial_a"
    persist(trial, 3, 300)
    persist(trial, 3, 500, outcome=Outcome("grokking", 100, 450, None, 450.0, "generalized"))
    found = checkpoints.newest(FS, str(trial))
    assert found.step == 500 and found.members["t-s0"].outcome.phase == "grokking"


def test_pruning_keeps_the_newest_whole_ones_and_leaves_a_marker_where_it_emptied_a_directory(
    tmp_path: Path,
) -> None:
    trial = tmp_path / "trial_a"
    dirs = [persist(trial, i, 100 * i) for i in range(5)]
    (dirs[4] / "step-0000000400" / checkpoints.META_FILE).write_text("{not json")  # torn: not kept
    checkpoints.prune(FS, str(trial))
    kept = sorted(p.parent.name for p in trial.glob("checkpoint_*/step-*"))
    assert kept == ["checkpoint_000002", "checkpoint_000003"]
    for d in (dirs[0], dirs[1], dirs[4]):  # Tune's directories stay, so a stale record still restores
        assert d.is_dir() and (d / checkpoints.PRUNED_FILE).exists()
    assert checkpoints.newest(FS, str(trial), named=str(dirs[0])).step == 300


def test_a_trial_with_no_whole_checkpoint_has_none(tmp_path: Path) -> None:
    trial = tmp_path / "trial_a"
    directory = persist(trial, 0, 100)
    (directory / "step-0000000100" / checkpoints.STATE_FILE).unlink()
    assert checkpoints.newest(FS, str(trial), named=str(directory)) is None
    assert checkpoints.read_members(FS, str(directory)) == {} and checkpoints.read_members(FS, None) == {}
    assert checkpoints.newest(FS, str(tmp_path / "never-ran")) is None


def test_a_checkpoint_of_the_earlier_layout_is_read_where_tune_recorded_it(tmp_path: Path) -> None:
    """grokstudy <= 0.1.0 wrote meta.json and state.pt at the top of Tune's directory."""
    directory = tmp_path / "trial_a" / "checkpoint_000004"
    directory.mkdir(parents=True)
    state_writer()(directory / checkpoints.STATE_FILE)
    saved = {t: m.to_dict() for t, m in member(400).items()}
    (directory / checkpoints.META_FILE).write_text(json.dumps({"format": 1, "members": saved}))
    found = checkpoints.newest(FS, str(directory.parent), named=str(directory))
    assert found is not None and found.members["t-s0"].records[-1].step == 400


@pytest.mark.parametrize("outcome", [None, Outcome("memorization", 12, None, None, 300.0, "budget")])
def test_what_a_checkpoint_keeps_of_a_member_reads_back_equal(outcome: Outcome | None) -> None:
    saved = member(300, outcome)["t-s0"]
    assert SavedMember.from_dict(json.loads(json.dumps(saved.to_dict()))) == saved
