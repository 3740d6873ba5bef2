"""Two-digit examples (MultiMNIST, SPEC 9) in the losses, the metric and the model: margin loss
with both targets, each digit's reconstruction against its own canvas, both-digit accuracy, all
against NumPy; the decoder decoding each label's capsule alone."""

import numpy as np
import pytest
import torch

from capsnet_triton.losses import capsnet_loss, check_labels, correct_predictions, margin_loss, reconstruction_loss
from capsnet_triton.model import CapsNet, CapsNetOutput


def numpy_margin(lengths, present, m_plus=0.9, m_minus=0.1, lambda_=0.5):
    per_class = (present * np.maximum(0.0, m_plus - lengths) ** 2
                 + lambda_ * (1 - present) * np.maximum(0.0, lengths - m_minus) ** 2)
    return per_class.sum(axis=1).mean()


def two_labels(batch, generator):
    first = torch.randint(0, 10, (batch,), generator=generator)
    return torch.stack([first, (first + torch.randint(1, 10, (batch,), generator=generator)) % 10], dim=1)


def test_two_digit_margin_and_reconstruction_losses_match_numpy():
    generator = torch.Generator().manual_seed(0)
    batch = 9
    lengths = torch.rand(batch, 10, generator=generator, dtype=torch.float64)
    labels = two_labels(batch, generator)
    present = np.zeros((batch, 10))
    present[np.arange(batch)[:, None], labels.numpy()] = 1.0
    assert float(margin_loss(lengths, labels)) == pytest.approx(numpy_margin(lengths.numpy(), present), rel=1e-12)

    parts = torch.rand(batch, 2, 1, 36, 36, generator=generator, dtype=torch.float64)
    decoded = torch.rand(batch, 2, 36 * 36, generator=generator, dtype=torch.float64)
    expected = ((decoded.numpy() - parts.numpy().reshape(batch, 2, -1)) ** 2).sum(axis=(1, 2)).mean()
    assert float(reconstruction_loss(decoded, parts)) == pytest.approx(expected, rel=1e-12)
    output = CapsNetOutput(torch.zeros(batch, 10, 16), lengths, decoded)
    terms = capsnet_loss(output, parts, labels, reconstruction_weight=0.0005)
    assert float(terms.total) == pytest.approx(numpy_margin(lengths.numpy(), present) + 0.0005 * expected, rel=1e-12)
    with pytest.raises(ValueError, match="reconstruction must have shape"):
        reconstruction_loss(decoded[:, :1], parts)


def test_both_digit_accuracy_matches_numpy():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.rand(500, 10, generator=generator)
    labels = two_labels(500, generator)
    top_two = np.argsort(-lengths.numpy(), axis=1)[:, :2]
    expected = np.array([set(t) == set(l) for t, l in zip(top_two.tolist(), labels.tolist())])
    lengths[:50] = 0.0
    lengths[torch.arange(50), labels[:50, 1]] = 0.9                 # the true pair, longest second-label first
    lengths[torch.arange(50), labels[:50, 0]] = 0.8
    expected[:50] = True
    lengths[50:60, :] = 0.0
    lengths[torch.arange(50, 60), labels[50:60, 0]] = 0.9           # one right, one wrong: the example is wrong
    lengths[torch.arange(50, 60), _third_class(labels[50:60])] = 0.8
    expected[50:60] = False
    assert np.array_equal(correct_predictions(lengths, labels).numpy(), expected)
    assert 0 < expected.sum() < 500


def _third_class(labels):
    """A class different from both of each row's labels."""
    third = (labels[:, 0] + 1) % 10
    return torch.where(third == labels[:, 1], (third + 1) % 10, third)


def test_model_decodes_each_label_alone():
    torch.manual_seed(0)
    model = CapsNet(image_size=36, conv_channels=8, primary_types=2, decoder_hidden=(16, 32)).eval()
    images = torch.rand(4, 1, 36, 36)
    labels = torch.tensor([[1, 2], [3, 0], [9, 4], [5, 6]])
    with torch.no_grad():
        # An untrained network's capsules are about 1e-4 long, too short for the decoder to show
        # which it was given: decoding both labels' capsules together would pass unscaled.
        model.decoder.fc1.weight.mul_(1e6)
        both = model(images, labels).reconstruction
        assert both.shape == (4, 2, 36 * 36)
        for k in range(2):
            torch.testing.assert_close(both[:, k], model(images, labels[:, k]).reconstruction)
    with pytest.raises(ValueError, match="distinct"):
        check_labels(torch.tensor([[1, 1]]), 1, 10)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        check_labels(torch.zeros(2, 11, dtype=torch.long), 2, 10)


def test_two_digit_predictions_do_not_depend_on_the_labels_order():
    lengths = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.9, 0.1, 0.8, 0.2]])
    labels = torch.tensor([[3, 1], [0, 1]])
    assert correct_predictions(lengths, labels).tolist() == [True, False]
    assert correct_predictions(lengths, labels.flip(1)).tolist() == [True, False]
