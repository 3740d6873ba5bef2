"""Capsule lengths, margin loss (Eq. 4) and reconstruction loss: values, gradients, bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton.reference import (
    capsule_length_backward,
    capsule_length_forward,
    margin_loss_backward,
    margin_loss_forward,
    reconstruction_loss_backward,
    reconstruction_loss_forward,
)
from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error

seeds = st.integers(0, 2**32 - 1)


def margin_problem(seed, B=5, J=4, K=None):
    """Lengths [B, J] and labels [B], or [B, K] of K distinct classes (MultiMNIST's K = 2)."""
    rng = np.random.default_rng(seed)
    if K is None:
        labels = rng.integers(0, J, size=B)
    else:
        labels = np.stack([rng.permutation(J)[:K] for _ in range(B)])
    return rng.uniform(0, 1, size=(B, J)), labels


def margin_loss_by_definition(lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
    """Eq. 4 written term by term, one sample and one class at a time; T_k = 1 for every class
    present (SPEC 9: both digits of a MultiMNIST image)."""
    total = 0.0
    for b, row in enumerate(lengths):
        for k, length in enumerate(row):
            if k in np.atleast_1d(labels[b]):
                total += max(0.0, m_plus - length) ** 2
            else:
                total += lambda_ * max(0.0, length - m_minus) ** 2
    return total / len(lengths)


@given(seeds, st.sampled_from([(0.9, 0.1, 0.5), (0.8, 0.3, 1.0)]), st.sampled_from([None, 1, 2, 3]))
def test_margin_loss_matches_equation_4(seed, constants, K):
    lengths, labels = margin_problem(seed, K=K)
    m_plus, m_minus, lambda_ = constants
    loss, _ = margin_loss_forward(lengths, labels, m_plus, m_minus, lambda_)
    assert loss.shape == ()
    assert loss == pytest.approx(margin_loss_by_definition(lengths, labels, m_plus, m_minus, lambda_), rel=1e-13)


def test_margin_loss_is_zero_for_confident_correct_capsules():
    labels = np.array([2, 0])
    lengths = np.full((2, 3), 0.05)
    lengths[np.arange(2), labels] = 0.95
    loss, cache = margin_loss_forward(lengths, labels)
    assert loss == 0
    assert np.array_equal(margin_loss_backward(1.0, cache), np.zeros_like(lengths))


@given(seeds, st.sampled_from([None, 2]))
def test_margin_loss_backward_matches_finite_differences(seed, K):
    lengths, labels = margin_problem(seed, K=K)
    dlengths = margin_loss_backward(0.7, margin_loss_forward(lengths, labels)[1])
    numeric = numerical_gradient(lambda: 0.7 * margin_loss_forward(lengths, labels)[0], lengths)
    assert relative_error(dlengths.ravel(), numeric) <= FD_TOLERANCE


def test_margin_loss_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    lengths, labels = rng.uniform(0, 1, size=(6, 10)), rng.integers(0, 10, size=6)
    lengths_t = torch.tensor(lengths, requires_grad=True)
    T = torch.nn.functional.one_hot(torch.tensor(labels), 10).double()
    per_sample = (T * torch.relu(0.9 - lengths_t) ** 2 + 0.5 * (1 - T) * torch.relu(lengths_t - 0.1) ** 2).sum(1)
    per_sample.mean().backward()
    loss, cache = margin_loss_forward(lengths, labels)
    assert relative_error(loss, per_sample.mean().item()) <= 1e-14
    assert relative_error(margin_loss_backward(1.0, cache), lengths_t.grad.numpy()) <= 1e-14


def test_margin_loss_keeps_float32():
    lengths = np.full((2, 3), 0.5, dtype=np.float32)
    loss, cache = margin_loss_forward(lengths, np.array([0, 1]))
    assert loss.dtype == np.float32 and margin_loss_backward(1.0, cache).dtype == np.float32


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 3]), r"labels must lie in 0\.\.2"),
        (np.array([-1, 0]), r"labels must lie in 0\.\.2"),
        (np.array([0.0, 1.0]), "integer array"),           # a TypeError, as the torch face's
        (np.array([True, False]), "integer array"),
        (np.array([[0, 1]]), r"labels must have shape \[B\]"),
        (np.array([0, 1, 2]), r"labels must have shape \[B\]"),
        (np.array([[0, 1, 2, 0], [0, 1, 2, 1]]), r"1 <= K < 3"),
        (np.array([[0, 1, 2], [2, 0, 1]]), r"1 <= K < 3"),
        (np.zeros((2, 0), dtype=int), r"1 <= K < 3"),
        (np.array([[0, 2], [1, 1]]), "distinct"),
        (np.array([[0, 2], [1, 3]]), r"labels must lie in 0\.\.2"),
    ],
)
def test_margin_loss_rejects_bad_labels(labels, match):
    with pytest.raises(TypeError if match == "integer array" else ValueError, match=match):
        margin_loss_forward(np.full((2, 3), 0.5), labels)


def test_margin_loss_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"\[B, J\]"):
        margin_loss_forward(np.full((2, 3, 1), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        margin_loss_forward(np.zeros((0, 3)), np.zeros(0, dtype=int))
    # As torch's margin_loss refuses them: a negative lambda_ gave a negative loss.
    for name, value in (("lambda_", -1.0), ("m_plus", np.nan), ("m_minus", "0.1"), ("lambda_", True)):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            margin_loss_forward(np.full((2, 3), 0.5), np.array([0, 1]), **{name: value})
    _, cache = margin_loss_forward(np.full((2, 3), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="scalar"):
        margin_loss_backward(np.ones(2), cache)


@given(seeds, st.sampled_from([(4, 9), (4, 2, 9)]))
def test_reconstruction_loss_and_gradient(seed, shape):
    """One reconstruction per sample [B, N], or two [B, K, N] (MultiMNIST: each against its own digit)."""
    rng = np.random.default_rng(seed)
    reconstruction, target = rng.uniform(size=shape), rng.uniform(size=shape)
    loss, cache = reconstruction_loss_forward(reconstruction, target)
    assert loss == pytest.approx(sum(((r - t) ** 2).sum() for r, t in zip(reconstruction, target)) / 4, rel=1e-13)
    numeric = numerical_gradient(lambda: 2.5 * reconstruction_loss_forward(reconstruction, target)[0], reconstruction)
    assert relative_error(reconstruction_loss_backward(2.5, cache).ravel(), numeric) <= FD_TOLERANCE


def test_reconstruction_loss_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    reconstruction, target = rng.uniform(size=(5, 16)), rng.uniform(size=(5, 16))
    r_t = torch.tensor(reconstruction, requires_grad=True)
    expected = torch.nn.functional.mse_loss(r_t, torch.tensor(target), reduction="sum") / 5
    expected.backward()
    loss, cache = reconstruction_loss_forward(reconstruction, target)
    assert relative_error(loss, expected.item()) <= 1e-14
    assert relative_error(reconstruction_loss_backward(1.0, cache), r_t.grad.numpy()) <= 1e-14


def test_reconstruction_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, N\] or \[B, K, N\]"):
        reconstruction_loss_forward(np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="target has shape"):
        reconstruction_loss_forward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"target must be a floating-point array, got dtype uint8"):
        reconstruction_loss_forward(np.full((1, 3), 0.5), np.array([[0, 128, 255]], np.uint8))


@given(seeds)
def test_capsule_length_and_gradient(seed):
    rng = np.random.default_rng(seed)
    v, dlengths = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4))
    lengths, cache = capsule_length_forward(v)
    np.testing.assert_allclose(lengths, np.linalg.norm(v, axis=-1), rtol=1e-14)
    numeric = numerical_gradient(lambda: np.sum(capsule_length_forward(v)[0] * dlengths), v)
    assert relative_error(capsule_length_backward(dlengths, cache).ravel(), numeric) <= FD_TOLERANCE


def test_capsule_length_matches_torch_and_has_zero_gradient_at_zero(rng):
    torch = pytest.importorskip("torch")
    v = rng.normal(size=(2, 5, 16))
    v[0, 3] = 0.0
    dlengths = rng.normal(size=(2, 5))
    lengths, cache = capsule_length_forward(v)
    dv = capsule_length_backward(dlengths, cache)
    assert np.isfinite(dv).all() and np.array_equal(dv[0, 3], np.zeros(16))
    v_t = torch.tensor(v, requires_grad=True)
    v_t.norm(dim=-1).backward(torch.tensor(dlengths))      # torch also takes 0 at v = 0
    assert relative_error(lengths, np.linalg.norm(v, axis=-1)) <= 1e-15
    assert relative_error(dv, v_t.grad.numpy()) <= 1e-14


def test_capsule_length_of_a_tiny_capsule_does_not_underflow():
    lengths, cache = capsule_length_forward(np.array([[3e-200, 4e-200]]))
    assert relative_error(lengths, np.array([5e-200])) <= 1e-15
    assert relative_error(capsule_length_backward(np.ones(1), cache), np.array([[0.6, 0.8]])) <= 1e-15


def test_capsule_length_rejects_bad_input():
    with pytest.raises(ValueError, match="scalar"):
        capsule_length_forward(np.float64(2.0))
    with pytest.raises(ValueError, match="0 dimensions"):
        capsule_length_forward(np.ones((2, 0)))
    _, cache = capsule_length_forward(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="dlengths"):
        capsule_length_backward(np.ones((2, 4)), cache)


@pytest.mark.parametrize("name", ["m_plus", "m_minus", "lambda_"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_margin_loss_refuses_infinite_constants(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        margin_loss_forward(np.full((2, 3), 0.5), np.array([0, 1]), **{name: value})
