"""The NumPy reference of CapsNet with dynamic routing: the ground truth every kernel and the
PyTorch model are tested against, and a readable specification of the paper.

Imports nothing but NumPy and the standard library. One file per concept, in reading order:

- squash.py       squash, the capsule non-linearity (Eq. 1)
- prediction.py   prediction vectors u_hat = W u (Eq. 2)
- routing.py      routing by agreement (Procedure 1, Eq. 3), both gradient policies
- capsule_linear.py  the DigitCaps layer: prediction then routing, the fused layer's oracle
- losses.py       capsule lengths, margin loss (Eq. 4), reconstruction loss (Section 4.1)
- layers.py       the plain layers around the capsules: conv2d, ReLU, linear, sigmoid
- network.py      the whole MNIST CapsNet (Section 4) as functions of a parameter dict
- mnist.py        reading MNIST's IDX files
- checks.py       the input checks the functions above share
- optim.py        Adam, for training the NumPy network
- __main__.py     `python -m capsnet_triton.reference --data DIR`: train a small CapsNet in NumPy

Every differentiable step is `forward(...) -> (out, cache)` and `backward(dout, cache)`, with
three departures: squash, whose backward needs only its input, is `squash_forward(s)` /
`squash_backward(dv, s)`; routing's and capsule_linear's backward also return the bias gradient
when the forward had a bias; and `network_backward(cache)` starts from the total loss itself.
"""

from .capsule_linear import capsule_linear_backward, capsule_linear_forward
from .layers import (
    conv2d_backward,
    conv2d_forward,
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
    reconstruction_loss_backward,
    reconstruction_loss_forward,
)
from .mnist import load_mnist, read_idx
from .network import (
    CapsNetConfig,
    init_params,
    network_backward,
    network_forward,
    parameter_count,
    parameter_shapes,
    classify,
)
from .prediction import prediction_backward, prediction_forward
from .routing import routing_backward, routing_forward
from .squash import squash_backward, squash_forward

__all__ = [
    "squash_forward",
    "squash_backward",
    "prediction_forward",
    "prediction_backward",
    "routing_forward",
    "routing_backward",
    "capsule_linear_forward",
    "capsule_linear_backward",
    "capsule_length_forward",
    "capsule_length_backward",
    "margin_loss_forward",
    "margin_loss_backward",
    "reconstruction_loss_forward",
    "reconstruction_loss_backward",
    "conv2d_forward",
    "conv2d_backward",
    "relu_forward",
    "relu_backward",
    "linear_forward",
    "linear_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "CapsNetConfig",
    "parameter_shapes",
    "parameter_count",
    "init_params",
    "network_forward",
    "network_backward",
    "classify",
    "read_idx",
    "load_mnist",
]
