#!/usr/bin/env bash
# Create .venv with bnstudy and its test dependencies. Idempotent; about 1-2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision first, pinned to a pair that works together. PyPI's Linux wheels are the
# CUDA build (a ~5 GB venv); the CPU build (~1 GB) is on PyTorch's own index. Without a GPU we use
# that index when it is reachable, else say in one line how to get it (TORCH_INDEX overrides).
TORCH=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -z "${TORCH_INDEX:-}" ] && [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null \
        && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if .venv/bin/python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" 2>/dev/null; then
        TORCH_INDEX=$CPU_INDEX
    else
        echo "setup.sh: no GPU here, but $CPU_INDEX is unreachable: installing PyPI's torch (CUDA build, ~5 GB); for the CPU build run TORCH_INDEX=$CPU_INDEX bash scripts/setup.sh where it is reachable" >&2
    fi
fi
.venv/bin/python -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} $TORCH
.venv/bin/python -m pip install -q -e ".[dev]"
