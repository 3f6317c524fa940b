"""Every shipped study file is valid and expands to its points x seeds."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from grokstudy import points, search
from grokstudy.study import describe, load_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").rglob("*.yaml"))


REPO = Path(__file__).resolve().parent.parent
DOCS = [
    REPO / "README.md",
    REPO / "Makefile",
    *(REPO / "docs").rglob("*.md"),
    *(REPO / "cluster").rglob("*.md"),
]


def test_every_study_the_docs_name_exists_and_every_shipped_study_is_documented() -> None:
    import re

    text = "\n".join(p.read_text() for p in DOCS if p.exists())
    named = {n for n in re.findall(r"studies/([\w./-]+\.yaml)", text) if not re.fullmatch(r"[A-Z]\.yaml", n)}
    shipped = {str(p.relative_to(REPO / "studies")) for p in STUDIES}
    assert named - shipped == set(), f"the docs name studies that do not exist: {named - shipped}"
    assert shipped - named == set(), f"shipped studies no doc mentions: {shipped - named}"


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_study_file_reads_back_equal_from_its_resolved_form(path: Path) -> None:
    """What the runner stores beside the experiment and in MLflow, and a resume reads back."""
    from grokstudy.study import parse_study, study_to_dict

    study = load_study(path)
    assert parse_study(study_to_dict(study)) == study


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_study_file_is_valid_and_expands_to_every_point_and_seed_once(path: Path) -> None:
    study = load_study(path)
    trials = search.dry_run(study)
    counts = Counter((points.point_id(p), p["train.seed"]) for p in trials)
    assert set(counts.values()) == {1}
    if study.search.sampler == "boundary":  # adaptive: how many depends on the phases found
        assert study.search.n_trials is None and len(trials) <= study.search.n_points * study.search.seeds
        assert describe(study).endswith("infers the rest")
        return
    assert len(trials) == study.search.n_trials == study.search.n_points * study.search.seeds
    if study.search.sampler == "grid":
        assert {pid for pid, _ in counts} == {points.point_id(p) for p in points.grid_points(study)}
    searched = {d.key for d in study.search.space}
    drawn = {study.diagram.x, study.diagram.y} if len(searched) > 1 else {study.diagram.x}
    assert drawn <= searched, "a shipped study draws its diagram over searched axes"
    assert describe(study).endswith(f"= {study.search.n_trials} trials")


PAPERS = sorted((REPO / "studies" / "papers").glob("*.yaml"))
CPU_SECONDS = 15 * 60 * 2
"""A -cpu study must fit 15 minutes of this repo's 2-core machines."""
FLOPS_PER_CORE = 20e9
"""Sustained float32 FLOP/s of one core of those machines on these small models, conservatively
(bench/step_efficiency.py measured ~90e9 for the reference MLP, ~85e9 for the transformer)."""


def cost_s(study) -> float:
    """Core-seconds a study needs at most: trials x steps x 6 FLOP per parameter and token and
    example (+ evaluations over the whole table), plus 3 s per trial of start-up."""
    total = 0.0
    for point in search.dry_run(study):
        cfg = study.trial(point)
        m, p = cfg.model, cfg.task.p
        pairs = 120**2 if cfg.task.op == "perm" else p * p
        vocab = 120 if cfg.task.op == "perm" else p
        # Parameters that take part in matrix products (embeddings are lookups).
        if m.kind == "gromov":
            params, tokens = m.width * vocab, 1
        elif m.kind == "mlp":
            inputs = 2 * vocab if m.inputs == "onehot" else 2 * m.embed_dim
            params, tokens = inputs * m.width + (m.depth - 1) * m.width**2 + m.width * vocab, 1
        else:
            d = m.embed_dim
            params, tokens = m.depth * (4 * d * d + 2 * d * m.width) + d * vocab, 3
        batch = cfg.train.batch_size or round(cfg.data.fraction * pairs)
        steps = cfg.train.max_steps
        evals = steps / cfg.train.eval_every
        total += 6 * params * tokens * batch * steps + 2 * params * tokens * pairs * evals
    return total / FLOPS_PER_CORE + 3 * len(search.dry_run(study))


@pytest.mark.parametrize("path", PAPERS, ids=[p.name for p in PAPERS])
def test_every_paper_study_cites_its_paper_and_its_cpu_variant_fits_the_time(path: Path) -> None:
    header = path.read_text().split("\nname:")[0]
    assert "arXiv" in header and "Claim" in header, f"{path.name} must cite its paper and state its claim"
    study = load_study(path)
    if path.stem.endswith("-cpu"):
        assert cost_s(study) <= CPU_SECONDS, f"{path.name} needs ~{cost_s(study) / 120:.0f} min on 2 cores"
        assert (path.parent / f"{path.stem.removesuffix('-cpu')}.yaml").exists()
        assert study.resources.gpu == 0
    else:
        assert (path.parent / f"{path.stem}-cpu.yaml").exists(), f"{path.name} has no -cpu variant"
        assert study.resources.gpu > 0, "a paper-size study is for a GPU cluster"


def test_smoke_study_stays_small_enough_for_ci() -> None:
    study = load_study(STUDIES[0].parent / "smoke.yaml")
    assert study.search.n_trials == 4 and study.search.seeds == 1
    assert study.base.train.max_steps <= 500 and study.base.model.width <= 64


def test_quickstart_is_a_weight_decay_by_fraction_grid_with_replicates() -> None:
    study = load_study(STUDIES[0].parent / "quickstart.yaml")
    assert [d.key for d in study.search.space] == ["optimizer.weight_decay", "data.fraction"]
    assert study.search.sampler == "grid" and study.search.seeds >= 2
    assert study.resources.gpu == 0 and study.resources.cpu == 1


def test_the_cluster_study_is_nandas_transformer_on_a_9_by_9_grid() -> None:
    study = load_study(STUDIES[0].parent / "wd_vs_frac_transformer.yaml")
    m, o = study.base.model, study.base.optimizer
    assert (m.kind, m.embed_dim, m.heads, m.width, m.depth, m.layer_norm) == (
        "transformer",
        128,
        4,
        512,
        1,
        False,
    )
    assert (o.name, o.lr, o.betas, study.base.task.p) == ("adamw", 1e-3, (0.9, 0.98), 97)
    assert study.search.n_trials == 9 * 9 * 3 and study.resources.gpu == 0.25
    assert study.resources.pack * 4 >= study.search.n_trials  # four packs on one GPU hold it all


# ---- the generated reference and JSON Schema ------------------------------------------------------


def test_the_study_reference_and_schema_are_what_config_generates_now() -> None:
    from grokstudy import reference

    assert reference.stale(REPO) == [], "run `python -m grokstudy.reference` (make reference) and commit"


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_names_the_schema_and_passes_it(path: Path) -> None:
    import json

    import jsonschema
    import yaml

    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema="), first
    schema_file = (path.parent / first.split("=", 1)[1]).resolve()
    assert schema_file == REPO / "studies" / "study.schema.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(path.read_text()), schema, cls=jsonschema.Draft202012Validator)


def test_the_schema_takes_max_steps_as_a_number_or_an_auto_budget() -> None:
    import json

    import jsonschema
    import yaml

    text = (REPO / "studies" / "quickstart.yaml").read_text()
    auto = yaml.safe_load(
        text.replace("max_steps: 3000", "max_steps: {auto: {per_decay_time: 10, min: 1000, max: 20000}}")
    )
    schema = json.loads((REPO / "studies" / "study.schema.json").read_text())
    jsonschema.validate(auto, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    ("swap", "where"),
    [
        (("weight_decay: 1.0", "weight_decy: 1.0"), "weight_decy"),  # a typo'd key
        (("weight_decay: 1.0", "weight_decay: -1"), "-1"),  # out of range
        (("name: adamw", "name: adamx"), "adamx"),  # not a choice
        (("data.fraction: {values", "data.fractoin: {values"), "data.fractoin"),  # no such axis
        (("{values: [0.3, 0.45, 0.6, 0.8]}", "{values: [0.3], log: [0.1, 1]}"), "values"),  # two forms
        (("max_steps: 3000", "max_steps: {auto: {per_decay_time: 10, min: 1000}}"), "auto.max"),  # no max
        (("max_steps: 3000", "max_steps: {auto: {per_decay_time: 10, min: 1, max: 9, mx: 9}}"), "auto.mx"),
    ],
)
def test_the_schema_refuses_what_the_validator_refuses(swap: tuple[str, str], where: str) -> None:
    import json

    import jsonschema
    import yaml

    from grokstudy.errors import StudyError

    text = (REPO / "studies" / "quickstart.yaml").read_text()
    assert swap[0] in text
    bad = yaml.safe_load(text.replace(*swap, 1))
    schema = json.loads((REPO / "studies" / "study.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
    from grokstudy.study import parse_study

    with pytest.raises(StudyError, match=re.escape(where)):
        parse_study(bad)
