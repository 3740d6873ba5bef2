"""The project installs with nothing downloaded (a GPU machine without a package index).

One test builds and installs with pip exactly as on such a machine (--no-index --no-deps
--no-build-isolation, the interpreter's own setuptools); the other runs scripts/install_offline.py
in a fresh venv of Python 3.12 where one is found (else this Python) that sees the base
interpreter's packages, with the setuptools wheel CPython ships for its own tests (67.6.1 in
3.12: older than 70.1 and without the `wheel` package, the build fails there, so the script
falls back to its finder). Set CAPSNET_TEST_PYTHON to try another interpreter. It runs again
under Python 3.10 where there is one: the oldest Python supported, whose standard library has no
TOML parser for the script to read pyproject.toml with.
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["capsnet-train", "capsnet-evaluate"]
# Every package and the folder of the checkout it comes from, read off the tree, so that one left
# out of pyproject.toml's list fails the install tests (from the checkout it would still import).
SOURCES = {"capsnet_triton": "capsnet_triton",
           **{f"capsnet_triton.{d.name}": f"capsnet_triton/{d.name}" for d in sorted((ROOT / "capsnet_triton").iterdir())
              if (d / "__init__.py").is_file() and not d.is_symlink()},
           "capsnet_triton.reference": "reference", "capsnet_triton.kernels": "kernels"}
PACKAGES = list(SOURCES)
FIND = ("import importlib.util, sys; "
        f"print('\\n'.join(importlib.util.find_spec(n).origin for n in {PACKAGES!r}))")


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _checkout_copy(tmp_path):
    """The files an install reads, copied, so that nothing is written into this checkout."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("capsnet_triton", "reference", "kernels", "scripts"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return copy


def _origins(python, tmp_path, env=None):
    """Where a fresh `python` finds each package, asked from a folder outside any checkout."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return _run([str(python), "-c", FIND], cwd=elsewhere, env=env).split()


def _python(version):
    """Python `version` ("3.12": the GPU machine's; "3.10": the oldest supported, without
    tomllib) if this machine has one, else None. CAPSNET_TEST_PYTHON stands in for 3.12."""
    candidates = [os.environ.get("CAPSNET_TEST_PYTHON") if version == "3.12" else None, shutil.which(f"python{version}")]
    if shutil.which("pyenv"):
        versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        for found in (v for v in versions if v.startswith(version + ".")):
            prefix = subprocess.run(["pyenv", "prefix", found], capture_output=True, text=True).stdout.strip()
            candidates.append(os.path.join(prefix, "bin", f"python{version}"))
    for python in filter(None, candidates):
        try:
            if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
                return python
        except OSError:
            continue
    return None


def test_pip_builds_and_installs_with_no_index_and_no_build_isolation(tmp_path):
    copy = _checkout_copy(tmp_path)
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
          "--target", str(target), str(copy)])
    env = {**os.environ, "PYTHONPATH": str(target)}
    origins = _origins(sys.executable, tmp_path, env)
    assert origins == [str(target / name.replace(".", "/") / "__init__.py") for name in PACKAGES]
    # reference/ and kernels/ install inside the namespace, not as generic top-level packages.
    assert not (target / "reference").exists() and not (target / "kernels").exists()
    metadata = next(target.glob("capsnet_triton-*.dist-info/METADATA")).read_text()
    assert "License-File: LICENSE" in metadata
    assert sorted(os.listdir(target / "bin")) == sorted(COMMANDS)


@pytest.mark.parametrize("version", ["3.12", "3.10"])
def test_install_offline_script_in_a_fresh_venv(tmp_path, version):
    python = _python(version)
    if python is None:
        if version == "3.10":
            pytest.skip("no Python 3.10 on this machine")
        python = sys.executable
    copy = _checkout_copy(tmp_path)
    venv = tmp_path / "venv"
    _run([python, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    venv_python = venv / "bin" / "python"
    stdlib_test = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"]).strip()
    wheels = glob.glob(os.path.join(stdlib_test, "test", "setuptools-*.whl")) + \
        glob.glob(os.path.join(stdlib_test, "test", "wheeldata", "setuptools-*.whl"))
    has_pip = subprocess.run([venv_python, "-c", "import pip"], capture_output=True).returncode == 0
    if wheels and has_pip:
        _run([venv_python, "-m", "pip", "install", "--no-index", "--no-deps", wheels[0]])
    out = _run([venv_python, str(copy / "scripts" / "install_offline.py")])
    assert f"capsnet_triton from {copy} is installed" in out
    origins = _origins(venv_python, tmp_path)
    assert origins == [str(copy / SOURCES[name] / "__init__.py") for name in PACKAGES]
    # Whichever route it took (pip's, or its finder where this Python's setuptools cannot build),
    # the commands are there, run by the venv's interpreter, each calling its module's main (run
    # here they would need the venv's Python to have numpy and torch, which this one may lack).
    for command, module in zip(COMMANDS, ("train", "evaluate")):
        path = venv / "bin" / command
        assert os.access(path, os.X_OK), path
        shebang, *body = path.read_text().splitlines()
        # "#!PYTHON", or where that cannot hold the path, /bin/sh exec-ing the quoted PYTHON; the
        # venv's own path, not its target (a venv's python is a link to the base interpreter's).
        interpreter = shlex.split(body[0])[1] if shebang == "#!/bin/sh" else shebang[2:]
        assert interpreter == str(venv_python), (shebang, body[0])
        assert any(f"from capsnet_triton.{module} import main" in line for line in body), body


def test_setup_script_parses():
    _run(["bash", "-n", str(ROOT / "setup.sh")])
