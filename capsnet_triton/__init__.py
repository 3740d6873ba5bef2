"""Capsule Networks with dynamic routing (Sabour, Frosst & Hinton, 2017).

`capsnet_triton.reference` is NumPy only; everything else needs torch, which is imported on
first use of a torch-facing name, so `import capsnet_triton.reference` works without torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CapsNet": "capsnet_triton.model",
    "squash": "capsnet_triton.ops",
    "dynamic_routing": "capsnet_triton.ops",
    "capsule_linear": "capsnet_triton.ops",
    "margin_loss": "capsnet_triton.losses",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'capsnet_triton' has no attribute {name!r}")


def __dir__():
    """The lazy names too, for tab completion and dir()."""
    return sorted(set(globals()) | set(_LAZY))
