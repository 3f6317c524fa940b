"""The live progress of a study, counted from its trials' reports, and the MLflow-outage rule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from grokstudy import member, progress
from grokstudy.records import Outcome


def trial(tid: str, *members: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"members": [{"trial_id": m} for m in members]})


def report(down_s: float = 0.0, reached_s: float = -1.0, done: tuple[str, ...] = ()) -> dict:
    outcomes = [
        {"trial_id": t, **Outcome("grokking", 1, 2, None, 2.0, "generalized").to_dict()} for t in done
    ]
    return {member.OUTCOMES: json.dumps(outcomes), "tracking_down_s": down_s, "tracking_reached_s": reached_s,
            "tracking_error": "ConnectionError: refused" if down_s else ""}  # fmt: skip


def test_members_are_counted_done_running_failed_and_pending() -> None:
    shown: list[progress.Progress] = []
    p = progress.StudyProgress(total=5, emit=shown.append, outage_limit_s=60, tracking_uri="u", known={},
                               every_s=0)  # fmt: skip
    a, b = trial("A", "a0", "a1"), trial("B", "b0")
    p.started(a)
    p.started(b)
    p.reported(a, report(done=("a0",)))
    p.errored(b)
    last = shown[-1]
    assert (last.done, last.running, last.failed, last.pending, dict(last.phases)) == (
        1,
        1,
        1,
        2,
        {"grokking": 1},
    )


def test_an_outage_counts_from_the_first_trial_that_saw_it_even_when_each_trial_is_shorter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trials of a few seconds each see only their own part of an outage; the study sees all of it."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    p = progress.StudyProgress(total=None, emit=None, outage_limit_s=13, tracking_uri="u", known={})
    for i in range(3):  # three short trials one after another, each down for 4 s when it reports
        now[0] += 4
        p.reported(trial(f"T{i}", f"t{i}"), report(down_s=4))
    assert p.warning and now[0] - p.down_since == 12  # the warning shows once, from the first report
    now[0] += 4
    with pytest.raises(progress.TrackingUnavailable, match="unreachable for 16 s, longer than"):
        p.reported(trial("T3", "t3"), report(down_s=4))


def test_an_outage_ends_only_when_a_trial_stored_something_after_it_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    p = progress.StudyProgress(total=None, emit=None, outage_limit_s=60, tracking_uri="u", known={})
    p.reported(trial("A", "a"), report(down_s=5))
    now[0] += 5
    p.reported(trial("B", "b"), report(down_s=0, reached_s=-1))  # a new trial that has not tried yet
    p.reported(trial("C", "c"), report(down_s=0, reached_s=20))  # stored something before the outage
    assert p.down_since == 995.0 and p.warning
    p.reported(trial("D", "d"), report(down_s=0, reached_s=1))  # stored something 1 s ago: MLflow is back
    assert p.down_since is None and p.warning is None
