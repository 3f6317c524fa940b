#!/bin/sh
# Install grokstudy and its pinned dependencies into one Python environment.
# The Makefile (and so CI) and the Dockerfile both run this script, so a broken
# install step fails CI even where no Docker engine runs.
#
#   PYTHON=.venv/bin/python cluster/install.sh          # dev install (editable, with tests)
#   GROKSTUDY_EXTRAS=s3 GROKSTUDY_EDITABLE=0 cluster/install.sh   # what the image does
#
# torch is installed first, and only when the environment has none (install your own
# build first and nothing below applies). Which one:
#   TORCH_VARIANT=auto (default)  on Linux without `nvidia-smi` on PATH: the CPU build,
#                     from PyTorch's CPU index (TORCH_CPU_INDEX_URL), instead of the
#                     multi-GB CUDA build PyPI serves for Linux; if that index does not
#                     answer within 5 s, the default index, with a note. With
#                     `nvidia-smi`, and on macOS: the default index (PyPI's Linux wheel
#                     bundles CUDA; its macOS wheel is the CPU build).
#   TORCH_VARIANT=cpu       the CPU build from TORCH_CPU_INDEX_URL, wherever (no fallback)
#   TORCH_VARIANT=cuda      PyPI's CUDA build (Linux only): the default index
#   TORCH_VARIANT=default   the default index, whatever it serves (the image uses this:
#                           a docker build has no GPU to detect)
#   TORCH_CPU_INDEX_URL     default https://download.pytorch.org/whl/cpu (or your mirror of it)
#   TORCH_SPEC              the full override: what pip installs, as given (auto then picks
#                           no index). Default torch==2.13.0, the version our CI machines
#                           keep on disk (PyTorch's CPU index serves it as 2.13.0+cpu, which
#                           satisfies ==2.13.0). It is split into words, so it may carry pip
#                           options: TORCH_SPEC="torch==2.13.0 --index-url https://..."
# e.g. `TORCH_VARIANT=cuda make setup`. GROKSTUDY_PART=torch-spec prints the pip
# arguments torch would be installed with, and installs nothing.
#
# Two stages, for Docker layer caching (the default does both):
#   GROKSTUDY_PART=deps     torch and every dependency named in pyproject.toml
#                           (needs only pyproject.toml and cluster/), not grokstudy
#   GROKSTUDY_PART=package  grokstudy itself, with --no-deps
#   GROKSTUDY_PART=constraints  print the effective constraints and stop (a check)
#   GROKSTUDY_PART=torch-spec   print torch's pip arguments and stop (a check)
# EXTRA_CONSTRAINTS=FILE adds a second constraints file for every package that
# cluster/constraints.txt does not pin (the Ray image ships its own lock,
# /home/ray/requirements_compiled.txt); where both pin a package, ours wins.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC_GIVEN=${TORCH_SPEC:+yes}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_VARIANT=${TORCH_VARIANT:-auto}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL%/}
EXTRAS=${GROKSTUDY_EXTRAS-dev}
EDITABLE=${GROKSTUDY_EDITABLE:-1}
PART=${GROKSTUDY_PART:-all}
EXTRA_CONSTRAINTS=${EXTRA_CONSTRAINTS:-}

case "$PART" in
    all | deps | package | constraints | torch-spec) ;;
    *) echo "install.sh: GROKSTUDY_PART must be all, deps, package, constraints or torch-spec (got '$PART')" >&2; exit 2 ;;
esac
case "$TORCH_VARIANT" in
    auto | cpu | cuda | default) ;;
    *) echo "install.sh: TORCH_VARIANT must be auto, cpu, cuda or default (got '$TORCH_VARIANT')" >&2; exit 2 ;;
esac

# Does the CPU index answer within 5 s? Asked from a thread, so that a resolver that
# hangs (which no socket timeout bounds) cannot hold the install up either. Unreachable,
# pip would retry it for seconds (about 8 s where the name does not resolve, minutes where
# packets are dropped) and then fail or fall back anyway.
cpu_index_answers() {
    "$PYTHON" - "$TORCH_CPU_INDEX_URL/torch/" >/dev/null 2>&1 <<'EOF'
import os, sys, threading, urllib.request
answered = []
def ask():
    # The page pip reads; its status line is enough (the body is not read).
    with urllib.request.urlopen(sys.argv[1], timeout=5):
        answered.append(True)
thread = threading.Thread(target=ask, daemon=True)
thread.start()
thread.join(6)
os._exit(0 if answered else 1)
EOF
}

# The pip arguments torch is installed with, on one line (a note on stderr says why).
torch_args() {
    os=$(uname -s)
    variant=$TORCH_VARIANT
    if [ "$variant" = auto ]; then
        variant=default
        if [ -z "$TORCH_SPEC_GIVEN" ] && [ "$os" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
            if cpu_index_answers; then
                echo "install.sh: Linux without nvidia-smi: torch's CPU build (TORCH_VARIANT=cuda for PyPI's CUDA build)" >&2
                variant=cpu
            else
                echo "install.sh: Linux without nvidia-smi, but $TORCH_CPU_INDEX_URL does not answer: torch from the default index (on PyPI that is the CUDA build)" >&2
            fi
        fi
    fi
    case "$variant" in
        cpu) echo "$TORCH_SPEC --index-url $TORCH_CPU_INDEX_URL" ;;
        cuda)
            if [ "$os" != Linux ]; then
                echo "install.sh: TORCH_VARIANT=cuda: torch's CUDA builds are for Linux (this is $os)" >&2
                return 2
            fi
            echo "$TORCH_SPEC"
            ;;
        default) echo "$TORCH_SPEC" ;;
    esac
}
if [ "$PART" = torch-spec ]; then
    torch_args
    exit 0
fi

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
        torch=$(torch_args)
        echo "install.sh: no torch found; installing $torch"
        # shellcheck disable=SC2086 # split on purpose: pip options and the requirement
        "$PYTHON" -m pip install --quiet $torch
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
