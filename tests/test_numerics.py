"""SPEC 8's agreement rule (capsnet_triton.numerics) catches what it must and passes what it must."""

import numpy as np
import pytest
import torch

from capsnet_triton.numerics import (FD_STEP, FD_TOLERANCE, ROUNDING_FACTOR, SPREAD_FACTOR, TOLERANCE, agreement_error,
                                     assert_agrees, input_sensitivity, numerical_gradient, poisoned, relative_error,
                                     rounding_error, sample_indices)

LOW = (torch.float16, torch.bfloat16)


def reference(rng, n=4096):
    return rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))


def test_the_ceilings_and_the_rounding_factor_are_spec_8s():
    assert TOLERANCE == {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
    assert ROUNDING_FACTOR == 3.0
    assert FD_STEP == 1e-6 and FD_TOLERANCE == 1e-6        # "step about 1e-6", "<= 1e-6"


def test_relative_error_is_the_norm_of_the_difference():
    """What every reference test compares with: not a difference of norms, which a permuted or
    negated result keeps; inf for another shape or a NaN; the absolute norm against zero."""
    assert relative_error([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(np.sqrt(8 / 14))
    assert relative_error(-np.ones(4), np.ones(4)) == 2.0
    assert relative_error(np.ones(1), np.ones(5)) == np.inf
    assert relative_error([np.nan, 1.0], [1.0, 1.0]) == np.inf
    assert relative_error([3.0, 4.0], [0.0, 0.0]) == 5.0


def test_sample_indices_are_distinct_and_spread_over_the_array(rng):
    """The entries a finite-difference check samples: not the first ones, which are sample 0's alone."""
    indices = sample_indices((10, 100), rng, 10)
    assert len(set(indices.tolist())) == 10 and 0 <= indices.min() and indices.max() < 1000
    assert indices.max() >= 100
    assert np.array_equal(sample_indices((2, 3), rng, 10), np.arange(6))


def test_half_precision_is_moved_by_float32s_roundoff_as_it_accumulates_in_float32():
    """input_sensitivity for float16 and bfloat16 is float32's: they accumulate in float32 (the
    bfloat16 unit roundoff there made the spread 65,000 times wider)."""
    terms = (np.array([1.0, -1.0 + 1e-6, 0.5]),)

    def total(x):
        return (np.array([x.sum()]),)

    spreads = [input_sensitivity(total, terms, dtype) for dtype in ("float32", "float16", "bfloat16")]
    assert spreads[0] == spreads[1] == spreads[2] and spreads[0][0] < 1e-6


def test_the_rules_follow_the_output_dtype_where_it_differs_from_the_input():
    """An output kept in float32 from bfloat16 inputs (the kernels' s and couplings) is held to the
    bfloat16 ceiling but not to bfloat16's rounding rule; one in bfloat16 is."""
    ref = np.linspace(1.0, 2.0, 64)
    assert agreement_error(ref * (1 + 1e-3), ref, "bfloat16", output_dtype="float32") is None
    assert agreement_error(ref * (1 + 1e-3), ref, "float32", output_dtype="float32") is not None
    assert_agrees(torch.tensor(ref * (1 + 1e-2), dtype=torch.float32), ref, torch.bfloat16, "float32 output")
    with pytest.raises(AssertionError, match="rounding"):
        assert_agrees(torch.tensor(ref * (1 + 1e-2), dtype=torch.bfloat16), ref, torch.bfloat16, "bfloat16 output")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_full_precision_error_passes_under_its_ceiling_and_fails_over_it(dtype):
    ceiling = TOLERANCE[dtype]
    ref = np.linspace(1.0, 2.0, 64)
    assert agreement_error(ref * (1 + 0.5 * ceiling), ref, dtype) is None
    assert "ceiling" in agreement_error(ref * (1 + 1.5 * ceiling), ref, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_correctly_rounded_output_passes(rng, dtype):
    ref = reference(rng)
    assert agreement_error(torch.from_numpy(ref).to(dtype).double().numpy(), ref, dtype) is None


@pytest.mark.parametrize("dtype, bug", [(torch.float16, 0.003), (torch.bfloat16, 0.01)], ids=str)
def test_a_systematic_bug_within_the_ceiling_fails(rng, dtype, bug):
    ref = reference(rng)
    buggy = torch.from_numpy(ref * (1 + bug)).to(dtype).double().numpy()
    assert relative_error(buggy, ref) < TOLERANCE[str(dtype).removeprefix("torch.")]
    assert "rounding" in agreement_error(buggy, ref, dtype)


def truncated(values):
    """float64 values converted to bfloat16 as Triton's interpreter does: float32, then truncated."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float64)


# float16 at 0.1% is ~5x the error of rounding; bfloat16 at 0.5% only ~3.2x, so it is checked on
# a large output, where the ratio no longer scatters around 3 (at 64 elements it does).
@pytest.mark.parametrize("dtype, bias, n", [(torch.float16, 1e-3, 64), (torch.float16, -1e-3, 64),
                                            (torch.bfloat16, 1e-2, 64), (torch.bfloat16, -1e-2, 64),
                                            (torch.bfloat16, 5e-3, 4096), (torch.bfloat16, -5e-3, 4096)], ids=str)
def test_a_small_systematic_bias_fails_rounded_or_truncated(rng, dtype, bias, n):
    ref = rng.standard_normal(n)
    assert "rounding" in agreement_error(torch.from_numpy(ref * (1 + bias)).to(dtype).double().numpy(), ref, dtype)
    if dtype == torch.bfloat16:
        assert "truncation" in agreement_error(truncated(ref * (1 + bias)), ref, dtype, conversion="truncate")


@pytest.mark.parametrize("n", range(1, 11))
def test_correct_conversions_of_small_outputs_pass(rng, n):
    """A kernel's float32 result (the reference off by a few float32 roundings) rounded to float16
    or bfloat16, or truncated to bfloat16 as Triton's interpreter does, passes at any size."""
    for _ in range(300):
        ref = reference(rng, n)
        computed = ref * (1 + 2.0 ** -20 * rng.standard_normal(n))
        for dtype in (torch.float16, torch.bfloat16):
            rounded = torch.from_numpy(computed).to(dtype).double().numpy()
            assert agreement_error(rounded, ref, dtype) is None
        assert agreement_error(truncated(computed), ref, torch.bfloat16, conversion="truncate") is None


def test_a_single_element_is_held_to_3x_its_rounding_error():
    ref = np.array([1.0 + 2.0 ** -7 + 2.0 ** -12])         # near the bfloat16 number 1 + 2^-7
    assert rounding_error(ref, "bfloat16") == 2.0 ** -12
    assert agreement_error(np.array([1.0 + 2.0 ** -7]), ref, "bfloat16") is None
    assert agreement_error(np.array([1.0 + 2.0 ** -6]), ref, "bfloat16") is not None     # one ulp off: 31x


def test_truncation_is_allowed_only_where_the_conversion_says_so():
    below = np.array([1.5 - 2.0 ** -12])                   # truncates one ulp (2^-7) down, to 1.5 - 2^-7
    assert rounding_error(below, "bfloat16", "truncate") == 2.0 ** -7 - 2.0 ** -12
    assert agreement_error(truncated(below), below, "bfloat16") is not None
    assert agreement_error(truncated(below), below, "bfloat16", conversion="truncate") is None
    # A float32 result a hair under 1.5, where the reference is a hair over, truncates a whole ulp
    # below the reference's own truncation: allowed once, not twice, and not where the reference
    # lies farther above 1.5 than a few float32 roundings could move it.
    for hair, allowed in ((2.0 ** -20, True), (2.0 ** -12, False)):
        above = np.array([1.5 + hair])
        assert (agreement_error(np.array([1.5 - 2.0 ** -7]), above, "bfloat16", conversion="truncate") is None) == allowed
        assert agreement_error(np.array([1.5 - 2.0 ** -6]), above, "bfloat16", conversion="truncate") is not None
    # Nor can a bias hide behind the largest element's ulp (64 normal values and 16.251, 1% off).
    ref = np.append(np.random.default_rng(3).standard_normal(64), 16.251)
    assert "truncation" in agreement_error(truncated(ref * 1.01), ref, "bfloat16", conversion="truncate")
    # float16 is rounded by every backend; an unknown conversion is refused.
    for conversion in ("nearest", "truncate"):                # float16 rounding error 2^-12; 2 ulps off
        assert "rounding" in agreement_error(np.array([1.0 + 2.0 ** -9]), np.array([1.0 + 2.0 ** -12]), "float16",
                                             conversion=conversion)
    with pytest.raises(ValueError, match="conversion"):
        agreement_error(below, below, "bfloat16", conversion="round")


def test_nan_passes_only_where_the_reference_has_nan():
    ref = np.array([1.0, np.nan, 2.0])
    assert agreement_error(np.array([1.0, np.nan, 2.0]), ref, "float32") is None
    assert agreement_error(np.array([1.0, 5.0, 2.0]), ref, "float32") is not None
    assert agreement_error(np.array([np.nan, np.nan, 2.0]), ref, "float32") is not None
    assert agreement_error(np.array([np.inf, 1.0]), np.array([1.0, 1.0]), "float32") is not None


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_inf_passes_only_where_the_reference_has_inf_of_that_sign(dtype):
    """An error measured over an infinite reference value is inf or NaN, which passed any output."""
    ref = np.array([-np.inf, 1.0, 2.0])
    assert agreement_error(ref.copy(), ref, dtype) is None
    for wrong in ([7.0, -3.0, 9.0], [-np.inf, -3.0, 9.0], [np.inf, 1.0, 2.0], [1.0, 1.0, 2.0], [-np.inf, np.inf, 2.0]):
        assert agreement_error(np.array(wrong), ref, dtype) is not None, wrong


def test_zero_reference_needs_exact_zero_and_underflow_has_a_floor():
    assert agreement_error(np.zeros(3), np.zeros(3), "float64") is None
    assert agreement_error(np.array([0.0, 1e-300, 0.0]), np.zeros(3), "float64") is not None
    tiny = np.full(4, 1e-42)                                # below float32's smallest normal number
    assert agreement_error(np.zeros(4), tiny, "float32") is None
    assert agreement_error(np.zeros(4), np.full(4, 1e-30), "float32") is not None


def test_assert_agrees_names_the_output_and_takes_tensors():
    ref = np.linspace(1, 2, 10)
    assert_agrees(torch.tensor(ref, dtype=torch.float32), ref, torch.float32, "v")
    with pytest.raises(AssertionError, match="^v: relative error"):
        assert_agrees(torch.tensor(ref * 1.001, dtype=torch.float32), ref, torch.float32, "v")
    with pytest.raises(AssertionError, match="shape"):
        assert_agrees(torch.tensor(ref[:3]), ref, torch.float64, "v")


def test_numerical_gradient_of_a_cubic(rng):
    x = rng.standard_normal(5)
    assert relative_error(numerical_gradient(lambda: np.sum(x ** 3), x), 3 * x ** 2) <= 1e-8


def test_spread_measures_ill_conditioning_and_widens_only_by_it():
    terms = np.array([1.0, -1.0 + 1e-9])                  # a sum that cancels to 1e-9

    def total(x):
        return (np.array([x.sum()]),)

    (spread,) = input_sensitivity(total, (terms,), "float32")
    assert 1e-9 < spread < 2 * 2.0 ** -24                # ~eps32 against a result of 1e-9
    exact = np.array([1e-9])
    off = exact + 3 * spread
    assert agreement_error(off, exact, "float32") is not None
    assert agreement_error(off, exact, "float32", spread=spread) is None
    assert SPREAD_FACTOR == 4.0
    assert agreement_error(exact + 3.9 * spread, exact, "float32", spread=spread) is None
    assert agreement_error(exact + 5 * spread, exact, "float32", spread=spread) is not None
    (calm,) = input_sensitivity(total, (np.array([1.0, 2.0]),), "float32")
    assert calm / 3.0 < 0.01 * TOLERANCE["float32"]       # relative to the sum 3: changes nothing


def test_spread_counts_the_rounding_of_intermediates_that_moving_the_inputs_misses():
    """(x0 + x1) - x1 is x0 exactly, and moving x1 moves both of its terms alike; evaluated in
    float32 the intermediate x0 + x1 rounds x0 = 1e-9 away entirely."""

    def cancelled(x):
        return (np.array([(x[0] + x[1]) - x[1]]),)

    x = np.array([1e-9, 1.0])
    (spread,) = input_sensitivity(cancelled, (x,), "float32")
    assert spread >= 0.99e-9
    (exact,) = input_sensitivity(cancelled, (x,), "float64")
    assert exact < 1e-15                                    # float64: its own rounding only


def test_poisoned_buffers_are_all_nan_so_an_unwritten_zero_fails():
    """Every kernel test writes into poisoned outputs: an element a kernel leaves unwritten must
    fail, even where the right value is exactly 0 (a buffer that merely came from torch.empty may
    hold zeros)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        buffer = poisoned((3, 4), dtype)
        assert buffer.dtype == dtype and torch.isnan(buffer).all()
        with pytest.raises(AssertionError):
            assert_agrees(buffer, np.zeros((3, 4)), dtype, "unwritten")


def test_bfloat16_rounding_is_torchs_ties_to_even():
    """The helper behind rounding_error rounds as torch converts float32 to bfloat16: ties (half an
    ulp above 1 + k ulp) to the even neighbour, the rest to nearest."""
    from capsnet_triton.numerics import _round_to
    values = np.concatenate([[1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 3 + 2.0 ** -7],
                             np.random.default_rng(0).normal(size=100)])
    expected = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(_round_to(values, "bfloat16"), expected)
