#!/bin/sh
# Install grokstudy and its pinned dependencies into one Python environment.
# The Makefile (and so CI) and the Dockerfile both run this script, so a broken
# install step fails CI even where no Docker engine runs.
#
#   PYTHON=.venv/bin/python cluster/install.sh          # dev install (editable, with tests)
#   GROKSTUDY_EXTRAS=s3 GROKSTUDY_EDITABLE=0 cluster/install.sh   # what the image does
#
# TORCH_SPEC is what gets installed when no torch is present. The default
# torch==2.13.0 matches the CPU wheel our CI machines keep on disk; on a GPU
# machine set TORCH_SPEC=torch (or install torch for your CUDA first). It is
# split into words, so it may carry pip options:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#
# Two stages, for Docker layer caching (the default does both):
#   GROKSTUDY_PART=deps     torch and every dependency named in pyproject.toml
#                           (needs only pyproject.toml and cluster/), not grokstudy
#   GROKSTUDY_PART=package  grokstudy itself, with --no-deps
#   GROKSTUDY_PART=constraints  print the effective constraints and stop (a check)
# EXTRA_CONSTRAINTS=FILE adds a second constraints file for every package that
# cluster/constraints.txt does not pin (the Ray image ships its own lock,
# /home/ray/requirements_compiled.txt); where both pin a package, ours wins.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${GROKSTUDY_EXTRAS-dev}
EDITABLE=${GROKSTUDY_EDITABLE:-1}
PART=${GROKSTUDY_PART:-all}
EXTRA_CONSTRAINTS=${EXTRA_CONSTRAINTS:-}

case "$PART" in
    all | deps | package | constraints) ;;
    *) echo "install.sh: GROKSTUDY_PART must be all, deps, package or constraints (got '$PART')" >&2; exit 2 ;;
esac

constraints=cluster/constraints.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "$EXTRA_CONSTRAINTS" ]; then
    # Our pins, then every line of the other file whose package we do not pin.
    # Names compare case-insensitively with -, _ and . equal (PEP 503).
    awk '
        function name(line) { sub(/[ \t]*[=<>!~;\[@ \t].*/, "", line); line = tolower(line); gsub(/[-_.]+/, "-", line); return line }
        /^[ \t]*(#|-|$)/ { if (FNR == NR) print; next }
        FNR == NR { ours[name($0)] = 1; print; next }
        !(name($0) in ours) { print }
    ' "$constraints" "$EXTRA_CONSTRAINTS" >"$tmp/constraints.txt"
    constraints=$tmp/constraints.txt
fi
if [ "$PART" = constraints ]; then
    cat "$constraints"
    exit 0
fi

if [ "$PART" != package ]; then
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "install.sh: no torch found; installing $TORCH_SPEC"
        # shellcheck disable=SC2086 # split on purpose: TORCH_SPEC may carry pip options
        "$PYTHON" -m pip install --quiet $TORCH_SPEC
    fi
fi

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
case "$PART" in
    all)
        if [ "$EDITABLE" = 1 ]; then
            "$PYTHON" -m pip install --quiet -c "$constraints" -e "$target"
        else
            "$PYTHON" -m pip install --quiet -c "$constraints" "$target"
        fi
        ;;
    deps)
        # pyproject.toml's dependencies (and the chosen extras), without grokstudy.
        "$PYTHON" - "$EXTRAS" >"$tmp/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]))
EOF
        "$PYTHON" -m pip install --quiet -c "$constraints" -r "$tmp/requirements.txt"
        ;;
    package)
        if [ "$EDITABLE" = 1 ]; then
            "$PYTHON" -m pip install --quiet --no-deps -e "$target"
        else
            "$PYTHON" -m pip install --quiet --no-deps "$target"
        fi
        ;;
esac

if [ "$PART" = deps ]; then
    "$PYTHON" -c "import torch, ray, mlflow, optuna; print('deps: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__, '| optuna', optuna.__version__)"
else
    "$PYTHON" -c "import grokstudy, torch, ray, mlflow, optuna; print('grokstudy', grokstudy.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__, '| optuna', optuna.__version__)"
fi
