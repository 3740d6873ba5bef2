"""What "agree" means (SPEC section 8): the one place the project's numerical rules are written.

Every comparison against the float64 reference, in the tests and in bench's correctness gate,
goes through this module:

- relative error ||out - ref|| / ||ref|| within a ceiling per dtype: float64 1e-12, float32
  1e-5, float16 5e-3, bfloat16 3e-2 (inputs rounded to the low-precision dtype first);
- for float16 and bfloat16 outputs also the flash-attention rule: the error at most 3x the
  error of the reference simply rounded to that dtype, because the ceilings above are far
  looser than the real error and would let a systematic 1% bug pass. Nothing is added per
  element: rounding to nearest needs nothing more, since a kernel's float32 error moves an
  element across a midpoint only where both neighbours are half an ulp away (a floor of one
  ulp per element, about 3.5x the rms error of rounding, let a 0.5% bfloat16 bias pass). At 3x,
  0.1% in float16 (about 5x the rounding error) fails clearly, 1% in bfloat16 (6x) too; 0.5% in
  bfloat16 is about 3.2x, so it fails on large outputs only, as narrowly as SPEC 8's 3 allows;
- Triton's interpreter converts float32 to bfloat16 by truncation (toward zero), not rounding;
  a test of interpreted kernels passes conversion="truncate", and the rule above then applies to
  the output less the known difference of the two conversions, trunc(ref) - round(ref) (0 or
  one ulp per element). Truncation jumps a whole ulp where the kernel's float32 value and the
  reference lie on either side of a bfloat16 number, so one ulp more is allowed for each element
  whose reference lies within STRADDLE |ref| (2^-16 |ref|, a few float32 roundings) of a
  bfloat16 number, about 1 element in 180 of normal values, and for no other: a bias fails
  nearly as under rounding;
- an underflow floor of one smallest normal number of the output dtype per element, since
  values below it come back flushed to zero or as subnormals, which no format holds to any
  relative tolerance;
- NaN never passes, except at exactly the places where the reference has NaN (SPEC 7's NaN
  policy: non-finite input propagates); an infinite value passes only where the reference has
  the same infinity;
- a float64 backward agrees with central finite differences (step 1e-6) to 1e-6;
- where the function itself is ill-conditioned at the drawn input (a sum over i that cancels,
  a saturated softmax), no evaluation in the compute precision can meet a ceiling: a test may
  then pass `spread`, how far the float64 reference moves when its inputs move by one rounding
  error of the compute precision or when it is itself evaluated in that precision
  (`input_sensitivity`), and the error may exceed the ceiling by at most SPREAD_FACTOR times
  that. On a well-conditioned input the spread is far below the ceiling and changes nothing.

NumPy only, so that the reference's tests run where torch is not installed; the helpers that
take torch tensors import torch when called.
"""

import numpy as np

__all__ = [
    "TOLERANCE", "ROUNDING_FACTOR", "CONVERSIONS", "FD_STEP", "FD_TOLERANCE", "relative_error", "rounding_error",
    "agreement_error", "input_sensitivity", "assert_agrees", "as_float64", "poisoned", "sample_indices",
    "numerical_gradient", "dtype_name",
]

# Ceilings of the relative error by the name of the input dtype ("float32", "bfloat16", ...).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
ROUNDING_FACTOR = 3.0          # low precision: error <= 3 x the error of rounding the reference
SPREAD_FACTOR = 4.0            # ill-conditioned input: error <= ceiling + 4 x the reference's spread
# Unit roundoff of the precision a dtype is computed in: half precision accumulates in float32.
COMPUTE_EPS = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -24, "bfloat16": 2.0 ** -24}
LOW_PRECISION = ("float16", "bfloat16")
# How a backend converts float32 to bfloat16: rounding to nearest even (torch, compiled Triton),
# or truncation toward zero (Triton's interpreter). float16 is rounded to nearest by every backend.
CONVERSIONS = ("nearest", "truncate")
# How close, relative to |ref|, a reference may lie to a bfloat16 number for a kernel's float32
# value (a few float32 roundings off) to fall on its other side: see _straddle_slack.
STRADDLE = 2.0 ** -16
FD_STEP = 1e-6
FD_TOLERANCE = 1e-6

# The smallest normal number of each output dtype: the underflow floor per element.
_TINY = {"float64": np.finfo(np.float64).tiny, "float32": np.finfo(np.float32).tiny,
         "float16": np.finfo(np.float16).tiny, "bfloat16": 2.0 ** -126}


def dtype_name(dtype):
    """"float32" for torch.float32, np.float32 or "float32"."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")
    else:
        name = np.dtype(dtype).name
    return name if name == "bfloat16" else np.dtype(name).name


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| (||actual|| where expected is all zero); inf when the
    shapes differ or anything is NaN or inf."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not (np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))):
        return np.inf
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def _round_to(values, dtype, conversion="nearest"):
    """float64 values as dtype holds them, back in float64 (bfloat16: the top 16 bits of float32,
    rounded to nearest even as torch does, or truncated toward zero under conversion="truncate")."""
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        if conversion == "nearest":
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = bits >> 16 << 16
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


def _bfloat16_ulp(values):
    """The spacing of bfloat16's numbers at each |value| (float32's exponent, 8 bits)."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(values), 2.0 ** -126))) - 7)


def _straddle_slack(expected, truncated):
    """One bfloat16 ulp for each element whose reference lies within STRADDLE |ref| of a bfloat16
    number (`truncated` is the reference truncated to bfloat16): there a kernel's float32 value
    may fall on the other side of that number and truncate one ulp away from the reference's
    own truncation. Nothing for the other elements, so a bias cannot hide behind it."""
    ulp, reach = _bfloat16_ulp(expected), STRADDLE * np.abs(expected)
    above = np.abs(expected) - np.abs(truncated)                    # in [0, ulp)
    return float(np.linalg.norm(ulp[(above <= reach) | (ulp - above <= reach)]))


def _check_conversion(conversion):
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, not {conversion!r}")


def rounding_error(expected, dtype, conversion="nearest"):
    """||convert(expected, dtype) - expected||: the error of a perfect kernel with dtype output
    whose backend converts float32 to bfloat16 as `conversion` says (see CONVERSIONS)."""
    _check_conversion(conversion)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(_round_to(expected, dtype_name(dtype), conversion) - expected))


def input_sensitivity(function, inputs, dtype, seed=0, trials=3):
    """How far each float64 output of function(*inputs) moves under the rounding of dtype's
    compute precision: the largest ||out(moved) - out||, one per output, over a few random
    draws that scale every input array elementwise by (1 + e), |e| up to the unit roundoff, and
    over function evaluated on its inputs in the compute precision itself (float32 for every
    dtype but float64), which rounds every intermediate as a kernel does. Moving the inputs alone
    misses what a function amplifies of its intermediates' rounding: at a saturated softmax
    the logits are hundreds, and their rounding, not the inputs', moves the couplings.
    None inputs and outputs pass through (spread 0)."""
    rng = np.random.default_rng(seed)
    name = dtype_name(dtype)
    eps = COMPUTE_EPS[name]
    compute = np.float64 if name == "float64" else np.float32
    base = function(*inputs)
    draws = [[None if x is None else x * (1 + eps * rng.uniform(-1, 1, np.shape(x))) for x in inputs]
             for _ in range(trials)]
    draws.append([None if x is None else np.asarray(x).astype(compute) for x in inputs])
    spread = [0.0] * len(base)
    for moved in draws:
        for k, (out, start) in enumerate(zip(function(*moved), base)):
            if start is not None:
                spread[k] = max(spread[k], float(np.linalg.norm(np.subtract(out, start, dtype=np.float64))))
    return spread


def agreement_error(actual, expected, input_dtype, output_dtype=None, spread=0.0, conversion="nearest"):
    """None when actual agrees with the float64 reference `expected` under SPEC 8, else a message.

    input_dtype names the tolerance (the dtype the inputs were rounded to); output_dtype (default
    the input dtype) sets the underflow floor and, for float16/bfloat16, the rounding rule;
    spread (see input_sensitivity) widens both by SPREAD_FACTOR x spread; conversion says how the
    backend that computed `actual` converts float32 to bfloat16 (CONVERSIONS: "truncate" for
    Triton's interpreter); it changes nothing for other output dtypes.
    """
    _check_conversion(conversion)
    input_dtype = dtype_name(input_dtype)
    output_dtype = input_dtype if output_dtype is None else dtype_name(output_dtype)
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    expected_nan = np.isnan(expected)
    if not np.array_equal(np.isnan(actual), expected_nan):
        return (f"NaN at {np.count_nonzero(np.isnan(actual))} places, the reference at "
                f"{np.count_nonzero(expected_nan)} (or at other places)")
    # An infinite reference value is matched exactly, sign included; an error measured over it
    # would be inf or NaN, which no comparison below fails, so any output would pass.
    expected_inf = np.isinf(expected)
    if not np.array_equal(np.isinf(actual), expected_inf) or np.any(actual[expected_inf] != expected[expected_inf]):
        return (f"infinite at {np.count_nonzero(np.isinf(actual))} places, the reference at "
                f"{np.count_nonzero(expected_inf)} (or at other places, or of the other sign)")
    finite = ~(expected_nan | expected_inf)
    actual, expected = actual[finite], expected[finite]
    if not np.any(expected):
        return None if not np.any(actual) else f"the reference is all zero, max |out| is {np.abs(actual).max():.3e}"
    error = np.linalg.norm(actual - expected)
    floor = np.sqrt(expected.size) * _TINY[output_dtype] + SPREAD_FACTOR * spread
    allowed = TOLERANCE[input_dtype] * np.linalg.norm(expected) + floor
    if error > allowed:
        return (f"relative error {error / np.linalg.norm(expected):.3e} over the {input_dtype} "
                f"ceiling {TOLERANCE[input_dtype]:.0e}")
    if output_dtype in LOW_PRECISION:
        rounded = _round_to(expected, output_dtype)
        rounding = float(np.linalg.norm(rounded - expected))
        slack, truncating = 0.0, output_dtype == "bfloat16" and conversion == "truncate"
        if truncating:
            # What rounding would have given, and one ulp for each element whose float32 value
            # may truncate across a bfloat16 number (see the module docstring).
            truncated = _round_to(expected, output_dtype, conversion)
            error = np.linalg.norm(actual - expected - (truncated - rounded))
            slack = _straddle_slack(expected, truncated)
        if error > ROUNDING_FACTOR * rounding + slack + floor:
            return (f"error {error:.3e} is {error / max(rounding, floor):.2f}x the error of rounding the "
                    f"reference to {output_dtype} ({rounding:.3e}); at most {ROUNDING_FACTOR:g}x"
                    + (f" (after truncation, plus {slack:.3e} for values near a bfloat16 number)"
                       if truncating else ""))
    return None


def as_float64(x):
    """A tensor's (or array's) values as a float64 NumPy array."""
    if hasattr(x, "detach"):
        import torch
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_agrees(out, ref, input_dtype, name, output_dtype=None, spread=0.0, conversion="nearest"):
    """Assert SPEC 8's agreement of `out` (a tensor or array) with the float64 reference `ref`.

    output_dtype defaults to out's own dtype (a tensor's) or the input dtype (an array's);
    conversion is how out's backend converts float32 to bfloat16 (see agreement_error).
    """
    if output_dtype is None:
        output_dtype = out.dtype if hasattr(out, "detach") else input_dtype
    message = agreement_error(as_float64(out), ref, input_dtype, output_dtype, spread, conversion)
    assert message is None, f"{name}: {message}"


def poisoned(shape, dtype, device="cpu", value=float("nan")):
    """A tensor full of NaN: an output buffer whose unwritten elements fail assert_agrees. Where
    the expected output is itself NaN (SPEC 7's policy), pass a finite `value` instead."""
    import torch
    return torch.full(shape, value, dtype=dtype, device=device)


def sample_indices(shape, rng, count):
    """Up to `count` distinct flat indices into an array of `shape` (all of them if fewer): where
    a finite-difference check samples a large gradient."""
    size = int(np.prod(shape))
    if size <= count:
        return np.arange(size)
    return rng.choice(size, size=count, replace=False)


def numerical_gradient(loss, x, indices=None, step=FD_STEP):
    """Central differences of the scalar loss() w.r.t. the float64 array x at flat `indices`.

    x is perturbed in place and restored, so loss() must read x. Returns the gradient entries
    in the order of `indices` (all entries when None). The difference is taken in the loss's own
    precision (a long double x gives long double losses), then stored as float64.
    """
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x), "x must be contiguous so that perturbing the view moves x"
    indices = np.arange(flat.size) if indices is None else np.asarray(indices)
    grad = np.empty(len(indices))
    for n, k in enumerate(indices):
        original = flat[k]
        flat[k] = original + step
        plus = loss()
        flat[k] = original - step
        minus = loss()
        flat[k] = original
        grad[n] = (plus - minus) / (2 * step)
    return grad
