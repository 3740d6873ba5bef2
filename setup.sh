#!/usr/bin/env bash
# One-step set-up for a fresh machine: a virtual environment in .venv with the project, its test
# tools and a torch that fits the machine (the CPU build where there is no CUDA GPU).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" torch
    else
        "${pip[@]}" torch==2.13.0
    fi
fi
"${pip[@]}" -e '.[test]'
