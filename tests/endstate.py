"""What a finished study must hold, however often its driver died: every point x seed exactly
once in the tables, in the Optuna study and in MLflow, and every curve whole (each eval step
once, none missing). Shared by the resume tests and bench/soak_resume.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from grokstudy import points, search, storage, train, weights
from grokstudy.config import Study
from grokstudy.study import parse_study
from grokstudy.tracking import ARCHIVED_TAG, PARENT_TAG


def expected_trials(study: Study) -> set[str]:
    """The trial ids a study runs (deterministic samplers)."""
    return {points.trial_id(p) for p in search.dry_run(study)}


def problems(out: Path, study: Study, tracking_uri: str | None = None) -> list[str]:
    """Everything wrong with a finished study's end state (an empty list: all is well)."""
    found: list[str] = []
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    curves = pq.read_table(out / "curves.parquet").to_pylist()
    ids = Counter(t["trial_id"] for t in trials)
    expected = expected_trials(study)
    if set(ids) != expected:
        found.append(f"trials.parquet holds {sorted(set(ids) ^ expected)} beyond or short of the study")
    found += [f"trials.parquet holds {tid} {n} times" for tid, n in ids.items() if n != 1]
    steps_of: dict[str, list[int]] = {}
    for row in curves:
        steps_of.setdefault(row["trial_id"], []).append(row["step"])
    for t in trials:
        want = [s for s in train.eval_steps(study.trial(_point(t, study)).train) if s <= t["steps"]]
        got = sorted(steps_of.get(t["trial_id"], []))
        if got != want:
            found.append(f"curves.parquet: {t['trial_id']} has steps {_diff(got, want)}")

    import optuna

    ot = optuna.load_study(study_name=study.name, storage=f"sqlite:///{out / 'optuna.db'}")
    complete = Counter(
        t.user_attrs.get(search.TRIAL_ID) for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE
    )
    if set(complete) != expected or set(complete.values()) != {1}:
        found.append(f"optuna.db: COMPLETE trials {dict(complete)} are not each trial once")
    unfinished = [
        t.number
        for t in ot.trials
        if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    ]
    if unfinished:
        found.append(f"optuna.db: trials {unfinished} never finished")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    # Runs of results that `grokstudy run --fresh` set aside are not this study's.
    archived = {r.info.run_id for r in runs if ARCHIVED_TAG in r.data.tags}
    runs = [r for r in runs if r.info.run_id not in archived and r.data.tags.get(PARENT_TAG) not in archived]
    parents = [r for r in runs if r.data.tags.get("grokstudy.kind") == "study"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        found.append(
            f"MLflow: study runs {[(p.info.run_id, p.info.status) for p in parents]}, want one FINISHED"
        )
    children = [r for r in runs if r.data.tags.get("grokstudy.kind") == "trial"]
    keys = Counter(r.data.tags.get("grokstudy.trial_key") for r in children)
    if set(keys) != expected or set(keys.values()) != {1}:
        found.append(f"MLflow: trial runs by key {dict(keys)} are not each trial once")
    by_id = {t["trial_id"]: t for t in trials}
    keeps_weights = study_as_run(out).run.save_weights == "final"
    for run in children:
        tid = run.data.tags.get("grokstudy.trial_key")
        if run.info.status != "FINISHED":
            found.append(f"MLflow: {tid} ended {run.info.status}")
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        want = sorted(steps_of.get(tid, []))
        if sorted(logged) != want:
            found.append(f"MLflow: {tid} logged steps {_diff(sorted(logged), want)}")
        if tid in by_id and by_id[tid]["run_id"] != run.info.run_id:
            found.append(f"trials.parquet links {tid} to run {by_id[tid]['run_id']}, not {run.info.run_id}")
        if keeps_weights and run.info.status == "FINISHED":
            stored = [a.path for a in client.list_artifacts(run.info.run_id, weights.ARTIFACT_PATH)]
            if stored != [f"{weights.ARTIFACT_PATH}/{weights.file_name(tid)}"]:
                found.append(f"MLflow: {tid}'s run holds weights artifacts {stored}")
    return found + weights_problems(out, trials)


def weights_problems(out: Path, trials: list[dict]) -> list[str]:
    """A weights file exists iff its trial finished, and trials.parquet names it, on the storage
    the study ran with."""
    ran = study_as_run(out)
    experiment = storage.join(ran.run.storage or str(out / "ray"), ran.name)
    directory = weights.directory(experiment)
    files = set(storage.list_files(directory, weights.SUFFIX))
    finished = {t["trial_id"] for t in trials if t["stop_reason"] not in (None, "error")}
    if ran.run.save_weights == "none":
        return [f"weights kept though run.save_weights is none: {sorted(files)}"] if files else []
    found = []
    if files != {weights.file_name(t) for t in finished}:
        found.append(f"weights files {sorted(files)} are not one per finished trial {sorted(finished)}")
    for t in trials:
        want = (
            storage.join(directory, weights.file_name(t["trial_id"])) if t["trial_id"] in finished else None
        )
        if t["weights_uri"] != want:
            found.append(f"trials.parquet: {t['trial_id']}'s weights_uri is {t['weights_uri']}, not {want}")
    return found


def study_as_run(out: Path) -> Study:
    """The resolved study a run wrote to `<out>/study.yaml` (`--set` overrides included)."""
    import yaml

    return parse_study(yaml.safe_load((out / "study.yaml").read_text()))


def _point(row: dict, study: Study) -> dict:
    keys = [d.key for d in study.search.space] + ["train.seed"]
    return {k: tuple(row[k]) if isinstance(row[k], list) else row[k] for k in keys}


def _diff(got: list[int], want: list[int]) -> str:
    twice = sorted(s for s, n in Counter(got).items() if n > 1)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    return f"twice {twice[:8]}, missing {missing[:8]}, extra {extra[:8]} ({len(got)} of {len(want)})"
