"""The fused DigitCaps kernels (kernels/capsule_linear.py and, for variant="split",
kernels/capsule_linear_split.py) against the float64 NumPy reference (reference/capsule_linear.py:
prediction then routing; SPEC 3, 7 and 8).

Every check runs forward and backward: v, every iteration's s and the couplings kept for the
backward against the reference forward, du, dW and the bias gradient ds_all.sum((0, 1)) against
the reference backward, under both gradient policies, with all outputs (and the scratch buffers,
kernel A's logit gradients among them) poisoned with NaN before the kernels write them. The split
kernels take samples in blocks of BLOCK_B = 4: batches of 1 to 3 leave a block partly empty, and
a batch of 5 or 8 makes two blocks.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import (DEVICE, DTYPES, FINITE_POISON, NAN_CASES, as_float64, assert_agrees, dtype_id, magnitudes,
                           poisoned, sample)

from capsnet_triton import numerics
from capsnet_triton.checks import compute_dtype, kept_iterations
from capsnet_triton.kernels import capsule_linear as capsule_linear_kernels
from capsnet_triton.kernels import capsule_linear_weight
from capsnet_triton.kernels import capsule_linear_backward, capsule_linear_forward
from capsnet_triton.kernels.launch import DEFAULT_VARIANT, max_tile
from capsnet_triton.numerics import input_sensitivity
from capsnet_triton.reference import capsule_linear_backward as reference_backward
from capsnet_triton.reference import capsule_linear_forward as reference_forward

# Every test here runs with the split launches' partial sums poisoned, and checks that no kernel
# wrote past the ends of a poisoned buffer (conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_scratch", "guarded_outputs")


def check_capsule_linear(u, weight, iterations, dv, *, bias=None, gradient="full", block_i=None,
                         variant=DEFAULT_VARIANT, splits=None, weight_launch=None):
    """Run the kernels on poisoned outputs, compare with the reference, return (v, s_all, du, dW, ds_all)."""
    B, I, P = u.shape
    _, J, D, _ = weight.shape
    dtype = u.dtype
    kept = kept_iterations(iterations, gradient)
    v, s_all, couplings = capsule_linear_forward(
        u, weight, iterations, bias, gradient=gradient, block_i=block_i, variant=variant, splits=splits,
        out=(poisoned((B, J, D), dtype), poisoned((iterations, B, J, D), compute_dtype(dtype)),
             poisoned((kept, B, I, J), compute_dtype(dtype))))
    du, dW, ds_all = capsule_linear_backward(
        dv, u, weight, s_all, couplings, gradient=gradient, block_i=block_i, variant=variant, splits=splits,
        weight_launch=weight_launch,
        out=(poisoned(u.shape, dtype), poisoned(weight.shape, dtype),
             poisoned((iterations, B, J, D), compute_dtype(dtype))))

    # A zero bias changes nothing in the reference and makes it return dL/dbias.
    bias64 = np.zeros((J, D)) if bias is None else as_float64(bias)

    def reference_dbias(u64, weight64, bias64):
        _, cache = reference_forward(u64, weight64, iterations, bias=bias64, gradient=gradient)
        return (reference_backward(as_float64(dv), cache)[2],)

    ref_v, cache = reference_forward(as_float64(u), as_float64(weight), iterations, bias=bias64,
                                     gradient=gradient)
    ref_du, ref_dW, ref_dbias = reference_backward(as_float64(dv), cache)
    # dbias sums ds over samples and iterations, and the sum may cancel (four samples of J = D = 1
    # summed to 1/40 of their terms): the comparison allows for what it amplifies (SPEC 8).
    (dbias_spread,) = input_sensitivity(reference_dbias, (as_float64(u), as_float64(weight), bias64), dtype)
    assert_agrees(v, ref_v, dtype, "v")
    # s_all and ds_all are computed and kept in the compute dtype, from inputs already rounded to
    # theirs: they are held to its tolerance, not to the half-precision input's.
    assert_agrees(s_all, np.stack(cache[1]["s_all"]), compute_dtype(dtype), "s_all")
    # c^(2..r) under "full", c^(r) under "last" (nothing at r = 1), [k, B, I, J] as the reference's.
    assert_agrees(couplings, np.asarray(cache[1]["couplings"][iterations - kept:]).reshape(kept, B, I, J),
                  compute_dtype(dtype), "kept couplings")
    assert_agrees(du, ref_du, dtype, "du")
    assert_agrees(dW, ref_dW, dtype, "dW")
    assert_agrees(ds_all.sum((0, 1)), ref_dbias, compute_dtype(dtype), "dbias = ds_all.sum((0, 1))",
                  spread=dbias_spread)
    return v, s_all, du, dW, ds_all


def layer_inputs(rng, shape, dtype, magnitude="normal", with_bias=False):
    """u [B, I, P] of the magnitude, W [I, J, D, P] / sqrt(P), optional bias [J, D], dv [B, J, D]."""
    B, I, J, D, P = shape
    u = sample(rng, (B, I, P), dtype, magnitude)
    weight = (sample(rng, (I, J, D, P), torch.float64) / np.sqrt(P)).to(dtype)
    bias = sample(rng, (J, D), dtype, magnitude) if with_bias else None
    return u, weight, bias, sample(rng, (B, J, D), dtype)


@st.composite
def layer_cases(draw, dtype, variant):
    magnitude = draw(st.sampled_from(magnitudes(dtype)))
    # For |s| ~ 1e15 squash's gradient along s is 2 / |s|^3 ~ 1e-45, below float32's normal range,
    # while across s it is |v| / |s| ~ 1e-15. At D = 1 only the part along s exists, and dW =
    # ds u^T scales its rounding up by |u| ~ 1e15; at P = 1 (with I = J = 1) du = W^T ds sees only
    # the part along s too, as a difference of terms 1e14 times larger. Neither is computable in
    # float32, so large inputs are drawn with D, P >= 2, where the part across s dominates.
    least = 2 if magnitude == "large" else 1
    # B up to 6: the split kernels take the batch in blocks of 4 samples, the last one partial.
    B, I, J, D, P = (draw(st.integers(fewest, most))
                     for fewest, most in ((1, 6), (1, 19), (1, 10), (least, 16), (least, 9)))
    return dict(
        magnitude=magnitude,
        shape=(B, I, J, D, P),
        iterations=draw(st.integers(1, 5)),
        with_bias=draw(st.booleans()),
        # 1: the split forward's on a GPU in float64. Under the interpreter None puts all of I in
        # one tile, which the split kernels cannot split: for them a block that leaves several.
        block_i=draw(st.sampled_from([None, 1, 2, 8] if variant == "sample" else [1, 2, 4])),
        splits=draw(st.sampled_from([None, 1, 2, 3])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# One Hypothesis run per dtype, variant and policy, each with a quarter of the profile's examples
# (a dtype's four runs draw as many as the profile gives a test); test_capsule_linear_corners
# pins the edge shapes in every one of these cells.
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@settings(max_examples=max(1, settings().max_examples // 4))
@given(data=st.data())
def test_capsule_linear_kernels_match_reference(dtype, variant, gradient, data):
    case = data.draw(layer_cases(dtype, variant))
    rng = np.random.default_rng(case["seed"])
    u, weight, bias, dv = layer_inputs(rng, case["shape"], dtype, case["magnitude"], case["with_bias"])
    check_capsule_linear(u, weight, case["iterations"], dv, bias=bias, gradient=gradient,
                         block_i=case["block_i"], variant=variant, splits=case["splits"])


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_capsule_linear_corners(dtype, variant, gradient, rng):
    """Every dtype, variant and policy at J = 1 and J = 17 (32 lanes), D = 3 and 9, P = 5 and 3,
    r = 5, 3 and 1, over blocks of 4 inputs, the last one partial, which the split kernels take in
    2 chunks, the last one partial too, and 5 samples (two blocks of 4, the second holding one)."""
    for shape, iterations in (((5, 13, 1, 3, 5), 5), ((2, 13, 17, 9, 3), 3), ((3, 6, 4, 5, 8), 1)):
        u, weight, bias, dv = layer_inputs(rng, shape, dtype, with_bias=True)
        check_capsule_linear(u, weight, iterations, dv, bias=bias, gradient=gradient, block_i=4, variant=variant,
                             splits=2)


@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_capsule_linear_with_inputs_not_a_multiple_of_the_block(gradient, variant, rng):
    """13 inputs in blocks of 4; split asks 3 chunks of I and gets 2 of 8 and 5 inputs."""
    u, weight, bias, dv = layer_inputs(rng, (2, 13, 10, 16, 8), torch.float32, with_bias=True)
    check_capsule_linear(u, weight, 3, dv, bias=bias, gradient=gradient, block_i=4, variant=variant, splits=3)


@pytest.mark.parametrize("variant", ["sample", "split"])
def test_capsule_linear_at_the_mnist_shape(variant, rng):
    """DigitCaps of the MNIST network (SPEC 5): I = 1152, J = 10, D = 16, P = 8, 3 iterations, with
    the launchers' own block sizes (kernel B under the interpreter: all 160 of J D's columns,
    padded to 256, a program; on a GPU three chunks of 64)."""
    u, weight, bias, dv = layer_inputs(rng, (2, 1152, 10, 16, 8), torch.float32, with_bias=True)
    check_capsule_linear(u, weight, 3, dv, bias=bias, variant=variant)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_kernel_b_under_last_reads_c_r_at_two_iterations(dtype, rng):
    """Under "last", kernel B's du_hat is c^(r) ds^(r); at r = 2 the kept c^(2) is read (r = 1
    alone takes the uniform 1/J). J = 3 parents, so that c^(2) differs from 1/J."""
    u, weight, bias, dv = layer_inputs(rng, (3, 5, 3, 4, 3), dtype, with_bias=True)
    check_capsule_linear(u, weight, 2, dv, bias=bias, gradient="last")


class _LaunchSpy:
    """Stands in for backward kernel B: records each launch's grid and blocks, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs["BLOCK_B"], kwargs["BLOCK_JD"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_kernel_b_with_its_own_launch(gradient, dtype, rng, monkeypatch):
    """weight_launch sets kernel B's (BLOCK_B, BLOCK_JD, num_warps) alone: 37 samples in blocks of 16
    and of 32 (the last one partial), J D = 21 columns in chunks of 16 (two, du then summed from
    their partials) and in one of 32, P = 5 padded to 16; kernel A at its own block. (Under the
    interpreter kernel B's own launch takes all of B and J D at once.)"""
    spy = _LaunchSpy(capsule_linear_weight.backward_weight_kernel)
    monkeypatch.setattr(capsule_linear_weight, "backward_weight_kernel", spy)
    u, weight, bias, dv = layer_inputs(rng, (37, 6, 3, 7, 5), dtype, with_bias=True)
    for weight_launch in ((16, 16, 2), (32, 32, 4)):
        check_capsule_linear(u, weight, 3, dv, bias=bias, gradient=gradient, weight_launch=weight_launch)
    assert spy.launches == [((6, 2), 16, 16), ((6, 1), 32, 32)]
    for bad, message in (((16, 16, 3), "num_warps must be a power of two from 1 to 32"),
                         ((16, 16, 64), "num_warps must be a power of two from 1 to 32"),
                         ((8, 16, 4), "BLOCK_B must be a power of two >= 16"),
                         ((16, 24, 4), "BLOCK_JD must be a power of two >= 16"),
                         ((16, 2**17, 4), "more than a Triton tensor may"),
                         ((1, 2), r"weight_launch must be \(BLOCK_B, BLOCK_JD, num_warps\)")):
        with pytest.raises(ValueError, match=message):
            check_capsule_linear(u, weight, 3, dv, weight_launch=bad)


def test_kernel_b_takes_wider_chunks_where_the_grid_axis_would_overflow(rng, monkeypatch):
    """Kernel B's chunks of columns are the grid's second axis (at most GRID_Y_MAX on a GPU): where
    BLOCK_JD would give more, the launcher takes wider chunks, and the result stays right."""
    spy = _LaunchSpy(capsule_linear_weight.backward_weight_kernel)
    monkeypatch.setattr(capsule_linear_weight, "backward_weight_kernel", spy)
    u, weight, _, dv = layer_inputs(rng, (3, 4, 13, 5, 3), torch.float64)        # J D = 65
    monkeypatch.setattr(capsule_linear_weight, "GRID_Y_MAX", 2)
    check_capsule_linear(u, weight, 2, dv, weight_launch=(16, 16, 1))
    assert spy.launches == [((4, 2), 16, 64)]


def test_the_split_kernels_tile_fits_a_gpu_blocks_shared_memory(monkeypatch):
    """On sm_90 the split kernels' whole u_hat tile [BLOCK_B, BLOCK_I, BLOCK_J, BLOCK_D] passes
    through shared memory: 4 samples of J = 100, D = 128 in float32 took 256 KB, over a block's
    227 KB, and could not launch. The launch config of a GPU, not the interpreter's, keeps fewer
    samples there; the MNIST shape keeps its 4."""
    from capsnet_triton.kernels import launch
    for module in (launch, capsule_linear_kernels):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    for (J, D, dtype), block_b in (((10, 16, torch.float32), 4), ((100, 128, torch.float32), 1),
                                   ((64, 128, torch.float64), 1), ((64, 256, torch.bfloat16), 1)):
        config = capsule_linear_kernels._launch_config(1152, J, D, 8, dtype, None, samples=4)
        assert config["BLOCK_B"] == block_b, (J, D, dtype)
        tile = config["BLOCK_B"] * config["BLOCK_I"] * config["BLOCK_J"] * config["BLOCK_D"]
        assert tile * compute_dtype(dtype).itemsize <= 128 * 1024, (J, D, dtype)


@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("gradient", ["full", "last"])
def test_backward_from_the_kept_couplings_alone(gradient, variant, rng, monkeypatch):
    """The backward reads c^(t) from the forward's couplings, not from u_hat: with the kept
    couplings replaced by other values of their shape (those of other inputs), du and dW
    follow them, and under "full" so does kernel A's ds^(1..r-1) (kernel B alone reads them under
    "last"). Kernel A's logit gradients [r - 1, B, I, J] are asked for under "full" only
    (poisoned, as every scratch buffer here). 5 samples (two blocks of 4 for split), 13 inputs
    in blocks of 4, J = 11 parents, r = 4."""
    asked = []
    poisoned_scratch = capsule_linear_kernels.scratch
    monkeypatch.setattr(capsule_linear_kernels, "scratch", lambda shape, like: asked.append(shape) or
                        poisoned_scratch(shape, like))
    u, weight, bias, dv = layer_inputs(rng, (5, 13, 11, 9, 3), torch.float32, with_bias=True)
    check_capsule_linear(u, weight, 4, dv, bias=bias, gradient=gradient, block_i=4, variant=variant, splits=2)
    assert ((3, 5, 13, 11) in asked) == (gradient == "full")

    launch = dict(gradient=gradient, block_i=4, variant=variant, splits=2)
    _, s_all, couplings = capsule_linear_forward(u, weight, 4, bias, **launch)
    _, _, other = capsule_linear_forward(u.flip(0), weight, 4, bias, **launch)
    du, dW, ds_all = capsule_linear_backward(dv, u, weight, s_all, couplings, **launch)
    du_other, dW_other, ds_all_other = capsule_linear_backward(dv, u, weight, s_all, other, **launch)
    assert not torch.allclose(du, du_other) and not torch.allclose(dW, dW_other)
    assert torch.equal(ds_all[-1], ds_all_other[-1])                      # squash's backward of dv alone
    assert torch.allclose(ds_all[:-1], ds_all_other[:-1]) == (gradient == "last")
    with pytest.raises(ValueError, match=r"couplings must be capsule_linear_forward's third output under "
                                         r"gradient='last', \[k, B, I, J\] = \[1, 5, 13, 11\]"):
        capsule_linear_backward(dv, u, weight, s_all, couplings[:2] if gradient == "full" else couplings[:0],
                                gradient="last")


@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("shape, iterations, splits", [((5, 11, 3, 3, 5), 4, 3), ((8, 9, 1, 5, 3), 2, 1),
                                                        ((5, 23, 17, 9, 2), 3, 7)])
def test_split_variant_over_several_blocks_and_chunks(shape, iterations, splits, gradient, rng):
    """The split kernels over two blocks of samples (5 samples: the second block holds one; 8:
    both full), chunks of 2 inputs with the last one partial, or one chunk (splits = 1), J = 1
    and J > 16, D = 3 and 9, odd P; more splits asked than there are chunks gives one per chunk."""
    u, weight, bias, dv = layer_inputs(rng, shape, torch.float32, with_bias=True)
    check_capsule_linear(u, weight, iterations, dv, bias=bias, gradient=gradient, block_i=2, variant="split",
                         splits=splits)


@pytest.mark.parametrize("variant", ["sample", "split"])
@pytest.mark.parametrize("P", [1, 3, 8])
def test_capsule_linear_of_one_parent(P, variant, rng):
    """J = 1: the coupling is 1 in every iteration, v = squash(sum_i W u)."""
    u, weight, _, dv = layer_inputs(rng, (2, 5, 1, 4, P), torch.float64)
    v, *_ = check_capsule_linear(u, weight, 3, dv, variant=variant, splits=2, block_i=2)
    s = torch.einsum("ijdp,bip->bjd", weight, u)
    assert torch.allclose(v, s * s.norm(dim=-1, keepdim=True) / (1 + s.norm(dim=-1, keepdim=True) ** 2),
                          rtol=1e-12, atol=0)


# The interpreter's NumPy warns of the NaN this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("variant, iterations, gradient, dtype", NAN_CASES, ids=str)
def test_capsule_linear_propagates_non_finite_input_per_sample(variant, iterations, gradient, dtype, rng):
    """SPEC 7: a sample whose u holds a NaN or inf gets NaN in all of its v; the others, in the
    split kernels in the same block of samples, are unaffected. So in the backward, under either
    gradient policy: du, dW and the bias gradient (ds_all's sum) are the reference's, NaN exactly
    where it has NaN (all of those samples' du; all of dW, a sum over the batch), and the clean
    sample's are those of the clean sample alone; the kept couplings, s_all and ds_all of those
    samples are NaN. Every output is poisoned with a finite value, so that one left unwritten shows."""
    u, weight, _, dv = layer_inputs(rng, (3, 6, 4, 5, 3), dtype)
    u[0, 2, 1] = float("nan")
    u[2, 5, 0] = float("inf")
    launch = dict(variant=variant, splits=2, block_i=2, gradient=gradient)
    v, s_all, couplings = capsule_linear_forward(
        u, weight, iterations, **launch,
        out=(poisoned((3, 4, 5), dtype, FINITE_POISON),
             poisoned((iterations, 3, 4, 5), compute_dtype(dtype), FINITE_POISON),
             poisoned((kept_iterations(iterations, gradient), 3, 6, 4), compute_dtype(dtype), FINITE_POISON)))
    # Kernel B over two chunks of the J D = 20 columns: du summed from partials keeps the NaN.
    du, dW, ds_all = capsule_linear_backward(
        dv, u, weight, s_all, couplings, **launch, weight_launch=(16, 16, 1),
        out=(poisoned(u.shape, dtype, FINITE_POISON), poisoned(weight.shape, dtype, FINITE_POISON),
             poisoned((iterations, 3, 4, 5), compute_dtype(dtype), FINITE_POISON)))
    clean, clean_s_all, clean_couplings = capsule_linear_forward(u[1:2], weight, iterations, **launch)
    clean_du, _, clean_ds_all = capsule_linear_backward(dv[1:2], u[1:2], weight, clean_s_all, clean_couplings,
                                                        **launch, weight_launch=(16, 16, 1))
    for bad in (0, 2):
        # ds^(t) of the sample: NaN, but for the zeros "last" gives the iterations before the last.
        ds_nan = ds_all[:, bad] if gradient == "full" else ds_all[-1, bad]
        for output in (v[bad], s_all[:, bad], couplings[:, bad], du[bad], ds_nan):
            assert torch.isnan(output).all()
        assert gradient == "full" or (ds_all[:-1, bad] == 0).all()
    # A zero bias changes nothing in the reference and makes it return dL/dbias, ds_all's sum.
    _, cache = reference_forward(as_float64(u), as_float64(weight), iterations, bias=np.zeros((4, 5)),
                                 gradient=gradient)
    ref_du, ref_dW, ref_dbias = reference_backward(as_float64(dv), cache)
    assert np.isnan(ref_dW).all()
    # du is summed from the two chunks' partials by torch, which rounds to nearest (the interpreter
    # truncates in the kernels' own stores alone).
    numerics.assert_agrees(du, ref_du, dtype, "du")
    for out, ref, name in ((dW, ref_dW, "dW"), (ds_all.sum((0, 1)), ref_dbias, "dbias")):
        assert_agrees(out, ref, dtype, name)
    assert torch.equal(v[1], clean[0]) and torch.equal(couplings[:, 1], clean_couplings[:, 0])
    assert torch.equal(s_all[:, 1], clean_s_all[:, 0])
    assert torch.equal(du[1], clean_du[0]) and torch.equal(ds_all[:, 1], clean_ds_all[:, 0])


# The interpreter's NumPy warns of the NaN this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("variant", ["sample", "split"])
def test_capsule_linear_with_one_non_finite_weight_is_nan_as_the_reference(variant, bad, rng):
    """A NaN or inf in one W[i, j, d, p] makes u_hat non-finite at one (j, d) of every sample, and
    the reference's first softmax spreads it to every parent: at r = 1 all of v is NaN. (A
    non-finite u reaches every (j, d) through W u, so only a weight shows whether the split
    forward spreads a NaN over its whole sample in the first iteration.)"""
    B, I, J, D, P = 3, 6, 4, 5, 3
    u, weight, _, _ = layer_inputs(rng, (B, I, J, D, P), torch.float32)
    weight[2, 1, 3, 0] = bad
    v, s_all, _ = capsule_linear_forward(
        u, weight, 1, variant=variant, splits=2, block_i=2,
        out=(poisoned((B, J, D), torch.float32, FINITE_POISON), poisoned((1, B, J, D), torch.float32, FINITE_POISON),
             poisoned((0, B, I, J), torch.float32, FINITE_POISON)))
    ref_v, cache = reference_forward(as_float64(u), as_float64(weight), 1)
    assert np.isnan(ref_v).all()
    assert_agrees(v, ref_v, torch.float32, "v")
    assert_agrees(s_all, np.stack(cache[1]["s_all"]), torch.float32, "s_all")


@pytest.mark.parametrize("variant", ["sample", "split"])
def test_capsule_linear_allocates_its_outputs_when_not_given(variant, rng):
    u, weight, _, dv = layer_inputs(rng, (3, 7, 5, 6, 4), torch.float16)
    v, s_all, du, dW, ds_all = check_capsule_linear(u, weight, 2, dv, variant=variant)
    v_new, s_all_new, couplings = capsule_linear_forward(u, weight, 2, variant=variant)
    du_new, dW_new, ds_all_new = capsule_linear_backward(dv, u, weight, s_all_new, couplings, variant=variant)
    assert v_new.dtype == du_new.dtype == dW_new.dtype == torch.float16
    assert s_all_new.dtype == ds_all_new.dtype == couplings.dtype == torch.float32
    assert couplings.shape == (1, 3, 7, 5)
    for got, expected in zip((v_new, s_all_new, du_new, dW_new, ds_all_new), (v, s_all, du, dW, ds_all)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", ["sample", "split"])
def test_capsule_linear_of_an_empty_batch(variant):
    u, weight = torch.empty(0, 5, 3, device=DEVICE), torch.ones(5, 2, 4, 3, device=DEVICE)
    v, s_all, couplings = capsule_linear_forward(u, weight, 3, variant=variant)
    assert v.shape == (0, 2, 4) and s_all.shape == (3, 0, 2, 4) and couplings.shape == (2, 0, 5, 2)
    du, dW, ds_all = capsule_linear_backward(torch.empty(0, 2, 4, device=DEVICE), u, weight, s_all, couplings,
                                             variant=variant)
    assert du.shape == (0, 5, 3) and ds_all.shape == (3, 0, 2, 4)
    assert torch.equal(dW, torch.zeros_like(weight))


def test_capsule_linear_refuses_w_or_s_all_past_int32_offsets(rng, monkeypatch):
    """The kernels index W and s_all with int32 offsets: a lowered limit shows the guard at a small
    shape (W holds 24 elements, s_all r B J D = 3 x 3 x 4 x 3 = 108), forward and backward."""
    from capsnet_triton.kernels import capsule_linear
    u, weight = sample(rng, (3, 1, 2), torch.float32), sample(rng, (1, 4, 3, 2), torch.float32)
    monkeypatch.setattr(capsule_linear, "_INT32_MAX", 108)
    _, s_all, couplings = capsule_linear_forward(u, weight, 3)
    monkeypatch.setattr(capsule_linear, "_INT32_MAX", 107)
    with pytest.raises(ValueError, match=r"s_all \[r, B, J, D\] for r = 3 and B = 3.*2\*\*31 - 1"):
        capsule_linear_forward(u, weight, 3)
    with pytest.raises(ValueError, match=r"2\*\*31 - 1 elements"):
        capsule_linear_backward(torch.ones(3, 4, 3, device=DEVICE), u, weight, s_all, couplings)
    monkeypatch.setattr(capsule_linear, "_INT32_MAX", 23)                    # s_all of one sample: 12
    with pytest.raises(ValueError, match=r"W \[I, J, D, P\] = \(1, 4, 3, 2\)"):
        capsule_linear_forward(u[:1], weight, 1)


def test_capsule_linear_rejects_bad_input(monkeypatch):
    u, weight = torch.ones(2, 5, 3, device=DEVICE), torch.ones(5, 2, 4, 3, device=DEVICE)
    too_wide_for_kernel_b = (torch.ones(1, 1, 2**16 + 1, device=DEVICE), torch.full((1, 1, 1, 2**16 + 1), 1e-3, device=DEVICE))
    _, s_all, couplings = capsule_linear_forward(u, weight, 2)
    dv = torch.ones(2, 2, 4, device=DEVICE)
    cases = [
        (TypeError, "torch.Tensor", lambda: capsule_linear_forward(np.ones((2, 5, 3)), weight, 2)),
        (ValueError, "3 axes", lambda: capsule_linear_forward(u[0], weight, 2)),
        (ValueError, "4 axes", lambda: capsule_linear_forward(u, weight[0], 2)),
        (ValueError, "I and P must agree", lambda: capsule_linear_forward(u[:, :4], weight, 2)),
        (TypeError, "u's dtype", lambda: capsule_linear_forward(u, weight.double(), 2)),
        (TypeError, "float16, bfloat16", lambda: capsule_linear_forward(u.long(), weight, 2)),
        (ValueError, "at least one", lambda: capsule_linear_forward(u, weight[:, :0], 2)),
        (ValueError, "iterations must be an integer >= 1", lambda: capsule_linear_forward(u, weight, 0)),
        (ValueError, r"bias must have shape \[J, D\]",
         lambda: capsule_linear_forward(u, weight, 2, torch.ones(4, 2, device=DEVICE))),
        (ValueError, "power of two", lambda: capsule_linear_forward(u, weight, 2, block_i=3)),
        # Backward kernel B's smallest tile of W, [16, P] with P padded to 2**17, would be 2**21
        # elements: refused by the forward a backward may follow (keep, the default), not by
        # the backward after it.
        (ValueError, "more than a Triton tensor may", lambda: capsule_linear_forward(*too_wide_for_kernel_b, 1)),
        (ValueError, "gradient", lambda: capsule_linear_backward(dv, u, weight, s_all, couplings, gradient="none")),
        (ValueError, r"variant must be one of \('sample', 'split'\)",
         lambda: capsule_linear_forward(u, weight, 2, variant="persistent")),
        (ValueError, "variant must be one of",
         lambda: capsule_linear_backward(dv, u, weight, s_all, couplings, variant=None)),
        (ValueError, "splits must be an integer >= 1",
         lambda: capsule_linear_forward(u, weight, 2, variant="split", splits=0)),
        (ValueError, "splits must be an integer >= 1",
         lambda: capsule_linear_backward(dv, u, weight, s_all, couplings, variant="split", splits=1.5)),
        (ValueError, r"out\[0\] \(v\)",
         lambda: capsule_linear_forward(u, weight, 2, out=(torch.empty(2, 4, 2, device=DEVICE), s_all, couplings))),
        (ValueError, r"dv must have shape \[B, J, D\]",
         lambda: capsule_linear_backward(dv[:1], u, weight, s_all, couplings)),
        (ValueError, "s_all must be capsule_linear_forward's",
         lambda: capsule_linear_backward(dv, u, weight, s_all.double(), couplings)),
        (ValueError, "s_all must be capsule_linear_forward's",
         lambda: capsule_linear_backward(dv, u, weight, s_all[0], couplings)),
        (ValueError, "gradient", lambda: capsule_linear_forward(u, weight, 2, gradient="none")),
        (ValueError, r"out must be a tuple of 3 tensors \(v, s_all, couplings\), got 2 items",
         lambda: capsule_linear_forward(u, weight, 2, out=(torch.empty(2, 2, 4, device=DEVICE), s_all))),
        (ValueError, r"out\[2\] \(couplings\)",
         lambda: capsule_linear_forward(u, weight, 2, out=(torch.empty(2, 2, 4, device=DEVICE), s_all, s_all))),
        (TypeError, "couplings", lambda: capsule_linear_backward(dv, u, weight, s_all, couplings.numpy())),
        (ValueError, r"couplings must be capsule_linear_forward's third output under gradient='full', "
                     r"\[k, B, I, J\] = \[1, 2, 5, 2\] torch.float32, got shape \(1, 2, 5, 2\) torch.float64",
         lambda: capsule_linear_backward(dv, u, weight, s_all, couplings.double())),
        (ValueError, r"out\[1\] \(dW\)",
         lambda: capsule_linear_backward(dv, u, weight, s_all, couplings,
                                         out=(torch.empty_like(u), torch.empty_like(u), torch.empty_like(s_all)))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    # Inference (keep=False: no backward follows) never asks for kernel B's launch (a W of that
    # P would take minutes of the interpreter's loop over p: the check is watched instead).
    asked = []
    monkeypatch.setattr(capsule_linear_weight, "weight_launch_config", lambda *args: asked.append(args))
    capsule_linear_forward(u, weight, 2, keep=False)
    assert asked == []
    capsule_linear_forward(u, weight, 2)
    assert asked == [(2, 2, 4, 3, torch.float32)]


def test_kernel_b_own_launch_checks_each_of_its_tiles():
    """weight_launch's tiles, W and dW [BLOCK_JD, BLOCK_P] and u [BLOCK_B, BLOCK_P], are each held
    to Triton's tensor limit (2**20), also where BLOCK_P is the larger side."""
    config = capsule_linear_weight.weight_launch_config
    config(1, 1, 1, 1024, torch.float32, (16, 1024, 4))                   # [1024, 1024]: the limit itself
    with pytest.raises(ValueError, match="more than a Triton tensor may"):
        config(1, 1, 1, 2048, torch.float32, (16, 1024, 4))               # W [1024, 2048]
    with pytest.raises(ValueError, match="more than a Triton tensor may"):
        config(1, 1, 1, 1024, torch.float32, (2048, 16, 4))               # u [2048, 1024]


def test_kernel_b_gpu_launch_stays_within_its_tile(monkeypatch):
    """On a GPU kernel B's [BLOCK_JD, BLOCK_P] tiles (and du_hat [BLOCK_B, BLOCK_JD]) hold at most
    _WEIGHT_TILE elements, also where P pads past BLOCK_B = 16 (the compile test sees P = 8 alone)."""
    monkeypatch.setattr(capsule_linear_weight, "interpreting", lambda: False)
    for P, block_jd in ((8, 64), (32, 32), (64, 16)):
        config = capsule_linear_weight.weight_launch_config(128, 10, 16, P, torch.float32)
        assert (config["BLOCK_B"], config["BLOCK_JD"]) == (16, block_jd), P
        assert config["BLOCK_JD"] * max(config["BLOCK_B"], config["BLOCK_P"]) <= capsule_linear_weight._WEIGHT_TILE


def test_kernel_b_grid_stays_within_cudas_second_axis():
    """CUDA's grid allows at most 65535 blocks on its second axis, kernel B's chunks of columns:
    at J D = 16 * 65536 columns in chunks of 16 asked for, the launch takes chunks of 32."""
    J, D = 65536, 16
    config = capsule_linear_weight.weight_launch_config(1, J, D, 1, torch.float32, (16, 16, 1))
    assert config["BLOCK_JD"] == 32 and -(-J * D // config["BLOCK_JD"]) <= 65535


def test_kernel_b_interpreter_launch_keeps_every_tile_within_its_limit():
    """Under the interpreter the blocks take all of B and of J D, as far as its tile limit lets
    them: the u tile [BLOCK_B, BLOCK_P] too (B = 2048, P = 1024 gave 2**21 elements, past even
    Triton's tensor limit, and the launch failed)."""
    limit = max_tile(torch.float32)
    for B, P in ((2048, 1024), (512, 4096), (4096, 16)):
        c = capsule_linear_weight.weight_launch_config(B, 1, 16, P, torch.float32)
        assert max(c["BLOCK_B"] * c["BLOCK_P"], c["BLOCK_JD"] * max(c["BLOCK_B"], c["BLOCK_P"])) <= limit, (B, P, c)
    assert capsule_linear_weight.weight_launch_config(4, 10, 16, 8, torch.float32)["BLOCK_B"] == 16
