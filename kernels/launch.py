"""Launch helpers shared by the kernel launchers of squash.py, routing.py and capsule_linear.py:
output buffers, tile budgets, launch options, the Triton dtype a kernel computes in, and the
kernel variants a launcher offers.
"""

import functools
import re

import numpy as np
import torch
import triton
import triton.language as tl

from capsnet_triton.checks import check_float_tensor, compute_dtype, interpreting, kept_iterations

__all__ = ["tl_dtype", "output", "outputs", "check_kept_couplings", "couplings_pointer", "scratch", "max_tile",
           "check_tile", "block_inputs", "interpreter_problem", "launch_options", "VARIANTS", "DEFAULT_VARIANT", "split_stages",
           "check_variant", "on_tensor_device", "GRID_Y_MAX"]

# The most elements one tile may hold on a GPU, by compute dtype: enough to keep a tile and its
# temporaries in registers without spilling (float64 division and sqrt take many more registers
# per value, see tests/test_kernels_compile.py).
_GPU_TILE = {torch.float32: 4096, torch.float64: 1024}
# The interpreter pays per program and loop iteration, not per element: it takes far larger tiles.
_INTERPRETER_TILE = 1 << 16


def tl_dtype(dtype):
    """The Triton dtype a kernel computes in for inputs of torch `dtype`."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def output(out, shape, dtype, device, name):
    """A new tensor for a kernel to fill, or the caller's `out` once it is checked to fit."""
    shape = torch.Size(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype
            or out.device != device or not out.is_contiguous()):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} "
                         f"on {device}, got {got}")
    return out


def outputs(out, names):
    """The caller's `out` of a launcher with several outputs, one tensor (or None) per name, as a
    tuple; all None when out is None. Each is then checked by `output`."""
    if out is None:
        return (None,) * len(names)
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(f"out must be a tuple of {len(names)} tensors ({', '.join(names)}), got {got}")
    return tuple(out)


def check_kept_couplings(couplings, iterations, gradient, B, I, J, dtype, device, forward):
    """The couplings a forward kept for its backward ([k, B, I, J], checks.kept_iterations), checked
    to be `forward`'s output for r = iterations under this gradient policy, contiguous."""
    check_float_tensor(couplings, "couplings")
    shape = (kept_iterations(iterations, gradient), B, I, J)
    if couplings.shape != shape or couplings.dtype != dtype:
        raise ValueError(f"couplings must be {forward}'s third output under gradient={gradient!r}, "
                         f"[k, B, I, J] = {list(shape)} {dtype}, got shape {tuple(couplings.shape)} "
                         f"{couplings.dtype}")
    if couplings.device != device:
        raise ValueError(f"couplings is on {couplings.device}, not on {device} with the other tensors")
    return couplings.contiguous()


def couplings_pointer(couplings, stand_in):
    """What a kernel gets for the kept couplings: the buffer, or where none is kept (r = 1) the
    stand-in tensor, whose pointer no kernel then reads or writes."""
    return couplings if couplings.numel() else stand_in


def scratch(shape, like):
    """A buffer of `like`'s dtype and device that a kernel writes before any kernel reads it (the
    split kernels' partial sums). Tests fill it with NaN instead, so that a read of an element
    never written fails."""
    return like.new_empty(shape)


def max_tile(dtype):
    """The most elements a kernel tile may hold for inputs of `dtype`."""
    if interpreting():
        return _INTERPRETER_TILE
    return _GPU_TILE[compute_dtype(dtype)]


# The interpreter pays per program and loop iteration, not per element (about 7 ms per loop
# iteration of a routing-sized tile whatever its size), so there the whole of I goes into one
# block, up to this many inputs and the most elements one interpreted tensor may hold.
_INTERPRETER_MAX_BLOCK_I = 2048


def check_tile(per_input):
    """ValueError unless one input's tile of per_input elements is a tensor Triton can hold."""
    if per_input > tl.TRITON_MAX_TENSOR_NUMEL:
        raise ValueError(f"one input's tile would hold {per_input} elements (J, D and P padded to powers of two), "
                         f"more than a Triton tensor may ({tl.TRITON_MAX_TENSOR_NUMEL}); the PyTorch path "
                         f"(backend='torch') has no such limit")


def block_inputs(I, per_input, dtype, block_i=None):
    """BLOCK_I, the inputs of one tile of per_input elements each (a power of two): block_i when
    given (checked), else as many as keep the tile in registers on a GPU (max_tile), or, under
    the interpreter, as many as it takes (up to _INTERPRETER_MAX_BLOCK_I and its tensor limit).
    Under the interpreter, first checks that it can run the loop over I (interpreter_problem);
    everywhere, that one input's tile is a tensor Triton can hold (ValueError)."""
    problem = interpreter_problem(triton.__version__, np.__version__) if interpreting() else None
    if problem:
        raise RuntimeError(problem)
    check_tile(per_input)
    if block_i is not None:
        if isinstance(block_i, bool) or not isinstance(block_i, int) or block_i < 1 or block_i & (block_i - 1):
            raise ValueError(f"block_i must be a power of two >= 1, got {block_i!r}")
        return block_i
    if interpreting():
        most = min(_INTERPRETER_MAX_BLOCK_I, tl.TRITON_MAX_TENSOR_NUMEL // per_input)
    else:
        most = max_tile(dtype) // per_input
    return min(triton.next_power_of_2(I), max(1, most))


def _major_minor(version):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def interpreter_problem(triton_version, numpy_version):
    """Why Triton's interpreter cannot run the routing and capsule_linear kernels with these
    versions, or None. Before Triton 3.7 the interpreter reads a loop bound passed at run time
    (the loops over I, the iterations) with int() of a one-element array, which NumPy 2.4 made an
    error: every such kernel would fail deep inside the interpreter. (Compiled kernels, on a GPU,
    are unaffected; squash has no such loop.)"""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run these kernels with NumPy {numpy_version}: "
                "it reads loop bounds with int() of one-element arrays, which NumPy 2.4 refuses. "
                "Install triton>=3.7, or numpy<2.4 beside this Triton.")
    return None


def launch_options(tile_elements):
    """num_warps for a tile of this many elements (16 values a thread at the GPU tile limit), and FMA
    contraction asked for explicitly, so that the numerics do not change when a Triton release
    flips its default."""
    return dict(num_warps=4 if tile_elements <= 2048 else 8, enable_fp_fusion=True)


# The kernel variants of the routing and capsule_linear launchers' `variant=`: one program per
# sample ("sample"), or I split across programs with partial sums ("split").
VARIANTS = ("sample", "split")
# Measured on one H200 at the MNIST shape (docs/PERF.md, "First runs on a GPU"), kernels alone:
# routing forward 0.19 ms split against 0.32 sample at B = 128, 0.57 against 0.73 at B = 512, and
# forward + backward faster too; the fused layer's forward + backward 5.9 against 6.4 ms at B = 128
# (its kernels before predict_tile: the next GPU run decides the layer's default again).
DEFAULT_VARIANT = "split"
# Loads in flight per loop of the split kernels (tl.range's software pipelining on a GPU).
_SPLIT_STAGES = 2
# Pipelining holds a loop step's loads in shared memory (one step's worth at 2 stages, read off the
# sm_90 compile: 132 KB for a [1, 128, 256] float32 u_hat tile). Above this a step's loads are not
# pipelined, so that the largest tiles still launch (an H200 gives a block 227 KB; the fused split
# kernels' tile passes through shared memory too, which capsule_linear._launch_config bounds) and
# smaller ones leave room for two CTAs per SM. The MNIST launches stage 16-32 KB.
_MAX_STAGED_BYTES = 64 * 1024
# CUDA's limit on a grid's second and third axes.
GRID_Y_MAX = 65535


def split_stages(staged_bytes):
    """num_stages of a split kernel's loop over I whose every step loads `staged_bytes`."""
    return _SPLIT_STAGES if staged_bytes <= _MAX_STAGED_BYTES else 1


def on_tensor_device(launcher):
    """Run a launcher with its first argument's CUDA device current. Triton launches on the
    current device and its current stream: tensors on cuda:1 while cuda:0 is current would run
    on the wrong GPU (an illegal address), or unordered against the stream that made them."""
    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if isinstance(first, torch.Tensor) and first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return launch


def check_variant(variant):
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
