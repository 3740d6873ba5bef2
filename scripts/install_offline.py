#!/usr/bin/env python3
"""Install this checkout into the running interpreter (or its venv), editable, downloading nothing.

    python3 scripts/install_offline.py          (./setup.sh runs it where python3 has a CUDA torch)

First pip: `pip install --no-index --no-deps --no-build-isolation -e .`, which builds with the
interpreter's own setuptools (any version >= 61; before 70.1 setuptools also needs the `wheel`
package). Where pip is missing or that build fails, it writes what an editable install amounts
to: a finder in site-packages that maps the packages of pyproject.toml's [tool.setuptools]
package-dir to this checkout's folders (`_capsnet_triton_checkout.py`, loaded at start-up by
`capsnet_triton_checkout.pth`) and the commands of [project.scripts] (capsnet-train,
capsnet-evaluate) beside the interpreter; delete those four files to uninstall. Either way it
then checks, from another folder, that every package is found, and exits non-zero if not.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINDER = "_capsnet_triton_checkout"

FINDER_SOURCE = '''"""Maps the packages of capsnet-triton to the folders of a checkout (scripts/install_offline.py)."""

import importlib.util
import os
import sys

PACKAGES = {packages!r}


class _CheckoutFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = PACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if _CheckoutFinder not in sys.meta_path:
    sys.meta_path.insert(0, _CheckoutFinder)    # this checkout wins over any other install
'''


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:       # Python 3.10: the same parser, as pip (>= 21.2) vendors it
        try:
            from pip._vendor import tomli as tomllib
        except ImportError:           # no pip, or one older than 21.2, without tomli
            sys.exit("install_offline: this Python 3.10 has no pip >= 21.2, which its TOML parser comes with: "
                     "install one (python3 -m ensurepip --upgrade) or use Python >= 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def package_dirs():
    """{package name: absolute folder} from pyproject.toml, the one place the layout is written."""
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    return {name: os.path.join(ROOT, folder) for name, folder in mapping.items()}


def missing_packages():
    """Packages a fresh interpreter cannot find, asked from outside the checkout."""
    names = sorted(package_dirs())
    code = ("import importlib.util, sys; "
            f"print(' '.join(n for n in {names!r} if importlib.util.find_spec(n) is None))")
    with tempfile.TemporaryDirectory() as elsewhere:
        result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True)
    return result.stdout.split() if result.returncode == 0 else names


def pip_install():
    if importlib.util.find_spec("pip") is None:
        print("install_offline: this interpreter has no pip")
        return False
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", ROOT]
    print("install_offline:", " ".join(command))
    # pip's own output only where it failed, in its last lines: an old setuptools without `wheel`
    # fails with a screenful of build errors that the finder below makes moot.
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()][-3:]
        print("install_offline: pip failed:", *reason, sep="\n    ")
    return result.returncode == 0


def write_finder():
    site = sysconfig.get_path("purelib")
    with open(os.path.join(site, FINDER + ".py"), "w") as f:
        f.write(FINDER_SOURCE.format(packages=package_dirs()))
    with open(os.path.join(site, "capsnet_triton_checkout.pth"), "w") as f:
        f.write(f"import {FINDER}\n")
    print(f"install_offline: pip could not install the checkout; wrote {FINDER}.py and its .pth to {site}")
    scripts = sysconfig.get_path("scripts")
    for name, target in _pyproject()["project"]["scripts"].items():
        module, function = target.split(":")
        path = os.path.join(scripts, name)
        with open(path, "w") as f:
            # Through /bin/sh, the form pip uses where a "#!" line cannot hold the interpreter's
            # path (a space, or over the kernel's 127 bytes), here for every path: sh runs the
            # Python, which reads the quoted lines as a string and goes on.
            f.write(f"#!/bin/sh\n'''exec' {shlex.quote(sys.executable)} \"$0\" \"$@\"\n' '''\n"
                    f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        os.chmod(path, 0o755)
        print(f"install_offline: wrote the command {path}")


def main():
    if not pip_install() or missing_packages():
        write_finder()
    missing = missing_packages()
    if missing:
        print(f"install_offline: still not importable: {missing}", file=sys.stderr)
        return 1
    print(f"install_offline: capsnet_triton from {ROOT} is installed for {sys.executable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
