"""Routing by agreement (Procedure 1): gradients against finite differences and torch autograd
for both gradient policies, the properties the paper's procedure must have, and SPEC 7's policy
for non-finite and empty input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error, sample_indices
from capsnet_triton.reference import routing_backward, routing_forward, squash_backward, squash_forward


@st.composite
def routing_problems(draw):
    """u_hat [B, I, J, D] (B <= 3, I <= 12, J <= 6, D <= 5), r in 1..4, an optional bias, dv."""
    B, I, J, D = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    iterations = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([0.05, 0.5, 2.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u_hat = rng.normal(size=(B, I, J, D)) * scale
    bias = rng.normal(size=(J, D)) * scale if draw(st.booleans()) else None
    dv = rng.normal(size=(B, J, D))
    return u_hat, iterations, bias, dv, rng


def projected_loss(u_hat, iterations, bias, dv):
    v, _ = routing_forward(u_hat, iterations, bias=bias)
    return np.sum(v * dv)


def analytic_gradients(u_hat, iterations, bias, dv, gradient="full"):
    """(du_hat, dbias or None) from the reference backward."""
    _, cache = routing_forward(u_hat, iterations, bias=bias, gradient=gradient)
    grads = routing_backward(dv, cache)
    return grads if bias is not None else (grads, None)


@given(routing_problems())
def test_backward_matches_finite_differences(problem):
    u_hat, iterations, bias, dv, rng = problem
    du_hat, dbias = analytic_gradients(u_hat, iterations, bias, dv)
    indices = sample_indices(u_hat.shape, rng, 60)
    numeric = numerical_gradient(lambda: projected_loss(u_hat, iterations, bias, dv), u_hat, indices)
    assert relative_error(du_hat.ravel()[indices], numeric) <= FD_TOLERANCE
    if bias is not None:
        numeric_bias = numerical_gradient(lambda: projected_loss(u_hat, iterations, bias, dv), bias)
        assert relative_error(dbias.ravel(), numeric_bias) <= FD_TOLERANCE


@pytest.mark.parametrize("gradient", ["full", "last"])
@given(problem=routing_problems())
def test_matches_torch_autograd(problem, gradient):
    """Autograd through Procedure 1's literal loop, u_hat and bias detached in iterations 1..r-1
    under "last", is the exact gradient of each policy in float64."""
    torch = pytest.importorskip("torch")
    from capsnet_triton.baselines import routing
    u_hat, iterations, bias, dv, _ = problem
    u_hat_t = torch.tensor(u_hat, requires_grad=True)
    bias_t = None if bias is None else torch.tensor(bias, requires_grad=True)
    v_t = routing(u_hat_t, iterations, bias=bias_t, gradient=gradient)
    v_t.backward(torch.tensor(dv))

    v, _ = routing_forward(u_hat, iterations, bias=bias, gradient=gradient)
    du_hat, dbias = analytic_gradients(u_hat, iterations, bias, dv, gradient)
    assert relative_error(v, v_t.detach().numpy()) <= 1e-12
    assert relative_error(du_hat, u_hat_t.grad.numpy()) <= 1e-12
    if bias is not None:
        assert relative_error(dbias, bias_t.grad.numpy()) <= 1e-12


def test_policies_differ_only_from_the_second_iteration(rng):
    u_hat, dv = rng.normal(size=(2, 7, 4, 3)), rng.normal(size=(2, 4, 3))
    full = analytic_gradients(u_hat, 1, None, dv, "full")[0]
    assert np.array_equal(full, analytic_gradients(u_hat, 1, None, dv, "last")[0])
    full = analytic_gradients(u_hat, 3, None, dv, "full")[0]
    assert relative_error(analytic_gradients(u_hat, 3, None, dv, "last")[0], full) > 1e-3


def test_last_policy_is_the_last_iterations_coupling_times_its_ds(rng):
    """"last": c^(r) is a constant, so du_hat = c^(r) ds^(r) and dbias = sum_b ds^(r)."""
    u_hat, bias, dv = rng.normal(size=(2, 7, 4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4, 3))
    _, cache = routing_forward(u_hat, 3, bias=bias, gradient="last")
    du_hat, dbias = routing_backward(dv, cache)
    ds = squash_backward(dv, cache["s_all"][-1])
    assert relative_error(du_hat, cache["couplings"][-1][..., None] * ds[:, None]) <= 1e-15
    assert relative_error(dbias, ds.sum(axis=0)) <= 1e-15


@given(routing_problems())
def test_couplings_sum_to_one_over_parents_and_outputs_are_shorter_than_one(problem):
    u_hat, iterations, bias, _, _ = problem
    v, cache = routing_forward(u_hat, iterations, bias=bias)
    assert len(cache["couplings"]) == iterations
    for c in cache["couplings"]:
        assert c.shape == u_hat.shape[:3] and (c >= 0).all()
        np.testing.assert_allclose(c.sum(axis=2), 1.0, rtol=0, atol=1e-12)
    assert (np.linalg.norm(v, axis=-1) < 1).all()


@given(routing_problems())
def test_one_iteration_is_squash_of_the_uniformly_coupled_sum(problem):
    # r = 1: c = 1/J for every (i, j), so s_j = sum_i u_hat_ij / J (a mean over i only when I = J).
    u_hat, _, bias, _, _ = problem
    J = u_hat.shape[2]
    s = u_hat.sum(axis=1) / J + (0 if bias is None else bias)
    v, _ = routing_forward(u_hat, 1, bias=bias)
    assert relative_error(v, squash_forward(s)) <= 1e-12


@given(routing_problems())
def test_logits_start_at_zero_for_every_sample(problem):
    # Routing a batch must equal routing each sample alone, forward and backward.
    u_hat, iterations, bias, dv, _ = problem
    v, cache = routing_forward(u_hat, iterations, bias=bias)
    du_hat = routing_backward(dv, cache)
    du_hat = du_hat[0] if bias is not None else du_hat
    for b in range(u_hat.shape[0]):
        v_b, cache_b = routing_forward(u_hat[b:b + 1], iterations, bias=bias)
        du_b = routing_backward(dv[b:b + 1], cache_b)
        du_b = du_b[0] if bias is not None else du_b
        assert relative_error(v[b], v_b[0]) <= 1e-14
        assert relative_error(du_hat[b], du_b[0]) <= 1e-14


def test_agreement_moves_coupling_towards_the_agreeing_parent():
    # Two parents; every input predicts the same vector for parent 0 and scattered ones for
    # parent 1, so routing must couple more strongly to parent 0 with each iteration.
    rng = np.random.default_rng(7)
    I, D = 8, 4
    u_hat = np.empty((1, I, 2, D))
    u_hat[0, :, 0] = np.array([1.0, 0.5, 0.0, 0.0])
    u_hat[0, :, 1] = rng.normal(size=(I, D))
    _, cache = routing_forward(u_hat, 4)
    coupling_to_agreeing = [c[0, :, 0].mean() for c in cache["couplings"]]
    assert coupling_to_agreeing[0] == pytest.approx(0.5)
    assert all(later > earlier for earlier, later in zip(coupling_to_agreeing, coupling_to_agreeing[1:]))


def test_bad_input_raises(rng):
    with pytest.raises(ValueError, match="4 axes"):
        routing_forward(rng.normal(size=(2, 3, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        routing_forward(np.ones((1, 2, 3, 4), dtype=np.int32))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="iterations"):
            routing_forward(rng.normal(size=(1, 2, 3, 4)), bad)
    with pytest.raises(ValueError, match="bias"):
        routing_forward(rng.normal(size=(1, 2, 3, 4)), bias=np.zeros((4, 3)))
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        routing_forward(rng.normal(size=(1, 2, 3, 4)), bias=np.zeros((3, 4), dtype=np.int64))
    # A bias of another float dtype is added in u_hat's: v keeps u_hat's dtype.
    assert routing_forward(np.ones((1, 2, 3, 4), np.float32), bias=np.ones((3, 4)))[0].dtype == np.float32
    for bad in (True, False, "stop", None):
        with pytest.raises(ValueError, match=r"gradient must be one of \('full', 'last'\)"):
            routing_forward(rng.normal(size=(1, 2, 3, 4)), gradient=bad)
    for shape in ((1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)):
        with pytest.raises(ValueError, match="at least one input capsule, parent and dimension"):
            routing_forward(np.ones(shape))
    _, cache = routing_forward(rng.normal(size=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="dv"):
        routing_backward(np.zeros((1, 3, 5)), cache)


# NumPy warns of the NaN this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_sample_gives_nan_in_all_of_its_outputs(bad, iterations, gradient, rng):
    """SPEC 7: NaN in every v (and gradient) of the sample that holds the NaN or inf, even where
    one iteration would reach only one parent; the other samples are routed as if alone."""
    u_hat, bias, dv = rng.normal(size=(3, 6, 4, 5)), rng.normal(size=(4, 5)), rng.normal(size=(3, 4, 5))
    u_hat[1, 2, 3, 4] = bad
    v, cache = routing_forward(u_hat, iterations, bias=bias, gradient=gradient)
    du_hat, dbias = routing_backward(dv, cache)
    assert np.isnan(v[1]).all() and np.isnan(du_hat[1]).all() and np.isnan(dbias).all()
    for b in (0, 2):
        v_b, cache_b = routing_forward(u_hat[b:b + 1], iterations, bias=bias, gradient=gradient)
        du_b, _ = routing_backward(dv[b:b + 1], cache_b)
        assert np.array_equal(v[b], v_b[0]) and np.array_equal(du_hat[b], du_b[0])


@pytest.mark.parametrize("gradient", ["full", "last"])
def test_an_empty_batch_gives_empty_results(gradient):
    v, cache = routing_forward(np.ones((0, 5, 3, 4)), 3, bias=np.ones((3, 4)), gradient=gradient)
    du_hat, dbias = routing_backward(np.ones((0, 3, 4)), cache)
    assert v.shape == (0, 3, 4) and du_hat.shape == (0, 5, 3, 4)
    assert np.array_equal(dbias, np.zeros((3, 4)))


@pytest.mark.parametrize("dtype, scale", [(np.float64, 1000.0), (np.float32, 100.0)])
def test_softmax_survives_agreement_logits_beyond_exp_overflow(dtype, scale):
    """Every input predicts (scale, 0, 0) for parent 0 and 0 for parent 1. Iteration 1 (c = 1/2)
    gives v_0 ~ e_0, so b_i0 = scale, past where exp overflows (709 in float64, 88 in float32):
    only a softmax taken after subtracting the largest logit stays finite. Then c_i0 = 1 /
    (1 + e^-scale) = 1, s_0 = 4 scale e_0, and parent 1 gets nothing."""
    u_hat = np.zeros((1, 4, 2, 3), dtype=dtype)
    u_hat[0, :, 0, 0] = scale
    v, cache = routing_forward(u_hat, 3)
    n = 4 * scale
    np.testing.assert_allclose(v[0, 0], [n * n / (1 + n * n), 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(v[0, 1], np.zeros(3, dtype))
    np.testing.assert_allclose(cache["couplings"][-1][0, :, 0], 1.0, rtol=0, atol=1e-6)
