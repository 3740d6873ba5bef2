"""The generated inputs of the paper's other experiments (SPEC section 9), as tensor functions.

- MultiMNIST (Section 6): two digits of different classes of one split, each shifted by up to 4
  pixels on its own 36 x 36 canvas, overlaid by min(1, a + b). `multimnist` makes a set of them;
  training draws a `PairRecipe` per step (`draw_pairs`: which digits, which shifts) and
  `compose_pairs` turns it into images, so no pair is ever stored.
- `place` puts each digit at its own position on a larger canvas (MultiMNIST's two digits).
  MNIST on a 40 x 40 canvas (Section 5.2) is centred by mnist_variants.load_on_canvas and
  shifted by data.random_shift.
- An affNIST-like test set: `affine_transform` applies a random affine map with affNIST's
  published ranges to each 40 x 40 digit. It is *generated*, not affNIST (see `data.DATASETS`).

Everything is vectorised over the batch on the tensors' device (no per-sample Python), and every
random draw comes from an explicit torch.Generator on that device, so a seed gives the same data
on every run of a device type.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MULTI_CANVAS", "PairRecipe", "ClassGroups", "AFFINE_RANGES", "place", "class_groups", "draw_pairs",
           "compose_pairs", "multimnist", "affine_transform"]

MULTI_CANVAS = 36                  # MultiMNIST canvas side: a 28 x 28 digit with 4 pixels each side

# affNIST's published ranges: rotation in degrees, shear, scale per axis (translation: anywhere the
# digit stays inside the canvas).
AFFINE_RANGES = {"rotation": (-20.0, 20.0), "shear": (-0.2, 0.2), "scale": (0.8, 1.2)}


class PairRecipe(NamedTuple):
    """What makes a set of MultiMNIST pairs: digit indices into a split and their shifts."""

    index: torch.Tensor            # int64 [N, 2]: the two digits of each pair (distinct classes)
    shift: torch.Tensor            # int64 [N, 2, 2]: (dy, dx) of each digit from the canvas centre


class ClassGroups(NamedTuple):
    """A split's samples grouped by class, to draw a partner of another class without a host sync."""

    order: torch.Tensor            # int64 [N]: sample indices sorted by class
    start: torch.Tensor            # int64 [K]: where each class begins in `order`
    count: torch.Tensor            # int64 [K]: samples of each class


def place(images, top, left, size):
    """Each image on its own zero canvas of size x size, its top-left corner at (top, left).

    images [B, C, h, w] (any dtype); top, left integer [B] (may be negative or push the image
    partly off the canvas: what falls outside is cut). Returns [B, C, size, size], one gather.
    """
    batch, channels, height, width = images.shape
    device = images.device
    rows = torch.arange(size, device=device) - top[:, None]           # [B, size]: source row of each canvas row
    cols = torch.arange(size, device=device) - left[:, None]          # [B, size]
    inside = (((rows >= 0) & (rows < height))[:, None, :, None]
              & ((cols >= 0) & (cols < width))[:, None, None, :])    # [B, 1, size, size]
    gathered = images[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows.clamp(0, height - 1)[:, None, :, None],
        cols.clamp(0, width - 1)[:, None, None, :],
    ]                                                                 # [B, C, size, size]
    return torch.where(inside, gathered, torch.zeros((), dtype=images.dtype, device=device))


def class_groups(labels):
    """`ClassGroups` of integer labels [N]; ValueError unless they hold at least two classes.

    Reads the labels once (a host sync), so that drawing pairs afterwards needs none.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype in (torch.bool,) or labels.is_floating_point():
        raise TypeError(f"labels must be an integer torch.Tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got {list(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got {int(labels.min())}")
    count = torch.bincount(labels.long())                               # [K]
    classes, digits = int((count > 0).sum()), labels.numel()
    if classes < 2:
        raise ValueError("MultiMNIST needs a split with at least two classes (each pair is two different digits), "
                         f"got {classes} among {digits} digit{'s' * (digits != 1)}; a larger --validation-size "
                         "or --limit-train gives more")
    order = torch.argsort(labels, stable=True)
    return ClassGroups(order, torch.cumsum(count, 0) - count, count)


def _check_max_shift(max_shift, digit_size, canvas):
    room = (canvas - digit_size) // 2
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    if max_shift > room:
        raise ValueError(f"max_shift {max_shift} would push a {digit_size}x{digit_size} digit out of the "
                         f"{canvas}x{canvas} canvas (at most {room})")


def draw_pairs(labels, groups, first, generator, *, max_shift=4, digit_size=28, canvas=MULTI_CANVAS):
    """The `PairRecipe` of pairs whose first digits are `first` (int64 [B] into the split).

    Each partner is of another class: the class uniformly among the split's other classes, the
    sample uniformly within it. Shifts are uniform integers in [-max_shift, max_shift], independent
    per digit and axis. All draws come from `generator`, on the labels' device.
    """
    _check_max_shift(max_shift, digit_size, canvas)
    device = labels.device
    num_classes = groups.count.shape[0]
    first_class = labels[first]                                                        # [B]
    allowed = (groups.count > 0)[None, :] & (torch.arange(num_classes, device=device) != first_class[:, None])
    second_class = torch.multinomial(allowed.float(), 1, generator=generator)[:, 0]   # [B]
    available = groups.count[second_class]                                             # [B]
    position = (torch.rand(first.shape, generator=generator, device=device) * available).long()
    second = groups.order[groups.start[second_class] + torch.minimum(position, available - 1)]
    shift = torch.randint(-max_shift, max_shift + 1, (first.shape[0], 2, 2), generator=generator, device=device)
    return PairRecipe(torch.stack([first, second], dim=1), shift)


def compose_pairs(digits, shift, canvas=MULTI_CANVAS):
    """digits float [B, 2, C, h, w] in [0, 1] and shifts [B, 2, 2] -> (pairs, parts).

    parts [B, 2, C, canvas, canvas]: each digit on its own canvas, centred then shifted;
    pairs [B, C, canvas, canvas] = min(1, parts[:, 0] + parts[:, 1]) (SPEC 9: add and clip).
    """
    batch, _, channels, height, width = digits.shape
    top = shift[..., 0].flatten() + (canvas - height) // 2                            # [B*2] centred, then shifted
    left = shift[..., 1].flatten() + (canvas - width) // 2
    parts = place(digits.flatten(0, 1), top, left, canvas)
    parts = parts.unflatten(0, (batch, 2))                                            # [B, 2, C, S, S]
    return torch.clamp(parts[:, 0] + parts[:, 1], max=1.0), parts


def multimnist(images, labels, count, *, seed, max_shift=4):
    """`count` MultiMNIST pairs from one split's digits (SPEC 9, the paper's Section 6).

    images float [N, 1, 28, 28] in [0, 1], integer labels [N]. Pair k's first digit is digit
    k mod N (so count = 10 N makes ten pairs per digit, as the fixed test set does); its partner is
    drawn from another class. Deterministic for a seed on a device type.
    Returns (pairs [count, 1, 36, 36] in [0, 1], labels int64 [count, 2] of two distinct classes,
    parts [count, 2, 1, 36, 36] each digit's own shifted canvas), pairs == min(1, parts[:, 0] + parts[:, 1]).
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point torch.Tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"images must have shape [N, 1, 28, 28], got {list(images.shape)}")
    if images.numel() and not (0.0 <= float(images.min()) and float(images.max()) <= 1.0):
        raise ValueError("images must lie in [0, 1] (scale uint8 pixels by 1/255)")
    if isinstance(labels, torch.Tensor):
        labels = labels.to(images.device)
    groups = class_groups(labels)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    _check_max_shift(max_shift, 28, MULTI_CANVAS)
    labels = labels.long()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    first = torch.arange(count, device=images.device) % images.shape[0]
    recipe = draw_pairs(labels, groups, first, generator, max_shift=max_shift)
    pairs, parts = compose_pairs(images[recipe.index], recipe.shift)
    return pairs, labels[recipe.index], parts


def _bounding_box(images):
    """Per image [B, 1, H, W]: (top, bottom, left, right) pixel indices of the non-zero pixels,
    the whole canvas for an empty image. Returns float [B, 4]."""
    height, width = images.shape[-2:]
    rows = (images[:, 0] > 0).any(dim=2)                                  # [B, H]
    cols = (images[:, 0] > 0).any(dim=1)                                  # [B, W]

    def extent(mask, size):
        index = torch.arange(size, device=mask.device, dtype=torch.float32)
        low = torch.where(mask, index, float(size)).amin(dim=1)
        high = torch.where(mask, index, -1.0).amax(dim=1)
        empty = ~mask.any(dim=1)
        return torch.where(empty, 0.0, low), torch.where(empty, size - 1.0, high)

    top, bottom = extent(rows, height)
    left, right = extent(cols, width)
    return torch.stack([top, bottom, left, right], dim=1)


def affine_transform(images, *, generator):
    """A random affine map of each square image with affNIST's ranges (SPEC 9), and its parameters.

    images float [B, 1, S, S] in [0, 1] (a digit on a canvas with room around it, e.g. MNIST on
    40 x 40). About the canvas centre c, pixel p goes to M (p - c) + c + t with
    M = rotation(theta) @ shear(s) @ scale(sx, sy): theta uniform in +-20 degrees, s (x += s y)
    in +-0.2, sx and sy in [0.8, 1.2], then t uniform among the translations that keep the
    transformed bounding box of the digit inside the canvas (t = 0 on an axis where it cannot fit).
    Sampled bilinearly with zeros outside. Returns (images [B, 1, S, S], params: a dict of [B]
    tensors of the images' dtype "rotation" (degrees), "shear", "scale_x", "scale_y", "shift_x", "shift_y").
    """
    batch, _, size, _ = images.shape
    device = images.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator, device=device, dtype=images.dtype)

    rotation = uniform(*AFFINE_RANGES["rotation"])
    shear = uniform(*AFFINE_RANGES["shear"])
    scale_x, scale_y = uniform(*AFFINE_RANGES["scale"]), uniform(*AFFINE_RANGES["scale"])
    theta = rotation * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # M = [[cos, -sin], [sin, cos]] @ [[1, s], [0, 1]] @ diag(sx, sy), acting on (x, y) = (col, row).
    matrix = torch.stack([
        torch.stack([cos * scale_x, (cos * shear - sin) * scale_y], dim=1),
        torch.stack([sin * scale_x, (sin * shear + cos) * scale_y], dim=1),
    ], dim=1)                                                                          # [B, 2, 2]
    centre = (size - 1) / 2.0
    top, bottom, left, right = (_bounding_box(images).to(images.dtype) - centre).unbind(dim=1)
    corners = torch.stack([torch.stack([left, top], 1), torch.stack([right, top], 1),
                           torch.stack([left, bottom], 1), torch.stack([right, bottom], 1)], dim=2)  # [B, 2, 4]
    moved = matrix @ corners                                                           # [B, 2, 4]
    low_room = -centre - moved.amin(dim=2)                                             # [B, 2] smallest t
    high_room = centre - moved.amax(dim=2)                                             # [B, 2] largest t
    fits = low_room <= high_room
    draw = torch.rand(batch, 2, generator=generator, device=device, dtype=images.dtype)
    shift = torch.where(fits, low_room + draw * (high_room - low_room), torch.zeros_like(draw))
    # grid_sample wants, per output pixel, where to read: p_in - c = M^-1 (p_out - c - t), in
    # align_corners=True units where the canvas spans [-1, 1], i.e. pixel offsets / c.
    inverse = torch.linalg.inv(matrix)                                                 # [B, 2, 2]
    offset = -(inverse @ shift[:, :, None]) / centre                                  # [B, 2, 1]
    grid = F.affine_grid(torch.cat([inverse, offset], dim=2), list(images.shape), align_corners=True)
    transformed = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    params = dict(rotation=rotation, shear=shear, scale_x=scale_x, scale_y=scale_y,
                  shift_x=shift[:, 0], shift_y=shift[:, 1])
    return transformed.clamp(0.0, 1.0), params
