"""One Tune trial's pack of members, trained to their ends; no Ray here (the runner is the glue).

- `Trainer`: one member through `train.run`, or several as one stacked model through
  `packed.run_pack`; yields, per eval step, the records of the members evaluated there.
- `judge`: a member's `Outcome` once it should stop. The science decides: a member
  stops when its generalization has held for `phases.confirm_steps`, its loss diverged, or its
  budget is spent; never on a validation plateau, which is what grokking looks like.
- `PackRun`: what a trial does. Each record extends its member's curve and goes to the member's
  MLflow run (`tracking.Sender`, never blocking); outcomes are judged as records arrive; the
  caller is asked to report (progress, outcomes, MLflow health) at checkpoints, when a member
  finishes and at least every `REPORT_EVERY_S`, and to persist a checkpoint every
  `train.checkpoint_every` steps and at the end (`checkpoints.write`).
- `history`: a member as the table builder takes it, from what its checkpoint keeps.

The report's outcomes travel as JSON text under `OUTCOMES` (Tune's CSV and TensorBoard loggers keep a
string as it is); `outcomes_of` reads them back on the driver.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grokstudy import checkpoints, footprint, phases, storage, tracking, weights
from grokstudy.checkpoints import Found, SavedMember
from grokstudy.config import PhaseConfig, Study, TrialConfig, flatten
from grokstudy.errors import one_line
from grokstudy.points import point_from_config, point_id, point_label
from grokstudy.records import EvalRecord, Outcome, TrialHistory

OUTCOMES = "outcomes"
"""Report key: the outcome of every member finished so far (Tune keeps "done" for itself)."""
REPORT_EVERY_S = 30.0
"""A trial reports at least this often (progress, MLflow health) even between checkpoints."""
OPEN_BEFORE_CHECKPOINT_S = 10.0
CLOSE_TIMEOUT_S = 30.0

Report = Callable[[dict[str, Any], "PackRun | None"], None]
"""`report(metrics, pack)`: send a report to Tune, with `pack.write_checkpoint`'s checkpoint
when `pack` is given."""


class Trainer:
    """One member through `train.run`, or several through `packed.run_pack`; yields, per eval
    step, the (member index, record) of every member evaluated there."""

    def __init__(self, cfgs: Sequence[TrialConfig], directory: Path | None) -> None:
        from grokstudy import train  # here: the driver reads outcomes and histories without torch

        self._train = train
        self.cfgs = list(cfgs)
        self.single = len(cfgs) == 1
        path = None if directory is None else directory / checkpoints.STATE_FILE
        if self.single:
            self.state = train.init_state(cfgs[0]) if path is None else train.load_state(cfgs[0], path)
        else:
            from grokstudy import packed  # only packs pay for its import

            self._packed = packed
            self.state = packed.init_pack(cfgs) if path is None else packed.load_pack(cfgs, path)
        self.retired: set[int] = set()
        self._schedules = [set(train.eval_steps(c.train)) for c in cfgs]

    def retire(self, i: int) -> None:
        self.retired.add(i)
        if not self.single:
            self.state.retire(i)

    def member_state_dict(self, i: int) -> dict[str, Any]:
        """Member i's weights as its `nn.Module`'s state dict, on CPU (before it is retired)."""
        if self.single:
            return {k: v.detach().cpu().clone() for k, v in self.state.model.state_dict().items()}
        return self._packed.member_state_dict(self.state, i)

    def save(self, path: Path) -> None:
        if self.single:
            self._train.save_state(self.state, path)
        else:
            self._packed.save_pack(self.state, path)

    def steps(self) -> Iterator[list[tuple[int, EvalRecord]]]:
        if self.single:
            for record in self._train.run(self.cfgs[0], self.state):
                yield [(0, record)]
                if 0 in self.retired:
                    return
            return
        group: list[tuple[int, EvalRecord]] = []
        for i, record in self._packed.run_pack(self.state):
            if group and record.step != group[0][1].step:
                yield group  # a step whose members were not all evaluated (should not happen)
                group = []
            group.append((i, record))
            if self._complete(group):
                yield group
                group = []
        if group:
            yield group

    def _complete(self, group: list[tuple[int, EvalRecord]]) -> bool:
        step = group[0][1].step
        seen = {i for i, _ in group}
        expected = {
            i
            for i, sched in enumerate(self._schedules)
            if step in sched and (i not in self.retired or i in seen)
        }
        return expected <= seen


def judge(curve: Sequence[EvalRecord], cfg: TrialConfig, rule: PhaseConfig) -> Outcome | None:
    """A member's outcome once it should stop (generalization confirmed, diverged, or at its
    budget), else None."""
    last = curve[-1]
    diverged = phases.diverged(last)
    generalized = not diverged and phases.generalization_confirmed(
        [r.step for r in curve],
        [r.train_acc for r in curve],
        [r.val_acc for r in curve],
        rule,
        [r.val_loss for r in curve],
    )
    if not (diverged or generalized or last.step >= cfg.train.max_steps):
        return None
    verdict = phases.classify_records(curve, rule, cfg.train.max_steps)
    return Outcome(
        phase=verdict.phase,
        t_train=verdict.t_train,
        t_val=verdict.t_val,
        t_val_loss=verdict.t_val_loss,
        t_circuit=verdict.t_circuit,
        objective=float(verdict.t_val if verdict.t_val is not None else cfg.train.max_steps),
        stop_reason="diverged" if diverged else ("generalized" if generalized else "budget"),
    )


def run_tags(point: dict[str, Any], cfg: TrialConfig) -> dict[str, str]:
    """Tags every trial run carries from its start."""
    return {
        "grokstudy.point_id": point_id(point),
        "optimizer.weight_decay_form": cfg.optimizer.weight_decay_form,
    }


def data_split(cfg: TrialConfig) -> tracking.DataSplit:
    """The trial's split as an MLflow dataset: decided by the task, the fraction and the split
    seed alone (`tasks.split`), so trials of every init seed at one fraction share it."""
    import hashlib

    task = f"perm S_{cfg.task.n}" if cfg.task.op == "perm" else f"{cfg.task.op} mod {cfg.task.p}"
    source = {"task": task, "data.fraction": cfg.data.fraction, "data.split_seed": cfg.data.split_seed}
    digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:10]
    v = footprint.vocabulary(cfg.task)
    pairs = v * (v - 1) if cfg.task.op == "x/y" else v * v  # x/y leaves out y = 0
    train = round(cfg.data.fraction * pairs)
    return tracking.DataSplit(
        task, digest, source, {"pairs": pairs, "train_pairs": train, "val_pairs": pairs - train}
    )


def final_tags(outcome: Outcome, node: str) -> dict[str, str]:
    """Tags a trial run gets when its trial ends: its outcome, where it ran."""
    keys = ("phase", "t_train", "t_val", "t_val_loss", "t_circuit", "stop_reason")
    values = outcome.to_dict()
    return {k: "" if values[k] is None else str(values[k]) for k in keys} | {"ray.node": node}


def outcome_metrics(outcome: Outcome, curve: Sequence[EvalRecord]) -> dict[str, float]:
    """How a trial ended as MLflow metrics (the UI's compare view plots metrics, not tags):
    its timings, final accuracies and losses, validation accuracy when it fit, whether it was
    censored (1: it spent its budget without generalizing), and `phase_code` (the index of its
    phase in `phases.PHASES`). A timing it never reached, or a non-finite loss, is left out."""
    last = curve[-1] if curve else None
    values: dict[str, float | None] = {
        "t_train": outcome.t_train,
        "t_val": outcome.t_val,
        "t_val_loss": outcome.t_val_loss,
        "t_circuit": outcome.t_circuit,
        "delay": None
        if outcome.t_val is None or outcome.t_train is None
        else outcome.t_val - outcome.t_train,
        "phase_code": phases.PHASES.index(outcome.phase) if outcome.phase in phases.PHASES else None,
        "censored": float(outcome.stop_reason == "budget" and outcome.t_val is None),
        "val_acc_at_fit": phases.val_acc_at(curve, outcome.t_train),
    }
    if last is not None:
        values |= {"final_train_acc": last.train_acc, "final_val_acc": last.val_acc,
                   "final_train_loss": last.train_loss, "final_val_loss": last.val_loss}  # fmt: skip
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def outcomes_of(result: dict[str, Any]) -> list[tuple[str, Outcome]]:
    """(member trial id, outcome) of each member a trial's report says has finished."""
    text = result.get(OUTCOMES)
    rows = json.loads(text) if isinstance(text, str) and text else []
    return [(row["trial_id"], Outcome.from_dict(row)) for row in rows if "trial_id" in row]


class PackRun:
    """The members of one Tune trial, from a fresh start or from their newest checkpoint."""

    def __init__(
        self,
        study: Study,
        members: Sequence[dict[str, Any]],
        saved: Found | None,
        where: tracking.Where,
        node: str,
        weights_dir: str | None = None,
    ) -> None:
        self.study, self.node = study, node
        self.weights_dir = weights_dir
        """Where each member's final weights go (`weights.directory`); None: nowhere."""
        self.ids = [m["trial_id"] for m in members]
        self.points = [point_from_config(study, m["point"]) for m in members]
        self.cfgs = [study.trial(p) for p in self.points]
        self.restored_step = saved.step if saved is not None else -1
        """The step of the checkpoint this run continues from (-1: a fresh start); reported."""
        kept = saved.members if saved is not None else {}
        self.curves = {t: list(kept[t].records) if t in kept else [] for t in self.ids}
        self.outcomes = {t: kept[t].outcome for t in self.ids if t in kept and kept[t].outcome is not None}
        self.weights_uris = {t: kept[t].weights_uri for t in self.outcomes if kept[t].weights_uri}
        self._scratch: tempfile.TemporaryDirectory | None = None  # weights files until MLflow has them
        if saved is None:
            self.trainer = Trainer(self.cfgs, None)
        else:
            with saved.local() as directory:
                self.trainer = Trainer(self.cfgs, directory)
        for i, tid in enumerate(self.ids):
            if tid in self.outcomes:
                self.trainer.retire(i)
        self.sender = tracking.Sender(where)
        self.runs = {
            tid: self.sender.open(
                tid,
                point_label(point),
                params=flatten(cfg),
                tags=run_tags(point, cfg) | {"grokstudy.pack_size": str(len(self.ids))},
                run_id=kept[tid].run_id if tid in kept else None,
                dataset=data_split(cfg),
            )
            for tid, point, cfg in zip(self.ids, self.points, self.cfgs, strict=True)
        }
        for tid in self.ids:  # after a restore: replay what MLflow lost since its last step
            self.runs[tid].sync(self.curves[tid])

    def run(self, report: Report) -> None:
        """Train every member to its end, reporting as the module docstring says."""
        try:
            last_report = time.monotonic()
            if len(self.outcomes) == len(self.ids):  # restored after its last member finished
                report(self.metrics(self.trainer.state.step), self._checkpointed())
                return
            for group in self.trainer.steps():
                step = group[0][1].step
                finished_now = any([self._record(i, record) for i, record in group])
                everyone = len(self.outcomes) == len(self.ids)
                # Not at step 0 (a fresh start is as good, and its checkpoint would wait for
                # the runs' creation), nor at the step a restore began from.
                periodic = step % self.cfgs[0].train.checkpoint_every == 0 and step > max(
                    0, self.restored_step
                )
                checkpoint_due = everyone or periodic
                if checkpoint_due or finished_now or time.monotonic() - last_report > REPORT_EVERY_S:
                    self._log_gpu(step)
                    report(self.metrics(step), self._checkpointed() if checkpoint_due else None)
                    last_report = time.monotonic()
                if everyone:
                    return
        except BaseException as err:
            # The runs stay resumable: a retry from the checkpoint re-opens them.
            for tid in self.ids:
                if tid not in self.outcomes:
                    self.runs[tid].finish("FAILED", error=one_line(err, 4000))
            raise
        finally:
            # While MLflow is down, an ending trial does not wait for it: the driver settles its
            # run from the checkpoint at the end of the study.
            self.sender.close(0.0 if self.sender.down_s > 0 else CLOSE_TIMEOUT_S)
            if self._scratch is not None:
                self._scratch.cleanup()

    def _record(self, i: int, record: EvalRecord) -> bool:
        """Add member i's record; True when it finished the member."""
        tid = self.ids[i]
        curve = self.curves[tid]
        if curve and record.step <= curve[-1].step:
            return False
        curve.append(record)
        self.runs[tid].sync(curve)
        outcome = judge(curve, self.cfgs[i], self.study.phases)
        if outcome is None:
            return False
        self.outcomes[tid] = outcome
        self._keep_weights(i, record.step)
        self.trainer.retire(i)
        self.runs[tid].set_tags(final_tags(outcome, self.node))
        self.runs[tid].log_metrics(record.step, outcome_metrics(outcome, curve))
        self.runs[tid].finish("FINISHED")
        return True

    def _keep_weights(self, i: int, step: int) -> None:
        """Member i's final weights to the study's storage and, as an artifact, to its MLflow run
        (`weights`); before it retires, while a pack still holds them."""
        if self.weights_dir is None:
            return
        tid = self.ids[i]
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="grokstudy-weights-")
        local = Path(self._scratch.name) / weights.file_name(tid)
        weights.write_local(local, tid, step, self.cfgs[i], self.trainer.member_state_dict(i))
        uri = storage.join(self.weights_dir, weights.file_name(tid))
        storage.put_file(local, uri)
        self.weights_uris[tid] = uri
        self.runs[tid].set_tags({tracking.WEIGHTS_TAG: uri})
        self.runs[tid].log_artifact(local, weights.ARTIFACT_PATH)

    def _log_gpu(self, step: int) -> None:
        """The GPU's utilisation and memory (`gpu.sample`) to the runs of the members still training."""
        if self.cfgs[0].train.device == "cpu":
            return
        from grokstudy import gpu

        values = gpu.sample()
        for tid in self.ids:
            if tid not in self.outcomes:
                self.runs[tid].log_metrics(step, values)

    def metrics(self, step: int) -> dict[str, Any]:
        """The report: progress, the finished members' outcomes, MLflow's health, the node."""
        done = [{"trial_id": t, **self.outcomes[t].to_dict(), "run_id": self.runs[t].run_id}
                for t in self.ids if t in self.outcomes]  # fmt: skip
        return {
            "step": step,
            "members": len(self.ids),
            "members_done": len(self.outcomes),
            OUTCOMES: json.dumps(done),
            "tracking_down_s": round(self.sender.down_s, 1),
            "tracking_reached_s": -1.0 if (reached := self.sender.reached_s) is None else round(reached, 1),
            "tracking_error": self.sender.last_error or "",
            "node": self.node,
            "restored_from_step": self.restored_step,
        }

    def _checkpointed(self) -> PackRun:
        # The checkpoint keeps each member's run id: wait for the runs to exist, not for every
        # record to be stored (the curve in the checkpoint replays those); while MLflow is down,
        # checkpoints do not wait for it.
        if self.sender.down_s == 0:
            self.sender.wait_opened(OPEN_BEFORE_CHECKPOINT_S)
        return self

    def write_checkpoint(self, directory: Path) -> None:
        """Write this pack's checkpoint into `directory` (`checkpoints.write`)."""
        kept = {
            t: SavedMember(
                self.curves[t], self.runs[t].run_id, self.outcomes.get(t), self.weights_uris.get(t)
            )
            for t in self.ids
        }
        checkpoints.write(directory, self.trainer.state.step, kept, self.trainer.save)


def history(
    study: Study,
    member: dict[str, Any],
    saved: SavedMember | None,
    node: str | None,
    error: str | None,
    running: bool = False,
) -> TrialHistory | None:
    """A member as the table builder takes it; None when it neither finished nor failed (the
    study was interrupted), unless it is `running` (a table written while the study runs)."""
    outcome = saved.outcome if saved is not None else None
    if outcome is None and error is None and not running:
        return None
    point = point_from_config(study, member["point"])
    return TrialHistory(
        trial_id=member["trial_id"],
        point=point,
        cfg=study.trial(point),
        records=tuple(saved.records) if saved is not None else (),
        outcome=outcome,
        node=node,
        run_id=saved.run_id if saved is not None else None,
        error=None if outcome else error,
        running=outcome is None and error is None,
        weights_uri=saved.weights_uri if saved is not None and outcome is not None else None,
    )
