"""results.py: typed, self-describing Parquet tables that plain pyarrow and pandas can read."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grokstudy import __version__
from grokstudy.config import (
    SearchConfig,
    SearchDim,
    Study,
    TrainConfig,
    TrialConfig,
    flatten,
    setting,
    with_overrides,
)
from grokstudy.errors import UsageError
from grokstudy.records import CURVE_KEYS, EvalRecord, Outcome, TrialHistory
from grokstudy.results import (
    CURVES_SCHEMA,
    TRIALS_SCHEMA,
    build_tables,
    curves_table,
    load_source,
    read_curves,
    read_trials,
    table_info,
    trials_schema,
    trials_table,
    write_tables,
)

SEARCHED = ("optimizer.weight_decay", "data.fraction")


@dataclass(frozen=True, slots=True)
class Odd:
    mapping: dict = dataclasses.field(default_factory=dict)


# A config grown by one field (module level: type hints resolve against module globals).
@dataclass(frozen=True, slots=True)
class NewTrain(TrainConfig):
    label_smoothing: float = setting(0.0, "Share of probability mass spread over wrong answers.", lo=0, hi=1)


@dataclass(frozen=True, slots=True)
class NewTrial(TrialConfig):
    train: NewTrain = field(default_factory=NewTrain)


def records(grok_at: int, fourier: bool = True) -> list[EvalRecord]:
    return [
        EvalRecord(
            step=s,
            train_loss=0.01,
            train_acc=1.0 if s >= 100 else 0.3,
            val_loss=0.02,
            val_acc=1.0 if s >= grok_at else 0.1,
            weights_norm=30.0 - s / 1000,
            fourier_top_k_share=0.5 if fourier else math.nan,
            elapsed_s=s / 1000,
        )
        for s in range(0, 3001, 100)
    ]


BUDGET = Outcome("memorization", None, None, None, 0.0, "budget")
"""The outcome the histories carry (build_tables classifies their curves afresh)."""
STUDY = Study(
    "demo",
    base=with_overrides(TrialConfig(), {"train.max_steps": 3000}),
    search=SearchConfig(
        space=(
            SearchDim("optimizer.weight_decay", log=(0.1, 1.0), points=2),
            SearchDim("data.fraction", values=(0.3, 0.5)),
        )
    ),
)


def histories() -> list[TrialHistory]:
    out = []
    for i, (wd, frac, grok_at, batch) in enumerate(
        [(0.1, 0.3, 2500, None), (1.0, 0.5, 200, 512), (1.0, 0.3, 10_000, None)]
    ):
        point = {"optimizer.weight_decay": wd, "data.fraction": frac, "train.batch_size": batch}
        cfg = STUDY.trial(point)
        out.append(
            TrialHistory(
                trial_id=f"t{i}",
                point=point,
                cfg=cfg,
                records=tuple(records(grok_at, fourier=i != 1)),
                outcome=BUDGET,
                node="node-a" if i else None,
                run_id=None if i == 2 else f"run{i}",
            )
        )
    return out


def study_rows() -> tuple[list[dict], list[dict]]:
    trials, curves = build_tables(STUDY, histories())
    return trials.to_pylist(), curves.to_pylist()


def test_trials_columns_are_the_config_fields_between_identity_and_verdict() -> None:
    names = TRIALS_SCHEMA.names
    hyper = list(flatten(TrialConfig()))
    assert names[:5] == ["study", "trial_id", "point_id", "run_id", "weights_uri"]
    assert names[5 : 5 + len(hyper)] == hyper
    assert {"optimizer.weight_decay_form", "searched", "phase", "t_val", "delay", "status"} <= set(names)


def test_config_types_become_column_types() -> None:
    s = TRIALS_SCHEMA
    assert s.field("task.op").type == pa.string()
    assert s.field("task.p").type == pa.int64()
    assert s.field("data.fraction").type == pa.float64()
    assert s.field("model.layer_norm").type == pa.bool_()
    assert s.field("optimizer.betas").type == pa.list_(pa.field("element", pa.float64()))
    assert s.field("train.batch_size").nullable and not s.field("train.seed").nullable
    assert s.field("searched").type == pa.list_(pa.field("element", pa.string()))
    assert s.field("delay").type == pa.int64() and s.field("delay").nullable


def test_a_new_config_field_becomes_a_column() -> None:
    schema = trials_schema(NewTrial)
    new = schema.field("train.label_smoothing")
    assert new.type == pa.float64()
    assert new.metadata[b"description"] == b"Share of probability mass spread over wrong answers."
    assert [n for n in schema.names if n not in TRIALS_SCHEMA.names] == ["train.label_smoothing"]
    assert schema.field("train.max_steps").metadata == TRIALS_SCHEMA.field("train.max_steps").metadata


def test_a_config_field_without_a_column_type_is_refused() -> None:
    with pytest.raises(TypeError, match="mapping"):
        trials_schema(Odd)


def test_every_field_is_described_and_step_fields_carry_units() -> None:
    for schema in (TRIALS_SCHEMA, CURVES_SCHEMA):
        for f in schema:
            assert f.metadata and f.metadata[b"description"], f.name
    assert TRIALS_SCHEMA.field("t_val").metadata[b"unit"] == b"steps"
    assert TRIALS_SCHEMA.field("wall_s").metadata[b"unit"] == b"seconds"
    assert CURVES_SCHEMA.field("step").metadata[b"unit"] == b"steps"
    assert TRIALS_SCHEMA.metadata[b"grokstudy.table"] == b"trials"
    assert CURVES_SCHEMA.metadata[b"grokstudy.version"] == __version__.encode()


def test_curve_columns_are_the_metric_keys() -> None:
    assert CURVES_SCHEMA.names == ["study", "trial_id", "step", *CURVE_KEYS]
    assert CURVE_KEYS[-1] == "time/elapsed_s"  # the same key as in MLflow


def test_tables_round_trip_through_parquet_with_schema_types_and_nulls(tmp_path: Path) -> None:
    trials, curves = build_tables(STUDY, histories())
    assert trials.schema.equals(TRIALS_SCHEMA)
    assert table_info(trials) == (
        "grid",
        {"optimizer.weight_decay": "log", "data.fraction": "linear"},
        {"x": "data.fraction", "y": "optimizer.weight_decay", "facet": None},
    )
    tpath, cpath = write_tables(trials, curves, tmp_path / "out")
    assert (tpath.name, cpath.name) == ("trials.parquet", "curves.parquet")
    assert pq.ParquetFile(tpath).metadata.row_group(0).column(0).compression == "ZSTD"
    back_t, back_c = read_trials(tpath), read_curves(cpath)
    assert back_t.equals(trials, check_metadata=True) and back_c.equals(curves, check_metadata=True)
    assert (back_t.num_rows, back_c.num_rows) == (3, 93)
    rows = back_t.to_pylist()
    assert [r["phase"] for r in rows] == ["grokking", "comprehension", "memorization"]
    assert (rows[2]["t_val"], rows[2]["delay"], rows[2]["run_id"], rows[0]["node"]) == (
        None,
        None,
        None,
        None,
    )
    assert (rows[0]["train.batch_size"], rows[1]["train.batch_size"]) == (None, 512)
    assert rows[0]["optimizer.betas"] == [0.9, 0.98] and rows[0]["searched"] == list(SEARCHED)
    assert rows[0]["optimizer.weight_decay_form"] == "decoupled_to_zero"
    fourier = back_c.filter(pa.compute.equal(back_c["trial_id"], "t1"))["fourier/top_k_share"]
    assert fourier.null_count == 31
    # The memorizing trial spent its 3,000 steps: censored, 3000 * lr 1e-3 * wd 1 = 3 decay times.
    assert [r["censored"] for r in rows] == [False, False, True]
    lr = STUDY.base.optimizer.lr
    assert [r["budget_decay_times"] for r in rows] == pytest.approx(
        [3000 * lr * wd for wd in (0.1, 1.0, 1.0)]
    )
    assert [r["val_acc_at_fit"] for r in rows] == pytest.approx([0.1] * 3)  # all fit near step 100


def test_files_are_readable_with_plain_pyarrow_and_pandas(tmp_path: Path) -> None:
    trial_rows_, curve_rows_ = study_rows()
    write_tables(trials_table(trial_rows_), curves_table(curve_rows_), tmp_path)
    df = pq.read_table(tmp_path / "trials.parquet").to_pandas()
    assert df.loc[df["trial_id"] == "t0", "optimizer.weight_decay"].item() == 0.1
    curves = pq.read_table(tmp_path / "curves.parquet").to_pandas()
    last = curves[curves["trial_id"] == "t0"].sort_values("step").iloc[-1]
    assert (last["step"], last["val/acc"]) == (3000, 1.0)


def test_load_source_takes_a_directory_or_a_trials_file(tmp_path: Path) -> None:
    trial_rows_, curve_rows_ = study_rows()
    write_tables(trials_table(trial_rows_), curves_table(curve_rows_), tmp_path)
    t, c = load_source(tmp_path)
    assert (t.num_rows, c.num_rows) == (3, 93)
    t, c = load_source(tmp_path / "trials.parquet")
    assert c is not None and c.num_rows == 93
    (tmp_path / "curves.parquet").unlink()
    assert load_source(tmp_path)[1] is None


def test_load_source_errors_name_the_problem_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no trials.parquet"):
        load_source(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        load_source(tmp_path / "nope.parquet")
    _, curve_rows_ = study_rows()
    pq.write_table(curves_table(curve_rows_), tmp_path / "c.parquet")
    with pytest.raises(UsageError, match="is a curves table, not a trials table"):
        load_source(tmp_path / "c.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match="cannot read") as err:
        load_source(tmp_path / "junk.parquet")
    assert "\n" not in str(err.value)


def test_a_wrong_row_is_reported_by_row_and_column() -> None:
    rows, _ = study_rows()
    bad = dict(rows[1], **{"task.p": 97.5})  # pyarrow alone would truncate this to 97
    with pytest.raises(ValueError, match=r"trials row 1, column 'task.p': expected int64"):
        trials_table([rows[0], bad])
    with pytest.raises(ValueError, match=r"column 'status': expected string \(not null\), got None"):
        trials_table([dict(rows[0], status=None)])
    with pytest.raises(ValueError, match="missing column.*delay.*unknown column.*gap"):
        trials_table([{k: v for k, v in rows[0].items() if k != "delay"} | {"gap": 1}])
    with pytest.raises(ValueError, match="stop_reason"):
        plateau = dataclasses.replace(BUDGET, stop_reason="plateau")
        build_tables(STUDY, [dataclasses.replace(histories()[0], outcome=plateau)])


def test_a_trial_that_failed_before_its_first_checkpoint_is_a_row_without_a_verdict() -> None:
    failed = dataclasses.replace(histories()[0], records=(), outcome=None, error="RuntimeError: boom")
    trials, curves = build_tables(STUDY, [failed])
    [row] = trials.to_pylist()
    assert (row["phase"], row["t_val"], row["status"], row["error"], row["wall_s"]) == (
        None, None, "ERROR", "RuntimeError: boom", 0.0,
    )  # fmt: skip
    assert curves.num_rows == 0


def test_wall_s_is_the_curves_last_elapsed_time() -> None:
    trials, curves = build_tables(STUDY, histories())
    assert trials.column("wall_s").to_pylist() == [3.0, 3.0, 3.0]


def test_empty_tables_still_carry_the_schema() -> None:
    assert trials_table([]).schema.equals(TRIALS_SCHEMA) and curves_table([]).num_rows == 0
