"""squash (Eq. 1): exact formula, gradient against finite differences and torch, edge values."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from capsnet_triton.reference import squash_backward, squash_forward
from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error


def exact_squash(s):
    n = np.linalg.norm(s, axis=-1, keepdims=True)
    return n**2 / (1 + n**2) * s / n


nonzero_vectors = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 6)),
    elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False),
).filter(lambda s: (np.abs(s).max(axis=-1) > 1e-100).all())


@given(nonzero_vectors)
def test_forward_matches_exact_formula(s):
    v = squash_forward(s)
    assert v.shape == s.shape and v.dtype == s.dtype
    assert relative_error(v, exact_squash(s)) <= 1e-12


@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.sampled_from([1e-3, 0.3, 1.0, 5.0, 1e3]))
def test_backward_matches_finite_differences(seed, D, scale):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(3, D)) * scale
    dv = rng.normal(size=(3, D))
    ds = squash_backward(dv, s)
    # Differenced in long double: for D = 1 and |s| ~ 1e3 the gradient is ~1/|s|^3 while the
    # loss is ~1, so float64 differences would carry ~1e-6 relative rounding error of their own.
    wide = s.astype(np.longdouble)
    numeric = numerical_gradient(lambda: np.sum(squash_forward(wide) * dv), wide, step=1e-6 * scale)
    assert relative_error(ds.ravel(), numeric) <= FD_TOLERANCE


def test_backward_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    from capsnet_triton.baselines import squash as torch_squash
    s = rng.normal(size=(4, 5, 7)) * np.array([0.01, 0.5, 1.0, 3.0, 100.0])[None, :, None]
    dv = rng.normal(size=s.shape)
    s_t = torch.tensor(s, requires_grad=True)
    torch_squash(s_t).backward(torch.tensor(dv))
    assert relative_error(squash_forward(s), torch_squash(s_t).detach().numpy()) <= 1e-12
    assert relative_error(squash_backward(dv, s), s_t.grad.numpy()) <= 1e-12


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_zero_vector_gives_zero_and_zero_gradient(dtype):
    s = np.zeros((2, 8), dtype=dtype)
    dv = np.ones_like(s)
    v, ds = squash_forward(s), squash_backward(dv, s)
    assert np.array_equal(v, s) and np.array_equal(ds, np.zeros_like(s))


def largest_with_finite_square(dtype):
    """The largest x of dtype with x * x finite."""
    x = np.sqrt(np.finfo(dtype).max).astype(dtype)
    with np.errstate(over="ignore"):
        while np.isfinite(x * x):
            x = np.nextafter(x, dtype(np.inf))
        while not np.isfinite(x * x):
            x = np.nextafter(x, dtype(0))
    return x


def extreme_inputs(dtype):
    """Vectors whose length is up to the largest finite value of dtype, and down to subnormal."""
    finfo = np.finfo(dtype)
    values = [largest_with_finite_square(dtype), finfo.tiny, finfo.smallest_subnormal, np.sqrt(finfo.tiny)]
    if dtype == np.float64:
        values += [1e300, 1e-300]
    cases = [np.array([finfo.max, 0, 0], dtype=dtype)]
    for x in map(dtype, values):
        cases.append(np.array([x, 0, 0], dtype=dtype))                       # |s| = x exactly
        cases.append(np.array([x, -x, x, x], dtype=dtype))                   # |s| = 2x
        cases.append(np.array([x * dtype(0.6), x * dtype(0.8)], dtype=dtype))  # |s| about x
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_and_tiny_inputs_stay_finite_and_bounded(dtype):
    # Underflow to 0 is the right answer for tiny s (v = s |s| / (1 + |s|^2)); overflow is not.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for s in extreme_inputs(dtype):
            v = squash_forward(s)
            ds = squash_backward(np.ones_like(s), s)
            assert v.dtype == dtype and np.isfinite(v).all() and np.isfinite(ds).all(), s
            # |v| < 1 exactly, so only rounding of the D products f(n) s_k may push it over 1.
            assert np.linalg.norm(v) <= 1, s
            assert np.linalg.norm(v.astype(np.float64)) <= 1 + np.finfo(dtype).eps, s
            # Direction is kept: v is a non-negative multiple of s.
            assert (np.sign(v) * np.sign(s) >= 0).all(), s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_length_just_under_one_at_the_largest_finite_square(dtype):
    edge = largest_with_finite_square(dtype)
    v = squash_forward(np.array([edge, 0], dtype=dtype))
    assert 1 - 4 * np.finfo(dtype).eps <= v[0] <= 1


def test_bad_input_raises():
    with pytest.raises(ValueError, match="scalar"):
        squash_forward(np.float64(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        squash_forward(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="must match"):
        squash_backward(np.ones((2, 4)), np.ones((2, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_length_that_overflows_the_dtype_still_gives_a_unit_vector_along_s(dtype):
    # |s| = 2 max is not representable, but v = |v| s / |s| only needs the direction.
    big = np.finfo(dtype).max
    s = np.array([big, -big, big, big], dtype=dtype)
    with np.errstate(over="ignore"):
        v = squash_forward(s)
        ds = squash_backward(np.ones_like(s), s)
    assert np.isfinite(v).all() and np.isfinite(ds).all()
    np.testing.assert_allclose(v, np.array([0.5, -0.5, 0.5, 0.5], dtype=dtype), rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("x", [1e-300, 1e-305, np.finfo(np.float64).tiny, 1e-320])
def test_gradient_of_a_tiny_capsule_is_its_first_order_term(x):
    """For |s| -> 0, v = s |s| / (1 + |s|^2) = s |s| + O(|s|^3), so dv/ds = |s| I + s s^T / |s|
    and ds = |s| dv + ((s . dv) / |s|) s: for s = (3x, 4x), dv = (1, 0), ds = (6.8x, 2.4x). Down
    to lengths whose square underflows (SPEC 2: the exact formula, rounded, for every finite
    non-zero s), where a gradient of 0 would freeze the capsule; 1e-320 is subnormal, so only
    its leading digits are exact."""
    s = np.array([3 * x, 4 * x])
    ds = squash_backward(np.array([1.0, 0.0]), s)
    np.testing.assert_allclose(ds, [6.8 * x, 2.4 * x], rtol=1e-12 if x > 1e-308 else 1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_capsule_holding_nan_or_inf_is_all_nan():
    """SPEC 7 on the reference itself (test_ops checks the torch paths, where torch is installed):
    every output of such a capsule is NaN, forward and backward; the other capsules are exact."""
    inf, nan = np.inf, np.nan
    s = np.array([[nan, 1.0, 2.0], [inf, 1.0, 2.0], [-inf, 0.0, 0.0], [inf, -inf, 1.0], [3.0, 4.0, 0.0]])
    v, ds = squash_forward(s), squash_backward(np.ones_like(s), s)
    assert np.isnan(v[:4]).all() and np.isnan(ds[:4]).all()
    np.testing.assert_allclose(v[4], np.array([3.0, 4.0, 0.0]) * 5 / 26, rtol=1e-15)   # |s| = 5
