#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with the project and its test tools.
# Where python3 already has a CUDA torch (a GPU machine, perhaps without a package index), the venv
# sees python3's packages and nothing is downloaded; elsewhere it gets a torch that fits the machine
# (the CPU build where there is no CUDA GPU) and the test tools from the package index.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: needs python3 >= 3.10, found $(python3 -V 2>&1)" >&2; exit 1; }

# A .venv of another python3, a broken one, or one of the other kind (seeing python3's packages or
# not) is rebuilt: patching it would keep the wrong interpreter, or let its own torch shadow
# python3's (or python3's shadow the CPU build).
venv_args() {  # $1: the include-system-site-packages the venv needs, true or false
    if [ -e .venv ] && ! { [ "$(.venv/bin/python -c 'import sys; print(sys.version)' 2>/dev/null)" \
                             = "$(python3 -c 'import sys; print(sys.version)')" ] \
                           && grep -qx "include-system-site-packages = $1" .venv/pyvenv.cfg 2>/dev/null; }; then
        echo "setup.sh: .venv was made by another python3 or is of the other kind: rebuilding it" >&2
        echo --clear
    fi
}

if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 -m venv --without-pip --system-site-packages $(venv_args true) .venv
    # python3 may itself live in a virtual environment, whose packages --system-site-packages does
    # not reach (it reaches the base interpreter's): a .pth file adds python3's own site-packages.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/python3-site-packages.pth"
    .venv/bin/python scripts/install_offline.py
    # Nothing is installed here: say what python3 lacks of what the tests and bench import.
    missing=$(.venv/bin/python -c 'import importlib.util as u
print(" ".join(n for n in ("numpy", "triton", "tqdm", "matplotlib", "pytest", "xdist", "hypothesis")
               if u.find_spec(n) is None))')
    if [ -n "$missing" ]; then
        echo "setup.sh: python3 lacks $missing (xdist: pytest-xdist): what imports them will not run;" \
             "install them into python3" >&2
    fi
else
    python3 -m venv $(venv_args false) .venv
    pip=(.venv/bin/python -m pip install --quiet)
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            "${pip[@]}" torch
        else
            # PyPI's Linux wheel of torch is the CUDA build (several GB of NVIDIA libraries); the CPU
            # build is torch==2.13.0+cpu, from a local wheel folder where pip's configuration names
            # one, else from PyTorch's own CPU index.
            "${pip[@]}" torch==2.13.0+cpu 2>/dev/null || {
                echo "setup.sh: no torch==2.13.0+cpu wheel where pip looks by default: trying PyTorch's CPU index" >&2
                "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu
            }
        fi
    fi
    "${pip[@]}" -e '.[test]'
    # tests/test_kernels_compile.py compiles every kernel for sm_90 with the Triton of the GPU
    # machines' image too (its GPU_IMAGE_TRITON), whose compiler makes other code than the newest
    # Triton's: a copy of it beside the venv's own, for that test alone (not on the venv's path).
    image_triton=.venv/triton-gpu-image
    if [ ! -d "$image_triton/triton-3.6.0.dist-info" ]; then
        rm -rf "$image_triton"
        "${pip[@]}" --no-deps --target "$image_triton" triton==3.6.0 \
            || echo "setup.sh: could not install triton 3.6.0 into $image_triton: the sm_90 compile test" \
                    "will skip its second compiler" >&2
    fi
fi
echo "setup.sh: .venv ready, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'); next:" \
     ".venv/bin/python bench.py, or .venv/bin/python -m pytest -n auto"
