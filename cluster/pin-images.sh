#!/usr/bin/env bash
# Pin every third-party image of the kit to the digest its tag points at now:
#   cluster/pin-images.sh            # rewrites the files in place; review with `git diff`
# Needs Docker with buildx (`docker buildx imagetools inspect` reads a registry without
# pulling). Images you build from this repository (registry.example.com/...) are pinned
# after you push them: set OWN=<registry>/<name>:<tag> to pin those too, e.g.
#   OWN="ghcr.io/me/grokstudy:2.60.0-py311-gpu ghcr.io/me/grokstudy-mlflow:3.17.2" cluster/pin-images.sh
# tests/test_cluster_configs.py checks that every third-party image carries a digest.
set -euo pipefail
cd "$(dirname "$0")"

FILES=(k8s/mlflow.yaml k8s/raycluster.yaml k8s/rayjob.yaml mlflow-compose.yaml mlflow.Dockerfile)
THIRD_PARTY=(postgres:17 python:3.11-slim)

digest() {
    docker buildx imagetools inspect "$1" --format '{{json .Manifest}}' \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])'
}

for image in "${THIRD_PARTY[@]}" ${OWN:-}; do
    pinned="$image@$(digest "$image")"
    echo "$pinned"
    for file in "${FILES[@]}"; do
        # the tag, with or without an older digest, becomes tag@new-digest
        python3 - "$file" "$image" "$pinned" <<'PY'
import re, sys
path, image, pinned = sys.argv[1:]
text = open(path).read()
new = re.sub(re.escape(image) + r"(@sha256:[0-9a-f]{64})?(?=\s|$)", pinned, text)
if new != text:
    open(path, "w").write(new)
PY
    done
done
