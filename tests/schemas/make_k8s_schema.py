"""Regenerate k8s-v1.33-defs.json: the core Kubernetes schemas our manifests need.

Source: the `kubernetes-validate` wheel (PyPI, Apache-2.0), which ships the JSON
schemas generated from Kubernetes' OpenAPI document ("local-strict": unknown fields are
errors). This keeps only the definitions reachable from ROOTS, without descriptions.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    unzip -q /tmp/kv/kubernetes_validate-*.whl -d /tmp/kv/whl
    python tests/schemas/make_k8s_schema.py \
        /tmp/kv/whl/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = (
    "io.k8s.api.apps.v1.Deployment",
    "io.k8s.api.apps.v1.StatefulSet",
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.Secret",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.core.v1.Namespace",
    "io.k8s.api.networking.v1.NetworkPolicy",
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.api.core.v1.ResourceRequirements",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.EnvVarSource",
    "io.k8s.api.core.v1.VolumeMount",
)
PREFIX = "#/$defs/"  # references inside _definitions.json are document-local


def _refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(PREFIX)} if "$ref" in node else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def _strip(node: object) -> object:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(schema_dir: str) -> None:
    source = json.loads((Path(schema_dir) / "_definitions.json").read_text())
    defs = source["$defs"]
    keep: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_refs(defs[name]) - keep)
    out = {
        "$schema": source["$schema"],
        "$id": source["$id"],
        "$comment": f"Subset of kubernetes-validate {Path(schema_dir).name}/_definitions.json "
        "(reachable from the kinds grokstudy's manifests use; descriptions removed). "
        "Regenerate with tests/schemas/make_k8s_schema.py.",
        "$defs": {name: _strip(defs[name]) for name in sorted(keep)},
    }
    target = Path(__file__).with_name("k8s-v1.33-defs.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{target}: {len(keep)} definitions")


if __name__ == "__main__":
    main(sys.argv[1])
