#!/bin/sh
# Install grokstudy and its pinned dependencies into one Python environment.
# The Makefile (and so CI) and the Dockerfile both run this script, so a broken
# install step fails CI even where no Docker engine runs.
#
#   PYTHON=.venv/bin/python cluster/install.sh          # dev install (editable, with tests)
#   GROKSTUDY_EXTRAS= GROKSTUDY_EDITABLE=0 cluster/install.sh   # what the image does
#
# TORCH_SPEC is what gets installed when no torch is present. The default
# torch==2.13.0 matches the CPU wheel our CI machines keep on disk; on a GPU
# machine set TORCH_SPEC=torch (or install torch for your CUDA first).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${GROKSTUDY_EXTRAS-dev}
EDITABLE=${GROKSTUDY_EDITABLE:-1}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: no torch found; installing $TORCH_SPEC"
    "$PYTHON" -m pip install --quiet $TORCH_SPEC
fi

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
if [ "$EDITABLE" = 1 ]; then
    "$PYTHON" -m pip install --quiet -c cluster/constraints.txt -e "$target"
else
    "$PYTHON" -m pip install --quiet -c cluster/constraints.txt "$target"
fi
"$PYTHON" -c "import grokstudy, torch, ray, mlflow, optuna; print('grokstudy', grokstudy.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__, '| optuna', optuna.__version__)"
