"""The whole MNIST CapsNet (paper Section 4, SPEC section 5) as functions of a parameter dict.

    images [B, C, H, W]
      -> Conv1 (k x k, stride 1) + ReLU                      [B, C1, H1, W1]
      -> PrimaryCaps conv (k x k, stride 2), no ReLU          [B, types*P, h, w]
      -> group into capsules, squash (Eq. 1)                  u [B, I = types*h*w, P]
      -> prediction vectors (Eq. 2)                           u_hat [B, I, J, D]
      -> routing by agreement (Procedure 1)                   v [B, J, D]
      -> lengths |v|, margin loss (Eq. 4)
      -> mask all capsules but one, decoder FC-ReLU-FC-ReLU-FC-sigmoid, reconstruction loss

Capsule (type t, row y, col x) is the P channels t*P .. t*P+P-1 at (y, x) and has index
i = t*h*w + y*w + x. Reshaping the NCHW map straight to [B, I, P] would instead mix P
neighbouring positions of one channel into a "capsule" (a known bug of public code).

The parameter names and shapes are those of the PyTorch model's state_dict, so weights load one
to one between the two.
"""

import dataclasses

import numpy as np

from .checks import check_constant
from .layers import (
    conv2d_backward,
    conv2d_forward,
    conv2d_output_size,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
)
from .losses import (
    capsule_length_backward,
    capsule_length_forward,
    margin_loss_backward,
    margin_loss_forward,
    one_hot,
    reconstruction_loss_backward,
    reconstruction_loss_forward,
)
from .prediction import prediction_backward, prediction_forward
from .routing import routing_backward, routing_forward
from .squash import squash_backward, squash_forward

__all__ = [
    "CapsNetConfig",
    "parameter_shapes",
    "parameter_count",
    "init_params",
    "network_forward",
    "network_backward",
    "classify",
]

CONV1_STRIDE = 1
PRIMARY_STRIDE = 2


@dataclasses.dataclass(frozen=True)
class CapsNetConfig:
    """Sizes of the network; the defaults are the paper's MNIST model (8,215,568 parameters)."""

    in_channels: int = 1
    image_size: int = 28
    conv_channels: int = 256          # C1
    kernel_size: int = 9              # both convolutions
    primary_types: int = 32           # primary capsule types (32 for MNIST)
    primary_dims: int = 8             # P
    num_classes: int = 10             # J
    digit_dims: int = 16              # D
    decoder_hidden: tuple = (512, 1024)
    routing_bias: bool = False

    def __post_init__(self):
        object.__setattr__(self, "decoder_hidden", tuple(self.decoder_hidden))
        if len(self.decoder_hidden) != 2:
            raise ValueError(f"decoder_hidden must hold 2 layer widths, got {self.decoder_hidden}")
        sizes = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                 if field.type is int or field.type == "int"}
        for name, size in [*sizes.items(), *(("a decoder_hidden width", width) for width in self.decoder_hidden)]:
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        if self.primary_grid < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for two {self.kernel_size}x{self.kernel_size} "
                "convolutions (the primary capsule grid would be empty)"
            )

    @property
    def primary_grid(self):
        """h = w, the side of the primary capsules' grid (6 for MNIST)."""
        conv1 = conv2d_output_size(self.image_size, self.kernel_size, CONV1_STRIDE)
        return conv2d_output_size(conv1, self.kernel_size, PRIMARY_STRIDE)

    @property
    def input_capsules(self):
        """I = types * h * w (1152 for MNIST)."""
        return self.primary_types * self.primary_grid**2


def parameter_shapes(config):
    """{name: shape} of every parameter, in the order of the PyTorch model's state_dict."""
    c = config
    pixels = c.in_channels * c.image_size**2
    hidden1, hidden2 = c.decoder_hidden
    shapes = {
        "conv1.weight": (c.conv_channels, c.in_channels, c.kernel_size, c.kernel_size),
        "conv1.bias": (c.conv_channels,),
        "primary_caps.conv.weight": (c.primary_types * c.primary_dims, c.conv_channels, c.kernel_size, c.kernel_size),
        "primary_caps.conv.bias": (c.primary_types * c.primary_dims,),
        "digit_caps.weight": (c.input_capsules, c.num_classes, c.digit_dims, c.primary_dims),
    }
    if c.routing_bias:
        shapes["digit_caps.bias"] = (c.num_classes, c.digit_dims)
    shapes.update({
        "decoder.fc1.weight": (hidden1, c.num_classes * c.digit_dims),
        "decoder.fc1.bias": (hidden1,),
        "decoder.fc2.weight": (hidden2, hidden1),
        "decoder.fc2.bias": (hidden2,),
        "decoder.fc3.weight": (pixels, hidden2),
        "decoder.fc3.bias": (pixels,),
    })
    return shapes


def parameter_count(config=CapsNetConfig(), *, include_decoder=True):
    """Number of trainable parameters: 8,215,568 for the default config, 6,804,224 without decoder."""
    return sum(
        int(np.prod(shape))
        for name, shape in parameter_shapes(config).items()
        if include_decoder or not name.startswith("decoder.")
    )


def init_params(config, rng, dtype=np.float64):
    """Fresh parameters: conv and linear layers U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
    default), digit_caps.weight N(0, 0.01^2), digit_caps.bias 0. rng: np.random.Generator."""
    shapes = parameter_shapes(config)
    params = {}
    for name, shape in shapes.items():
        if name == "digit_caps.weight":
            value = rng.normal(0.0, 0.01, size=shape)
        elif name == "digit_caps.bias":
            value = np.zeros(shape)
        else:
            # A bias has the fan-in of its layer's weight: the product of the weight's other axes.
            weight_shape = shapes[name.replace(".bias", ".weight")]
            bound = 1.0 / np.sqrt(np.prod(weight_shape[1:]))
            value = rng.uniform(-bound, bound, size=shape)
        params[name] = value.astype(dtype)
    return params


def _check_params(params, config):
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if np.shape(params[name]) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape}, got {np.shape(params[name])}")


def _check_images(images, config):
    images = np.asarray(images)
    expected = (config.in_channels, config.image_size, config.image_size)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images must have shape [B, C, H, W] = [B, *{expected}], got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    return images


def _encode(params, images, config, routing_iterations, routing_gradient):
    """images -> output capsules v [B, J, D], with the caches of every step."""
    B = images.shape[0]
    types, P, h = config.primary_types, config.primary_dims, config.primary_grid
    w = h                                                          # square images, square grid
    conv1, conv1_cache = conv2d_forward(
        images, params["conv1.weight"], params["conv1.bias"], CONV1_STRIDE
    )                                                              # [B, C1, H1, W1]
    features, relu_cache = relu_forward(conv1)                     # [B, C1, H1, W1]
    primary, primary_cache = conv2d_forward(
        features, params["primary_caps.conv.weight"], params["primary_caps.conv.bias"], PRIMARY_STRIDE
    )                                                              # [B, types*P, h, w]
    s_primary = primary.reshape(B, types, P, h, w).transpose(0, 1, 3, 4, 2)  # [B, types, h, w, P]
    s_primary = s_primary.reshape(B, types * h * w, P)             # [B, I, P]
    u = squash_forward(s_primary)                                  # [B, I, P]
    u_hat, prediction_cache = prediction_forward(u, params["digit_caps.weight"])  # [B, I, J, D]
    v, routing_cache = routing_forward(
        u_hat, routing_iterations, bias=params.get("digit_caps.bias"), gradient=routing_gradient
    )                                                              # [B, J, D]
    caches = dict(conv1=conv1_cache, relu=relu_cache, primary=primary_cache, s_primary=s_primary,
                  prediction=prediction_cache, routing=routing_cache)
    return v, caches


def _decode(params, v, selected):
    """Reconstruction [B, C*H*W] from the one capsule per sample named by `selected` [B]."""
    B, J, D = v.shape
    mask = one_hot(selected, J, v.dtype)                           # [B, J]
    decoder_input = (v * mask[:, :, None]).reshape(B, J * D)       # [B, J*D]
    h1, fc1_cache = linear_forward(decoder_input, params["decoder.fc1.weight"], params["decoder.fc1.bias"])
    a1, relu1_cache = relu_forward(h1)                             # [B, hidden1]
    h2, fc2_cache = linear_forward(a1, params["decoder.fc2.weight"], params["decoder.fc2.bias"])
    a2, relu2_cache = relu_forward(h2)                             # [B, hidden2]
    h3, fc3_cache = linear_forward(a2, params["decoder.fc3.weight"], params["decoder.fc3.bias"])
    reconstruction, sigmoid_cache = sigmoid_forward(h3)            # [B, C*H*W]
    cache = dict(mask=mask, fc1=fc1_cache, relu1=relu1_cache, fc2=fc2_cache, relu2=relu2_cache,
                 fc3=fc3_cache, sigmoid=sigmoid_cache)
    return reconstruction, cache


def network_forward(params, images, labels, config, routing_iterations=3, routing_gradient="full",
                    reconstruction_weight=0.0005):
    """Training loss: margin loss (Eq. 4) + reconstruction_weight * reconstruction loss.

    images [B, C, H, W] floats in [0, 1]; labels integer [B]. The decoder sees the true label's
    capsule only (Section 4.1). routing_gradient: the routing's gradient policy, "full" or
    "last" (SPEC section 3). Returns (total_loss, cache); the cache exposes v [B, J, D],
    lengths [B, J], reconstruction [B, C*H*W], margin_loss and reconstruction_loss.
    """
    _check_params(params, config)
    images = _check_images(images, config)
    check_constant("reconstruction_weight", reconstruction_weight)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        # The margin loss takes [B, K] (MultiMNIST), but this decoder reconstructs one capsule
        # per image; SPEC 9's reconstruction of each digit on its own is the PyTorch CapsNet's.
        raise ValueError(f"labels must have shape [B], one class per image, got shape {labels.shape}")
    B = images.shape[0]
    v, encoder_caches = _encode(params, images, config, routing_iterations, routing_gradient)
    lengths, length_cache = capsule_length_forward(v)              # [B, J]
    margin, margin_cache = margin_loss_forward(lengths, labels)    # []
    reconstruction, decoder_cache = _decode(params, v, labels)    # [B, C*H*W]
    recon_loss, recon_cache = reconstruction_loss_forward(reconstruction, images.reshape(B, -1))  # []
    total = margin + reconstruction_weight * recon_loss            # []
    cache = dict(v=v, lengths=lengths, reconstruction=reconstruction, margin_loss=margin,
                 reconstruction_loss=recon_loss, params=params, config=config,
                 reconstruction_weight=reconstruction_weight, length_cache=length_cache,
                 margin_cache=margin_cache, decoder_cache=decoder_cache, recon_cache=recon_cache,
                 **encoder_caches)
    return total, cache


def network_backward(cache):
    """Gradients of the total loss w.r.t. every parameter: {name: array of the param's shape}."""
    config, params = cache["config"], cache["params"]
    B, J, D = cache["v"].shape
    types, P, h = config.primary_types, config.primary_dims, config.primary_grid
    w = h                                                          # square images, square grid
    grads = {}

    # Decoder, from the reconstruction loss back to the masked capsules.
    dec = cache["decoder_cache"]
    d = reconstruction_loss_backward(cache["reconstruction_weight"], cache["recon_cache"])  # [B, C*H*W]
    d = sigmoid_backward(d, dec["sigmoid"])                        # [B, C*H*W]
    d, grads["decoder.fc3.weight"], grads["decoder.fc3.bias"] = linear_backward(d, dec["fc3"])
    d = relu_backward(d, dec["relu2"])                             # [B, hidden2]
    d, grads["decoder.fc2.weight"], grads["decoder.fc2.bias"] = linear_backward(d, dec["fc2"])
    d = relu_backward(d, dec["relu1"])                             # [B, hidden1]
    d, grads["decoder.fc1.weight"], grads["decoder.fc1.bias"] = linear_backward(d, dec["fc1"])
    dv = d.reshape(B, J, D) * dec["mask"][:, :, None]              # [B, J, D]

    # Margin loss through the capsule lengths.
    dlengths = margin_loss_backward(1.0, cache["margin_cache"])    # [B, J]
    dv = dv + capsule_length_backward(dlengths, cache["length_cache"])  # [B, J, D]

    # Capsules.
    routed = routing_backward(dv, cache["routing"])
    if config.routing_bias:
        du_hat, grads["digit_caps.bias"] = routed                  # [B, I, J, D], [J, D]
    else:
        du_hat = routed                                            # [B, I, J, D]
    du, grads["digit_caps.weight"] = prediction_backward(du_hat, cache["prediction"])  # [B, I, P]
    ds_primary = squash_backward(du, cache["s_primary"])           # [B, I, P]
    dprimary = ds_primary.reshape(B, types, h, w, P).transpose(0, 1, 4, 2, 3)  # [B, types, P, h, w]
    dprimary = dprimary.reshape(B, types * P, h, w)                # [B, types*P, h, w]

    # Convolutions.
    dfeatures, grads["primary_caps.conv.weight"], grads["primary_caps.conv.bias"] = conv2d_backward(
        dprimary, cache["primary"])                                # [B, C1, H1, W1]
    dconv1 = relu_backward(dfeatures, cache["relu"])               # [B, C1, H1, W1]
    # The gradient of the images themselves comes with it, unused: nothing is learned below Conv1.
    _, grads["conv1.weight"], grads["conv1.bias"] = conv2d_backward(dconv1, cache["conv1"])
    return {name: grads[name] for name in params}


def classify(params, images, config, routing_iterations=3, reconstruct=True):
    """(classes [B] of the longest output capsule, reconstructions [B, C*H*W] of that capsule,
    or None with reconstruct=False, which skips the decoder)."""
    _check_params(params, config)
    images = _check_images(images, config)
    v, _ = _encode(params, images, config, routing_iterations, routing_gradient="full")
    lengths, _ = capsule_length_forward(v)                         # [B, J]
    classes = np.argmax(lengths, axis=1)                           # [B]
    if not reconstruct:
        return classes, None
    reconstruction, _ = _decode(params, v, classes)                # [B, C*H*W]
    return classes, reconstruction
