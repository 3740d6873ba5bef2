"""The NumPy reference of CapsNet with dynamic routing: the ground truth every kernel and the
PyTorch model are tested against, and a readable specification of the paper.

Imports nothing but NumPy and the standard library. One file per concept:
squash (Eq. 1), prediction vectors (Eq. 2), routing (Procedure 1, Eq. 3), losses (Eq. 4 and
Section 4.1), the plain layers the network needs, and the whole MNIST network (Section 4).
"""

from .routing import routing_backward, routing_forward
from .squash import squash_backward, squash_forward

__all__ = ["squash_forward", "squash_backward", "routing_forward", "routing_backward"]
