"""The generators of SPEC 9's inputs: MultiMNIST pairs (shapes, range, distinct labels,
determinism, each part a whole shifted digit, shifts within bounds, bad input) and the
affNIST-like affine maps (parameters within affNIST's ranges, recovered from the images)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capsnet_triton.synthetic import (AFFINE_RANGES, affine_transform, class_groups, compose_pairs, draw_pairs,
                                      multimnist, place)


def noisy_digits(count, seed=0, classes=10):
    """Digits with every pixel non-zero (so a part's non-zero box is the whole digit) and all distinct."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.05 + 0.95 * torch.rand(count, 1, 28, 28, generator=generator)
    return images, torch.arange(count) % classes


def locate(part):
    """(top, left) of the non-zero box of a [1, 36, 36] part, and its 28 x 28 content."""
    rows = torch.nonzero(part[0].sum(dim=1)).flatten()
    cols = torch.nonzero(part[0].sum(dim=0)).flatten()
    top, left = int(rows[0]), int(cols[0])
    assert (int(rows[-1]) - top, int(cols[-1]) - left) == (27, 27)
    return top, left, part[:, top:top + 28, left:left + 28]


# --- the generator ------------------------------------------------------------------------------

def test_pairs_shapes_range_distinct_labels_and_overlay():
    images, labels = noisy_digits(40)
    pairs, pair_labels, parts = multimnist(images, labels, 300, seed=3)
    assert pairs.shape == (300, 1, 36, 36) and parts.shape == (300, 2, 1, 36, 36) and pair_labels.shape == (300, 2)
    assert pair_labels.dtype == torch.int64 and pairs.dtype == images.dtype
    assert 0.0 <= float(pairs.min()) and float(pairs.max()) <= 1.0 and float(pairs.max()) == 1.0
    assert bool((pair_labels[:, 0] != pair_labels[:, 1]).all())
    assert torch.equal(pairs, torch.clamp(parts[:, 0] + parts[:, 1], max=1.0))
    assert torch.equal(pair_labels[:, 0], labels[torch.arange(300) % 40])       # pair k starts with digit k mod N


def test_each_part_is_one_whole_digit_of_its_label_shifted_within_bounds():
    images, labels = noisy_digits(30)
    for max_shift in (4, 2, 0):
        _, pair_labels, parts = multimnist(images, labels, 400, seed=max_shift, max_shift=max_shift)
        shifts = []
        for k in range(parts.shape[0]):
            for j in range(2):
                top, left, content = locate(parts[k, j])
                shifts.append((top - 4, left - 4))
                matches = [n for n in range(len(images)) if torch.equal(images[n], content)]
                assert len(matches) == 1 and labels[matches[0]] == pair_labels[k, j]
                # nothing but the digit on its canvas
                assert float(parts[k, j].sum()) == pytest.approx(float(content.sum()), rel=1e-6)
        shifts = np.array(shifts)
        assert np.abs(shifts).max() == max_shift                  # within bounds, and the extremes occur
        assert len(np.unique(shifts[:, 0])) == 2 * max_shift + 1 == len(np.unique(shifts[:, 1]))


def test_partners_come_from_the_other_classes_of_the_split():
    images, _ = noisy_digits(20)
    labels = torch.tensor([3, 7] * 10)
    _, pair_labels, _ = multimnist(images, labels, 200, seed=0)
    assert {tuple(sorted(row)) for row in pair_labels.tolist()} == {(3, 7)}
    _, pair_labels, _ = multimnist(*noisy_digits(100), 2000, seed=1)
    counts = np.bincount(pair_labels[:, 1].numpy(), minlength=10)
    assert counts.min() > 2000 / 10 * 0.6                           # every other class gets chosen


def test_deterministic_for_a_seed():
    images, labels = noisy_digits(25)
    first = multimnist(images, labels, 64, seed=11)
    again = multimnist(images, labels, 64, seed=11)
    other = multimnist(images, labels, 64, seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])


def test_bad_input_raises():
    images, labels = noisy_digits(10)
    with pytest.raises(ValueError, match="at least two classes .*, got 1 among 10 digits; a larger --validation-size"):
        multimnist(images, torch.full((10,), 4), 5, seed=0)
    for count in (0, -3):
        with pytest.raises(ValueError, match="count"):
            multimnist(images, labels, count, seed=0)
    with pytest.raises(ValueError, match="out of the 36x36 canvas"):
        multimnist(images, labels, 5, seed=0, max_shift=5)
    with pytest.raises(ValueError, match="max_shift"):
        multimnist(images, labels, 5, seed=0, max_shift=-1)
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        multimnist(images[:, :, :20], labels, 5, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multimnist(images * 255, labels, 5, seed=0)
    with pytest.raises(TypeError):
        multimnist((images * 255).to(torch.uint8), labels, 5, seed=0)
    with pytest.raises(TypeError):
        multimnist(images, labels.float(), 5, seed=0)
    with pytest.raises(ValueError, match="labels"):
        multimnist(images, labels[:7], 5, seed=0)


def test_place_cuts_what_falls_outside():
    image = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3)
    placed = place(image.expand(2, -1, -1, -1), torch.tensor([-1, 3]), torch.tensor([1, 2]), 4)
    assert torch.equal(placed[0, 0], torch.tensor([[0, 4, 5, 6], [0, 7, 8, 9], [0, 0, 0, 0], [0, 0, 0, 0.]]))
    assert torch.equal(placed[1, 0], torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 2.]]))




# --- the affNIST-like affine maps ---------------------------------------------------------------

def mnist_like_on_40(count, seed=0):
    """Blobby digit-sized shapes of varied extent, centred on a 40 x 40 canvas (like MNIST padded by 6)."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.zeros(count, 1, 28, 28)
    for n in range(count):
        top, left = torch.randint(3, 8, (2,), generator=generator).tolist()
        height, width = torch.randint(12, 21, (2,), generator=generator).tolist()
        digits[n, 0, top:top + height, left:left + width] = 0.2 + 0.8 * torch.rand(height, width, generator=generator)
    return F.pad(digits, (6, 6, 6, 6))


def centroid(images):
    """(x, y) intensity centroid of each [1, S, S] image, in pixels."""
    size = images.shape[-1]
    index = torch.arange(size, dtype=images.dtype)
    mass = images.sum(dim=(1, 2, 3))
    x = (images.sum(dim=(1, 2)) * index).sum(dim=1) / mass
    y = (images.sum(dim=(1, 3)) * index).sum(dim=1) / mass
    return torch.stack([x, y], dim=1)


def test_affine_parameters_lie_in_affnists_ranges_and_are_seeded():
    images = mnist_like_on_40(400)
    out, params = affine_transform(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    for name, key in (("rotation", "rotation"), ("shear", "shear"), ("scale", "scale_x"), ("scale", "scale_y")):
        low, high = AFFINE_RANGES[name]
        values = params[key]
        assert low <= float(values.min()) and float(values.max()) <= high
        assert float(values.max() - values.min()) > 0.9 * (high - low)      # the whole range is used
    assert AFFINE_RANGES == {"rotation": (-20.0, 20.0), "shear": (-0.2, 0.2), "scale": (0.8, 1.2)}
    again, _ = affine_transform(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert float(params["shift_x"].abs().max()) > 3.0                       # translations are drawn too


def _linear_part(params):
    """[B, 2, 2]: the linear part of affine_transform's maps, from the parameters it returns."""
    theta = params["rotation"] * np.pi / 180
    cos, sin, shear = torch.cos(theta), torch.sin(theta), params["shear"]
    return torch.stack([
        torch.stack([cos * params["scale_x"], (cos * shear - sin) * params["scale_y"]], dim=1),
        torch.stack([sin * params["scale_x"], (sin * shear + cos) * params["scale_y"]], dim=1)], dim=1)


def test_affine_map_is_recovered_from_the_images():
    """Mass scales by det M = sx sy (so no part of a digit left the canvas, though the
    translations use all the room there is) and the centroid moves to M (p - c) + c + t: the
    sampled map is the applied one."""
    images = mnist_like_on_40(300, seed=1).double()
    out, params = affine_transform(images, generator=torch.Generator().manual_seed(5))
    mass_ratio = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    torch.testing.assert_close(mass_ratio, params["scale_x"] * params["scale_y"], rtol=0.02, atol=0.0)
    assert float((out[..., 0, :].sum(-1) + out[..., -1, :].sum(-1) + out[..., 0].sum(-1) + out[..., -1].sum(-1)
                  > 0).double().mean()) > 0.05                     # some digits do reach an edge
    matrix = _linear_part(params)
    centre = 19.5
    expected = ((matrix @ (centroid(images) - centre)[:, :, None])[:, :, 0] + centre
                + torch.stack([params["shift_x"], params["shift_y"]], dim=1))
    torch.testing.assert_close(centroid(out), expected, rtol=0.0, atol=0.25)


def test_compose_pairs_puts_each_digit_at_its_own_dy_and_dx():
    """shift[..., 0] moves the digit down, shift[..., 1] right: not both by one of them."""
    digits = torch.ones(3, 2, 1, 28, 28)
    shift = torch.tensor([[[-4, 3], [2, -1]], [[0, 4], [-3, 0]], [[4, -4], [1, 2]]])
    _, parts = compose_pairs(digits, shift)
    for k in range(3):
        for j in range(2):
            rows = torch.nonzero(parts[k, j, 0].sum(dim=1)).flatten()
            cols = torch.nonzero(parts[k, j, 0].sum(dim=0)).flatten()
            assert (int(rows[0]) - 4, int(cols[0]) - 4) == tuple(shift[k, j].tolist())


def test_affine_translation_is_zero_on_an_axis_where_the_digit_cannot_fit():
    """A digit filling the canvas fits only where the map shrinks it enough; elsewhere t = 0, as
    documented, not a value between two impossible limits."""
    images = torch.ones(256, 1, 40, 40, dtype=torch.float64)
    _, params = affine_transform(images, generator=torch.Generator().manual_seed(0))
    matrix = _linear_part(params)
    corners = torch.tensor([[-19.5, 19.5, -19.5, 19.5], [-19.5, -19.5, 19.5, 19.5]], dtype=torch.float64)
    extent = (matrix @ corners).abs().amax(dim=2)                      # [B, 2]: half-width of the moved box
    shift = torch.stack([params["shift_x"], params["shift_y"]], dim=1)
    fits = extent <= 19.5
    assert 0 < int(fits.sum()) < fits.numel()                          # both cases occur
    assert bool((shift[~fits] == 0).all())
    assert bool((shift[fits].abs() <= 19.5 - extent[fits] + 1e-9).all())


def test_affine_scales_are_drawn_independently_per_axis():
    _, params = affine_transform(torch.zeros(200, 1, 40, 40), generator=torch.Generator().manual_seed(0))
    assert float((params["scale_x"] - params["scale_y"]).abs().max()) > 0.2


def test_pair_draws_are_independent_and_use_every_partner():
    """SPEC 9: each digit of a pair shifted on its own, in each axis on its own; a partner drawn
    among all the digits of its class, not always the same one."""
    labels = torch.arange(100) % 10
    recipe = draw_pairs(labels, class_groups(labels), torch.arange(5000) % 100, torch.Generator().manual_seed(0))
    shifts = recipe.shift.reshape(-1, 4).double()                   # dy1, dx1, dy2, dx2
    correlation = torch.corrcoef(shifts.T) - torch.eye(4, dtype=torch.float64)
    assert float(correlation.abs().max()) < 0.1
    assert len(recipe.index[:, 1].unique()) == 100


def test_affine_translations_span_the_whole_room():
    """A translation is uniform over all the room that keeps the transformed digit in the canvas."""
    images = torch.zeros(400, 1, 40, 40, dtype=torch.float64)
    images[:, :, 10:30, 10:30] = 1.0                               # box 10..29: corners at +-9.5 from the centre
    _, params = affine_transform(images, generator=torch.Generator().manual_seed(0))
    matrix = _linear_part(params)
    corners = torch.tensor([[-9.5, 9.5, -9.5, 9.5], [-9.5, -9.5, 9.5, 9.5]], dtype=torch.float64)
    moved = matrix @ corners
    low, high = -19.5 - moved.amin(dim=2), 19.5 - moved.amax(dim=2)
    assert bool((low < high).all())                                # every digit fits here
    where = (torch.stack([params["shift_x"], params["shift_y"]], dim=1) - low) / (high - low)
    assert float(where.min()) >= -1e-9 and float(where.max()) <= 1 + 1e-9
    assert float(where.min()) < 0.05 and float(where.max()) > 0.95
