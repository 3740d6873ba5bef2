"""The MNIST CapsNet of Sabour, Frosst & Hinton (2017), Section 4, as a torch module.

    images [B, C, H, W]
      -> conv1: Conv kernel x kernel, stride 1, ReLU             [B, 256, 20, 20]
      -> primary_caps: Conv stride 2, grouped into capsules,     u [B, 1152, 8]
         squashed (Eq. 1)
      -> digit_caps: u_hat = W u (Eq. 2), routing (Procedure 1)  v [B, 10, 16]
      -> lengths |v_j| (class probabilities)                     [B, 10]
      -> decoder (Section 4.1) of v with all capsules but one    [B, C*H*W]
         masked: the label's in training, the longest's otherwise

Parameter names and shapes match the NumPy reference network (`capsnet_triton.reference.network`),
so its parameters load with `load_state_dict` one to one. The defaults have the paper's
8,215,568 parameters (6,804,224 without decoder).
"""

from typing import NamedTuple, Optional

import torch
from torch import nn

from .checks import autocast_mixes, check_backend, check_flag, check_gradient, check_iterations, check_positive_int
from .data import dataset_spec
from .layers import Decoder, DigitCaps, PrimaryCaps, check_hidden_widths, recomputed_convolutions
from .losses import check_labels, one_hot_mask

__all__ = ["CapsNet", "CapsNetOutput", "build_model"]

# Samples per chunk of the convolutions' recomputation in a CPU backward (layers.recomputed_convolutions):
# at B = 128 chunks of 16 kept the MNIST training step's peak growth at 105-132 MiB, chunks of 32 at 142-152.
RECOMPUTE_CHUNK = 16


class CapsNetOutput(NamedTuple):
    """What `CapsNet.forward` returns."""

    v: torch.Tensor                          # [B, J, D] output (digit) capsules
    lengths: torch.Tensor                    # [B, J] |v_j|, float32 at least
    reconstruction: Optional[torch.Tensor]   # [B, C*H*W] ([B, K, C*H*W] for labels [B, K]), None without decoder


class CapsNet(nn.Module):
    """CapsNet with dynamic routing; see the module docstring for the architecture.

    routing_iterations, routing_gradient ("full" or "last", SPEC 3), routing_bias and
    routing_backend configure DigitCaps (their `gradient` is routing_gradient); fused=True (the
    default) runs it as `capsnet_triton.capsule_linear`, which never holds u_hat [B, I, J, D] in
    memory, fused=False as `predict` then `capsnet_triton.dynamic_routing`: the same function,
    for comparison and, on a GPU, for speed (README, "Use it"). decoder=False drops the
    reconstruction network. PrimaryCaps' squash always picks its backend by device (Triton for
    CUDA tensors). Every option is checked here, not at the first forward: sizes must be integers
    >= 1 and choices among theirs (ValueError), flags True or False (TypeError), each error naming
    its option.
    recompute_convolutions=True (the default): on a CPU, while gradients are recorded, Conv1's
    activation is not kept for the backward but recomputed there in chunks of samples
    (`layers.recomputed_convolutions`): the same function and gradients, the MNIST training
    step's peak memory growth at B = 128 down from 274-312 to 105-132 MiB, for steps about 9%
    slower on a 2-core CPU (docs/PERF.md). False keeps the activation, as on a GPU.
    """

    def __init__(self, in_channels=1, image_size=28, num_classes=10, conv_channels=256,
                 kernel_size=9, primary_types=32, primary_dims=8, digit_dims=16,
                 routing_iterations=3, routing_gradient="full", routing_bias=False, decoder=True,
                 decoder_hidden=(512, 1024), routing_backend=None, fused=True, recompute_convolutions=True):
        super().__init__()
        for name, size in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes),
                           ("conv_channels", conv_channels), ("kernel_size", kernel_size),
                           ("primary_types", primary_types), ("primary_dims", primary_dims),
                           ("digit_dims", digit_dims)):
            check_positive_int(size, name)
        # DigitCaps and Decoder would check these too, under their own names for them (`fused` is
        # DigitCaps' own); decoder_hidden is checked even without a decoder.
        for name, flag in (("decoder", decoder), ("routing_bias", routing_bias),
                           ("recompute_convolutions", recompute_convolutions)):
            check_flag(flag, name)
        check_iterations(routing_iterations, "routing_iterations")
        check_gradient(routing_gradient, "routing_gradient")
        check_backend(routing_backend, "routing_backend")
        check_hidden_widths(decoder_hidden, "decoder_hidden")
        self.recompute_convolutions = recompute_convolutions
        conv1_size = image_size - kernel_size + 1
        grid = (conv1_size - kernel_size) // 2 + 1                     # PrimaryCaps conv, stride 2
        if grid < 1:
            raise ValueError(
                f"image_size {image_size} is too small for two {kernel_size}x{kernel_size} convolutions "
                f"(needs at least {2 * kernel_size - 1})"
            )
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = nn.Conv2d(in_channels, conv_channels, kernel_size)
        self.primary_caps = PrimaryCaps(conv_channels, primary_types, primary_dims, kernel_size, stride=2)
        self.digit_caps = DigitCaps(primary_types * grid * grid, primary_dims, num_classes, digit_dims,
                                    routing_iterations=routing_iterations, gradient=routing_gradient,
                                    bias=routing_bias, backend=routing_backend, fused=fused)
        self.decoder = (Decoder(num_classes * digit_dims, decoder_hidden, in_channels * image_size ** 2)
                        if decoder else None)

    def forward(self, images, labels=None, *, validate=True):
        """images [B, C, H, W]; labels integer [B], [B, K] or None -> `CapsNetOutput`.

        The decoder sees v flattened to [B, J*D] with every capsule zeroed except the label's
        (when labels are given, as in training) or the longest one's (Section 4.1). With labels
        [B, K] (K distinct classes per image, SPEC 9) it decodes each of the K capsules alone.
        validate=False skips the range check of the label values (a wait for the device), for
        labels checked beforehand, as training checks each split once. Under torch.compile that
        check is skipped too (it would break the graph), so check compiled labels beforehand: an
        out-of-range label there masks every capsule to zero instead of raising.
        """
        self._check_images(images)
        if labels is not None:            # before the forward's work, and even where unused
            check_labels(labels, images.shape[0], self.num_classes, values=validate, beside=("images", images))
        if self.recompute_convolutions and images.device.type == "cpu" and torch.is_grad_enabled():
            u = self.primary_caps.capsules(recomputed_convolutions(
                images, self.conv1, self.primary_caps.conv, RECOMPUTE_CHUNK))  # [B, I, P]
        else:
            features = torch.relu(self.conv1(images))                 # [B, 256, 20, 20]
            u = self.primary_caps(features)                            # [B, I, P]
        v = self.digit_caps(u)                                         # [B, J, D]
        lengths = torch.linalg.vector_norm(v, dim=-1, dtype=torch.promote_types(v.dtype, torch.float32))
        if self.decoder is None:
            return CapsNetOutput(v, lengths, None)
        if labels is None:
            labels = lengths.argmax(dim=1)                             # [B] the longest capsule
        keep = one_hot_mask(labels, self.num_classes)                  # [B, J] or [B, K, J]
        # Labels [B, K] (several digits, MultiMNIST): each of the K capsules decoded on its own.
        capsules = v.unsqueeze(1) if labels.ndim == 2 else v           # [B, (1,) J, D]
        masked = (capsules * keep.unsqueeze(-1).to(v.dtype)).flatten(-2)  # [B, (K,) J*D]
        return CapsNetOutput(v, lengths, self.decoder(masked))

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"CapsNet expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (scale uint8 to [0, 1]), got {images.dtype}")
        # Said here, in the model's terms: Conv1 would say "Input type (double) and bias type (float)",
        # and a later layer would name its own tensors ("u").
        weight = self.conv1.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {weight.device}; "
                             f"move one to the other (model.to(device) or images.to(device))")
        if images.dtype != weight.dtype and not autocast_mixes(images, weight.dtype):
            float64 = torch.float64 in (images.dtype, weight.dtype)
            raise TypeError(f"images are {images.dtype} but the model's parameters are {weight.dtype}; convert one "
                            f"(model.to(dtype) or images.to(dtype))"
                            + (" (autocast leaves float64 alone)" if float64 else ", or run under torch.autocast"))


# The training command's --digitcaps choices, as CapsNet's `fused`.
_DIGITCAPS = {"fused": True, "unfused": False}


def build_model(config):
    """The CapsNet a run configuration (a training checkpoint's "config" dict) describes.

    The image shape and the number of classes come from the config's dataset entry
    (`data.DATASETS`); the other options from the config itself. Configs older than the
    "digitcaps" entry run the fused layer, their default.
    """
    digitcaps = config.get("digitcaps", "fused")
    if digitcaps not in _DIGITCAPS:
        raise ValueError(f"digitcaps must be one of {sorted(_DIGITCAPS)}, got {digitcaps!r}")
    spec = dataset_spec(config["dataset"])
    channels, height, width = spec.image_shape
    if height != width:
        raise ValueError(f"CapsNet takes square images; {spec.name} has {height}x{width}")
    return CapsNet(
        in_channels=channels,
        image_size=height,
        num_classes=spec.num_classes,
        conv_channels=config["conv_channels"],
        primary_types=config["primary_types"],
        routing_iterations=config["routing_iterations"],
        routing_gradient=config["routing_gradient"],
        routing_bias=config["routing_bias"],
        decoder=config["decoder"],
        decoder_hidden=tuple(config["decoder_hidden"]),
        fused=_DIGITCAPS[digitcaps],
    )
