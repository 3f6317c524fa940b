"""What a running study has done so far: one small JSON file the driver rewrites as trials start
and end (`<out>/progress.json`, and beside the Tune experiment under `run.storage`), read by
`grokstudy status` without touching the study. Standard library only.

A snapshot names every member the driver knows of (a point x seed with its status and, once it
finished, its phase), the study's size, when it started and who is driving it, so a reader can
count, draw the grid and tell a live driver from one that was killed (`driver_alive`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

SNAPSHOT_FILE = "progress.json"
STORAGE_SNAPSHOT_FILE = "grokstudy-progress.json"
"""Its copy in the Tune experiment's directory under `run.storage` (for a cluster study)."""
HEARTBEAT_S = 30.0
"""A live driver rewrites its snapshot at least this often, even when nothing changed."""


@dataclass(frozen=True, slots=True)
class MemberState:
    trial_id: str
    point: dict[str, Any]
    """Its searched values and train.seed, as plain JSON values (a Tune config's point)."""
    status: str
    """running | done | failed (pending members are not listed: they have not been asked for)."""
    phase: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    study: str
    total: int | None
    """Trials the study will run (None: an adaptive sampler decides as it goes)."""
    started_at: float
    """Unix time the study first started (kept across resumes)."""
    run_started_at: float
    """Unix time this driver run started."""
    done_at_run_start: int
    """Members already done when this driver run started (a resume's): the rate counts the rest."""
    updated_at: float
    members: list[MemberState] = field(default_factory=list)
    driver: dict[str, Any] = field(default_factory=dict)
    """{"pid", "host", "host_id", "state"}: state is running, or how it ended (finished,
    interrupted, crashed)."""
    warning: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for m in self.members if m.status == status)

    @property
    def pending(self) -> int | None:
        if self.total is None:
            return None
        return max(0, self.total - sum(1 for m in self.members if m.status != "pending"))

    def rate_per_s(self, now: float) -> float | None:
        """Members finished per second by this driver run (None: none yet)."""
        done = self.count("done") + self.count("failed") - self.done_at_run_start
        spent = now - self.run_started_at
        return done / spent if done > 0 and spent > 0 else None

    def eta_s(self, now: float) -> float | None:
        rate, pending = self.rate_per_s(now), self.pending
        if rate is None or pending is None:
            return None
        return (pending + self.count("running")) / rate

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Inverse of `to_json`; ValueError when the text is not a snapshot."""
        try:
            raw = json.loads(text)
            members = [MemberState(**m) for m in raw.pop("members", [])]
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known}, members=members)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a grokstudy progress snapshot ({err})") from None


def this_driver(state: str = "running") -> dict[str, Any]:
    from grokstudy.storage import host_id

    return {"pid": os.getpid(), "host": socket.gethostname(), "host_id": host_id(), "state": state}


def driver_alive(snapshot: Snapshot, now: float | None = None) -> bool | None:
    """Is the driver that wrote `snapshot` still running? True/False when it can be told (its
    process on this machine, or a state other than running), else whether its heartbeat is
    fresh (None: a snapshot of another machine more than 3 heartbeats old)."""
    from grokstudy.storage import host_id

    d = snapshot.driver
    if d.get("state", "running") != "running":
        return False
    here = host_id()
    if here and d.get("host_id") == here and isinstance(d.get("pid"), int):
        try:
            os.kill(d["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = time.time() if now is None else now
    return True if now - snapshot.updated_at < 3 * HEARTBEAT_S else None
