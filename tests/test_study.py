"""The study file: every mistake is one line naming its dotted path; valid studies round-trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from grokstudy import study as study_mod
from grokstudy.config import Study, TrialConfig
from grokstudy.errors import StudyError, StudyErrors
from grokstudy.study import describe, load_study, parse_set, parse_study, study_to_dict, trial_from_overrides

STUDY = """\
name: test-study
task: {op: "x+y", p: 23}
data: {fraction: 0.5}
model: {kind: mlp, embed_dim: 16, width: 64}
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 1.0}
train: {max_steps: 300, eval_every: 50, checkpoint_every: 100}
search:
  sampler: grid
  space:
    optimizer.weight_decay: {log: [1.0e-3, 10.0], points: 3}
    data.fraction: {range: [0.2, 0.8], points: 4}
  seeds: 2
resources: {cpu: 1}
diagram: {x: data.fraction, y: optimizer.weight_decay}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def error_lines(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(StudyError) as exc:
        load_study(write(tmp_path, text), overrides)
    return str(exc.value).splitlines()


# (replace this, with that) in STUDY → (the dotted path that must lead the line, a fragment of it)
MALFORMED = {
    "typo at top level": (("optimizer:", "optimiser:"), "optimiser", "did you mean 'optimizer'?"),
    "typo in a section": (
        ("weight_decay: 1.0", "weight_decy: 1.0"),
        "optimizer.weight_decy",
        "did you mean 'weight_decay'?",
    ),
    "typo in a searched key": (
        ("optimizer.weight_decay: {log", "optimizer.weight_decy: {log"),
        "search.space.optimizer.weight_decy",
        "did you mean 'optimizer.weight_decay'?",
    ),
    "typo inside a search axis": (
        ("points: 3", "pionts: 3"),
        "search.space.optimizer.weight_decay.pionts",
        "did you mean 'points'?",
    ),
    "fraction out of range": (
        ("fraction: 0.5", "fraction: 1.5"),
        "data.fraction",
        "(got 1.5); allowed: 0 < fraction < 1",
    ),
    "searched fraction out of range": (
        ("range: [0.2, 0.8]", "range: [0.1, 1.2]"),
        "search.space.data.fraction",
        "(got 1.2)",
    ),
    "non-prime modulus for x/y": (('op: "x+y", p: 23', 'op: "x/y", p: 48'), "task.p", "not prime (got 48)"),
    "non-prime searched modulus for x/y": (
        ("  seeds: 2", '    task.op: {choice: ["x/y"]}\n    task.p: {values: [23, 25]}\n  seeds: 2'),
        "search.space.task.p",
        "not prime (got 25)",
    ),
    "unknown op": (('op: "x+y"', 'op: "x+z"'), "task.op", "did you mean 'x+y'?"),
    "bad sampler": (
        ("sampler: grid", "sampler: bayes"),
        "search.sampler",
        "allowed: grid, sobol, random, tpe",
    ),
    "grid without points": (
        (", points: 3}", "}"),
        "search.space.optimizer.weight_decay",
        "grid sampler needs points",
    ),
    "sobol without num_samples": (("sampler: grid", "sampler: sobol"), "search.num_samples", "missing"),
    "checkpoint not a multiple of eval": (
        ("checkpoint_every: 100", "checkpoint_every: 75"),
        "train.checkpoint_every",
        "not a multiple of train.eval_every",
    ),
    "wrong type": (
        ("max_steps: 300", "max_steps: lots"),
        "train.max_steps",
        "expected an integer (got 'lots')",
    ),
    "log range through zero": (
        ("log: [1.0e-3, 10.0]", "log: [0, 10.0]"),
        "search.space.optimizer.weight_decay",
        "0 < low < high",
    ),
    "two forms on one axis": (
        ("points: 3}", "points: 3, values: [1.0]}"),
        "search.space.optimizer.weight_decay",
        "exactly one of",
    ),
    "searching the seed": (
        ("  seeds: 2", "    train.seed: {values: [0, 1]}\n  seeds: 2"),
        "search.space.train.seed",
        "search.seeds",
    ),
    "zero seeds": (("seeds: 2", "seeds: 0"), "search.seeds", "(got 0)"),
    "unsafe name": (("name: test-study", "name: my study/1"), "name", "not a safe name"),
    "heads do not divide embed_dim": (
        ("kind: mlp, embed_dim: 16", "kind: transformer, heads: 3, embed_dim: 16"),
        "model.embed_dim",
        "multiple of 3",
    ),
    "unknown diagram axis": (
        ("x: data.fraction", "x: data.fracton"),
        "diagram.x",
        "did you mean 'data.fraction'?",
    ),
    "betas out of range": (("lr: 1.0e-3", "lr: 1.0e-3, betas: [0.9, 1.0]"), "optimizer.betas", "[0, 1)"),
    "more than one GPU but not whole": (
        ("resources: {cpu: 1}", "resources: {cpu: 1, gpu: 1.5}"),
        "resources.gpu",
        "whole number",
    ),
    "modulus too large": (("p: 23", "p: 5000"), "task.p", "2 <= p <= 4096"),
    "empty training set": (
        ("range: [0.2, 0.8]", "range: [0.0005, 0.8]"),
        "search.space.data.fraction",
        "empty training set",
    ),
    "nesterov without momentum": (
        ("name: adamw, lr", "name: sgd, nesterov: true, lr"),
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
    ),
    "zero batch": (("max_steps: 300", "max_steps: 300, batch_size: 0"), "train.batch_size", "or full"),
    "checkpoint every 1e20 steps": (
        ("checkpoint_every: 100", "checkpoint_every: 1e20"),
        "train.checkpoint_every",
        "(got 100000000000000000000)",
    ),
    "a batch of 1e30": (
        ("max_steps: 300", "max_steps: 300, batch_size: 1e30"),
        "train.batch_size",
        "or full",
    ),
    "a budget of 1e300 steps": (("max_steps: 300", "max_steps: 1e300"), "train.max_steps", "<= 1e9"),
    "sampler seed beyond 32 bits": (
        ("seeds: 2", "seeds: 2\n  sampler_seed: 4294967296"),
        "search.sampler_seed",
        "2**32 - 1",
    ),
    "init seed beyond 64 bits": (
        ("max_steps: 300", "max_steps: 300, seed: 18446744073709551616"),
        "train.seed",
        "2**32 - 1",
    ),
    "a billion seeds": (("seeds: 2", "seeds: 1e9"), "search.seeds", "1 <= seeds <= 1000"),
    "a trillion grid trials": (
        ("points: 4}", "points: 10000}\n    model.width: {range: [1, 10000], points: 10000}"),
        "search",
        "at most 1,000,000",
    ),
    "random sampler asked for more points than its space has": (
        ("sampler: grid", "sampler: random\n  num_samples: 20"),
        "search.num_samples",
        "only 12 distinct points",
    ),
    "retry forever": (
        ("resources: {cpu: 1}", "resources: {cpu: 1}\nrun: {max_failures: -1}"),
        "run.max_failures",
        "0 <= max_failures",
    ),
    "an Optuna storage of earlier versions": (
        ("resources: {cpu: 1}", "resources: {cpu: 1}\nrun: {optuna_storage: 'sqlite:///x.db'}"),
        "run.optuna_storage",
        "travels with the Ray Tune experiment",
    ),
    "an axis of 20,000 values": (
        (
            "  seeds: 2",
            "    model.width: {values: [" + ", ".join(map(str, range(1, 20_001))) + "]}\n  seeds: 2",
        ),
        "search.space.model.width",
        "lists 20,000 values; allowed: at most 10,000",
    ),
    "storage over ftp": (
        ("resources: {cpu: 1}", "resources: {cpu: 1}\nrun: {storage: 'ftp://host/studies'}"),
        "run.storage",
        "unsupported scheme ftp://",
    ),
    "a password in the tracking URI": (
        ("resources: {cpu: 1}", "resources: {cpu: 1}\nrun: {tracking_uri: 'http://me:hunter2@mlflow:5000'}"),
        "run.tracking_uri",
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    ),
    "weights kept some of the time": (
        ("resources: {cpu: 1}", "resources: {cpu: 1}\nrun: {save_weights: best}"),
        "run.save_weights",
        "allowed: final, none",
    ),
    "an axis label for a key that does not exist": (
        ("y: optimizer.weight_decay}", "y: optimizer.weight_decay, labels: {optimizer.weight_decy: wd}}"),
        "diagram.labels",
        "unknown key 'optimizer.weight_decy'; did you mean 'optimizer.weight_decay'?",
    ),
    "axis labels as a list": (
        ("y: optimizer.weight_decay}", "y: optimizer.weight_decay, labels: [wd, frac]}"),
        "diagram.labels",
        "expected a mapping of dotted keys to labels",
    ),
    "one-hot inputs to a transformer": (
        (
            "model: {kind: mlp, embed_dim: 16, width: 64}",
            "model: {kind: transformer, embed_dim: 16, width: 64, inputs: onehot}",
        ),
        "model.inputs",
        "onehot is an input of model.kind mlp",
    ),
    "an embedding std without an embedding": (
        (
            "model: {kind: mlp, embed_dim: 16, width: 64}",
            "model: {kind: mlp, width: 64, inputs: onehot, embed_std: 1.0}",
        ),
        "model.embed_std",
        "model.inputs onehot has no embedding table",
    ),
    "repeated integer grid values": (
        ("  seeds: 2", "    model.width: {log: [1, 4], points: 9}\n  seeds: 2"),
        "search.space.model.width",
        "repeat values",
    ),
}


@pytest.mark.parametrize(("swap", "path", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_each_mistake_is_one_line_naming_its_dotted_path(
    tmp_path: Path, swap: tuple[str, str], path: str, fragment: str
) -> None:
    assert swap[0] in STUDY
    lines = error_lines(tmp_path, STUDY.replace(*swap, 1))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    assert fragment in lines[0]


@pytest.mark.parametrize(("swap", "path", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_grokstudy_run_of_a_malformed_file_exits_2_with_that_one_line(
    tmp_path: Path, swap: tuple[str, str], path: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grokstudy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", str(write(tmp_path, STUDY.replace(*swap, 1))), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"grokstudy run: error: {path}: ") and fragment in line
    assert not (tmp_path / "out").exists()


def test_all_problems_of_a_file_are_reported_together(tmp_path: Path) -> None:
    text = STUDY.replace("fraction: 0.5", "fraction: 2").replace("max_steps: 300", "max_steps: lots")
    text = text.replace("sampler: grid", "sampler: bayes")
    with pytest.raises(StudyErrors) as exc:
        load_study(write(tmp_path, text))
    assert {e.path for e in exc.value.errors} == {"data.fraction", "train.max_steps", "search.sampler"}
    assert len(str(exc.value).splitlines()) == 3


def test_yaml_syntax_errors_and_duplicate_keys_name_the_file_and_line(tmp_path: Path) -> None:
    lines = error_lines(tmp_path, STUDY.replace("data: {fraction: 0.5}", "data: {fraction: 0.5"))
    assert lines[0].startswith(f"{tmp_path / 'study.yaml'}: not valid YAML: line ")
    lines = error_lines(tmp_path, STUDY + "name: again\n")
    assert "line 15: duplicate key 'name'" in lines[0]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"name: caf\xe9\n", "not UTF-8 text (byte 9)"),
        (b"[" * 3000, "not valid YAML"),
        (
            b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
            b"name: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
            "name: not a safe name",
        ),
        (
            b"name: big\n" + b"# padding\n" * 200_000,
            "the study file is 2,000,010 bytes; allowed: at most 1,000,000",
        ),
    ],
    ids=["non-UTF-8 byte", "3000 open brackets", "YAML alias bomb", "a 2 MB file"],
)
def test_hostile_files_get_one_short_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    with pytest.raises(StudyError) as exc:
        load_study(path)
    lines = str(exc.value).splitlines()
    assert any(fragment in line for line in lines), lines
    assert all(len(line) < 400 for line in lines), [len(line) for line in lines]


def test_a_missing_file_is_named() -> None:
    with pytest.raises(StudyError, match="no/such/study.yaml: no such study file"):
        load_study("no/such/study.yaml")


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    text = STUDY.replace("lr: 1.0e-3", "lr: 1e-3").replace("max_steps: 300", "max_steps: 3e2")
    s = load_study(write(tmp_path, text))
    assert s.base.optimizer.lr == 1e-3
    assert s.base.train.max_steps == 300 and isinstance(s.base.train.max_steps, int)


# ---- --set ---------------------------------------------------------------------------------------

BAD_SET = {
    "no equals sign": (("foo",), "--set", "expected KEY=VALUE"),
    "unknown key": (("train.max_stepz=5",), "--set train.max_stepz", "did you mean 'train.max_steps'?"),
    "unknown section": (("trian.max_steps=5",), "--set trian.max_steps", "did you mean 'train.max_steps'?"),
    "unknown searched key": (
        ("search.space.optimizer.weight_decy={values: [1]}",),
        "search.space.optimizer.weight_decy",
        "did you mean",
    ),
    "a searched key set as a base value": (
        ("optimizer.weight_decay=0.1",),
        "--set optimizer.weight_decay",
        "--set search.space.optimizer.weight_decay=null",
    ),
    "value that is not YAML": (("optimizer.betas=[0.9,",), "--set optimizer.betas", "not valid YAML"),
    "bad value": (("optimizer.lr=0",), "optimizer.lr", "(got 0); allowed: 0 < lr <= 1000"),
}


@pytest.mark.parametrize(("overrides", "path", "fragment"), BAD_SET.values(), ids=BAD_SET.keys())
def test_bad_overrides_are_one_line_naming_the_key(
    tmp_path: Path, overrides: tuple[str, ...], path: str, fragment: str
) -> None:
    lines = error_lines(tmp_path, STUDY, overrides)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    assert fragment in lines[0]


def test_overrides_set_numbers_lists_full_batches_and_search_axes(tmp_path: Path) -> None:
    path = write(tmp_path, STUDY)
    s = load_study(
        path,
        [
            "train.max_steps=2000",
            "optimizer.betas=[0.9, 0.99]",
            "train.batch_size=full",
            "search.seeds=3",
            "search.space.data.fraction.points=2",
            "search.space.optimizer.weight_decay=null",
            "optimizer.weight_decay=0.1",
            "search.space.optimizer.name={choice: [adamw, sgd]}",
            "name=other",
        ],
    )
    assert s.name == "other"
    assert s.base.train.max_steps == 2000
    assert s.base.optimizer.betas == (0.9, 0.99)
    assert s.base.train.batch_size is None
    assert s.base.optimizer.weight_decay == 0.1
    assert s.search.seeds == 3
    assert [(d.key, d.grid) for d in s.search.space] == [
        ("data.fraction", (0.2, 0.8)),
        ("optimizer.name", ("adamw", "sgd")),
    ]
    assert load_study(path, ["train.batch_size=64"]).base.train.batch_size == 64


def test_parse_set_reads_values_as_yaml() -> None:
    assert parse_set(["a.b=2000", "c.d=[0.9,0.99]", "e.f=full", "g.h=1e-3", "i.j=", "k.l=x=y"]) == {
        "a.b": 2000,
        "c.d": [0.9, 0.99],
        "e.f": "full",
        "g.h": 1e-3,
        "i.j": None,
        "k.l": "x=y",
    }


# ---- round trips and summaries -------------------------------------------------------------------


def test_a_valid_study_round_trips_through_yaml(tmp_path: Path) -> None:
    text = STUDY.replace(
        "  seeds: 2",
        "    optimizer.betas: {choice: [[0.9, 0.98], [0.9, 0.999]]}\n"
        "    model.width: {values: [32, 64]}\n"
        "    model.depth: {range: [1, 3], points: 3}\n"
        "  seeds: 2",
    )
    s = load_study(write(tmp_path, text))
    assert parse_study(study_to_dict(s)) == s
    dumped = write(tmp_path, yaml.safe_dump(study_to_dict(s), sort_keys=False))
    assert load_study(dumped) == s
    betas = next(d for d in s.search.space if d.key == "optimizer.betas")
    assert betas.choice == ((0.9, 0.98), (0.9, 0.999))
    assert next(d for d in s.search.space if d.key == "model.depth").integer


def test_describe_shows_the_axes_and_the_trial_count(tmp_path: Path) -> None:
    text = describe(load_study(write(tmp_path, STUDY)))
    assert "optimizer.weight_decay  3 log-spaced values: 0.001, 0.1, 10" in text
    assert "data.fraction           4 values: 0.2, 0.4, 0.6, 0.8" in text
    assert text.endswith("12 points x 2 seeds = 24 trials")
    assert yaml.safe_load(text.split("\n\nsearch axes")[0])["name"] == "test-study"


# ---- a single trial for `grokstudy train` --------------------------------------------------------


def test_train_overrides_build_a_validated_trial(tmp_path: Path) -> None:
    assert trial_from_overrides([]) == TrialConfig()
    cfg = trial_from_overrides(["task.op=x/y", "task.p=97", "optimizer.lr=3e-3", "train.batch_size=full"])
    assert (cfg.task.op, cfg.task.p, cfg.optimizer.lr, cfg.train.batch_size) == ("x/y", 97, 3e-3, None)
    from_study = trial_from_overrides(["data.fraction=0.7"], write(tmp_path, STUDY))
    assert from_study.task.p == 23 and from_study.data.fraction == 0.7


@pytest.mark.parametrize(
    ("overrides", "path", "fragment"),
    [
        (["task.op=x/y", "task.p=48"], "task.p", "e.g. 47 or 53"),
        (["search.seeds=2"], "--set search.seeds", "a trial key"),
        (
            ["optimizer.weight_decy=0.1"],
            "--set optimizer.weight_decy",
            "did you mean 'optimizer.weight_decay'?",
        ),
        (["model.kind=rnn"], "model.kind", "allowed: mlp, transformer, gromov"),
    ],
)
def test_bad_train_overrides_name_the_key(overrides: list[str], path: str, fragment: str) -> None:
    with pytest.raises(StudyError) as exc:
        trial_from_overrides(overrides)
    line = str(exc.value)
    assert line.startswith(f"{path}: ") and fragment in line and "\n" not in line


# ---- the names study.py repeats from the registries ----------------------------------------------

REGISTRIES = [
    ("task.op", "grokstudy.tasks", "OPERATIONS"),
    ("model.kind", "grokstudy.models", "MODELS"),
    ("model.activation", "grokstudy.models", "ACTIVATIONS"),
    ("optimizer.name", "grokstudy.optim", "OPTIMIZERS"),
]


@pytest.mark.parametrize(("key", "module", "registry"), REGISTRIES)
def test_the_choices_study_accepts_are_the_registered_ones(key: str, module: str, registry: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    registered = getattr(importlib.import_module(module), registry)
    assert set(study_mod.CHOICES[key]) == set(registered)


# ---- extends: a study over another ----------------------------------------------------------------


def test_a_study_that_extends_another_is_its_base_with_its_own_keys_merged_over_it(tmp_path: Path) -> None:
    from grokstudy.study import study_to_dict

    (tmp_path / "base.yaml").write_text(STUDY)
    child = tmp_path / "small.yaml"
    child.write_text(
        "extends: base.yaml\nname: small\ntrain: {max_steps: 200}\n"
        "search: {space: {data.fraction: {values: [0.5]}}, seeds: 1}\n"
    )
    base, small = load_study(tmp_path / "base.yaml"), load_study(child, ["optimizer.lr=0.01"])
    assert small.name == "small" and small.base.train.max_steps == 200
    assert small.base.train.eval_every == base.base.train.eval_every  # the rest of train: the base's
    assert [d.key for d in small.search.space] == ["data.fraction"]  # space is one key: replaced
    assert small.search.seeds == 1 and small.search.sampler == base.search.sampler
    assert small.base.optimizer.lr == 0.01  # --set applies to the merged study
    expected = study_to_dict(base)
    expected["name"], expected["train"]["max_steps"], expected["optimizer"]["lr"] = "small", 200, 0.01
    expected["search"] |= {"seeds": 1, "space": {"data.fraction": {"values": [0.5]}}}
    assert study_to_dict(small) == expected


@pytest.mark.parametrize(
    ("base_text", "child_text", "starts", "fragment"),
    [
        (
            STUDY.replace("weight_decay: 1.0", "weight_decy: 1.0"),
            "extends: base.yaml\nname: c\n",
            "optimizer.weight_decy: ",
            "(set in {tmp}/base.yaml)",
        ),
        (
            STUDY,
            "extends: base.yaml\nname: c\noptimizer: {weight_decy: 1.0}\n",
            "optimizer.weight_decy: ",
            "did you mean 'weight_decay'?",
        ),
        (STUDY, "extends: base.yaml\ntrain: {max_steps: 10}\n", "{tmp}/child.yaml: name: ", "its own name"),
        (STUDY, "extends: nowhere.yaml\nname: c\n", "{tmp}/nowhere.yaml: ", "no such study file"),
        (
            "extends: child.yaml\n" + STUDY,
            "extends: base.yaml\nname: c\n",
            "{tmp}/base.yaml: extends: ",
            "a cycle",
        ),
        (STUDY, "extends: [base.yaml]\nname: c\n", "{tmp}/child.yaml: extends: ", "expected the path"),
    ],
    ids=["a bad key in the base", "a bad key in the child", "no name", "no base", "a cycle", "not a path"],
)
def test_a_problem_in_an_extended_study_is_one_line_naming_its_file(
    tmp_path: Path, base_text: str, child_text: str, starts: str, fragment: str
) -> None:
    (tmp_path / "base.yaml").write_text(base_text)
    (tmp_path / "child.yaml").write_text(child_text)
    with pytest.raises(StudyError) as exc:
        load_study(tmp_path / "child.yaml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(starts.format(tmp=tmp_path)), lines[0]
    assert fragment.format(tmp=tmp_path) in lines[0]


def test_validate_resolved_prints_the_merged_study_as_a_study_file(tmp_path: Path, capsys) -> None:
    import yaml

    from grokstudy.cli import main
    from grokstudy.study import parse_study

    (tmp_path / "base.yaml").write_text(STUDY)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: c\nmodel: {width: 32}\n")
    assert main(["validate", "--resolved", str(tmp_path / "child.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "extends" not in printed and printed["model"]["width"] == 32
    assert parse_study(printed) == load_study(tmp_path / "child.yaml")


WD = {"log": [0.1, 10.0], "points": 3}
FRAC = {"values": [0.3, 0.5]}


def _study(sampler: str = "grid", seeds: int = 2, lr: float = 1e-3, **space_and_search) -> Study:
    space = {"optimizer.weight_decay": WD, "data.fraction": FRAC} | space_and_search.pop("space", {})
    search = {"sampler": sampler, "space": space, "seeds": seeds} | space_and_search
    return parse_study(
        {"name": "grows", "task": {"op": "x+y", "p": 23}, "optimizer": {"lr": lr}, "search": search}
    )


GROWTH = {
    "a seed": (_study(), _study(seeds=3), None),
    "an axis value": (_study(), _study(space={"data.fraction": {"values": [0.3, 0.4, 0.5]}}), None),
    "a finer log axis": (_study(), _study(space={"optimizer.weight_decay": WD | {"points": 5}}), None),
    "a larger budget": (_study("boundary", budget=10), _study("boundary", budget=20), None),
    "no budget": (_study("boundary", budget=10), _study("boundary"), None),
    "more sobol points": (_study("sobol", num_samples=4), _study("sobol", num_samples=8), None),
    "fewer seeds": (_study(), _study(seeds=1), ("search.seeds", "add seeds, not drop them")),
    "a smaller budget": (
        _study("boundary", budget=10),
        _study("boundary", budget=5),
        ("search.budget", "not shrink"),
    ),
    "an axis value gone": (
        _study(),
        _study(space={"data.fraction": {"values": [0.3]}}),
        ("search.space.data.fraction", "not lose them (0.5 gone)"),
    ),
    "a new axis": (
        _study(),
        _study(space={"optimizer.lr": {"values": [1e-3, 1e-2]}}),
        ("search.space.optimizer.lr", "adding or removing an axis"),
    ),
    "a sobol axis": (
        _study("sobol", num_samples=4),
        _study("sobol", num_samples=4, space={"data.fraction": {"range": [0.2, 0.9]}}),
        ("search.space.data.fraction", "space cannot grow"),
    ),
    "another sampler": (_study(), _study("sobol", num_samples=4), ("search.sampler", "finished trials mean")),
    "a trial setting": (_study(), _study(seeds=3, lr=1e-2), ("optimizer.lr", "0.001 -> 0.01 since")),
    # Like every phase key: a boundary study chose where to train by the labels it saw.
    "a phase rule setting": (
        _study(),
        parse_study(study_to_dict(_study()) | {"phases": {"plateau_max": 0.1}}),
        ("phases.plateau_max", "null -> 0.1 since"),
    ),
}


@pytest.mark.parametrize("before, after, refusal", GROWTH.values(), ids=GROWTH.keys())
def test_a_study_may_grow_but_not_change_what_its_finished_trials_mean(
    before: Study, after: Study, refusal: tuple[str, str] | None
) -> None:
    growth = study_mod.compare(before, after)
    if refusal is None:
        assert growth.grown and not growth.refused
        return
    key, fragment = refusal
    assert growth.refused[0][0] == key and fragment in growth.refused[0][1], growth.refused


# ---- train.max_steps: {auto: ...} ------------------------------------------------------------------

AUTO = "max_steps: {auto: {per_decay_time: 1, min: 100, max: 20000}}"
AUTO_STUDY = STUDY.replace("max_steps: 300", AUTO)


@pytest.mark.parametrize(
    ("lr", "wd", "steps"),
    [
        (1e-3, 1e-3, 20000),  # 1 / (lr * wd) = 1e6 steps: clipped to max
        (1e-3, 0.1, 10000),  # exactly 10000 (in floats 10000.000000000002): no evaluation more
        (3e-3, 1.0, 350),  # 333.3 rounded up to eval_every 50
        (1e-3, 10.0, 100),  # exactly min
        (1e-2, 10.0, 100),  # 10 steps: raised to min
        (1e-3, 0.0, 20000),  # no decay: max
    ],
)
def test_an_auto_budget_is_its_points_decay_times_rounded_up_and_clipped(
    tmp_path: Path, lr: float, wd: float, steps: int
) -> None:
    s = load_study(write(tmp_path, AUTO_STUDY))
    assert s.base.train.max_steps == 20000  # the base trial holds max: every upper-end check reads it
    point = {"optimizer.lr": lr, "optimizer.weight_decay": wd, "data.fraction": 0.5}
    assert s.trial(point).train.max_steps == steps


def test_an_auto_budget_round_trips_and_a_changed_rule_changes_what_trials_mean(tmp_path: Path) -> None:
    s = load_study(write(tmp_path, AUTO_STUDY))
    auto = s.auto_max_steps
    assert auto is not None and (auto.per_decay_time, auto.min, auto.max) == (1.0, 100, 20000)
    resolved = study_to_dict(s)
    assert resolved["train"]["max_steps"] == {"auto": {"per_decay_time": 1.0, "min": 100, "max": 20000}}
    assert load_study(write(tmp_path, yaml.safe_dump(resolved, sort_keys=False))) == s
    longer = load_study(write(tmp_path, AUTO_STUDY), ["train.max_steps.auto.per_decay_time=10"])
    assert longer.auto_max_steps.per_decay_time == 10.0
    [(key, why)] = study_mod.compare(s, longer).refused
    assert key == "train.max_steps" and why.endswith(study_mod.CHANGES_MEANING)
    fixed = load_study(write(tmp_path, AUTO_STUDY), ["train.max_steps=300"])  # a number turns auto off
    assert fixed.auto_max_steps is None
    assert fixed.trial({"optimizer.weight_decay": 10.0}).train.max_steps == 300


def test_describe_lists_each_points_auto_budget_and_the_model_steps(tmp_path: Path) -> None:
    text = describe(load_study(write(tmp_path, AUTO_STUDY)))
    assert "  lr 0.001, weight_decay 0.001: 20000 steps\n  lr 0.001, weight_decay 0.1: 10000 steps\n" in text
    assert "  lr 0.001, weight_decay 10: 100 steps" in text
    # 4 fractions x 2 seeds per weight decay: (20000 + 10000 + 100) * 8 of 20000 * 24.
    assert "240,800 model-steps over 24 trials (50% of max_steps 20000 for all)" in text
    assert text.endswith("12 points x 2 seeds = 24 trials")


def test_a_single_trial_from_an_auto_study_gets_its_budget(tmp_path: Path) -> None:
    path = write(tmp_path, AUTO_STUDY)
    assert trial_from_overrides(["optimizer.weight_decay=0.1"], path).train.max_steps == 10000
    given = trial_from_overrides(["optimizer.weight_decay=0.1", "train.max_steps=700"], path)
    assert given.train.max_steps == 700


# (replace AUTO in AUTO_STUDY with this, or --set these) → (the dotted path that leads the line, a fragment)
AUTO_REFUSALS = {
    "auto without its parameters": (("max_steps: auto",), "train.max_steps", "auto takes its parameters"),
    "a mapping without auto": (("max_steps: {}",), "train.max_steps", "expected an integer or {auto:"),
    "a typo of auto": (("max_steps: {atuo: {}}",), "train.max_steps.atuo", "did you mean 'auto'?"),
    "auto not a mapping": (("max_steps: {auto: 10}",), "train.max_steps.auto", "expected a mapping"),
    "a typo inside auto": (
        ("max_steps: {auto: {per_decay_time: 1, mn: 100, min: 100, max: 200}}",),
        "train.max_steps.auto.mn",
        "did you mean 'min'?",
    ),
    "K of 0": (
        ("max_steps: {auto: {per_decay_time: 0, min: 100, max: 200}}",),
        "train.max_steps.auto.per_decay_time",
        "(got 0); allowed: 0 < per_decay_time",
    ),
    "K not a number": (
        ("max_steps: {auto: {per_decay_time: ten, min: 100, max: 200}}",),
        "train.max_steps.auto.per_decay_time",
        "expected a number (got 'ten')",
    ),
    "min of 0": (
        ("max_steps: {auto: {per_decay_time: 1, min: 0, max: 200}}",),
        "train.max_steps.auto.min",
        "(got 0); allowed: an integer, 1 <= min <= 1e9",
    ),
    "max not an integer": (
        ("max_steps: {auto: {per_decay_time: 1, min: 100, max: 250.5}}",),
        "train.max_steps.auto.max",
        "expected an integer (got 250.5)",
    ),
    "max beyond any budget": (
        ("max_steps: {auto: {per_decay_time: 1, min: 100, max: 1e12}}",),
        "train.max_steps.auto.max",
        "1 <= max <= 1e9",
    ),
    "max missing": (
        ("max_steps: {auto: {per_decay_time: 1, min: 100}}",),
        "train.max_steps.auto.max",
        "missing; e.g. max_steps: {auto:",
    ),
    "min above max": (
        ("max_steps: {auto: {per_decay_time: 1, min: 500, max: 200}}",),
        "train.max_steps.auto.min",
        "above max (got min 500, max 200); allowed: 1 <= min <= max",
    ),
    "max with too many evaluations": (
        (
            "max_steps: {auto: {per_decay_time: 1, min: 100, max: 200000000}}",
            *("--set", "train.eval_every=1", "--set", "train.checkpoint_every=1"),
        ),
        "train.eval_every",
        "200000000 steps evaluated every 1",
    ),
    "auto and a searched max_steps": (
        (AUTO, "--set", "search.space.train.max_steps={values: [100, 200]}"),
        "search.space.train.max_steps",
        "searched while train.max_steps is auto",
    ),
    "one auto key set where max_steps is a number": (
        ("max_steps: 300", "--set", "train.max_steps.auto.min=5"),
        "--set train.max_steps.auto.min",
        "train.max_steps is not auto (got 300)",
    ),
}


@pytest.mark.parametrize(("change", "path", "fragment"), AUTO_REFUSALS.values(), ids=AUTO_REFUSALS.keys())
def test_grokstudy_validate_refuses_each_bad_auto_budget_in_one_line_exit_2(
    tmp_path: Path, change: tuple[str, ...], path: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grokstudy.cli import main

    text = AUTO_STUDY.replace(AUTO, change[0])
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(write(tmp_path, text)), *change[1:]])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"grokstudy validate: error: {path}: ") and fragment in line, line


# ---- conditional settings ----------------------------------------------------------------------

CONDITIONAL_STUDY = STUDY.replace(
    "    data.fraction: {range: [0.2, 0.8], points: 4}",
    "    data.fraction: {range: [0.2, 0.8], points: 4}\n    train.loss: {choice: [cross_entropy, stablemax]}",
) + (
    "conditional:\n"
    "  - when: {train.loss: stablemax}\n"
    "    set: {optimizer.betas: [0.9, 0.999], model.bias: false}\n"
    "  - when: {train.loss: stablemax, optimizer.weight_decay: 10.0}\n"
    "    set: {optimizer.betas: [0.9, 0.99]}\n"
)


def test_conditional_settings_apply_to_the_matching_points_in_order_and_round_trip(tmp_path: Path) -> None:
    s = load_study(write(tmp_path, CONDITIONAL_STUDY))
    point = {"optimizer.weight_decay": 0.1, "data.fraction": 0.4, "train.loss": "stablemax"}
    assert (s.trial(point).optimizer.betas, s.trial(point).model.bias) == ((0.9, 0.999), False)
    later = s.trial(point | {"optimizer.weight_decay": 10.0})  # the second entry wins where both match
    assert (later.optimizer.betas, later.model.bias) == ((0.9, 0.99), False)
    other = s.trial(point | {"train.loss": "cross_entropy"})
    assert (other.optimizer.betas, other.model.bias) == (s.base.optimizer.betas, True)
    resolved = study_to_dict(s)
    assert resolved["conditional"][0] == {
        "when": {"train.loss": "stablemax"},
        "set": {"optimizer.betas": [0.9, 0.999], "model.bias": False},
    }
    assert load_study(write(tmp_path, yaml.safe_dump(resolved, sort_keys=False))) == s
    assert "conditional" not in study_to_dict(load_study(write(tmp_path, STUDY)))  # old fingerprints stay
    path = write(tmp_path, CONDITIONAL_STUDY)  # `grokstudy train` takes them too; --set wins
    assert trial_from_overrides(["train.loss=stablemax"], path).optimizer.betas == (0.9, 0.999)
    mine = trial_from_overrides(["train.loss=stablemax", "optimizer.betas=[0.9, 0.95]"], path)
    assert (mine.optimizer.betas, mine.model.bias) == ((0.9, 0.95), False)
    assert trial_from_overrides([], path).optimizer.betas == s.base.optimizer.betas
    changed = load_study(write(tmp_path, CONDITIONAL_STUDY.replace("[0.9, 0.999]", "[0.9, 0.98]")))
    [(key, why)] = study_mod.compare(s, changed).refused
    assert key == "conditional" and why.endswith(study_mod.CHANGES_MEANING)


CONDITIONAL_REFUSALS = {
    "a list of mappings": ("  - when: {train.loss: stablemax}\n", "  - stablemax\n  - when: {train.loss: stablemax}\n", "conditional[0]", "exactly when and set"),
    "an unsearched when": ("when: {train.loss: stablemax}\n", "when: {optimizer.lr: 0.001}\n", "conditional[0].when.optimizer.lr", "follow a searched value"),
    "a value off the axis": ("when: {train.loss: stablemax}\n", "when: {train.loss: mse}\n", "conditional[0].when.train.loss", "not one of the axis's values"),
    "a searched set": ("model.bias: false}", "data.fraction: 0.5}", "conditional[0].set.data.fraction", "searched"),
    "a bad value": ("model.bias: false}", "model.bias: 3}", "conditional[0].set.model.bias", "expected true or false"),
    "an unknown key": ("model.bias: false}", "model.biass: false}", "conditional[0].set.model.biass", "did you mean 'model.bias'?"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"), CONDITIONAL_REFUSALS.values(), ids=CONDITIONAL_REFUSALS.keys()
)
def test_each_bad_conditional_entry_is_one_line_naming_its_key_exit_2(
    tmp_path: Path, old: str, new: str, path: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grokstudy.cli import main

    assert old in CONDITIONAL_STUDY
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(write(tmp_path, CONDITIONAL_STUDY.replace(old, new, 1)))])
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"grokstudy validate: error: {path}: ") and fragment in line, line


def test_a_batch_holds_batch_size_rows_at_most_batch_fraction_of_the_training_set(tmp_path: Path) -> None:
    from grokstudy.config import TrainConfig, batch_rows

    power = TrainConfig(batch_size=512, batch_fraction=0.5)  # Power et al.'s min(512, ceil(n / 2))
    assert [batch_rows(power, n) for n in (1, 101, 1024, 1025, 9409)] == [1, 51, 512, 512, 512]
    assert [batch_rows(TrainConfig(batch_size=b), 100) for b in (None, 32, 500)] == [100, 32, 100]
    assert batch_rows(TrainConfig(batch_fraction=0.25), 101) == 26  # full, capped
    s = load_study(write(tmp_path, STUDY), ["train.batch_size=512", "train.batch_fraction=0.5"])
    assert (s.base.train.batch_size, s.base.train.batch_fraction) == (512, 0.5)
    [line] = error_lines(tmp_path, STUDY, ("train.batch_fraction=1.5",))
    assert line == "train.batch_fraction: out of range (got 1.5); allowed: 0 < batch_fraction <= 1"
