"""The MNIST-derived datasets of the paper's other experiments (SPEC 9), as entries of
`data.DATASETS`: multimnist, mnist40, affnist-generated and affnist (see `capsnet_triton.data`).

This module is imported by `capsnet_triton.data` once its own names exist, and adds the entries;
it holds their loaders and the split types MultiMNIST needs (`PairSplit`, `PairSource`).
"""

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import data
from .affnist import read_affnist
from .synthetic import ClassGroups, PairRecipe, affine_transform, class_groups, compose_pairs, draw_pairs

__all__ = ["PairSplit", "PairSource", "load_on_canvas", "load_affine_generated", "load_affnist",
           "fixed_translations", "fixed_pairs", "pair_source"]


class PairSplit(NamedTuple):
    """A fixed set of MultiMNIST pairs: the digits and the recipe; each batch is composed when asked."""

    digits: data.Split                  # 28 x 28 digits of one split
    recipe: PairRecipe

    def __len__(self):
        return self.recipe.index.shape[0]

    @property
    def labels(self):
        """int64 [N, 2]: the classes of each pair's two digits."""
        return self.digits.labels[self.recipe.index]

    def subset(self, index):
        return PairSplit(self.digits, PairRecipe(*(tensor[index] for tensor in self.recipe)))

    def to(self, device):
        return PairSplit(self.digits.to(device), PairRecipe(*(tensor.to(device) for tensor in self.recipe)))

    def batch(self, index):
        """Batch of pairs [B, 1, 36, 36], their two labels [B, 2] and each digit's canvas [B, 2, 1, 36, 36]."""
        digits = self.recipe.index[index]                                   # [B, 2]
        pairs, parts = compose_pairs(data.to_float(self.digits.images[digits]), self.recipe.shift[index])
        return data.Batch(pairs, self.digits.labels[digits], parts)


class PairSource(NamedTuple):
    """MultiMNIST's training set: fresh pairs for every step, from the digits of one split."""

    digits: data.Split
    groups: ClassGroups            # the digits' labels grouped by class

    def __len__(self):
        return len(self.digits)

    def to(self, device):
        return PairSource(self.digits.to(device), ClassGroups(*(tensor.to(device) for tensor in self.groups)))

    def augmented(self, index, seed, step, max_shift):
        """Pairs whose first digits are `index`, partners and shifts drawn from (seed, step) on the device."""
        generator = torch.Generator(device=self.digits.images.device).manual_seed(data.derive_seed(seed, 3, step))
        recipe = draw_pairs(self.digits.labels, self.groups, index, generator, max_shift=max_shift)
        return PairSplit(self.digits, recipe).batch(slice(None))


def load_on_canvas(spec, directory, train):
    """MNIST's split with each digit centred on a zero canvas of the entry's image_shape."""
    split = data.load_idx_split(spec, directory, train)
    margin = (spec.image_shape[1] - split.images.shape[2]) // 2
    return data.Split(F.pad(split.images, (margin,) * 4), split.labels)


# Fixed seeds of the generated evaluation sets, the same for every run so results compare.
_EVALUATION_SEED = 9


def load_affine_generated(spec, directory, train):
    """The affNIST-like generated test set (train is False: a test set only): MNIST's test digits
    on 40 x 40 under random affine maps of affNIST's ranges (`synthetic.affine_transform`), fixed
    by a seed."""
    digits = load_on_canvas(spec, directory, train=False)
    generator = torch.Generator().manual_seed(data.derive_seed(_EVALUATION_SEED, 1))
    images, _ = affine_transform(data.to_float(digits.images), generator=generator)
    return data.Split(torch.round(images * 255.0).to(torch.uint8), digits.labels)


def load_affnist(spec, directory, train):
    """affNIST's transformed test set from its published files (see `affnist.read_affnist`;
    train is False: a test set only)."""
    images, labels = read_affnist(directory)
    return data.Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


def fixed_translations(split, test):
    """mnist40's validation and test digits, each at a random position fixed by a seed."""
    generator = torch.Generator().manual_seed(data.derive_seed(_EVALUATION_SEED, 2, int(test)))
    return data.Split(data.random_shift(split.images, 6, generator=generator), split.labels)


def fixed_pairs(split, test):
    """MultiMNIST's fixed evaluation pairs of a split on the CPU: one per held-out digit for
    validation, ten per test digit for the test (SPEC 9), pair k's first digit being digit k mod N."""
    count = len(split) * (10 if test else 1)
    generator = torch.Generator().manual_seed(data.derive_seed(_EVALUATION_SEED, 3, int(test)))
    first = torch.arange(count) % len(split)
    return PairSplit(split, draw_pairs(split.labels, class_groups(split.labels), first, generator))


def pair_source(split):
    return PairSource(split, class_groups(split.labels))


_MNIST = data.DATASETS["mnist"]
data.DATASETS.update({
    "multimnist": replace(
        _MNIST, name="multimnist", image_shape=(1, 36, 36), stored_shape=(1, 28, 28), digit_shape=(1, 28, 28),
        training_split=pair_source,
        evaluation_split=fixed_pairs, defaults={"max_shift": 4, "lr_decay_steps": 20000},
        metric="both-digit accuracy"),
    "mnist40": replace(_MNIST, name="mnist40", image_shape=(1, 40, 40), digit_shape=(1, 28, 28),
                       loader=load_on_canvas, evaluation_split=fixed_translations, defaults={"max_shift": 6}),
    "affnist-generated": replace(_MNIST, name="affnist-generated", image_shape=(1, 40, 40),
                                 loader=load_affine_generated, test_only=True),
    "affnist": data.DatasetSpec(name="affnist", image_shape=(1, 40, 40), num_classes=10, loader=load_affnist,
                                folder="affNIST", mirrors=(), files=(), test_only=True),
})
