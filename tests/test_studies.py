"""Every shipped study file is valid and expands to its points x seeds (STYLE.md, principle 5)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from grokstudy import search
from grokstudy.study import describe, load_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").rglob("*.yaml"))


REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").rglob("*.md"), *(REPO / "cluster").rglob("*.md")]


def test_every_study_the_docs_name_exists_and_every_shipped_study_is_documented() -> None:
    import re

    text = "\n".join(p.read_text() for p in DOCS if p.exists())
    named = {n for n in re.findall(r"studies/([\w./-]+\.yaml)", text) if not re.fullmatch(r"[A-Z]\.yaml", n)}
    shipped = {str(p.relative_to(REPO / "studies")) for p in STUDIES}
    assert named - shipped == set(), f"the docs name studies that do not exist: {named - shipped}"
    assert shipped - named == set(), f"shipped studies no doc mentions: {shipped - named}"


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_study_file_is_valid_and_expands_to_every_point_and_seed_once(path: Path) -> None:
    study = load_study(path)
    trials = search.dry_run(study)
    counts = Counter((search.point_id(p), p["train.seed"]) for p in trials)
    assert len(trials) == search.n_trials(study) == search.n_points(study) * study.search.seeds
    assert set(counts.values()) == {1}
    if study.search.sampler == "grid":
        assert {pid for pid, _ in counts} == {search.point_id(p) for p in search.grid_points(study)}
    searched = {d.key for d in study.search.space}
    assert {study.diagram.x, study.diagram.y} <= searched, (
        "a shipped study draws its diagram over searched axes"
    )
    assert describe(study).endswith(f"= {search.n_trials(study)} trials")


def test_smoke_study_stays_small_enough_for_ci() -> None:
    study = load_study(STUDIES[0].parent / "smoke.yaml")
    assert search.n_trials(study) == 4 and study.search.seeds == 1
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
    assert search.n_trials(study) == 9 * 9 * 3 and study.resources.gpu == 0.25
