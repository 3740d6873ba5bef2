"""The reference needs only NumPy and the standard library (SPEC section 7): it must import and
run where torch and triton are absent, import nothing else, and importing the package's top
level must not pull torch in."""

import subprocess
import sys
import textwrap


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_reference_works_with_torch_and_triton_blocked():
    result = run_python("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")

        import importlib
        import pkgutil

        import numpy as np
        before = {m.split(".")[0] for m in sys.modules}       # NumPy's own and the interpreter's
        import capsnet_triton
        import capsnet_triton.reference as ref

        for module in pkgutil.iter_modules(ref.__path__):
            importlib.import_module(f"{ref.__name__}.{module.name}")

        rng = np.random.default_rng(0)
        v = ref.squash_forward(rng.normal(size=(4, 8)))
        v, cache = ref.routing_forward(rng.normal(size=(2, 6, 3, 4)), 3)
        du_hat = ref.routing_backward(np.ones_like(v), cache)
        loss, _ = ref.margin_loss_forward(np.linalg.norm(v, axis=-1), np.array([0, 2]))
        assert np.isfinite(du_hat).all() and np.isfinite(loss)
        assert not any(m.split(".")[0] in ("torch", "triton") for m in sys.modules), "torch leaked in"
        # Not tqdm, matplotlib or any other package either: NumPy is the reference's one dependency.
        # (NumPy's random loads compiled helpers of no file of their own when first used.)
        others = sorted({name.split(".")[0] for name, module in sys.modules.items() if getattr(module, "__file__", None)}
                        - before - sys.stdlib_module_names - {"capsnet_triton"})
        assert not others, f"the reference imported {others}"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_package_top_level_does_not_import_torch():
    result = run_python("""
        import sys
        import capsnet_triton
        import capsnet_triton.reference
        assert set(capsnet_triton.__all__) <= set(dir(capsnet_triton))   # the lazy names, listed
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton")))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
