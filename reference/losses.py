"""Capsule lengths and the two losses of the paper (Eq. 4 and Section 4.1), forward and backward.

- Capsule length: |v_k| is the probability that entity k is present.
- Margin loss (Eq. 4), per sample, summed over the classes k and averaged over the batch:

      L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2

  with T_k = 1 for the true class only, m+ = 0.9, m- = 0.1, lambda = 0.5. For MultiMNIST
  (Section 6, SPEC 9), two digits per image: T_k = 1 for both classes present.
- Reconstruction loss (Section 4.1): per sample the sum over pixels of the squared error,
  averaged over the batch. The network weighs it by 0.0005 so that it does not dominate. For
  MultiMNIST each digit is reconstructed from its own capsule against its own canvas, and the
  per-sample sum runs over both reconstructions.
"""

import numpy as np

from .checks import check_capsules, check_constant, check_floating
from .squash import _norm_and_direction

__all__ = [
    "capsule_length_forward",
    "capsule_length_backward",
    "margin_loss_forward",
    "margin_loss_backward",
    "reconstruction_loss_forward",
    "reconstruction_loss_backward",
    "one_hot",
]


def capsule_length_forward(v):
    """lengths = |v| over the last axis, scaled as squash scales its norm, so that tiny capsules
    do not underflow to length 0 (nor huge ones overflow). A capsule holding a NaN or inf has
    length NaN, as squash gives it NaN outputs (SPEC 7). v [..., D] -> (lengths [...], cache)."""
    lengths, direction = _norm_and_direction(check_capsules(v, "v"))            # [..., 1], [..., D]
    return lengths[..., 0], (direction, lengths[..., 0])


def capsule_length_backward(dlengths, cache):
    """dv = dlengths v / |v|, and 0 where v = 0 (a subgradient; never NaN). -> dv [..., D]."""
    direction, lengths = cache
    dlengths = np.asarray(dlengths)
    if dlengths.shape != lengths.shape:
        raise ValueError(f"dlengths must have shape {lengths.shape}, got {dlengths.shape}")
    return dlengths[..., None] * direction                         # [..., D]


def _check_labels(labels, batch, num_classes):
    """Integer labels [B], or [B, K] of K < J distinct classes per sample (MultiMNIST: K = 2; K = J
    would mark every class present, the shape of one-hot rows)."""
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.shape != (batch,) and not (labels.ndim == 2 and labels.shape[0] == batch
                                         and 1 <= labels.shape[1] < num_classes):
        raise ValueError(f"labels must have shape [B] = ({batch},) or [B, K] with 1 <= K < {num_classes}, "
                         f"got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} (J = {num_classes} classes), "
            f"found values in {labels.min()}..{labels.max()}"
        )
    if labels.ndim == 2 and np.any(np.diff(np.sort(labels, axis=1), axis=1) == 0):
        raise ValueError("labels [B, K] must hold K distinct classes per sample")
    return labels


def _upstream_scalar(dloss, dtype):
    """dL/dloss for a scalar loss, in the loss's dtype (so float32 stays float32)."""
    if np.ndim(dloss) != 0:
        raise ValueError(f"dloss must be a scalar (the loss is a batch mean), got shape {np.shape(dloss)}")
    return np.asarray(dloss, dtype=dtype)


def one_hot(labels, num_classes, dtype=np.float64):
    """T [B, J] with T[b, labels[b]] = 1 and 0 elsewhere; for labels [B, K], a 1 at each of
    the sample's K classes."""
    samples = np.arange(labels.shape[0])                           # [B]
    targets = np.zeros((labels.shape[0], num_classes), dtype=dtype)   # [B, J]
    targets[samples if labels.ndim == 1 else samples[:, None], labels] = 1.0
    return targets


def margin_loss_forward(lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
    """Batch mean of the per-sample margin loss (Eq. 4). lengths [B, J], integer labels [B], or
    [B, K] of the K classes present in each sample (MultiMNIST).

    Returns (loss, cache); loss is a NumPy scalar of lengths' dtype.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 2:
        raise ValueError(f"lengths must have shape [B, J] (2 axes), got shape {lengths.shape}")
    check_floating(lengths=lengths)
    B, J = lengths.shape
    if B == 0:
        raise ValueError("lengths has an empty batch; the batch mean is undefined")
    for name, value in (("m_plus", m_plus), ("m_minus", m_minus), ("lambda_", lambda_)):
        check_constant(name, value)
    labels = _check_labels(labels, B, J)
    T = one_hot(labels, J, lengths.dtype)                          # [B, J]
    present = np.maximum(0.0, m_plus - lengths)                    # [B, J]
    absent = np.maximum(0.0, lengths - m_minus)                    # [B, J]
    per_sample = np.sum(T * present**2 + lambda_ * (1.0 - T) * absent**2, axis=1)  # [B]
    loss = np.mean(per_sample)                                     # []
    return loss, (T, present, absent, lambda_)


def margin_loss_backward(dloss, cache):
    """dlengths [B, J] = dloss / B * (-2 T max(0, m+ - |v|) + 2 lambda (1 - T) max(0, |v| - m-))."""
    T, present, absent, lambda_ = cache
    scale = _upstream_scalar(dloss, T.dtype) / T.shape[0]
    return scale * (-2.0 * T * present + 2.0 * lambda_ * (1.0 - T) * absent)  # [B, J]


def reconstruction_loss_forward(reconstruction, target):
    """Batch mean of the per-sample sum of squared errors. reconstruction, target [B, N] (N
    pixels), or [B, K, N] for K reconstructions per sample, each against its own target
    (MultiMNIST: each digit's canvas); the sum then runs over all K N values of a sample."""
    reconstruction, target = np.asarray(reconstruction), np.asarray(target)
    check_floating(reconstruction=reconstruction, target=target)  # uint8 pixels would wrap, unscaled
    if reconstruction.ndim not in (2, 3):
        raise ValueError(f"reconstruction must have shape [B, N] or [B, K, N], got shape {reconstruction.shape}")
    if target.shape != reconstruction.shape:
        raise ValueError(f"target has shape {target.shape} but reconstruction has {reconstruction.shape}")
    if reconstruction.shape[0] == 0:
        raise ValueError("reconstruction has an empty batch; the batch mean is undefined")
    error = reconstruction - target                                # [B, (K,) N]
    loss = np.mean(np.sum(error * error, axis=tuple(range(1, error.ndim))))  # []
    return loss, error


def reconstruction_loss_backward(dloss, cache):
    """d reconstruction [B, (K,) N] = dloss * 2 (reconstruction - target) / B."""
    error = cache
    return _upstream_scalar(dloss, error.dtype) * 2.0 / error.shape[0] * error  # [B, (K,) N]
