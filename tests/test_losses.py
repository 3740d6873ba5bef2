"""The torch losses (capsnet_triton.losses) against the NumPy reference and by hand."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from capsnet_triton import margin_loss
from capsnet_triton.losses import LossTerms, capsnet_loss, reconstruction_loss
from capsnet_triton.model import CapsNetOutput
from capsnet_triton.numerics import assert_agrees
from capsnet_triton.reference import margin_loss_backward, margin_loss_forward
from capsnet_triton.reference.losses import reconstruction_loss_backward, reconstruction_loss_forward




@st.composite
def lengths_and_labels(draw):
    """Lengths [B, J] and labels [B], or [B, K] of K distinct classes (MultiMNIST, SPEC 9)."""
    batch = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 10))
    present = draw(st.one_of(st.none(), st.integers(1, max(1, classes - 1))))   # K < J, or None for [B]
    present = present if classes > 1 else None
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Lengths in [0, 1.2) cover both sides of m- = 0.1 and m+ = 0.9, so every branch of max(0, .) is hit.
    lengths = rng.uniform(0.0, 1.2, size=(batch, classes))
    if present is None:
        labels = rng.integers(0, classes, size=batch)
    else:
        labels = np.stack([rng.permutation(classes)[:present] for _ in range(batch)])
    return lengths, labels


@given(lengths_and_labels(), st.sampled_from([(0.9, 0.1, 0.5), (0.8, 0.2, 1.0)]))
def test_margin_loss_matches_reference(data, constants):
    lengths, labels = data
    m_plus, m_minus, lambda_ = constants
    ref_loss, cache = margin_loss_forward(lengths, labels, m_plus, m_minus, lambda_)
    ref_grad = margin_loss_backward(1.0, cache)

    lengths_t = torch.tensor(lengths, requires_grad=True)
    loss = margin_loss(lengths_t, torch.from_numpy(labels), m_plus=m_plus, m_minus=m_minus, lambda_=lambda_)
    loss.backward()

    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert_agrees(loss, ref_loss, torch.float64, "margin loss")
    assert_agrees(lengths_t.grad, ref_grad, torch.float64, "its gradient")


def test_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.30, 0.05],
                            [0.05, 0.50, 0.80]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # Sample 0: present 0.95 >= m+ -> 0; absent 0.30 -> 0.5 * 0.2^2 = 0.02; absent 0.05 <= m- -> 0.
    # Sample 1: absent 0.05 -> 0; present 0.50 -> 0.4^2 = 0.16; absent 0.80 -> 0.5 * 0.7^2 = 0.245.
    expected = ((0.0 + 0.02 + 0.0) + (0.0 + 0.16 + 0.245)) / 2
    assert margin_loss(lengths, labels).item() == pytest.approx(expected, rel=1e-14)


def test_margin_loss_half_precision_computes_in_float32():
    lengths = torch.tensor([[0.3, 0.7], [0.95, 0.02]], dtype=torch.bfloat16)
    labels = torch.tensor([1, 0])
    loss = margin_loss(lengths, labels)
    assert loss.dtype == torch.float32
    expected = margin_loss(lengths.double(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("digits", [(), (2,)], ids=["one image", "two digits (MultiMNIST)"])
def test_reconstruction_loss_matches_reference_and_by_hand(rng, digits):
    images = rng.uniform(size=(3, *digits, 2, 4, 5))
    reconstruction = rng.uniform(size=(3, *digits, 40))
    ref, cache = reconstruction_loss_forward(reconstruction, images.reshape(3, *digits, 40))
    ref_grad = reconstruction_loss_backward(1.0, cache)

    recon_t = torch.tensor(reconstruction, requires_grad=True)
    loss = reconstruction_loss(recon_t, torch.from_numpy(images))
    loss.backward()
    assert_agrees(loss, ref, torch.float64, "reconstruction loss")
    assert_agrees(recon_t.grad, ref_grad, torch.float64, "its gradient")

    # By hand: one sample, error 0.5 in 2 of 4 pixels -> 2 * 0.25.
    small = reconstruction_loss(torch.tensor([[0.5, 0.0, 1.0, 0.25]]), torch.tensor([[[[0.0, 0.0], [0.5, 0.25]]]]))
    assert small.item() == pytest.approx(0.5)


def test_capsnet_loss_combines_terms():
    lengths = torch.tensor([[0.2, 0.6], [0.9, 0.4]])
    labels = torch.tensor([1, 0])
    images = torch.rand(2, 1, 3, 3)
    reconstruction = torch.rand(2, 9)
    output = CapsNetOutput(v=torch.zeros(2, 2, 4), lengths=lengths, reconstruction=reconstruction)

    terms = capsnet_loss(output, images, labels, reconstruction_weight=0.01)
    assert isinstance(terms, LossTerms)
    assert terms.margin.item() == pytest.approx(margin_loss(lengths, labels).item())
    assert terms.reconstruction.item() == pytest.approx(reconstruction_loss(reconstruction, images).item())
    assert terms.total.item() == pytest.approx(terms.margin.item() + 0.01 * terms.reconstruction.item())

    default = capsnet_loss(output, images, labels)
    assert default.total.item() == pytest.approx(default.margin.item() + 0.0005 * default.reconstruction.item())

    without_decoder = capsnet_loss(output._replace(reconstruction=None), images, labels)
    assert without_decoder.reconstruction.item() == 0.0
    assert without_decoder.total.item() == pytest.approx(without_decoder.margin.item())


@pytest.mark.parametrize("labels, error, match", [
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
    ([0, 1], TypeError, "integer torch.Tensor"),
    (torch.tensor([0, 3]), ValueError, r"\[0, 3\)"),
    (torch.tensor([-1, 0]), ValueError, r"\[0, 3\)"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \[B\] = \[2\]"),
    (torch.tensor([[0, 1]]), ValueError, r"shape \[B\] = \[2\]"),
    # In these terms: torch would say "Tensor on device meta is not on the expected device cpu!".
    (torch.tensor([0, 1], device="meta"), ValueError, r"labels are on meta but the lengths are on cpu"),
])
def test_margin_loss_rejects_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        margin_loss(torch.rand(2, 3), labels)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"lengths must be a tensor of shape \[B, J\]"):
        margin_loss(torch.rand(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        margin_loss(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        margin_loss(torch.rand(0, 3), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="empty batch"):      # a NaN mean before
        reconstruction_loss(torch.rand(0, 16), torch.rand(0, 1, 4, 4))
    with pytest.raises(ValueError, match=r"reconstruction must have shape \[B, C\*H\*W\] = \[2, 16\]"):
        reconstruction_loss(torch.rand(2, 15), torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \[B, C, H, W\]"):
        reconstruction_loss(torch.rand(2, 16), torch.rand(2, 16))


@pytest.mark.parametrize("loss, args, name", [
    (margin_loss, ([[0.1, 0.9]], torch.tensor([1])), "lengths"),
    (reconstruction_loss, (torch.rand(1, 16), [[0.0] * 16]), "images"),
    (reconstruction_loss, ([[0.0] * 16], torch.rand(1, 1, 4, 4)), "reconstruction"),
])
def test_losses_reject_what_is_not_a_tensor_with_a_type_error(loss, args, name):
    """As the ops do (and margin_loss for its labels): a wrong type is a TypeError, a wrong shape a ValueError."""
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list"):
        loss(*args)


@pytest.mark.parametrize("constant, value", [("lambda_", -1.0), ("m_plus", float("nan")), ("m_minus", float("inf")),
                                             ("m_plus", "0.9"), ("lambda_", True)])
def test_margin_loss_constants_are_finite_numbers_at_least_zero(constant, value):
    """A negative lambda would reward the capsules it should punish (a loss of -0.1 came back)."""
    with pytest.raises(ValueError, match=f"{constant} must be a finite number >= 0"):
        margin_loss(torch.rand(3, 4), torch.tensor([0, 1, 2]), **{constant: value})


def test_capsnet_loss_refuses_uint8_targets_and_a_bad_weight():
    output = CapsNetOutput(torch.rand(2, 3, 4), torch.rand(2, 3), torch.rand(2, 16))
    images, labels = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    with pytest.raises(TypeError, match=r"scale uint8 to \[0, 1\]"):
        capsnet_loss(output, (images * 255).to(torch.uint8), labels)
    for weight in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="reconstruction_weight must be a finite number >= 0"):
            capsnet_loss(output, images, labels, reconstruction_weight=weight)
    learned = torch.tensor(0.5, requires_grad=True)             # a tensor weight is taken, not read
    capsnet_loss(output, images, labels, reconstruction_weight=learned).total.backward()
    assert learned.grad is not None


def test_one_hot_labels_are_told_to_be_class_indices():
    """By their shape, [B, J], so without reading them (validate=False, compiled) and at J = 2,
    where a row [1, 0] holds two distinct classes."""
    for J in (10, 2):
        one_hot = torch.nn.functional.one_hot(torch.tensor([1, 0]), J)
        for validate in (True, False):
            with pytest.raises(ValueError, match=r"one-hot rows\? give class indices \[B\]"):
                margin_loss(torch.rand(2, J), one_hot, validate=validate)
    with pytest.raises(ValueError, match=r"shape \[B\] = \[2\], got \[2, 1\]"):     # one class: no [B, K]
        margin_loss(torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="K distinct classes per sample"):
        margin_loss(torch.rand(2, 10), torch.tensor([[3, 3], [1, 7]]))


def test_loss_constants_of_zero_are_taken():
    """">= 0": lambda = 0 drops the absent classes' term, m- = 0 penalises any length of them, and
    a reconstruction weight of 0 leaves the margin loss alone."""
    lengths, labels = torch.tensor([[0.3, 0.7, 0.2]]), torch.tensor([1])
    assert margin_loss(lengths, labels, lambda_=0.0).item() == pytest.approx(0.2 ** 2)
    assert margin_loss(lengths, labels, m_minus=0.0).item() == pytest.approx(0.2 ** 2 + 0.5 * (0.3 ** 2 + 0.2 ** 2))
    terms = capsnet_loss(CapsNetOutput(None, lengths, torch.rand(1, 4)), torch.rand(1, 1, 2, 2), labels,
                         reconstruction_weight=0.0)
    assert terms.total.item() == terms.margin.item()
