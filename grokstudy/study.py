"""The study file: YAML and `--set KEY=VALUE` text in, a validated frozen `Study` out.

The only module that parses user text, validated once at the edge. The schema is
read off `config.py`: a section's keys are its dataclass's fields, each value is
checked by its field's `config.setting` rule, so what is accepted cannot drift
from the configs or from what the training core checks (`config.validate_trial`).
Validation is hand-written, not pydantic: the messages are the product, and the
rest of the code sees only frozen dataclasses.

Every problem is one line, `dotted.path: what is wrong (got X); allowed: ...`,
with a "did you mean" for misspelt keys at any level and values cut short
(`config.show`: even an alias-bombed file gives a short line). All problems of
a file and its overrides are raised together (`errors.StudyErrors`); the CLI
prints them and exits 2, never a traceback.

YAML is read with two fixes to PyYAML's YAML 1.1 defaults: `1e-3` is a number
(as in YAML 1.2, not the string "1e-3"), and a repeated key in a mapping is an
error instead of silently keeping the last value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from grokstudy.config import (
    LATTICE_SAMPLERS,
    PHASE_RULES,
    STUDY_SECTIONS,
    TRIAL_SECTIONS,
    Conditional,
    DecayTimeBudget,
    RunConfig,
    SearchConfig,
    SearchDim,
    Spec,
    Study,
    TrialConfig,
    check_value,
    cross_problems,
    did_you_mean,
    get_path,
    is_number,
    plain,
    show,
    to_dict,
    with_overrides,
)
from grokstudy.errors import StudyError, StudyErrors, one_line, raise_all
from grokstudy.points import point_id
from grokstudy.uris import STORAGE_SCHEMES, has_credentials

# ---- the schema (read off config.py) ---------------------------------------------------------------

TOP_LEVEL = ("name", *STUDY_SECTIONS, "conditional")
DIM_FORMS = ("log", "range", "values", "choice")
DIM_KEYS = (*DIM_FORMS, "points", "integer")
MAX_POINTS = 10_000
"""Grid points of one log/range axis, and values of one values/choice axis."""
MAX_STUDY_BYTES = 1_000_000
"""A study file larger than this is not a hand-written study (YAML parsing alone takes seconds)."""
MAX_TRIALS = 10**6
"""Trials of one study (points x seeds): more is a typo, not a study."""

TYPES: dict[str, Any] = {
    f"{section}.{name}": hint
    for section, cls in STUDY_SECTIONS.items()
    for name, hint in get_type_hints(cls).items()
}
TRIAL_KEYS = tuple(k for k in TYPES if k.split(".")[0] in TRIAL_SECTIONS)
"""Every dotted key of a TrialConfig: what may be searched, set for `grokstudy train`, or drawn."""
ANY_TRIAL_KEY = "any dotted key of " + ", ".join(TRIAL_SECTIONS) + " (e.g. optimizer.lr)"
ANY_STUDY_KEY = "name, " + ", ".join(f"{s}.*" for s in STUDY_SECTIONS)
REMOVED: dict[str, str] = {
    "run.optuna_storage": "removed: the Optuna study now travels with the Ray Tune experiment "
    "(run.storage), so a resumed study finds it wherever it resumes; drop this key",
}
"""Keys earlier versions accepted, with what to do instead."""
AUTO_STEPS_EXAMPLE = "{auto: {per_decay_time: 10, min: 1000, max: 20000}}"
"""`train.max_steps`'s other form (config.DecayTimeBudget), as error lines show it."""
AUTO_STEPS_PREFIX = "train.max_steps.auto."


SPECS: dict[str, Spec] = {
    f"{section}.{f.name}": f.metadata["spec"]
    for section, cls in STUDY_SECTIONS.items()
    for f in dataclasses.fields(cls)
    if "spec" in f.metadata
}
"""Each key's rule (`config.setting`); keys without one take any value of their type."""
CHOICES: dict[str, tuple[str, ...]] = {k: s.choices for k, s in SPECS.items() if s.choices is not None}
"""The names each choice key accepts (the registries in tasks/models/optim must agree)."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""A study name is a directory, a Ray experiment, an Optuna study and an MLflow experiment."""

# ---- reading YAML --------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-3`) and duplicate keys as errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists inline: `betas: [0.9, 0.98]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise StudyError(source, f"not valid YAML: {where}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise StudyError(source, f"not valid YAML: {one_line(str(e), 200)}") from None
    except RecursionError:
        raise StudyError(source, "not valid YAML: nested too deeply") from None


# ---- public API ----------------------------------------------------------------------------------


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read, override and validate a study file.

    `overrides` are `KEY=VALUE` strings as given to `--set` (the value is YAML:
    `train.max_steps=2000`, `optimizer.betas=[0.9,0.99]`, `train.batch_size=full`,
    `search.space.optimizer.weight_decay={log: [1e-3, 1], points: 5}`).
    A file with `extends: base.yaml` (a path relative to it) is its base with this file's
    sections merged over it key by key (`search.space` is one key: a file that sets it replaces
    the base's axes); a problem with a key the base set names the base file.
    Raises `StudyError`/`StudyErrors` listing every problem found.
    """
    data, origins = _read_extended(Path(path), ())
    try:
        return _parse(data, str(path), overrides)
    except StudyErrors as e:
        raise StudyErrors([_name_origin(err, origins, str(path)) for err in e.errors]) from None
    except StudyError as e:
        raise _name_origin(e, origins, str(path)) from None


MAX_EXTENDS = 8
"""How deep `extends:` may chain: deeper is a mistake, not a study."""


def _read_file(path: Path) -> dict[str, Any]:
    """A study file's YAML mapping (unvalidated): StudyError naming the file for what cannot be read."""
    source = str(path)
    try:
        if path.stat().st_size > MAX_STUDY_BYTES:
            size = f"{path.stat().st_size:,} bytes"
            raise StudyError(source, f"the study file is {size}; allowed: at most {MAX_STUDY_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError(source, "no such study file") from None
    except UnicodeDecodeError as e:
        raise StudyError(source, f"not UTF-8 text (byte {e.start}); save the study file as UTF-8") from None
    except OSError as e:
        raise StudyError(source, f"cannot read the study file: {e.strerror or e}") from None
    data = _load_yaml(text, source)
    if data is None:
        raise StudyError(source, "the study file is empty; see studies/smoke.yaml for a complete example")
    return data


def _read_extended(path: Path, chain: tuple[Path, ...]) -> tuple[Any, dict[str, str]]:
    """(the file's mapping with its `extends:` chain merged in, {section or section.key: the file
    that set it})."""
    data = _read_file(path)
    if not isinstance(data, dict) or "extends" not in data:
        keys = data.items() if isinstance(data, dict) else ()
        return data, _origins(keys, str(path))
    base_ref = data["extends"]
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise StudyError(
            f"{path}: extends",
            f"expected the path of a study file, relative to this one (got {show(base_ref)})",
        )
    base_path = path.parent / base_ref
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        raise StudyError(f"{path}: extends", f"{base_ref} extends this file again: a cycle")
    if len(chain) >= MAX_EXTENDS:
        raise StudyError(f"{path}: extends", f"more than {MAX_EXTENDS} files extend one another")
    if "name" not in data:
        raise StudyError(f"{path}: name", "missing; a study that extends another needs its own name")
    base, origins = _read_extended(base_path, (*chain, path))
    if not isinstance(base, dict):
        raise StudyError(str(base_path), f"a study file is a mapping of sections (got {show(base)})")
    merged = dict(base)
    for key, value in data.items():
        if key == "extends":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged[key] | value
        else:
            merged[key] = value
    return merged, origins | _origins(((k, v) for k, v in data.items() if k != "extends"), str(path))


def _origins(items: Any, source: str) -> dict[str, str]:
    out = {}
    for key, value in items:
        out[str(key)] = source
        if isinstance(value, dict):
            out |= {f"{key}.{sub}": source for sub in value}
    return out


def _name_origin(err: StudyError, origins: dict[str, str], source: str) -> StudyError:
    """`err`, saying which file set its key when that is a base the study extends."""
    parts = err.path.split(".")
    where = next((origins[k] for n in (2, 1) if (k := ".".join(parts[:n])) in origins), source)
    return err if where == source else StudyError(err.path, f"{err.msg} (set in {where})")


def parse_study(data: dict[str, Any], source: str = "<study>", overrides: Sequence[str] = ()) -> Study:
    """Validate an already-parsed study mapping (the contents of a YAML file), with `overrides`
    as `load_study` takes them."""
    return _parse(data, source, overrides)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`["train.max_steps=2000", ...]` → `{"train.max_steps": 2000}`; values are YAML.

    Only the syntax is checked here; whether a key exists is checked against
    the study (`load_study`) or the trial (`trial_from_overrides`).
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key):
            problems.append(
                StudyError("--set", f"expected KEY=VALUE, e.g. --set train.max_steps=2000 (got {item!r})")
            )
            continue
        try:
            out[key] = _load_yaml(text, f"--set {key}") if text.strip() else None
        except StudyError as e:
            problems.append(e)
    raise_all(problems)
    return out


def trial_from_overrides(overrides: Sequence[str], base_file: Path | None = None) -> TrialConfig:
    """One validated trial for `grokstudy train`: the study's base trial (or the
    defaults) with `--set` keys of the trial applied (`task.op=x/y`, `optimizer.lr=1e-3`), then
    the study's `conditional` settings its values match (a key set with `--set` stays)."""
    study = load_study(base_file) if base_file is not None else None
    raw = to_dict(study.base if study is not None else TrialConfig())
    problems: list[StudyError] = []
    items = parse_set(overrides)
    for key, value in items.items():
        if key in TRIAL_KEYS:
            section, name = key.split(".")
            raw[section][name] = value
        else:
            problems.append(_unknown(f"--set {key}", key, TRIAL_KEYS, "a trial key: " + ANY_TRIAL_KEY))
    bad: set[str] = set()
    trial = TrialConfig(**{s: cls(**_section(s, raw[s], problems, bad)) for s, cls in TRIAL_SECTIONS.items()})
    for c in study.conditional if study is not None else ():  # as a study's trial, but --set wins
        if all(get_path(trial, key) == value for key, value in c.when):
            trial = with_overrides(trial, {key: value for key, value in c.set if key not in items})
    auto = study.auto_max_steps if study is not None else None
    if auto is not None and "train.max_steps" not in items:  # the study's budget at this lr and decay
        o = trial.optimizer
        trial = with_overrides(
            trial, {"train.max_steps": auto.steps(o.lr, o.weight_decay, trial.train.eval_every)}
        )
    _cross_checks(trial, {}, problems, bad)
    raise_all(problems)
    return trial


def study_to_dict(study: Study) -> dict[str, Any]:
    """The resolved study as plain YAML-ready data; `parse_study` reads it back equal."""
    out: dict[str, Any] = {"name": study.name, **to_dict(study.base)}
    if out["train"]["batch_size"] is None:
        out["train"]["batch_size"] = "full"
    if study.auto_max_steps is not None:  # as the file wrote it: the base trial's max is not the rule
        out["train"]["max_steps"] = {"auto": to_dict(study.auto_max_steps)}
    s = study.search
    out["search"] = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    out["search"]["space"] = {dim.key: _dim_to_dict(dim) for dim in s.space}
    for section in ("phases", "resources", "run", "diagram"):
        out[section] = to_dict(getattr(study, section))
    if study.conditional:  # only when used: older studies keep their fingerprints
        out["conditional"] = [
            {"when": {k: plain(v) for k, v in c.when}, "set": {k: plain(v) for k, v in c.set}}
            for c in study.conditional
        ]
    return out


RESUMABLE_CHANGES = ("run.", "diagram.", "resources.cpu", "resources.gpu", "train.measures_every")
"""Keys of the resolved study a resumed run may change: where and how it runs, and what it
measures on the side, not what it trains."""


def fingerprint(study: Study) -> dict[str, str]:
    """{dotted key: value as YAML text} of everything in a study that decides which trials
    run and how: what a resumed study must keep (`changes`)."""
    data = study_to_dict(study)
    data["search.space"] = data["search"].pop("space")  # one key per axis
    flat = {"name": json.dumps(data.pop("name"))}
    if "conditional" in data:
        flat["conditional"] = json.dumps(data.pop("conditional"), sort_keys=True)
    flat |= {f"{s}.{k}": json.dumps(v, sort_keys=True) for s, part in data.items() for k, v in part.items()}
    return {k: v for k, v in flat.items() if not k.startswith(RESUMABLE_CHANGES)}


def changes(old: dict[str, str], new: dict[str, str], limit: int = 4) -> str | None:
    """`key: old -> new; ...` for what differs between two fingerprints (None if nothing)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not keys:
        return None
    shown = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


@dataclasses.dataclass(frozen=True, slots=True)
class Growth:
    """How a study differs from the one its trials started with (`compare`): what grew (more
    seeds, more values on an axis, a larger budget or num_samples: every finished trial keeps
    its meaning, and only new ones run) and what changed otherwise (a refusal)."""

    grown: tuple[str, ...] = ()
    """`key: old -> new` of each growth."""
    refused: tuple[tuple[str, str], ...] = ()
    """(key, `old -> new ...; why`) of each change that would change what finished trials mean."""


def compare(before: Study, after: Study) -> Growth:
    """Sort the differences between two studies of one name into growth and refusals."""
    old, new = fingerprint(before), fingerprint(after)
    grown: list[str] = []
    refused: list[tuple[str, str]] = []
    for key in sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)):
        shown = f"{old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
        why = _not_growth(key, before, after)
        if why is None:
            grown.append(f"{key}: {shown}")
        else:
            refused.append((key, f"{shown} since the study's trials started; {why}"))
    refused.sort(key=lambda r: not r[1].endswith(CHANGES_MEANING))  # the gravest first
    return Growth(tuple(grown), tuple(refused))


def _not_growth(key: str, before: Study, after: Study) -> str | None:
    """Why changing `key` from `before` to `after` is not growth (None: it is)."""
    b, a = before.search, after.search
    lattice = a.sampler in LATTICE_SAMPLERS and b.sampler == a.sampler
    if key == "search.seeds":
        return None if a.seeds > b.seeds else "a study can add seeds, not drop them"
    if key == "search.budget":
        if a.budget is None or (b.budget is not None and a.budget > b.budget):
            return None
        return "a study's budget can grow, not shrink"
    if key == "search.num_samples":
        if lattice or (
            b.num_samples is not None and a.num_samples is not None and a.num_samples > b.num_samples
        ):
            return None  # a lattice sampler ignores num_samples
        return "a study can sample more points, not fewer"
    if key.startswith("search.space."):
        axis = key.removeprefix("search.space.")
        dims_b = {d.key: d for d in b.space}
        dims_a = {d.key: d for d in a.space}
        if axis not in dims_b or axis not in dims_a:
            return "adding or removing an axis changes every finished trial's point"
        if not lattice:
            return f"the {a.sampler} sampler's space cannot grow (only a grid's or boundary's axes can)"
        db, da = dims_b[axis], dims_a[axis]
        if not (db.is_discrete and da.is_discrete):
            return "an axis without a grid cannot grow"
        kept = {point_id({axis: v}) for v in da.grid}
        gone = [v for v in db.grid if point_id({axis: v}) not in kept]
        if gone:
            return f"an axis can gain values, not lose them ({', '.join(map(str, gone[:3]))} gone)"
        return None
    return CHANGES_MEANING


CHANGES_MEANING = "that changes what its finished trials mean"


def describe(study: Study) -> str:
    """A human summary for `grokstudy validate`: the resolved YAML, the axes and the trial count."""
    text = yaml.dump(study_to_dict(study), Dumper=_Dumper, sort_keys=False)
    s = study.search
    lines = [text.rstrip(), ""]
    if study.auto_max_steps is not None:
        lines += [*_describe_auto_steps(study), ""]
    lines.append(f"search axes ({s.sampler}):")
    width = max((len(d.key) for d in s.space), default=0)
    for dim in s.space:
        lines.append(f"  {dim.key:<{width}}  {_describe_dim(dim, s.sampler)}")
    if not s.space:
        lines.append("  none: every trial is the base trial")
    seeds = f"{s.seeds} seed{'s' * (s.seeds != 1)}"
    lattice = s.sampler in LATTICE_SAMPLERS
    n = s.n_points or 0
    if lattice and s.num_samples:
        lines.append(f"(num_samples is ignored by the {s.sampler} sampler)")
    if s.sampler == "boundary":
        cap = f", at most {s.budget}" if s.budget else ""
        lines.append(
            f"{n} grid points x {seeds}{cap}: trains where phases change, every seed only where"
            " they meet, and infers the rest"
        )
    elif lattice:
        lines.append(f"{n} points x {seeds} = {n * s.seeds} trials")
    else:
        lines.append(f"{n} points ({s.sampler}) x {seeds} = {n * s.seeds} trials")
    return "\n".join(lines)


def _describe_auto_steps(study: Study) -> list[str]:
    """Each (lr, weight decay) pair's step budget; on a lattice, the model-steps of every trial
    against the same trials at a fixed max."""
    auto = study.auto_max_steps
    assert auto is not None
    dims = {d.key: d for d in study.search.space}

    def values(key: str) -> list[Any]:  # a continuous axis: its two ends
        dim = dims.get(key)
        if dim is None:
            return [get_path(study.base, key)]
        return list(dim.grid) if dim.is_discrete else list(dim.log or dim.range or ())

    pairs = [(lr, wd) for lr in values("optimizer.lr") for wd in values("optimizer.weight_decay")]
    budgets = [
        study.trial({"optimizer.lr": lr, "optimizer.weight_decay": wd}).train.max_steps for lr, wd in pairs
    ]
    rows = [
        f"  lr {show(lr)}, weight_decay {show(wd)}: {n} steps"
        for (lr, wd), n in zip(pairs, budgets, strict=True)
    ]
    rule = f"{show(auto.per_decay_time)} / (lr * weight_decay), rounded up to eval_every, within [{auto.min}, {auto.max}]"
    lines = [f"step budgets (train.max_steps auto: {rule}):"]
    lines += rows if len(rows) <= 12 else [*rows[:5], "  ...", *rows[-2:]]
    s = study.search
    gridded = all(dims[k].is_discrete for k in dims.keys() & {"optimizer.lr", "optimizer.weight_decay"})
    if s.sampler in LATTICE_SAMPLERS and gridded and s.n_points:
        spent = sum(budgets) * (s.n_points // len(pairs)) * s.seeds
        fixed = auto.max * s.n_points * s.seeds
        most = "at most " if s.sampler == "boundary" else ""
        trials = f"{s.n_points * s.seeds} trials"
        lines.append(
            f"{most}{spent:,} model-steps over {trials} ({spent / fixed:.0%} of max_steps {auto.max} for all)"
        )
    return lines


# ---- parsing -------------------------------------------------------------------------------------


def _parse(data: Any, source: str, overrides: Sequence[str] = ()) -> Study:
    if not isinstance(data, dict):
        raise StudyError(source, f"a study file is a mapping of sections (got {show(data)})")
    problems: list[StudyError] = []
    data = _apply_overrides(data, parse_set(overrides), problems)
    bad: set[str] = set()
    problems += [_unknown(str(key), str(key), TOP_LEVEL) for key in data if key not in TOP_LEVEL]
    name = data.get("name")
    if name is None:
        problems.append(StudyError("name", "missing; every study needs a name (letters, digits, _ . -)"))
        name = "study"
    elif not isinstance(name, str) or not NAME.fullmatch(name):
        problems.append(
            StudyError(
                "name",
                f"not a safe name (got {show(name)}); allowed: letters, digits, _ . - "
                "(it names directories and experiments), starting with a letter or digit",
            )
        )
        name = "study"
    auto, data = _auto_max_steps(data, problems, bad)
    sections = {s: _section(s, data.get(s), problems, bad) for s in STUDY_SECTIONS if s != "search"}
    search = _search(data.get("search"), problems, bad)
    sections["phases"] = PHASE_RULES.get(sections["phases"].get("rule", "default"), {}) | sections["phases"]
    configs = {s: STUDY_SECTIONS[s](**kwargs) for s, kwargs in sections.items()}
    base = TrialConfig(**{s: configs.pop(s) for s in TRIAL_SECTIONS})
    conditional = _conditional(data.get("conditional"), search, auto is not None, problems, bad)
    study = Study(
        name=name, base=base, search=search, auto_max_steps=auto, conditional=conditional, **configs
    )
    if auto is not None and any(d.key == "train.max_steps" for d in search.space):
        problems.append(StudyError("search.space.train.max_steps", "searched while train.max_steps is auto "
                                   "(each point's budget from its lr and weight decay); keep one: drop "
                                   "this axis or give train.max_steps a number"))  # fmt: skip
    for axis in ("x", "y", "facet"):
        key = getattr(study.diagram, axis)
        if key is not None and key not in TRIAL_KEYS:
            problems.append(_unknown(f"diagram.{axis}", key, TRIAL_KEYS, ANY_TRIAL_KEY))
    for key in study.diagram.labels or {}:
        if key not in TRIAL_KEYS:
            problems.append(_unknown("diagram.labels", key, TRIAL_KEYS, ANY_TRIAL_KEY))
    if study.diagram.x == study.diagram.y:
        problems.append(StudyError("diagram.y", "the same key as diagram.x; a phase diagram needs two axes"))
    _cross_checks(base, {d.key: d for d in search.space}, problems, bad, conditional)
    _check_places(study.run, problems)
    raise_all(problems)
    return study


CONDITIONAL_EXAMPLE = "[{when: {train.loss: stablemax}, set: {optimizer.betas: [0.9, 0.999]}}]"


def _conditional(
    raw: Any, search: SearchConfig, auto_steps: bool, problems: list[StudyError], bad: set[str]
) -> tuple[Conditional, ...]:
    """`conditional: [{when: {searched key: value}, set: {trial key: value}}, ...]` read and
    checked: `when` names searched keys and values on their lists, `set` trial keys nobody
    searches; entries with a problem are reported and left out."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(
            StudyError("conditional", f"a list of {{when, set}} entries, e.g. {CONDITIONAL_EXAMPLE}")
        )
        return ()
    dims = {d.key: d for d in search.space}
    out = []
    for i, entry in enumerate(raw):
        path = f"conditional[{i}]"
        n_before = len(problems)
        if not isinstance(entry, dict) or set(entry) != {"when", "set"}:
            problems.append(StudyError(path, f"an entry has exactly when and set (got {show(entry)})"))
            continue
        parts: dict[str, list[tuple[str, Any]]] = {"when": [], "set": []}
        for part in ("when", "set"):
            items = entry[part]
            if not isinstance(items, dict) or not items:
                problems.append(
                    StudyError(f"{path}.{part}", f"a non-empty mapping of dotted keys (got {show(items)})")
                )
                continue
            for key, value in items.items():
                where = f"{path}.{part}.{key}"
                if key not in TRIAL_KEYS:
                    problems.append(_unknown(where, str(key), TRIAL_KEYS, ANY_TRIAL_KEY))
                    continue
                dim = dims.get(key)
                if part == "when" and (dim is None or not dim.is_discrete):
                    problems.append(StudyError(where, "not an axis with listed values in search.space; "
                                               "conditional settings follow a searched value"))  # fmt: skip
                    continue
                if part == "set" and (dim is not None or key == "train.seed"):
                    problems.append(StudyError(where, "searched (its value comes from the point); "
                                               "set only keys the search leaves alone"))  # fmt: skip
                    continue
                if part == "set" and key == "train.max_steps" and auto_steps:
                    problems.append(StudyError(where, "train.max_steps is auto here (each point's budget "
                                               "from its lr and weight decay); keep one"))  # fmt: skip
                    continue
                try:
                    typed = _check(key, _coerce(key, TYPES[key], value))
                except _Bad as e:
                    problems.append(StudyError(where, str(e)))
                    continue
                if part == "when" and typed not in dim.grid:
                    problems.append(StudyError(where, f"{show(value)} is not one of the axis's values "
                                               f"({', '.join(show(v) for v in dim.grid[:8])})"))  # fmt: skip
                    continue
                parts[part].append((key, typed))
        if len(problems) == n_before:
            out.append(Conditional(tuple(parts["when"]), tuple(parts["set"])))
        else:
            bad.update(k for k, _ in parts["set"])
    return tuple(out)


def _auto_max_steps(
    data: dict[str, Any], problems: list[StudyError], bad: set[str]
) -> tuple[DecayTimeBudget | None, dict[str, Any]]:
    """`train.max_steps: {auto: {...}}` read: (its budget, the study mapping with the base trial's
    max_steps set to the budget's max). A study without the form comes back as it is."""
    train = data.get("train")
    steps = train.get("max_steps") if isinstance(train, dict) else None
    if not isinstance(train, dict) or not (isinstance(steps, dict) or steps == "auto"):
        return None, data
    auto = None
    if steps == "auto":
        problems.append(
            StudyError("train.max_steps", f"auto takes its parameters, e.g. {AUTO_STEPS_EXAMPLE}")
        )
    else:
        auto = _decay_time_budget(steps, problems)
    rest = {k: v for k, v in train.items() if k != "max_steps"}
    if auto is None:
        bad.add("train.max_steps")  # already reported: no cross rule on it
    else:
        rest["max_steps"] = auto.max
    return auto, data | {"train": rest}


def _decay_time_budget(raw: dict[Any, Any], problems: list[StudyError]) -> DecayTimeBudget | None:
    """`{auto: {per_decay_time: K, min: A, max: B}}` → its DecayTimeBudget; None (reported) if bad."""
    path = "train.max_steps"
    n_before = len(problems)
    problems += [_unknown(f"{path}.{k}", str(k), ("auto",)) for k in raw if k != "auto"]
    if "auto" not in raw:
        if len(problems) == n_before:
            problems.append(
                StudyError(path, f"expected an integer or {AUTO_STEPS_EXAMPLE} (got {show(raw)})")
            )
        return None
    auto = raw["auto"]
    if not isinstance(auto, dict):
        example = AUTO_STEPS_EXAMPLE.removeprefix("{auto: ").removesuffix("}")
        problems.append(StudyError(f"{path}.auto", f"expected a mapping, e.g. {example} (got {show(auto)})"))
        return None
    fields = {f.name: f for f in dataclasses.fields(DecayTimeBudget)}
    hints = get_type_hints(DecayTimeBudget)
    kwargs: dict[str, Any] = {}
    for key, value in auto.items():
        where = f"{path}.auto.{key}"
        if key not in fields:
            problems.append(_unknown(where, str(key), list(fields)))
            continue
        try:
            kwargs[key] = _coerce(where, hints[key], value)
            message = check_value(key, fields[key].metadata["spec"], kwargs[key])
            if message:
                raise _Bad(message)
        except _Bad as e:
            problems.append(StudyError(where, str(e)))
    for key in (k for k in fields if k not in auto):
        problems.append(StudyError(f"{path}.auto.{key}", f"missing; e.g. max_steps: {AUTO_STEPS_EXAMPLE}"))
    if len(problems) > n_before:
        return None
    if kwargs["min"] > kwargs["max"]:
        got = f"got min {kwargs['min']}, max {kwargs['max']}"
        problems.append(StudyError(f"{path}.auto.min", f"above max ({got}); allowed: 1 <= min <= max"))
        return None
    return DecayTimeBudget(**kwargs)


def _check_places(run: RunConfig, problems: list[StudyError]) -> None:
    """Where a study writes: a storage scheme pyarrow can write to, no credentials in a URI
    (the study file is stored and printed), no empty path."""
    for key in ("out", "storage", "tracking_uri"):
        value = getattr(run, key)
        if value is not None and not value.strip():
            problems.append(StudyError(f"run.{key}", "empty; leave it out for the default"))
    if run.storage and "://" in run.storage:
        scheme = run.storage.split("://", 1)[0].lower()
        if scheme not in STORAGE_SCHEMES:
            problems.append(StudyError("run.storage", f"unsupported scheme {scheme}:// (allowed: "
                                       f"{', '.join(f'{s}://' for s in STORAGE_SCHEMES)} or a path)"))  # fmt: skip
    for key in ("storage", "tracking_uri"):
        value = getattr(run, key)
        if value and has_credentials(value):
            problems.append(StudyError(f"run.{key}", "holds credentials (user:password@); the study file is "
                                       "stored and printed: set MLFLOW_TRACKING_USERNAME and "
                                       "MLFLOW_TRACKING_PASSWORD (or the store's own credential "
                                       "variables) instead"))  # fmt: skip


def _section(section: str, raw: Any, problems: list[StudyError], bad: set[str]) -> dict[str, Any]:
    """Checked keyword arguments of one section's dataclass (but `search.space`, which is
    `_search`'s); bad keys are left at their default."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(StudyError(section, f"expected a mapping of keys (got {show(raw)})"))
        bad.add(section)
        return {}
    fields = [f.name for f in dataclasses.fields(STUDY_SECTIONS[section])]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{section}.{key}"
        if path in REMOVED:
            problems.append(StudyError(path, REMOVED[path]))
        elif key not in fields:
            problems.append(_unknown(path, str(key), fields))
        elif path != "search.space":
            try:
                kwargs[key] = _check(path, _coerce(path, TYPES[path], value))
            except _Bad as e:
                problems.append(StudyError(path, str(e)))
                bad.add(path)
    return kwargs


class _Bad(Exception):
    """A value problem; the caller attaches the dotted path."""


def _check(key: str, value: Any) -> Any:
    """`value` (already of the type of `key`) if it obeys the key's choices and range."""
    spec = SPECS.get(key)
    message = spec and check_value(key.split(".")[-1], spec, value)
    if message:
        raise _Bad(message)
    return value


def _coerce(key: str, hint: Any, v: Any) -> Any:
    """Types with safe coercion only: int → float, an integral float → int, a list → tuple."""
    if key == "train.batch_size" and (v is None or v == "full"):
        return None
    if key == "resources.pack" and v == "auto":
        return v
    if get_origin(hint) in (Union, types.UnionType):
        if v is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(v, bool):
            return v
        raise _Bad(f"expected true or false (got {show(v)})")
    if hint is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        extra = {"train.batch_size": " or full", "resources.pack": " or auto"}.get(key, "")
        raise _Bad(f"expected an integer{extra} (got {show(v)})")
    if hint is float:
        if is_number(v) and math.isfinite(v):
            return float(v)
        raise _Bad(f"expected a number (got {show(v)})")
    if hint is str:
        if isinstance(v, str) and v:
            return v
        raise _Bad(f"expected text (got {show(v)})")
    if get_origin(hint) is dict:  # diagram.labels: {dotted key: text}
        if isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, str) and t for k, t in v.items()):
            return dict(v)
        raise _Bad(
            f"expected a mapping of dotted keys to labels, e.g. {{data.fraction: train share}} (got {show(v)})"
        )
    if get_origin(hint) is tuple:  # optimizer.betas: tuple[float, float]
        n = len(get_args(hint))
        if isinstance(v, (list, tuple)) and len(v) == n:
            return tuple(_coerce(key, float, x) for x in v)
        raise _Bad(f"expected a list of {n} numbers, e.g. [0.9, 0.98] (got {show(v)})")
    return v


# ---- the search section --------------------------------------------------------------------------


def _search(raw: Any, problems: list[StudyError], bad: set[str]) -> SearchConfig:
    kwargs = _section("search", raw, problems, bad)
    if not isinstance(raw, dict):
        return SearchConfig()
    # An unknown sampler must not add "grid needs points" noise to its own error.
    sampler = None if "search.sampler" in bad else kwargs.get("sampler", SearchConfig().sampler)
    space = raw.get("space")
    dims: list[SearchDim] = []
    if space is not None and not isinstance(space, dict):
        problems.append(
            StudyError("search.space", f"expected a mapping of searched keys (got {show(space)})")
        )
    elif space:
        for key, dim_raw in space.items():
            dim = _dim(str(key), dim_raw, sampler, problems)
            if dim is None:
                bad.add(f"search.space.{key}")
            else:
                dims.append(dim)
    kwargs["space"] = tuple(dims)
    if kwargs.get("budget") is not None and sampler not in ("boundary", None):
        problems.append(StudyError("search.budget", f"applies to sampler boundary, not {sampler}"))
    if sampler not in (*LATTICE_SAMPLERS, None):
        if kwargs.get("num_samples") is None and "search.num_samples" not in bad:
            need = f"the {sampler} sampler needs how many points to draw, e.g. num_samples: 32"
            problems.append(StudyError("search.num_samples", f"missing; {need}"))
        if not space:
            problems.append(
                StudyError("search.space", f"empty; the {sampler} sampler needs at least one searched key")
            )
    config = SearchConfig(**kwargs)
    sizable = not bad.intersection({"search.seeds", "search.num_samples", "search.sampler"})
    if sizable and len(dims) == len(space or {}):  # every axis parsed: the count is real
        _check_size(config, problems)
    return config


def _check_size(search: SearchConfig, problems: list[StudyError]) -> None:
    """The study's trial count is sane, and a sampler can draw as many distinct points as asked."""
    grid_size, points = search.grid_size, search.n_points
    if points is not None and points * search.seeds > MAX_TRIALS:
        trials = f"{points:,} points x {search.seeds} seeds = {points * search.seeds:,} trials"
        problems.append(StudyError("search", f"{trials}; allowed: at most {MAX_TRIALS:,}"))
    elif search.sampler == "random" and grid_size is not None and points is not None and points > grid_size:
        repeats = f"{points} points from a space of only {grid_size} distinct points would repeat points"
        allowed = f"at most {grid_size}, or sampler: grid for all of them"
        problems.append(StudyError("search.num_samples", f"{repeats} (got {points}); allowed: {allowed}"))


def _dim(key: str, raw: Any, sampler: str | None, problems: list[StudyError]) -> SearchDim | None:
    """One searched key → SearchDim; every candidate value is checked like a base value."""
    path = f"search.space.{key}"
    n_before = len(problems)
    if key not in TRIAL_KEYS and key not in TRIAL_SECTIONS:
        problems.append(_unknown(path, key, TRIAL_KEYS, ANY_TRIAL_KEY))
        return None
    forms_help = (
        "{log: [low, high], points: N}, {range: [low, high], points: N}, {values: [...]} or {choice: [...]}"
    )
    try:
        if key == "train.seed":
            raise _Bad("seeds are replicates, not a searched key; set search.seeds: N instead")
        if key in TRIAL_SECTIONS:
            example = f"{key}.{dataclasses.fields(TRIAL_SECTIONS[key])[0].name}"
            raise _Bad(f"a section, not a key; search a dotted key, e.g. {example}")
        if not isinstance(raw, dict):
            raise _Bad(f"expected one of {forms_help} (got {show(raw)})")
    except _Bad as e:
        problems.append(StudyError(path, str(e)))
        return None
    unknown = [_unknown(f"{path}.{k}", str(k), DIM_KEYS) for k in raw if k not in DIM_KEYS]
    problems += unknown
    if unknown:  # what else looks wrong on this axis most likely follows from the typo
        return None
    forms = [f for f in DIM_FORMS if raw.get(f) is not None]
    if len(forms) != 1:
        got = ", ".join(forms) or "none"
        problems.append(StudyError(path, f"give exactly one of log, range, values, choice (got {got})"))
        return None
    form = forms[0]
    kwargs: dict[str, Any] = {"key": key}
    if form in ("log", "range"):
        kwargs.update(_interval(path, key, form, raw, sampler, problems))
    else:
        for extra in ("points", "integer"):
            if extra in raw:
                problems.append(StudyError(f"{path}.{extra}", f"applies to log/range dimensions, not {form}"))
        kwargs[form] = _candidates_of(path, key, form, raw[form], problems)
    if len(problems) > n_before:
        return None
    dim = SearchDim(**kwargs)
    # The searched values obey the same rules as a base value (ranges, choices).
    if dim.is_discrete:
        candidates = list(dim.grid)
    else:
        lo, hi = dim.log or dim.range
        candidates = [math.ceil(lo), math.floor(hi)] if dim.integer else [lo, hi]
    for value in candidates:
        try:
            _check(key, _coerce(key, TYPES[key], value))
        except _Bad as e:
            problems.append(StudyError(path, str(e)))
            return None
    if dim.points is not None and len(set(dim.grid)) < len(dim.grid):
        repeats = f"{dim.points} integer points repeat values (got {show(list(dim.grid))})"
        problems.append(StudyError(path, f"{repeats}; use fewer points or values: [...]"))
        return None
    return dim


def _interval(
    path: str, key: str, form: str, raw: dict[str, Any], sampler: str | None, problems: list[StudyError]
) -> dict[str, Any]:
    hint, pair = TYPES[key], raw[form]
    try:
        if hint not in (int, float):
            raise _Bad(f"{form} needs a numeric key, and {key} is not; use choice: [...] instead")
        if not (isinstance(pair, list) and len(pair) == 2 and all(is_number(x) for x in pair)):
            raise _Bad(f"{form} takes [low, high], two numbers (got {show(pair)})")
        if not float(pair[0]) < float(pair[1]):
            raise _Bad(f"{form} needs low < high (got {show(pair)})")
        if form == "log" and pair[0] <= 0:
            raise _Bad(f"log needs 0 < low < high (got {show(pair)}); use range: for 0")
    except _Bad as e:
        problems.append(StudyError(path, str(e)))
        return {}
    lo, hi = float(pair[0]), float(pair[1])
    out: dict[str, Any] = {form: (lo, hi)}
    integer = raw.get("integer", hint is int)
    if not isinstance(integer, bool):
        problems.append(StudyError(f"{path}.integer", f"expected true or false (got {show(integer)})"))
    elif hint is int and not integer:
        problems.append(StudyError(f"{path}.integer", f"{key} takes integers; drop integer: false"))
    elif integer and math.ceil(lo) > math.floor(hi):
        problems.append(StudyError(path, f"no integer lies in {form} {show(pair)}"))
    else:
        out["integer"] = integer
    points = raw.get("points")
    if points is None:
        if sampler in LATTICE_SAMPLERS:
            need = f"needs points: N on a {form} dimension, e.g. points: 5"
            problems.append(StudyError(path, f"the {sampler} sampler {need}"))
    elif isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= MAX_POINTS:
        expected = f"expected an integer, 2 <= points <= {MAX_POINTS}"
        problems.append(StudyError(f"{path}.points", f"{expected} (got {show(points)})"))
    else:
        out["points"] = points
    return out


def _candidates_of(path: str, key: str, form: str, items: Any, problems: list[StudyError]) -> tuple[Any, ...]:
    try:
        if not isinstance(items, list) or not items:
            raise _Bad(f"{form} takes a non-empty list (got {show(items)})")
        if len(items) > MAX_POINTS:
            raise _Bad(f"{form} lists {len(items):,} values; allowed: at most {MAX_POINTS:,}")
        if form == "values" and TYPES[key] not in (int, float):
            raise _Bad(f"values are numbers and {key} is not; use choice: [...]")
        out = tuple(_coerce(key, TYPES[key], item) for item in items)
        if len({show(v) for v in out}) < len(out):
            raise _Bad(f"{form} lists a value twice (got {show(items)})")
    except _Bad as e:
        problems.append(StudyError(path, str(e)))
        return ()
    return out


def _dim_to_dict(dim: SearchDim) -> dict[str, Any]:
    out = {form: plain(getattr(dim, form)) for form in DIM_FORMS if getattr(dim, form) is not None}
    if dim.points is not None:
        out["points"] = dim.points
    if dim.integer:
        out["integer"] = True
    return out


def _describe_dim(dim: SearchDim, sampler: str) -> str:
    if sampler in LATTICE_SAMPLERS or dim.is_listed:
        grid = [show(v) for v in dim.grid]
        shown = grid if len(grid) <= 12 else [*grid[:5], "...", *grid[-2:]]
        kind = "log-spaced " if dim.log is not None else ""
        return f"{len(grid)} {kind}values: {', '.join(shown)}"
    lo, hi = dim.log or dim.range
    what = "integers" if dim.integer else "numbers"
    scale = "log-uniform" if dim.log is not None else "uniform"
    return f"{what}, {scale} on [{show(lo)}, {show(hi)}]"


# ---- values that only make sense together --------------------------------------------------------


def _cross_checks(
    base: TrialConfig,
    dims: dict[str, SearchDim],
    problems: list[StudyError],
    bad: set[str],
    conditional: Sequence[Conditional] = (),
) -> None:
    """`config.cross_problems` over every value a key can take (base, searched or set by a
    `conditional` entry)."""

    def values(key: str, ends: bool) -> list[Any] | None:
        dim = dims.get(key)
        if dim is None:
            return [get_path(base, key), *(v for c in conditional for k, v in c.set if k == key)]
        if dim.is_discrete:
            return list(dim.grid)
        return list(dim.log or dim.range or ()) if ends else None

    skip = {k for k in TRIAL_KEYS if k in bad or f"search.space.{k}" in bad}
    for key, message in cross_problems(values, skip):
        problems.append(StudyError(f"search.space.{key}" if key in dims else key, message))


# ---- overrides -----------------------------------------------------------------------------------


def _apply_overrides(
    data: dict[str, Any], items: dict[str, Any], problems: list[StudyError]
) -> dict[str, Any]:
    """A copy of the raw study mapping with `--set` values written into it."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    space = data["search"].get("space") if isinstance(data.get("search"), dict) else None
    if isinstance(space, dict):
        data["search"]["space"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in space.items()}
    settable = ["name", *TYPES]
    written = []
    for key, value in items.items():
        path = f"--set {key}"
        section, _, name = key.partition(".")
        if key == "name":
            data["name"] = value
        elif key.startswith(AUTO_STEPS_PREFIX):
            _set_auto_steps(data, key.removeprefix(AUTO_STEPS_PREFIX), value, path, problems)
        elif key.startswith("search.space."):
            _set_dim(data, key.removeprefix("search.space."), value, path, problems)
        elif key not in settable:
            problems.append(_unknown(path, key, settable, ANY_STUDY_KEY))
        elif (target := _mapping(data, section, path, problems)) is not None:
            target[name] = value
            written.append(key)
    search = data.get("search")
    space = search.get("space") if isinstance(search, dict) else None
    for key in written:
        if key in TRIAL_KEYS and isinstance(space, dict) and key in space:
            ignored = f"{key} is searched (search.space.{key}), so this value would be ignored"
            fix = f"to fix it, also drop the axis: --set search.space.{key}=null"
            problems.append(StudyError(f"--set {key}", f"{ignored}; {fix}"))
    return data


def _mapping(parent: dict[str, Any], where: str, path: str, problems: list[StudyError]) -> dict | None:
    """The mapping at dotted `where` below `parent` for `--set` to write into, made if unset;
    None (reported) if something else is there."""
    key = where.rpartition(".")[2]
    if parent.get(key) is None:
        parent[key] = {}
    if isinstance(parent[key], dict):
        return parent[key]
    problems.append(StudyError(path, f"cannot set a key inside {where}, which is {show(parent[key])}"))
    return None


def _set_auto_steps(
    data: dict[str, Any], name: str, value: Any, path: str, problems: list[StudyError]
) -> None:
    """`train.max_steps.auto.NAME=VALUE` in a study whose train.max_steps is auto already."""
    train = _mapping(data, "train", path, problems)
    steps = train.get("max_steps") if train is not None else None
    if train is None:
        return
    if not (isinstance(steps, dict) and isinstance(steps.get("auto"), dict)):
        whole = f"--set 'train.max_steps={AUTO_STEPS_EXAMPLE}'"
        problems.append(StudyError(path, f"train.max_steps is not auto (got {show(steps)}); set the whole form, "
                                   f"e.g. {whole}"))  # fmt: skip
        return
    train["max_steps"] = steps | {"auto": steps["auto"] | {name: value}}  # copies: the file's data stays


def _set_dim(data: dict[str, Any], rest: str, value: Any, path: str, problems: list[StudyError]) -> None:
    """`search.space.KEY=MAPPING|null` or `search.space.KEY.ATTR=VALUE`."""
    search = _mapping(data, "search", path, problems)
    space = None if search is None else _mapping(search, "search.space", path, problems)
    if space is None:
        return
    key, attr = rest, None
    if rest not in TRIAL_KEYS:
        head, _, tail = rest.rpartition(".")
        if head in TRIAL_KEYS:
            key, attr = head, tail
    if attr is None:
        target, name = space, key
    elif attr not in DIM_KEYS:
        problems.append(_unknown(path, attr, DIM_KEYS))
        return
    elif not isinstance(space.get(key), dict):
        example = f"--set search.space.{key}={{values: [...]}}"
        problems.append(StudyError(path, f"{key} is not searched; set the whole axis, e.g. {example}"))
        return
    else:
        target, name = space[key], attr
    if value is None:
        target.pop(name, None)
    else:
        target[name] = value


# ---- small helpers -------------------------------------------------------------------------------


def _unknown(path: str, key: str, allowed: Sequence[str], listing: str | None = None) -> StudyError:
    """`path: unknown key 'weight_decy'; did you mean 'weight_decay'? allowed: ...`."""
    hint = did_you_mean(key, allowed, cutoff=0.6)
    return StudyError(path, f"unknown key {key!r}{hint} allowed: {listing or ', '.join(allowed)}")
