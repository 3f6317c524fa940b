"""The study format's reference, generated from the rules the validator itself reads (each field's
`config.setting`: doc, range, choices, unit; its type hint; its default), so it cannot drift:

- `docs/study-reference.md`: every section and key with its type, default, allowed values, what it
  does and which paper studies (studies/papers/) set it;
- `studies/study.schema.json`: a JSON Schema (draft 2020-12) of a study file, for editors (the
  shipped studies name it in a `# yaml-language-server: $schema=` line) and for checks.

    python -m grokstudy.reference            # from the repository's root: rewrite both (make reference)
    python -m grokstudy.reference --check    # exit 1 when either is out of date (a test checks the same)

The schema checks what a schema can say: key names, types, ranges and choices. Rules that tie keys
together (a transformer's heads dividing embed_dim, a grid needing `points`, ...) are the
validator's alone: `grokstudy validate STUDY` says all of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from grokstudy.config import (
    SAMPLERS,
    STUDY_SECTIONS,
    TRIAL_SECTIONS,
    Conditional,
    DecayTimeBudget,
    Spec,
    allowed_text,
    plain,
)
from grokstudy.study import AUTO_STEPS_EXAMPLE, CONDITIONAL_EXAMPLE, DIM_KEYS, NAME, SPECS, TRIAL_KEYS, TYPES

REFERENCE = Path("docs/study-reference.md")
SCHEMA = Path("studies/study.schema.json")
PAPERS = Path("studies/papers")


# ---- the JSON Schema -------------------------------------------------------------------------------


def study_schema() -> dict[str, Any]:
    """The JSON Schema of a study file."""
    sections = {name: _section_schema(name, cls) for name, cls in STUDY_SECTIONS.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "grokstudy study",
        "description": "A grokstudy study file (generated from grokstudy/config.py; see docs/study-reference.md).",
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {
                "type": "string",
                "pattern": f"^{NAME.pattern}$",
                "description": "the study's name: its output directory, Ray Tune experiment, Optuna "
                "study and MLflow experiment",
            },
            "extends": {
                "type": "string",
                "description": "a study file (relative to this one) whose sections this file's are merged "
                "over, key by key",
            },
            **sections,
            "conditional": _conditional_schema(),
        },
    }


def _conditional_schema() -> dict[str, Any]:
    """conditional: [{when: {searched key: value}, set: {trial key: value}}, ...]."""
    keys = {"type": "object", "minProperties": 1, "propertyNames": {"enum": list(TRIAL_KEYS)}}
    entry = {
        "type": "object",
        "additionalProperties": False,
        "required": ["when", "set"],
        "properties": {"when": keys, "set": keys},
    }
    return {"type": "array", "items": entry, "description": _doc(Conditional)}


def _section_schema(section: str, cls: type) -> dict[str, Any]:
    props = {}
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        props[f.name] = _space_schema() if key == "search.space" else _field_schema(key, f)
    return {"type": "object", "additionalProperties": False, "properties": props}


def _field_schema(key: str, f: dataclasses.Field) -> dict[str, Any]:
    spec: Spec | None = SPECS.get(key)
    out = _type_schema(TYPES[key], spec)
    if key == "train.batch_size":  # null and "full" both mean the whole training set
        out = {"anyOf": [out, {"const": "full"}]}
    if key == "resources.pack":  # a number, or measured (packsize.py)
        out = {"anyOf": [out, {"const": "auto"}]}
    if key == "train.max_steps":  # a number, or a budget per point (config.DecayTimeBudget)
        out = {"anyOf": [out, _auto_steps_schema()]}
    if spec is not None:
        out["description"] = spec.doc + (f" ({spec.unit})" if spec.unit else "")
    default = _default(f)
    if default is not dataclasses.MISSING:
        out["default"] = default
    return out


def _type_schema(hint: Any, spec: Spec | None) -> dict[str, Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return {"anyOf": [_type_schema(inner[0], spec), {"type": "null"}]}
    if typing.get_origin(hint) is tuple:
        items = [_type_schema(a, spec) for a in typing.get_args(hint)]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if typing.get_origin(hint) is dict:
        return {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}}
    if hint is bool:
        return {"type": "boolean"}
    if hint is str:
        return {"type": "string", "enum": list(spec.choices)} if spec and spec.choices else {"type": "string"}
    if hint in (int, float):
        out: dict[str, Any] = {"type": "integer" if hint is int else "number"}
        if spec is not None and spec.lo is not None:
            out["exclusiveMinimum" if spec.lo_open else "minimum"] = spec.lo
        if spec is not None and spec.hi is not None:
            out["exclusiveMaximum" if spec.hi_open else "maximum"] = spec.hi
        return out
    return {}


def _auto_steps_schema() -> dict[str, Any]:
    """train.max_steps: {auto: {per_decay_time: K, min: A, max: B}}, every key required."""
    hints = typing.get_type_hints(DecayTimeBudget)
    props = {}
    for f in dataclasses.fields(DecayTimeBudget):
        spec = f.metadata["spec"]
        props[f.name] = _type_schema(hints[f.name], spec) | {"description": spec.doc + f" ({spec.unit})"}
    auto = {"type": "object", "additionalProperties": False, "required": list(props), "properties": props}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["auto"],
        "properties": {"auto": auto},
    }


def _space_schema() -> dict[str, Any]:
    """search.space: {dotted trial key: exactly one of log, range, values, choice}."""
    pair = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
    listed = {"type": "array", "minItems": 1}
    forms = {"log": pair, "range": pair, "values": listed | {"items": {"type": "number"}}, "choice": listed}
    dim = {
        "type": "object",
        "additionalProperties": False,
        "properties": forms | {"points": {"type": "integer", "minimum": 1}, "integer": {"type": "boolean"}},
        "oneOf": [{"required": [form]} for form in forms],
    }
    trial_keys = [k for k in TYPES if k.split(".")[0] in TRIAL_SECTIONS]
    return {
        "type": "object",
        "description": "the searched keys: {dotted trial key: {log: [lo, hi], points: n} | {range: [lo, hi], "
        "points: n} | {values: [...]} | {choice: [...]}}",
        "propertyNames": {"enum": trial_keys},
        "additionalProperties": dim,
    }


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return plain(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return plain(f.default_factory())  # type: ignore[misc]
    return dataclasses.MISSING


# ---- the reference page ------------------------------------------------------------------------------


def reference_markdown(papers: dict[str, set[str]]) -> str:
    """The reference page; `papers`: {dotted key: paper studies that set it}."""
    lines = [
        "# Study file reference",
        "",
        "<!-- Generated by `python -m grokstudy.reference` (make reference) from grokstudy/config.py; "
        "do not edit. -->",
        "",
        "A study is one YAML file: a `name`, the base trial (`task`, `data`, `model`, `optimizer`, "
        "`train`), what to search (`search`), how phases are judged (`phases`), what each trial "
        "needs (`resources`), where and how it runs (`run`) and what the figures draw (`diagram`). "
        "Every key is optional but `name`; `grokstudy validate STUDY` checks a file and prints it "
        "resolved. Editors that read JSON Schema complete and check keys from "
        "[`studies/study.schema.json`](../studies/study.schema.json).",
        "",
        "`extends: base.yaml` (a path relative to the file) starts from another study: its sections "
        "are merged with this file's key by key, this file's winning (`search.space` is one key: "
        "setting it replaces the base's axes), and the file must have its own `name`. An error in a "
        "key the base set names the base file; `grokstudy validate --resolved STUDY` prints the "
        "merged study.",
        "",
        "**Used by** names the paper studies in `studies/papers/` that set the key (or search it).",
        "",
    ]
    for section, cls in STUDY_SECTIONS.items():
        lines += [f"## `{section}`", "", _section_doc(section, cls), ""]
        lines += [
            "| key | type | default | allowed | what it does | used by |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            lines.append(_row(key, f, papers.get(key, set())))
        if section == "search":
            lines += ["", _SPACE_DOC]
        if section == "train":
            lines += ["", _auto_steps_doc()]
        lines.append("")
    lines += ["## `conditional`", "", _CONDITIONAL_DOC, ""]
    return "\n".join(lines)


_CONDITIONAL_DOC = (
    "A list of `{when: {searched key: value, ...}, set: {trial key: value, ...}}` entries (e.g. "
    f"`{CONDITIONAL_EXAMPLE}`): a trial whose point has every `when` value takes the `set` values too, "
    "entry by entry in order, after its point's own (the arms of a paper that differ in more than "
    "their axis). `when` names axes with listed values (or grid points) and one of those values; "
    "`set` names keys the search leaves alone (not `train.seed`). The trial's id and point stay the "
    "axis values; its MLflow params hold what it ran with. `grokstudy train --study` applies them "
    "too, where the trial's own values match (a key given with `--set` stays as given)."
)


_SPACE_DOC = (
    "`search.space` maps dotted trial keys to one form each: `{log: [lo, hi], points: n}` (log-spaced), "
    "`{range: [lo, hi], points: n}` (evenly spaced), `{values: [...]}` (numbers as listed) or "
    "`{choice: [...]}` (categories); `integer: true` rounds a drawn value. Grid and boundary samplers "
    f"need `points` on every log or range axis. Samplers: {', '.join(SAMPLERS)}. Keys of a "
    f"dimension: {', '.join(DIM_KEYS)}."
)


def _auto_steps_doc() -> str:
    parts = []
    for f in dataclasses.fields(DecayTimeBudget):
        spec, integer = f.metadata["spec"], f.type in (int, "int")
        parts.append(f"`{f.name}` ({allowed_text(f.name, spec, integer)}): {spec.doc}")
    return (
        "`train.max_steps` also takes `{auto: {per_decay_time: K, min: A, max: B}}` (e.g. "
        f"`{AUTO_STEPS_EXAMPLE}`). {_doc(DecayTimeBudget)} Every key is needed: {'; '.join(parts)}. "
        "Each trial's budget is then its `max_steps` in `trials.parquet`, and `grokstudy validate` "
        "lists them; `train.max_steps` cannot also be searched."
    )


def _section_doc(section: str, cls: type) -> str:
    if section in TRIAL_SECTIONS:
        return f"Part of the base trial: every trial starts from it, and a searched key overrides it. {_doc(cls)}".strip()
    return _doc(cls)


def _doc(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    generated = doc.startswith(f"{cls.__name__}(")  # a dataclass without a docstring gets its signature
    return "" if generated else " ".join(doc.split("\n\n")[0].split())


def _row(key: str, f: dataclasses.Field, used_by: set[str]) -> str:
    spec = SPECS.get(key)
    hint = TYPES[key]
    default = _default(f)
    shown = "" if default is dataclasses.MISSING else json.dumps(default)
    if key == "search.space":
        hint, shown = dict, "{}"
        allowed, doc = "see below", "the searched keys and their values"
    else:
        integer = hint is int or int in typing.get_args(hint)
        allowed = allowed_text(key.split(".")[-1], spec, integer) if spec else "any value"
        if key == "train.max_steps":
            allowed += ", or `{auto: ...}` (below)"
        if hint is bool:
            allowed = "true \\| false"
        if spec is not None and spec.choices:
            allowed = " \\| ".join(f"`{c}`" for c in spec.choices)
        doc = (spec.doc + (f" ({spec.unit})" if spec.unit else "")) if spec else ""
    cells = [
        f"`{key}`",
        _type_name(hint),
        f"`{shown}`" if shown else "",
        allowed,
        doc,
        ", ".join(sorted(used_by)),
    ]
    cells = [re.sub(r"<(\w[^<>]*)>", r"&lt;\1&gt;", c) for c in cells]  # <storage> is text, not a tag
    return "| " + " | ".join(c.replace("|", "\\|") if i != 3 else c for i, c in enumerate(cells)) + " |"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typing.get_origin(hint) is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(hint)) + "]"
    if typing.get_origin(hint) is dict:
        return "mapping"
    return {bool: "bool", int: "int", float: "number", str: "text"}.get(hint, "mapping")


def paper_usage(files: Iterable[Path]) -> dict[str, set[str]]:
    """{dotted key: names of the paper studies that set it, or search it}."""
    used: dict[str, set[str]] = {}
    for path in files:
        paper = path.stem.removesuffix("-cpu")
        data = yaml.safe_load(path.read_text()) or {}
        for section, part in data.items():
            if not isinstance(part, dict):
                continue
            for key in part:
                used.setdefault(f"{section}.{key}", set()).add(paper)
        for axis in (data.get("search") or {}).get("space") or {}:
            used.setdefault(axis, set()).add(paper)
    return used


# ---- writing and checking -----------------------------------------------------------------------------


def generated(repo: Path) -> dict[Path, str]:
    """{path in the repository: its generated text}."""
    schema = json.dumps(study_schema(), indent=2, ensure_ascii=False) + "\n"
    papers = paper_usage(sorted((repo / PAPERS).glob("*.yaml")))
    return {SCHEMA: schema, REFERENCE: reference_markdown(papers) + "\n"}


def stale(repo: Path) -> list[Path]:
    """The generated files whose text in `repo` is not what would be generated now."""
    return [
        p for p, text in generated(repo).items() if not (repo / p).exists() or (repo / p).read_text() != text
    ]


def main(argv: list[str]) -> int:
    """Run from the repository's root (it reads studies/papers/ there)."""
    repo = Path.cwd()
    if argv[1:] == ["--check"]:
        out_of_date = stale(repo)
        for path in out_of_date:
            print(
                f"{path} is out of date: run `python -m grokstudy.reference` (make reference)",
                file=sys.stderr,
            )
        return 1 if out_of_date else 0
    for path, text in generated(repo).items():
        (repo / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
