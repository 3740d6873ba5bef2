"""CapsNet losses (paper Eq. 4 and Section 4.1) on torch tensors.

    margin          L = mean_b sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2
    reconstruction  R = mean_b sum_pixels (reconstruction - image)^2
    total           L + 0.0005 R

MultiMNIST (SPEC 9) has two digits per image: T_k = 1 for both classes, and R sums the error of
each digit's reconstruction (from its own capsule) against that digit's own canvas; an example
counts as right when the two longest capsules are its two classes (`correct_predictions`).

Both are computed in at least float32: under autocast (or with half-precision inputs) the
squared errors of 784 pixels summed in bfloat16 would lose most of their bits.
"""

import math
import numbers
from typing import NamedTuple

import torch

__all__ = ["LossTerms", "margin_loss", "reconstruction_loss", "capsnet_loss", "correct_predictions", "check_labels"]


class LossTerms(NamedTuple):
    """The total training loss and the two terms it is made of (scalars)."""

    total: torch.Tensor
    margin: torch.Tensor
    reconstruction: torch.Tensor


def margin_loss(lengths, labels, *, m_plus=0.9, m_minus=0.1, lambda_=0.5, validate=True):
    """Margin loss (Eq. 4): batch mean of the per-sample sum over classes k of

        T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

    lengths: [B, J] capsule lengths |v_k|; labels: integer [B] in [0, J), T_k = [k == label],
    or [B, K] of K < J distinct classes present in each image, T_k = [k among them] (MultiMNIST).
    One-hot rows, [B, J], are refused by their shape alone (unvalidated and compiled too): K = J
    would make every class present in every image.
    validate=False skips the range check of the label values, the one check that reads them
    (a wait for the device): for labels already checked, as training checks each split once.
    Returns a scalar, float32 for half-precision lengths.
    """
    _check_tensor(lengths, "lengths")
    if lengths.ndim != 2:
        raise ValueError(f"lengths must be a tensor of shape [B, J], got {_describe(lengths)}")
    if not lengths.is_floating_point():
        raise TypeError(f"lengths must be a floating-point tensor, got dtype {lengths.dtype}")
    for name, value in (("m_plus", m_plus), ("m_minus", m_minus), ("lambda_", lambda_)):
        _check_constant(name, value)
    if lengths.shape[0] == 0:
        raise ValueError("lengths has an empty batch; the batch mean is undefined")
    check_labels(labels, lengths.shape[0], lengths.shape[1], values=validate, beside=("lengths", lengths))
    lengths = _at_least_float32(lengths)
    present = one_hot_mask(labels, lengths.shape[1])                         # [B, (K,) J]
    present = (present.any(dim=1) if labels.ndim == 2 else present).to(lengths.dtype)  # [B, J]  T_k
    missing_penalty = torch.relu(m_plus - lengths) ** 2                      # [B, J]
    spurious_penalty = torch.relu(lengths - m_minus) ** 2                    # [B, J]
    per_class = present * missing_penalty + lambda_ * (1.0 - present) * spurious_penalty
    return per_class.sum(dim=1).mean()


def reconstruction_loss(reconstruction, images):
    """Batch mean of the per-sample sum of squared errors (Section 4.1).

    reconstruction: [B, C*H*W] decoder output; images: [B, C, H, W]. Several reconstructions
    per sample (MultiMNIST, SPEC 9: each digit from its own capsule against its own canvas):
    reconstruction [B, K, C*H*W] and images [B, K, C, H, W], the K errors summed per sample.
    """
    _check_tensor(images, "images")
    _check_tensor(reconstruction, "reconstruction")
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be a tensor of shape [B, C, H, W] or [B, K, C, H, W], got {_describe(images)}")
    if not images.is_floating_point():
        # uint8 pixels of 0..255 against a decoder's 0..1 would make an error 65,000 times too large.
        raise TypeError(f"images must be a floating-point tensor (scale uint8 to [0, 1]), got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images has an empty batch; the batch mean is undefined")
    expected = (*images.shape[:-3], images.shape[-3:].numel())
    if tuple(reconstruction.shape) != expected:
        form = "[B, C*H*W]" if images.ndim == 4 else "[B, K, C*H*W]"
        raise ValueError(
            f"reconstruction must have shape {form} = {list(expected)} for images of shape "
            f"{list(images.shape)}, got {_describe(reconstruction)}"
        )
    error = _at_least_float32(reconstruction) - _at_least_float32(images).flatten(-3)  # [B, (K,) C*H*W]
    return (error * error).flatten(1).sum(dim=1).mean()


def capsnet_loss(output, images, labels, *, reconstruction_weight=0.0005, validate=True):
    """Total loss = margin + reconstruction_weight * reconstruction (Section 4.1).

    output: a `CapsNetOutput` (lengths [B, J], reconstruction [B, C*H*W] or None for a model
    without decoder, whose reconstruction term is then 0); images: the reconstruction targets;
    labels [B], or [B, K] with images [B, K, C, H, W] one target per label (see
    `reconstruction_loss`). validate: as in `margin_loss`. Returns `LossTerms`.
    """
    if not isinstance(reconstruction_weight, torch.Tensor):     # a tensor may be learned: not read here
        _check_constant("reconstruction_weight", reconstruction_weight)
    margin = margin_loss(output.lengths, labels, validate=validate)
    if output.reconstruction is None:
        reconstruction = margin.new_zeros(())
    else:
        reconstruction = reconstruction_loss(output.reconstruction, images)
    return LossTerms(margin + reconstruction_weight * reconstruction, margin, reconstruction)


def _check_tensor(x, name):
    """A wrong type is a TypeError, as for the ops (capsnet_triton.checks); shapes are checked after."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_constant(name, value):
    """A loss constant: a finite number >= 0 (a negative lambda or weight would reward errors)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def correct_predictions(lengths, labels):
    """Bool [B]: labels [B], the longest capsule is the label's; labels [B, K] (K distinct
    classes, MultiMNIST), the K longest capsules are exactly those K classes (SPEC 9)."""
    if labels.ndim == 1:
        return lengths.argmax(dim=1) == labels
    longest = lengths.topk(labels.shape[1], dim=1).indices                  # [B, K]
    return (longest.sort(dim=1).values == labels.sort(dim=1).values).all(dim=1)


def check_labels(labels, batch, num_classes, values=True, beside=None):
    """Raise unless labels is an integer tensor of shape [batch] with values in [0, num_classes),
    or [batch, K] with K < num_classes distinct such values per row (K = num_classes would mark
    every class present: one-hot rows have that shape, and are refused without reading them).

    values=False checks the type and shape only, which needs no read of the values. beside:
    optional (name, tensor) that labels must share a device with, said in those terms (torch
    would name neither).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if beside is not None and labels.device != beside[1].device:
        raise ValueError(f"labels are on {labels.device} but the {beside[0]} are on {beside[1].device}; "
                         f"move them to one device (labels.to({beside[0]}.device))")
    several = labels.ndim == 2 and 1 <= labels.shape[1] < num_classes
    if labels.ndim not in (1, 2) or labels.shape[0] != batch or labels.ndim == 2 and not several:
        one_hot = " (one-hot rows? give class indices [B])" if labels.shape[1:] == (num_classes,) else ""
        or_several = f" or [B, K] with 1 <= K < {num_classes}" if num_classes > 1 else ""
        raise ValueError(f"labels must have shape [B] = [{batch}]{or_several}, got {list(labels.shape)}{one_hot}")
    # The value checks read the labels (a device sync); a compiled graph skips them rather than break.
    if values and labels.numel() and not torch.compiler.is_compiling():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) for {num_classes} classes, got values in [{low}, {high}]"
            )
        if labels.ndim == 2 and bool((labels.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("labels [B, K] must hold K distinct classes per sample")


def one_hot_mask(labels, num_classes):
    """Boolean [*labels.shape, num_classes], True at each label's class (no value checks, compile-friendly)."""
    return labels[..., None] == torch.arange(num_classes, device=labels.device)


def _at_least_float32(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)}"
    return type(x).__name__
