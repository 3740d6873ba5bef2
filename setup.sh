#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with the project and its test tools.
# Where python3 already has a CUDA torch (a GPU machine, perhaps without a package index), the venv
# sees python3's packages and nothing is downloaded; elsewhere it gets a torch that fits the machine
# (the CPU build where there is no CUDA GPU) and the test tools from the package index.
set -euo pipefail
cd "$(dirname "$0")"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 -m venv --without-pip --system-site-packages .venv
    # python3 may itself live in a virtual environment, whose packages --system-site-packages does
    # not reach (it reaches the base interpreter's): a .pth file adds python3's own site-packages.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/python3-site-packages.pth"
    .venv/bin/python scripts/install_offline.py
    exit
fi
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" torch
    else
        # PyPI's Linux wheel of torch is the CUDA build (several GB of NVIDIA libraries); the CPU
        # build is torch==2.13.0+cpu, from a local wheel folder where pip's configuration names one,
        # else from PyTorch's own CPU index.
        "${pip[@]}" torch==2.13.0+cpu 2>/dev/null \
            || "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
    fi
fi
"${pip[@]}" -e '.[test]'
