"""What is checked once Ray is up and before a study's trials start: the same study (or one that
only grew) on resume, a GPU where cuda is asked for, and a node that can hold a trial (memory,
CPUs, GPUs). Each refusal is a one-line StudyError; the checks that can run before Ray starts (versions, places,
MLflow) are `compat.check`, `storage.check_dir`/`check_storage` and `tracking.check_reachable`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from grokstudy import compat, footprint, storage
from grokstudy.config import Study
from grokstudy.errors import StudyError

log = logging.getLogger(__name__)

STUDY_FILE = "grokstudy-study.yaml"
"""Beside the Tune experiment: the resolved study it runs (a resume must match it)."""
LOOK_EVERY_S = 10.0
"""How often a study waiting for a node that fits asks Ray again."""


def check_same_study(study: Study, study_yaml: str, experiment_path: str) -> tuple[bool, tuple[str, ...]]:
    """(resumed, grown): whether the experiment exists (a resume), and how the study grew since
    its trials started (`study.compare`: more seeds, axis values, budget). Any other change is
    refused in one line naming the field. Writes the study beside the experiment."""
    import yaml

    from grokstudy.study import compare, parse_study

    file = storage.join(experiment_path, STUDY_FILE)
    # Resumable once Tune has saved an experiment snapshot; a driver killed before the first
    # one leaves nothing that needs keeping: its trials start afresh and re-attach to their runs.
    resumed = compat.has_experiment_snapshot(experiment_path)
    text = storage.read_text(file) if resumed else None
    grown: tuple[str, ...] = ()
    if text is not None:
        growth = compare(parse_study(yaml.safe_load(text), file), study)
        if growth.refused:
            (key, why), *others = growth.refused
            more = f" (also changed: {', '.join(k for k, _ in others)})" if others else ""
            raise StudyError(
                key,
                f"{why}{more}; run it with --fresh to start over under this name (the old results "
                "are kept beside the new ones), or give the study a new name",
            )
        grown = growth.grown
    storage.write_text(file, study_yaml)
    return resumed, grown


def check_devices(study: Study) -> None:
    """Refuse `train.device: cuda` where no trial would get a GPU."""
    devices = {study.base.train.device} | {
        v for d in study.search.space if d.key == "train.device" for v in (d.choice or d.values or ())
    }
    if "cuda" not in devices:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if study.resources.gpu <= 0 or gpus <= 0:
        why = "resources.gpu is 0" if study.resources.gpu <= 0 else "the Ray cluster has no GPU"
        raise StudyError(
            "train.device", f"cuda asked for, but {why}; use train.device: auto, or give trials a GPU"
        )


def _nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _fits(study: Study, nodes: list[dict[str, float]]) -> bool:
    cpu, gpu = study.resources.cpu, study.resources.gpu
    return any(r.get("CPU", 0) >= cpu and r.get("GPU", 0) >= gpu for r in nodes)


def check_fits(study: Study, pack: int, embedded: bool) -> WaitForNodes | None:
    """Refuse a study no node can run: a trial's (a pack's) estimated memory above the largest
    node's (`footprint`), CPU or GPU requests above every node's. On an embedded Ray that is
    final; on a cluster an autoscaler may add a node, so it is a warning, and the wait it starts
    (`WaitForNodes`). None when a node fits. GPU memory is not checked (Ray does not report it)."""
    nodes = _nodes()
    need = largest_trial_bytes(study, pack)
    memory = max((r.get("memory", 0) for r in nodes), default=0)
    if memory and need > memory:
        what = "pack" if pack > 1 else "trial"
        raise StudyError(
            "model",
            f"a {what} needs about {footprint.describe(need)} (parameters, optimizer state, data, "
            f"activations), more than the largest node's {footprint.describe(memory)}; use a smaller "
            "model, task or batch" + (", or a smaller resources.pack" if pack > 1 else ""),
        )
    if _fits(study, nodes):
        return None
    cpu, gpu = study.resources.cpu, study.resources.gpu
    best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    key = "resources.gpu" if gpu > best.get("GPU", 0) else "resources.cpu"
    why = (f"asks {cpu:g} CPU and {gpu:g} GPU per trial, and no node has that (the largest has "
           f"{best.get('CPU', 0):g} CPU and {best.get('GPU', 0):g} GPU)")  # fmt: skip
    if embedded:
        raise StudyError(key, f"{why}; lower it, or pass --num-cpus")
    log.warning("grokstudy: %s: %s; waiting up to %.0f s (run.resource_wait_s) for a node that fits",
                key, why, study.run.resource_wait_s)  # fmt: skip
    return WaitForNodes(study)


@dataclass
class WaitForNodes:
    """A cluster with no node that fits a trial: `check` (from the driver's loop) fails the
    study once run.resource_wait_s has passed without one joining."""

    study: Study
    since: float | None = field(default_factory=time.monotonic)
    _looked_at: float = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if self.since is None or now - self._looked_at < LOOK_EVERY_S:
            return
        self._looked_at = now
        if _fits(self.study, _nodes()):
            self.since = None  # a node that fits has joined
            return
        if now - self.since > self.study.run.resource_wait_s:
            r = self.study.resources
            raise StudyError(
                "resources.gpu" if r.gpu else "resources.cpu",
                f"no node could run a trial ({r.cpu:g} CPU, {r.gpu:g} GPU) after {now - self.since:.0f} s "
                "(run.resource_wait_s); add such nodes, or ask for less",
            )


def largest_trial_bytes(study: Study, pack: int = 1) -> int:
    """The estimate (`footprint.trial_bytes`) of the study's largest trial (or pack)."""
    return footprint.trial_bytes(study.trial(largest_point(study)), pack)


def largest_point(study: Study) -> dict[str, Any]:
    """The point whose trial needs the most memory (and compute: the largest training set):
    each searched axis set, in turn, to its value that needs the most (a grid's values, a
    range's ends)."""
    point: dict[str, Any] = {}
    for dim in study.search.space:
        candidates = list(dim.grid) if dim.is_discrete else list(dim.log or dim.range or ())
        if dim.integer:
            candidates = [int(v) for v in candidates]
        if candidates:
            point[dim.key] = max(
                candidates, key=lambda v: footprint.trial_bytes(study.trial(point | {dim.key: v}))
            )  # noqa: B023
    return point
