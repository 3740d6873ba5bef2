"""Test-session set-up shared by every test file.

Triton's interpreter must be chosen before triton is first imported anywhere in the process,
so this runs before any test module is collected: on a machine without a CUDA GPU the kernels
run through the interpreter (TRITON_INTERPRET=1), on a GPU machine natively.
"""

import os
import shutil
import subprocess


def _has_cuda_gpu():
    # Asked without importing torch or triton, so that the interpreter flag is set first; where an
    # image has the driver but not nvidia-smi, by the driver's list of GPUs.
    if shutil.which("nvidia-smi") is None:
        gpus = "/proc/driver/nvidia/gpus"
        return os.path.isdir(gpus) and bool(os.listdir(gpus))
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_gpu():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default) is derandomized so that CI is reproducible; "dev" is quick; "thorough" is
# for a long local run. Pick one with HYPOTHESIS_PROFILE=name.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
# scripts/gpu_check.sh: natively every new shape compiles its kernels, seconds of CPU each (on one
# H200, 50 examples a test ran a quarter of the suite in two minutes), so fewer examples than CI.
settings.register_profile("gpu", max_examples=10, derandomize=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def interpreted():
    """True when Triton kernels run through the CPU interpreter in this session."""
    from capsnet_triton.checks import interpreting
    return interpreting()


def pytest_report_header(config):
    """How the kernels run in this session, and a known break of older interpreters."""
    if not interpreted():
        return ["triton kernels: compiled for the GPU"]
    lines = ["triton kernels: through Triton's interpreter on the CPU"]
    import triton
    from capsnet_triton.kernels.launch import interpreter_problem
    problem = interpreter_problem(triton.__version__, np.__version__)
    if problem:
        lines.append(f"WARNING: {problem}")
    return lines


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so a failure reproduces."""
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Real MNIST: $CAPSNET_MNIST_DIR, else a datasets/mnist folder in a shared/ beside the checkout.
MNIST_DIR = os.environ.get("CAPSNET_MNIST_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "datasets", "mnist")


@pytest.fixture
def mnist_dir():
    """The real MNIST IDX files where this machine has them; skip otherwise."""
    path = os.path.abspath(MNIST_DIR)
    if not os.path.isfile(os.path.join(path, "train-labels-idx1-ubyte.gz")):
        pytest.skip(f"real MNIST not found in {path} (set CAPSNET_MNIST_DIR to its folder)")
    return path


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """The split launches' partial sums, the fused backward's logit gradients, which kernel A
    keeps for kernel B, and kernel B's partial sums of du (kernels.launch.scratch) start as NaN,
    as outputs do: a kernel that read an element no program wrote would fail the test."""
    from kernel_checks import poisoned

    from capsnet_triton.kernels import capsule_linear, capsule_linear_weight, routing

    def nan_filled(shape, like):
        return poisoned(shape, like.dtype)

    for module in (routing, capsule_linear, capsule_linear_weight):
        monkeypatch.setattr(module, "scratch", nan_filled)


@pytest.fixture
def guarded_outputs(monkeypatch):
    """After the test, no kernel wrote past either end of a poisoned buffer (kernel_checks.poisoned);
    under the interpreter, no kernel read an element outside every tensor of its launch (a masked-in
    address off them, which on a GPU reads garbage or faults, and which the interpreter reads quietly)."""
    from kernel_checks import written_past_the_ends

    if interpreted():
        _guard_reads(monkeypatch)
    written_past_the_ends()                                     # forget an earlier test's buffers
    yield
    spoiled = written_past_the_ends()
    assert not spoiled, f"a kernel wrote past the ends of its output buffers: {spoiled}"


def _guard_reads(monkeypatch):
    """Make the interpreter refuse a load whose unmasked addresses lie outside every tensor argument
    of the running launch (each from its first element to its last)."""
    import numpy as np
    from triton.runtime import interpreter

    extents = []                         # [start, end) bytes of the running launch's tensors
    init_args = interpreter.GridExecutor._init_args_hst

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        # Each tensor's own extent, not its storage's: a view's kernel must not read its neighbours.
        extents[:] = [(t.data_ptr(), t.data_ptr() + t.element_size() * (
                          1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))))
                      for t in (*args_hst, *kwargs_hst.values()) if hasattr(t, "data_ptr") and t.numel()]
        return args_hst, kwargs_hst

    masked_load = interpreter.InterpreterBuilder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        addresses = ptrs.data[mask.data].astype(np.uint64)
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in extents:
            inside |= (addresses >= start) & (addresses + size <= end)
        assert inside.all(), f"a kernel read {np.count_nonzero(~inside)} elements outside its launch's tensors"
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", init_args_hst)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", create_masked_load)
