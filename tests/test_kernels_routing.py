"""The fused routing kernels (kernels/routing.py) against the float64 NumPy reference (SPEC 3 and 8).

Every check runs forward and backward: v and every iteration's s against the reference forward,
du_hat and the bias gradient ds_all.sum((0, 1)) against the reference backward, under both
gradient policies, with all outputs poisoned with NaN before the kernels write them.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import interpreted
from kernel_checks import (DEVICE, DTYPES, FINITE_POISON, NAN_CASES, assert_agrees, dtype_id, magnitudes, poisoned,
                           sample)

from capsnet_triton.checks import compute_dtype, kept_iterations
from capsnet_triton.kernels import routing_backward, routing_forward
from capsnet_triton.kernels import routing_split
from capsnet_triton.kernels.launch import DEFAULT_VARIANT, GRID_Y_MAX
from capsnet_triton.numerics import as_float64
from capsnet_triton.reference import routing_backward as reference_routing_backward
from capsnet_triton.reference import routing_forward as reference_routing_forward

# Every test here runs with the split launches' partial sums poisoned, and checks that no kernel
# wrote past the ends of a poisoned buffer (conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_scratch", "guarded_outputs")


def check_routing(u_hat, iterations, dv, *, bias=None, gradient="full", block_i=None, variant=DEFAULT_VARIANT,
                  splits=None):
    """Run both kernels on poisoned outputs, compare with the reference, return (v, s_all, du_hat, ds_all)."""
    B, I, J, D = u_hat.shape
    dtype = u_hat.dtype
    kept = kept_iterations(iterations, gradient)
    v, s_all, couplings = routing_forward(
        u_hat, iterations, bias, gradient=gradient, block_i=block_i, variant=variant, splits=splits,
        out=(poisoned((B, J, D), dtype), poisoned((iterations, B, J, D), compute_dtype(dtype)),
             poisoned((kept, B, I, J), compute_dtype(dtype))))
    du_hat, ds_all = routing_backward(
        dv, u_hat, s_all, couplings, gradient=gradient, block_i=block_i, variant=variant, splits=splits,
        out=(poisoned((B, I, J, D), dtype), poisoned((iterations, B, J, D), compute_dtype(dtype))))

    # A zero bias changes nothing in the reference and makes it return dL/dbias = sum of every ds.
    bias64 = np.zeros((J, D)) if bias is None else as_float64(bias)
    ref_v, cache = reference_routing_forward(as_float64(u_hat), iterations, bias=bias64, gradient=gradient)
    ref_du_hat, ref_dbias = reference_routing_backward(as_float64(dv), cache)
    assert_agrees(v, ref_v, dtype, "v")
    # s_all and ds_all are computed and kept in the compute dtype, from inputs already rounded to
    # theirs: they are held to its tolerance, not to the half-precision input's.
    assert_agrees(s_all, np.stack(cache["s_all"]), compute_dtype(dtype), "s_all")
    # c^(2..r) under "full", c^(r) under "last" (nothing at r = 1), [k, B, I, J] as the reference's.
    assert_agrees(couplings, np.asarray(cache["couplings"][iterations - kept:]).reshape(kept, B, I, J),
                  compute_dtype(dtype), "kept couplings")
    assert_agrees(du_hat, ref_du_hat, dtype, "du_hat")
    assert_agrees(ds_all.sum((0, 1)), ref_dbias, compute_dtype(dtype), "dbias = ds_all.sum((0, 1))")
    return v, s_all, du_hat, ds_all


@st.composite
def routing_cases(draw, dtype, variant):
    magnitude = draw(st.sampled_from(magnitudes(dtype)))
    # For |s| ~ 1e15 squash's gradient along s is 2 / |s|^3 ~ 1e-45, below float32's normal range;
    # at D = 1 only that part exists, and the logits' gradient u_hat . ds carries its flushed
    # rounding up by |u_hat| ~ 1e15 (du_hat 0.96 off in bfloat16). Not computable in float32, so
    # large inputs are drawn with D >= 2, where the part across s dominates (as for the fused layer).
    least = 2 if magnitude == "large" else 1
    return dict(
        magnitude=magnitude,
        shape=tuple(draw(st.integers(fewest, most)) for fewest, most in ((1, 3), (1, 40), (1, 20), (least, 16))),
        iterations=draw(st.integers(1, 5)),
        with_bias=draw(st.booleans()),
        # Under the interpreter block_i=None puts all of I in one tile, which the split kernels
        # cannot split: for them a block that leaves several tiles, so that S > 1.
        block_i=draw(st.sampled_from([None, 4, 16] if variant == "sample" else [2, 4, 8])),
        splits=draw(st.sampled_from([None, 2, 3])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# One Hypothesis run per dtype, variant and policy, each with a quarter of the profile's examples
# (a dtype's four runs draw as many as the profile gives a test); test_routing_corners pins the
# edge shapes in every one of these cells.
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@settings(max_examples=max(1, settings().max_examples // 4))
@given(data=st.data())
def test_routing_kernels_match_reference(dtype, variant, gradient, data):
    case = data.draw(routing_cases(dtype, variant))
    rng = np.random.default_rng(case["seed"])
    B, I, J, D = case["shape"]
    u_hat = sample(rng, case["shape"], dtype, case["magnitude"])
    bias = sample(rng, (J, D), dtype, case["magnitude"]) if case["with_bias"] else None
    dv = sample(rng, (B, J, D), dtype)
    check_routing(u_hat, case["iterations"], dv, bias=bias, gradient=gradient,
                  block_i=case["block_i"], variant=variant, splits=case["splits"])


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_routing_corners(dtype, variant, gradient, rng):
    """Every dtype, variant and policy at J = 1 and J = 17 (32 lanes), D = 3 and 9, r = 5, 3 and
    1, over blocks of 4 inputs, the last one partial, which the split kernels take in 2 chunks,
    the last one partial too."""
    for (B, I, J, D), iterations in (((3, 13, 1, 3), 5), ((2, 13, 17, 9), 3), ((1, 6, 4, 5), 1)):
        check_routing(sample(rng, (B, I, J, D), dtype), iterations, sample(rng, (B, J, D), dtype),
                      bias=sample(rng, (J, D), dtype), gradient=gradient, block_i=4, variant=variant, splits=2)


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("shape, iterations, splits", [((2, 37, 17, 9), 5, 3), ((1, 5, 1, 3), 1, 2),
                                                        ((3, 23, 10, 16), 3, 7)])
def test_split_variant_over_several_chunks(shape, iterations, splits, gradient, rng):
    """The split kernels with chunks of 4 inputs, the last one partial, J = 1 and J > 16, D = 3
    and 9; more splits asked than there are chunks (23 inputs are 6 chunks) gives one per chunk."""
    B, I, J, D = shape
    check_routing(sample(rng, shape, torch.float32), iterations, sample(rng, (B, J, D), torch.float32),
                  bias=sample(rng, (J, D), torch.float32), gradient=gradient, block_i=4,
                  variant="split", splits=splits)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("iterations", [1, 5])
def test_routing_of_a_single_capsule(dtype, iterations, rng):
    """I = J = D = 1: the coupling is 1, v = squash(u_hat + bias), in every iteration."""
    u_hat = sample(rng, (2, 1, 1, 1), dtype)
    check_routing(u_hat, iterations, sample(rng, (2, 1, 1), dtype), bias=sample(rng, (1, 1), dtype))


@pytest.mark.parametrize("block_i", [4, 16])
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_routing_with_inputs_not_a_multiple_of_the_block(block_i, gradient, rng):
    u_hat = sample(rng, (2, 37, 10, 16), torch.float32)
    dv = sample(rng, (2, 10, 16), torch.float32)
    bias = sample(rng, (10, 16), torch.float32)
    check_routing(u_hat, 3, dv, bias=bias, gradient=gradient, block_i=block_i)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_routing_for_each_number_of_iterations(iterations, rng):
    u_hat = sample(rng, (2, 9, 4, 5), torch.float64)
    dv = sample(rng, (2, 4, 5), torch.float64)
    for gradient in ("full", "last"):
        check_routing(u_hat, iterations, dv, gradient=gradient)


@pytest.mark.parametrize("view", ["permuted", "strided"])
def test_routing_of_non_contiguous_u_hat_equals_contiguous(view, rng):
    """The kernels take u_hat's strides: a view gives the result of its contiguous copy, bit for bit
    in the interpreter. Compiled, the strides pick the load width and with it the order in which a
    sum adds its terms, so the two agree to float32 rounding (seen on one H200)."""
    if view == "permuted":
        u_hat = sample(rng, (2, 10, 13, 16), torch.float32).permute(0, 2, 1, 3)   # [2, 13, 10, 16]
    else:
        u_hat = sample(rng, (2, 13, 10, 32), torch.float32)[..., ::2]             # D stride 2
    assert not u_hat.is_contiguous()
    dv = sample(rng, (2, 10, 16), torch.float32)
    results = check_routing(u_hat, 3, dv, block_i=4)
    v, s_all, couplings = routing_forward(u_hat.contiguous(), 3, block_i=4)
    du_hat, ds_all = routing_backward(dv, u_hat.contiguous(), s_all, couplings, block_i=4)
    for got, expected in zip(results, (v, s_all, du_hat, ds_all)):
        if interpreted():
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_backward_from_the_kept_couplings(gradient, variant, rng, monkeypatch):
    """The backward reads c^(t) from the forward's couplings: with them replaced by another batch's,
    du_hat follows, and under "full" so does kernel A's ds^(1..r-1); under "last" u_hat is not
    read at all. Kernel A's logit gradients
    [r - 1, B, I, J] are asked for (poisoned) under "full" only. 3 samples, 13 inputs in blocks of
    4, J = 11, r = 4."""
    from capsnet_triton.kernels import routing
    asked = []
    poisoned_scratch = routing.scratch
    monkeypatch.setattr(routing, "scratch", lambda shape, like: asked.append(shape) or poisoned_scratch(shape, like))
    u_hat, dv = sample(rng, (3, 13, 11, 5), torch.float32), sample(rng, (3, 11, 5), torch.float32)
    check_routing(u_hat, 4, dv, gradient=gradient, block_i=4, variant=variant, splits=2)
    assert ((3, 3, 13, 11) in asked) == (gradient == "full")
    launch = dict(gradient=gradient, block_i=4, variant=variant, splits=2)
    _, s_all, couplings = routing_forward(u_hat, 4, **launch)
    _, _, other = routing_forward(u_hat.flip(0), 4, **launch)
    du_hat, ds_all = routing_backward(dv, u_hat, s_all, couplings, **launch)
    du_hat_other, ds_all_other = routing_backward(dv, u_hat, s_all, other, **launch)
    assert not torch.allclose(du_hat, du_hat_other)
    assert torch.equal(ds_all[-1], ds_all_other[-1])                      # squash's backward of dv alone
    assert torch.allclose(ds_all[:-1], ds_all_other[:-1]) == (gradient == "last")
    if gradient == "last":                                 # no kernel A, and kernel B reads no u_hat
        nan_u_hat = torch.full_like(u_hat, float("nan"))
        assert torch.equal(routing_backward(dv, nan_u_hat, s_all, couplings, **launch)[0], du_hat)


def test_routing_reads_a_sample_past_int32_offsets_uncopied(rng, monkeypatch):
    """DigitCaps' u_hat is batch-inner (input stride B J D); at a large batch one sample spans more
    than int32 offsets reach. The kernels start each tile at a 64-bit offset, so only a tile must
    fit: a lowered limit shows it at a small shape. The batch-inner view [5, 13, 10, 16] spans 9759
    elements a sample and 2559 a tile of 4 inputs; one sample holds 2080."""
    from capsnet_triton.kernels import routing
    u_hat = sample(rng, (13, 5, 10, 16), torch.float32).permute(1, 0, 2, 3)     # [5, 13, 10, 16]
    dv = sample(rng, (5, 10, 16), torch.float32)
    expected = check_routing(u_hat, 3, dv, block_i=4)
    monkeypatch.setattr(routing, "_INT32_MAX", 2600)               # the sample's span overflows
    assert routing._u_hat_for_kernels(u_hat, 4) is u_hat
    for got, want in zip(check_routing(u_hat, 3, dv, block_i=4), expected):
        assert torch.equal(got, want)
    monkeypatch.setattr(routing, "_INT32_MAX", 2100)               # a tile's too: one copy
    copied = routing._u_hat_for_kernels(u_hat, 4)
    assert copied is not u_hat and copied.is_contiguous() and torch.equal(copied, u_hat)
    for got, want in zip(check_routing(u_hat, 3, dv, block_i=4), expected):
        assert torch.equal(got, want)
    _, s_all, couplings = routing_forward(u_hat, 3, gradient="last")
    prepared = []
    monkeypatch.setattr(routing, "_u_hat_for_kernels", lambda *args: prepared.append(1) or args[0])
    routing_backward(dv, u_hat, s_all, couplings, gradient="last", block_i=4)
    assert prepared == []                                      # "last" reads no u_hat: no copy
    monkeypatch.undo()
    monkeypatch.setattr(routing, "_INT32_MAX", 2000)               # du_hat's offsets in a sample
    with pytest.raises(ValueError, match="more than 2\\*\\*31 - 1 elements"):
        routing_forward(u_hat, 3)
    with pytest.raises(ValueError, match="more than 2\\*\\*31 - 1 elements"):
        routing_backward(dv, u_hat, s_all, couplings, gradient="last", block_i=4)


def test_routing_backward_refuses_more_blocks_of_inputs_than_a_grid_axis_takes(rng, monkeypatch):
    """Kernel B's grid is (B, blocks of I); CUDA refuses a second axis over 65535, with an obscure
    launch error (fp32 at J = 10, D = 16 from I = 2**20, fp64 at J = D = 32 from I = 65536). A lowered
    limit shows the check at a small shape: I = 9 in blocks of 4 is 3 blocks. The check comes before
    kernel A runs: the poisoned ds_all stays as it was."""
    from capsnet_triton.kernels import routing
    u_hat, dv = sample(rng, (2, 9, 3, 5), torch.float32), sample(rng, (2, 3, 5), torch.float32)
    _, s_all, couplings = routing_forward(u_hat, 2, block_i=4)
    monkeypatch.setattr(routing, "GRID_Y_MAX", 3)
    routing_backward(dv, u_hat, s_all, couplings, block_i=4)
    monkeypatch.setattr(routing, "GRID_Y_MAX", 2)
    du_hat, ds_all = torch.full_like(u_hat, float("nan")), torch.full_like(s_all, float("nan"))
    with pytest.raises(ValueError, match="at most 2 blocks of 4 input capsules.*I = 9"):
        routing_backward(dv, u_hat, s_all, couplings, block_i=4, out=(du_hat, ds_all))
    assert ds_all.isnan().all()


def test_forced_splits_stay_within_the_grid_axis_limit():
    """A forced number of chunks past CUDA's 65535 on the grid's second axis is cut to it."""
    splits, chunk = routing_split.pick_splits(1, 70_000, 1, torch.device("cpu"), 70_000)
    assert splits <= GRID_Y_MAX and splits * chunk >= 70_000
    assert routing_split.pick_splits(1, 37, 4, torch.device("cpu"), 100) == (10, 4)


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.5.2", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False),
    ("3.9.0", "2.4.6", False), ("3.10.1+git1234", "2.10.0rc1", False), ("3.6.0", "2.10.0", True),
])
def test_interpreter_problem_names_the_versions_that_break_the_loops(triton_version, numpy_version, broken):
    """Triton 3.6's interpreter with NumPy 2.4 failed 104 tests deep inside it; 3.7 fixed it
    (both checked: Triton 3.6 with NumPy 2.3.5 and 2.5.2, and the interpreters of 3.7 and 3.8)."""
    from capsnet_triton.kernels.launch import interpreter_problem
    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert triton_version in problem and numpy_version in problem and "triton>=3.7" in problem


def test_launchers_run_with_their_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current device: a launcher makes its first tensor's device current
    (a CUDA tensor is stood in by a mock, as this test runs without a GPU), and leaves the
    current device alone for a CPU tensor."""
    from unittest import mock

    from capsnet_triton.kernels import launch
    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(launch.torch.cuda, "device", Device)

    def launcher(first, *args, **kwargs):
        return list(entered), args, kwargs

    wrapped = launch.on_tensor_device(launcher)
    on_gpu = mock.MagicMock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", 1))
    assert wrapped(on_gpu, 3, out=None) == ([torch.device("cuda", 1)], (3,), {"out": None})
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    assert wrapped(torch.zeros(1), 3) == ([], (3,), {})
    assert entered == []
    from capsnet_triton import kernels
    for name in ("squash_forward", "squash_backward", "routing_forward", "routing_backward",
                 "capsule_linear_forward", "capsule_linear_backward"):
        assert hasattr(getattr(kernels, name), "__wrapped__"), name        # every launcher is so wrapped


def test_split_loops_pipeline_loads_only_while_they_fit_shared_memory():
    """A step's loads at 2 stages sit in shared memory (132 KB for a float32 [1, 128, 256] tile on
    sm_90, over the 227 KB of an H200 in float64): larger ones run unpipelined, MNIST's stay pipelined."""
    from capsnet_triton.kernels import routing
    config, stages = routing._routing_launch_config(1152, 10, 16, torch.float32, 16)    # a GPU's BLOCK_I
    assert stages == 2
    for dtype in (torch.float32, torch.float64):
        config, stages = routing._routing_launch_config(1152, 128, 256, dtype, 1)
        assert config["BLOCK_I"] == 1 and stages == 1


@pytest.mark.skipif(not interpreted(), reason="the check guards the interpreter only")
def test_routing_under_a_broken_interpreter_says_so_before_launching(rng, monkeypatch):
    import triton
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.0")
    u_hat = sample(rng, (2, 5, 3, 4), torch.float32)
    for block_i in (None, 4):
        with pytest.raises(RuntimeError, match="triton>=3.7"):
            routing_forward(u_hat, 3, block_i=block_i)


@pytest.mark.parametrize("dtype, gradient",
                         [(torch.float32, "full"), (torch.float32, "last"), (torch.bfloat16, "full")],
                         ids=["float32", "float32-last", "bfloat16"])
def test_routing_at_the_mnist_shape(dtype, gradient, rng):
    """DigitCaps of the MNIST network (SPEC 5): I = 1152, J = 10, D = 16, 3 iterations."""
    u_hat = sample(rng, (2, 1152, 10, 16), dtype)
    check_routing(u_hat, 3, sample(rng, (2, 10, 16), dtype), gradient=gradient)


def test_routing_of_long_capsules_over_many_inputs(rng):
    """J = 10 and D = 64 at I = 1152: under the interpreter a tile over all of I would hold 2**21 elements,
    over its limit of 2**20, so the launchers size tiles by that limit."""
    u_hat = sample(rng, (2, 1152, 10, 64), torch.float32)
    check_routing(u_hat, 2, sample(rng, (2, 10, 64), torch.float32))


def test_routing_allocates_its_outputs_when_not_given(rng):
    u_hat = sample(rng, (3, 7, 5, 6), torch.float16)
    dv = sample(rng, (3, 5, 6), torch.float16)
    v, s_all, du_hat, ds_all = check_routing(u_hat, 2, dv)
    v_new, s_all_new, couplings = routing_forward(u_hat, 2)
    du_hat_new, ds_all_new = routing_backward(dv, u_hat, s_all_new, couplings)
    assert v_new.dtype == du_hat_new.dtype == torch.float16
    assert s_all_new.dtype == ds_all_new.dtype == couplings.dtype == torch.float32
    assert couplings.shape == (1, 3, 7, 5)
    for got, expected in zip((v_new, s_all_new, du_hat_new, ds_all_new), (v, s_all, du_hat, ds_all)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("gradient", ["full", "last"])
def test_routing_of_an_empty_batch(gradient):
    u_hat = torch.empty(0, 5, 3, 4, device=DEVICE)
    v, s_all, couplings = routing_forward(u_hat, 3, gradient=gradient)
    assert v.shape == (0, 3, 4) and s_all.shape == (3, 0, 3, 4)
    assert couplings.shape == ((2 if gradient == "full" else 1), 0, 5, 3)
    du_hat, ds_all = routing_backward(torch.empty(0, 3, 4, device=DEVICE), u_hat, s_all, couplings,
                                      gradient=gradient)
    assert du_hat.shape == (0, 5, 3, 4) and ds_all.shape == (3, 0, 3, 4)


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["no_bias", "bias"])
def test_routing_kernels_match_autograd_of_the_literal_loop(gradient, use_bias, rng):
    """SPEC 3: each policy against autograd through Procedure 1's literal loop (u_hat and bias
    detached in iterations 1..r-1 under "last"), in float64, for r = 1..4."""
    from capsnet_triton.baselines import routing
    for iterations in (1, 2, 3, 4):
        u_hat = sample(rng, (2, 7, 4, 3), torch.float64).requires_grad_(True)
        bias = sample(rng, (4, 3), torch.float64).requires_grad_(True) if use_bias else None
        dv = sample(rng, (2, 4, 3), torch.float64)
        v_expected = routing(u_hat, iterations, bias=bias, gradient=gradient)
        expected = torch.autograd.grad(v_expected, (u_hat, bias) if use_bias else (u_hat,), dv)
        v, s_all, couplings = routing_forward(u_hat.detach(), iterations, None if bias is None else bias.detach(),
                                              gradient=gradient)
        du_hat, ds_all = routing_backward(dv, u_hat.detach(), s_all, couplings, gradient=gradient)
        got = (du_hat, ds_all.sum((0, 1))) if use_bias else (du_hat,)
        assert torch.allclose(v, v_expected, rtol=1e-12, atol=1e-14)
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-12, atol=1e-14), (iterations, gradient)


# The interpreter's NumPy warns of the NaN this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("variant, iterations, gradient, dtype", NAN_CASES, ids=str)
def test_a_sample_holding_nan_or_inf_is_all_nan(variant, iterations, gradient, dtype, rng):
    """SPEC 7: NaN in all of v, s_all, the kept couplings and du_hat of that sample, in every block
    of I; the other samples bit for bit as when routed without it."""
    cdtype = compute_dtype(dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u_hat = sample(rng, (3, 37, 10, 16), dtype)
        dv = sample(rng, (3, 10, 16), dtype)
        u_hat[1, 30, 9, 15] = bad
        kept = kept_iterations(iterations, gradient)
        v, s_all, couplings = routing_forward(
            u_hat, iterations, gradient=gradient, block_i=16, variant=variant, splits=2,
            out=(poisoned((3, 10, 16), dtype, FINITE_POISON),
                 poisoned((iterations, 3, 10, 16), cdtype, FINITE_POISON),
                 poisoned((kept, 3, 37, 10), cdtype, FINITE_POISON)))
        du_hat, ds_all = routing_backward(dv, u_hat, s_all, couplings, gradient=gradient, block_i=16,
                                          variant=variant, splits=2,
                                          out=(poisoned(u_hat.shape, dtype, FINITE_POISON),
                                               poisoned(s_all.shape, cdtype, FINITE_POISON)))
        assert torch.isnan(couplings[:, 1]).all()
        ref_v, cache = reference_routing_forward(as_float64(u_hat), iterations, gradient=gradient)
        ref_du_hat = reference_routing_backward(as_float64(dv), cache)
        assert np.isnan(ref_v[1]).all() and np.isnan(np.stack(cache["s_all"])[:, 1]).all()
        assert np.isnan(ref_du_hat[1]).all()
        assert_agrees(v, ref_v, dtype, "v")            # NaN exactly where the reference has it
        assert_agrees(s_all, np.stack(cache["s_all"]), dtype, "s_all")
        assert_agrees(du_hat, ref_du_hat, dtype, "du_hat")
        clean = [0, 2]
        v_c, s_all_c, couplings_c = routing_forward(u_hat[clean], iterations, gradient=gradient, block_i=16,
                                                    variant=variant, splits=2)
        du_hat_c, ds_all_c = routing_backward(dv[clean], u_hat[clean], s_all_c, couplings_c, gradient=gradient,
                                              block_i=16, variant=variant, splits=2)
        assert torch.equal(v[clean], v_c) and torch.equal(du_hat[clean], du_hat_c)
        assert torch.equal(couplings[:, clean], couplings_c) and torch.equal(ds_all[:, clean], ds_all_c)
        # The sample's ds^(t): NaN, but for the zeros "last" gives the iterations before the last.
        assert torch.isnan(ds_all[-1, 1]).all()
        assert (torch.isnan(ds_all[:-1, 1]) if gradient == "full" else ds_all[:-1, 1] == 0).all()


def test_routing_rejects_bad_input():
    u_hat = torch.ones(2, 5, 3, 4, device=DEVICE)
    _, s_all, couplings = routing_forward(u_hat, 2)
    dv = torch.ones(2, 3, 4, device=DEVICE)
    cases = [
        (TypeError, "torch.Tensor", lambda: routing_forward(np.ones((2, 5, 3, 4)), 2)),
        (ValueError, "4 axes", lambda: routing_forward(torch.ones(5, 3, 4, device=DEVICE), 2)),
        (TypeError, "float16, bfloat16", lambda: routing_forward(u_hat.long(), 2)),
        (ValueError, "at least one input capsule",
         lambda: routing_forward(torch.ones(2, 0, 3, 4, device=DEVICE), 2)),
        (ValueError, "at least one input capsule",
         lambda: routing_forward(torch.ones(2, 5, 0, 4, device=DEVICE), 2)),
        (ValueError, "at least one input capsule",
         lambda: routing_forward(torch.ones(2, 5, 3, 0, device=DEVICE), 2)),
        (ValueError, "at least one input capsule",
         lambda: routing_backward(torch.ones(2, 0, 4, device=DEVICE), torch.ones(2, 5, 0, 4, device=DEVICE),
                                  torch.ones(2, 2, 0, 4, device=DEVICE), torch.ones(1, 2, 5, 0, device=DEVICE))),
        (ValueError, r"gradient must be one of \('full', 'last'\)",
         lambda: routing_backward(dv, u_hat, s_all, couplings, gradient=False)),
        (ValueError, "iterations must be an integer >= 1", lambda: routing_forward(u_hat, 0)),
        (ValueError, "iterations must be an integer >= 1", lambda: routing_forward(u_hat, True)),
        (ValueError, "iterations must be an integer >= 1", lambda: routing_forward(u_hat, 2.0)),
        (ValueError, r"bias must have shape \[J, D\]",
         lambda: routing_forward(u_hat, 2, torch.ones(4, 3, device=DEVICE))),
        (ValueError, "one device", lambda: routing_forward(u_hat, 2, torch.ones(3, 4, device="meta"))),
        (ValueError, "more than a Triton tensor may",                  # one input's [J, D] tile: 2**21
         lambda: routing_forward(torch.ones(1, 1, 1024, 1025, device=DEVICE), 2)),
        (ValueError, "power of two", lambda: routing_forward(u_hat, 2, block_i=3)),
        (ValueError, "power of two", lambda: routing_backward(dv, u_hat, s_all, couplings, block_i=0)),
        (ValueError, r"variant must be one of \('sample', 'split'\)",
         lambda: routing_forward(u_hat, 2, variant="persistent")),
        (ValueError, "variant must be one of", lambda: routing_backward(dv, u_hat, s_all, couplings, variant=None)),
        (ValueError, "splits must be an integer >= 1", lambda: routing_forward(u_hat, 2, variant="split", splits=0)),
        (ValueError, r"out\[0\] \(v\)",
         lambda: routing_forward(u_hat, 2, out=(torch.empty(2, 4, 3, device=DEVICE), s_all, couplings))),
        (ValueError, r"out must be a tuple of 3 tensors \(v, s_all, couplings\), got 2 items",
         lambda: routing_forward(u_hat, 2, out=(torch.empty(2, 3, 4, device=DEVICE), s_all))),
        (ValueError, "gradient", lambda: routing_forward(u_hat, 2, gradient="none")),
        (ValueError, r"dv must have shape \[B, J, D\]", lambda: routing_backward(dv[:1], u_hat, s_all, couplings)),
        (ValueError, "s_all must be routing_forward's",
         lambda: routing_backward(dv, u_hat, s_all.double(), couplings)),
        (ValueError, "s_all must be routing_forward's", lambda: routing_backward(dv, u_hat, s_all[:, :1], couplings)),
        (ValueError, r"couplings must be routing_forward's third output under gradient='last', "
                     r"\[k, B, I, J\] = \[1, 2, 5, 3\] torch.float32, got shape \(1, 2, 5, 3\) torch.float64",
         lambda: routing_backward(dv, u_hat, s_all, couplings.double(), gradient="last")),
        (ValueError, "couplings must be routing_forward's third output",
         lambda: routing_backward(dv, u_hat, s_all, couplings[:0])),
        (ValueError, r"out\[1\] \(ds_all\)",
         lambda: routing_backward(dv, u_hat, s_all, couplings,
                                  out=(torch.empty_like(u_hat), torch.empty(3, 2, 3, 4, device=DEVICE)))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
