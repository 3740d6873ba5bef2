"""The squash kernels (kernels/squash.py) against the float64 NumPy reference (SPEC sections 2 and 8)."""

import numpy as np
import pytest
import torch
from conftest import interpreted
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import DEVICE, DTYPES, FINITE_POISON, assert_agrees, dtype_id, magnitudes, poisoned, sample

from capsnet_triton.kernels import squash_backward, squash_forward
from capsnet_triton.numerics import as_float64
from capsnet_triton.reference import squash_backward as reference_squash_backward
from capsnet_triton.reference import squash_forward as reference_squash_forward

# Every test here checks that no kernel wrote past the ends of a poisoned buffer (conftest.py).
pytestmark = pytest.mark.usefixtures("guarded_outputs")


@st.composite
def squash_cases(draw, dtype):
    magnitude = draw(st.sampled_from(magnitudes(dtype)))
    leading = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    D = draw(st.integers(1, 20))                                           # 17..20 pad to 32
    seed = draw(st.integers(0, 2**32 - 1))
    return magnitude, (*leading, D), seed


# One Hypothesis run per dtype, so that each gets the profile's full number of examples.
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@given(data=st.data())
def test_squash_kernels_match_reference(dtype, data):
    magnitude, shape, seed = data.draw(squash_cases(dtype))
    rng = np.random.default_rng(seed)
    s = sample(rng, shape, dtype, magnitude)
    dv = sample(rng, shape, dtype)
    v = squash_forward(s, out=poisoned(shape, dtype))
    ds = squash_backward(dv, s, out=poisoned(shape, dtype))
    assert v.dtype == ds.dtype == dtype
    assert_agrees(v, reference_squash_forward(as_float64(s)), dtype, "v")
    assert_agrees(ds, reference_squash_backward(as_float64(dv), as_float64(s)), dtype, "ds")


# The interpreter's NumPy reports the overflow of |s| to inf in the last row, which the kernel expects.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_squash_of_huge_vectors_is_finite_and_just_under_unit_length(dtype):
    """SPEC 2: |s| up to the largest value whose square is finite (and beyond) gives v of length ~1."""
    largest = torch.finfo(dtype).max
    root = float(np.sqrt(largest)) * 0.99
    s = torch.tensor([[root, 0.0, 0.0, 0.0],                              # |s|^2 just finite
                      [root, root, root, root],                           # |s|^2 overflows
                      [largest * 0.9, largest * 0.9, -largest * 0.9, largest * 0.9]],  # |s| overflows
                     dtype=dtype, device=DEVICE)
    v = squash_forward(s)
    ds = squash_backward(torch.ones_like(s), s)
    assert torch.all(torch.isfinite(v)) and torch.all(torch.isfinite(ds))
    lengths = torch.linalg.vector_norm(v.double(), dim=-1)
    assert torch.all(lengths <= 1.0 + 4 * torch.finfo(dtype).eps)
    assert torch.allclose(lengths, torch.ones_like(lengths), rtol=0, atol=4 * torch.finfo(dtype).eps)
    scaled = s.double() / s.double().abs().amax(dim=-1, keepdim=True)
    direction = scaled / torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    assert torch.allclose(v.double(), direction, rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_squash_at_zero_is_zero_with_zero_gradient(dtype, rng):
    """SPEC 2: s = 0 gives v = 0 and ds = 0 exactly (never NaN), rows beside it unaffected."""
    s = sample(rng, (4, 5), dtype)
    s[1] = 0.0
    s[3] = 0.0
    dv = sample(rng, (4, 5), dtype)
    v = squash_forward(s)
    ds = squash_backward(dv, s)
    assert torch.all(v[[1, 3]] == 0) and torch.all(ds[[1, 3]] == 0)
    assert_agrees(v, reference_squash_forward(as_float64(s)), dtype, "v")
    assert_agrees(ds, reference_squash_backward(as_float64(dv), as_float64(s)), dtype, "ds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_squash_of_subnormal_vectors_is_finite(dtype):
    """A subnormal max|s| must not break the scaling (its reciprocal would overflow)."""
    smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    s = torch.tensor([[smallest, 0.0, -smallest], [3 * smallest, smallest, 0.0]], dtype=dtype, device=DEVICE)
    dv = torch.ones_like(s)
    v = squash_forward(s)
    ds = squash_backward(dv, s)
    assert torch.all(torch.isfinite(v)) and torch.all(torch.isfinite(ds))
    assert_agrees(ds, reference_squash_backward(as_float64(dv), as_float64(s)), dtype, "ds")


def test_squash_over_many_rows_with_a_partial_last_block(rng):
    """More rows than one program takes (and not a multiple of its block): every row is written."""
    shape = (4099 if interpreted() else 1 << 16, 3, 5)
    s = sample(rng, shape, torch.float32)
    dv = sample(rng, shape, torch.float32)
    v = squash_forward(s, out=poisoned(shape, torch.float32))
    ds = squash_backward(dv, s, out=poisoned(shape, torch.float32))
    assert_agrees(v, reference_squash_forward(as_float64(s)), torch.float32, "v")
    assert_agrees(ds, reference_squash_backward(as_float64(dv), as_float64(s)), torch.float32, "ds")


def test_squash_of_non_contiguous_input_equals_contiguous(rng):
    s = sample(rng, (6, 7), torch.float32).t()                             # [7, 6], capsules along stride 7
    dv = sample(rng, (6, 7), torch.float32).t()
    assert not s.is_contiguous()
    assert torch.equal(squash_forward(s), squash_forward(s.contiguous()))
    assert torch.equal(squash_backward(dv, s), squash_backward(dv.contiguous(), s.contiguous()))


def test_squash_of_empty_tensor_is_empty():
    s = torch.empty(0, 4, device=DEVICE)
    assert squash_forward(s).shape == (0, 4)
    assert squash_backward(s, s).shape == (0, 4)
    with pytest.raises(ValueError, match="0 dimensions"):
        squash_forward(torch.empty(4, 0, device=DEVICE))
    with pytest.raises(ValueError, match="0 dimensions"):
        squash_backward(torch.empty(4, 0, device=DEVICE), torch.empty(4, 0, device=DEVICE))


# The interpreter's NumPy warns of the NaN this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_squash_of_a_capsule_holding_nan_or_inf_is_all_nan(dtype, rng):
    """SPEC 7: a NaN or inf anywhere in a capsule (here in a padded block, D = 5 of 8) gives NaN
    in all of its v and ds, as the reference does; the other capsules are unaffected."""
    s = sample(rng, (6, 5), dtype)
    dv = sample(rng, (6, 5), dtype)
    s[0, 4] = float("nan")
    s[1, 0] = float("inf")
    s[2, 2] = -float("inf")
    s[3, 1], s[3, 3] = float("inf"), -float("inf")
    v = squash_forward(s, out=poisoned((6, 5), dtype, FINITE_POISON))
    ds = squash_backward(dv, s, out=poisoned((6, 5), dtype, FINITE_POISON))
    v_ref, ds_ref = reference_squash_forward(as_float64(s)), reference_squash_backward(as_float64(dv), as_float64(s))
    assert np.isnan(v_ref[:4]).all() and np.isnan(ds_ref[:4]).all() and not np.isnan(v_ref[4:]).any()
    assert_agrees(v, v_ref, dtype, "v")                    # NaN exactly where the reference has it
    assert_agrees(ds, ds_ref, dtype, "ds")


def test_squash_rejects_bad_input():
    s = torch.ones(3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="torch.Tensor"):
        squash_forward(np.ones((3, 4)))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        squash_forward(torch.ones(3, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="at least one axis"):
        squash_forward(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="must match"):
        squash_backward(torch.ones(3, 5, device=DEVICE), s)
    with pytest.raises(ValueError, match="contiguous torch.float32 tensor of shape"):
        squash_forward(s, out=torch.empty(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous torch.float32 tensor of shape"):
        squash_forward(s, out=torch.empty(3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="at most"):
        squash_forward(torch.ones(1, (1 << 14) + 1, device=DEVICE))
