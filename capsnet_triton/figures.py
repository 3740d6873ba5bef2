"""PNG figures of a trained CapsNet and its training run (matplotlib, no display needed).

- `reconstruction_figure`: inputs above the decoder's reconstructions (paper Figure 3).
- `perturbation_figure` of `capsule_perturbations`: each of the 16 dimensions of the predicted
  digit capsule shifted by -0.25 .. 0.25 in steps of 0.05 and decoded (paper Figure 4).
- `training_curves_figure`: loss and error from the JSON-lines log that training writes.
- `segmentation_figure`: MultiMNIST pairs above each digit's reconstruction from its own capsule,
  one in red and one in green (paper Figure 5).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas and never touch pyplot, so
no GUI backend or global state is involved. A grid of images is drawn as one tiled image rather
than hundreds of axes, which keeps a 16 x 11 grid fast to render.
"""

import json
import os

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from .files import atomic_write

__all__ = [
    "PERTURBATIONS", "capsule_perturbations", "reconstruction_figure", "perturbation_figure",
    "segmentation_figure", "align_predictions", "training_curves_figure", "read_log", "write_figures",
]

# Figure 4: every dimension of the capsule moved by -0.25, -0.20, ..., 0.25 (11 values).
PERTURBATIONS = tuple(round(0.05 * k, 2) for k in range(-5, 6))


def _to_hwc(images):
    """[..., C, H, W] tensor in [0, 1] -> NumPy [..., H, W, C] float, clipped."""
    array = images.detach().float().cpu().numpy()
    return np.clip(np.moveaxis(array, -3, -1), 0.0, 1.0)


def _tile(grid, gap=2):
    """[R, K, H, W, C] -> one [R*H + (R-1)*gap, K*W + (K-1)*gap, C] image, white between cells."""
    rows, cols, height, width, channels = grid.shape
    out = np.ones((rows * (height + gap) - gap, cols * (width + gap) - gap, channels))
    for r in range(rows):
        for c in range(cols):
            top, left = r * (height + gap), c * (width + gap)
            out[top:top + height, left:left + width] = grid[r, c]
    return out, height + gap, width + gap


def _show(ax, tiled):
    if tiled.shape[-1] == 1:
        ax.imshow(tiled[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(tiled, interpolation="nearest")


def _save(fig, path):
    """Write `fig` to `path` atomically, in the format its extension names (PNG without one): a
    full disk leaves the previous figure whole and says which figure it could not write."""
    FigureCanvasAgg(fig)
    with atomic_write(path) as f:
        # "tight": the image holds exactly the axes and their labels, no empty band around them.
        fig.savefig(f, format=os.path.splitext(os.fspath(path))[1][1:].lower() or "png", dpi=100,
                    bbox_inches="tight")
    return os.fspath(path)


class _PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks of a log axis to label (some minor ones where the axis
    spans under two decades), written as plain numbers: 0.6, 2, 30, not 6x10^-1."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_ticks(axis):
    axis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def reconstruction_figure(images, reconstructions, path, *, labels=None, predictions=None, title=None):
    """Inputs (top row) above their reconstructions (bottom row); writes a PNG to `path`.

    images [N, C, H, W] in [0, 1]; reconstructions [N, C*H*W] (the decoder's output) or
    [N, C, H, W]; labels / predictions: optional integer [N], printed above each column; title:
    optional, below the images (e.g. which set they come from).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {list(images.shape)}")
    if reconstructions.shape[0] != images.shape[0] or reconstructions[0].numel() != images[0].numel():
        raise ValueError(
            f"reconstructions of shape {list(reconstructions.shape)} do not match images of shape {list(images.shape)}"
        )
    pair = torch.stack([images, reconstructions.reshape(images.shape)])     # [2, N, C, H, W]
    tiled, cell_height, cell_width = _tile(_to_hwc(pair))
    count = images.shape[0]
    fig = Figure(figsize=(max(4.0, 0.9 * count), 2.4))
    ax = fig.add_subplot()
    _show(ax, tiled)
    ax.set_yticks([images.shape[2] / 2, cell_height + images.shape[2] / 2], ["input", "reconstruction"])
    if labels is not None or predictions is not None:
        captions = []
        for n in range(count):
            parts = []
            if labels is not None:
                parts.append(f"label {int(labels[n])}")
            if predictions is not None:
                parts.append(f"pred {int(predictions[n])}")
            captions.append("\n".join(parts))
        ax.set_xticks([n * cell_width + images.shape[3] / 2 for n in range(count)], captions, fontsize=7)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if title:
        ax.set_xlabel(title)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def capsule_perturbations(model, image, *, deltas=PERTURBATIONS, capsule=None):
    """Decode one digit capsule with each dimension perturbed in turn (paper Figure 4).

    model: a CapsNet with a decoder; image [C, H, W] in [0, 1]. The capsule is the longest one
    (the prediction) unless `capsule` names a class. With v its D-dim vector and e_d the d-th
    unit vector, decodes v + delta e_d for every d and every delta in `deltas`, all other
    capsules masked to zero as in Section 4.1.
    Returns (capsule index, decoded images [D, len(deltas), C, H, W]).
    """
    if model.decoder is None:
        raise ValueError("the model has no decoder, so there is nothing to perturb and decode")
    was_training = model.training
    model.eval()
    try:
        output = model(image[None])
        lengths = output.lengths[0]                                       # [J]
        j = int(lengths.argmax()) if capsule is None else int(capsule)
        if not 0 <= j < lengths.shape[0]:
            raise ValueError(f"capsule must be a class in [0, {lengths.shape[0]}), got {capsule}")
        v = output.v[0]                                                   # [J, D]
        num_caps, dims = v.shape
        shifts = torch.tensor(deltas, dtype=v.dtype, device=v.device)    # [K]
        basis = torch.eye(dims, dtype=v.dtype, device=v.device)          # [D, D]
        perturbed = v[j] + shifts[None, :, None] * basis[:, None, :]      # [D, K, D]
        masked = v.new_zeros(dims, len(deltas), num_caps, dims)           # [D, K, J, D]
        masked[:, :, j] = perturbed
        decoded = model.decoder(masked.reshape(-1, num_caps * dims))      # [D*K, C*H*W]
    finally:
        model.train(was_training)
    return j, decoded.reshape(dims, len(deltas), *image.shape)


def perturbation_figure(grid, path, *, capsule=None, deltas=PERTURBATIONS, title=None):
    """Draw the [D, K, C, H, W] output of `capsule_perturbations` as a D x K grid; writes `path`.
    title: optional, replaces the default "dimension perturbations" heading."""
    if grid.ndim != 5 or grid.shape[1] != len(deltas):
        raise ValueError(f"grid must have shape [D, {len(deltas)}, C, H, W], got {list(grid.shape)}")
    dims = grid.shape[0]
    tiled, cell_height, cell_width = _tile(_to_hwc(grid))
    fig = Figure(figsize=(0.55 * len(deltas) + 1.2, 0.55 * dims + 0.8))
    ax = fig.add_subplot()
    _show(ax, tiled)
    ax.set_xticks([k * cell_width + grid.shape[4] / 2 for k in range(len(deltas))],
                  [f"{d:+.2f}" for d in deltas], fontsize=7)
    ax.set_yticks([d * cell_height + grid.shape[3] / 2 for d in range(dims)], [str(d) for d in range(dims)], fontsize=7)
    ax.set_xlabel("perturbation")
    ax.set_ylabel("capsule dimension")
    ax.set_title((title or "dimension perturbations") + ("" if capsule is None else f" of capsule {capsule}"),
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _pair_caption(labels):
    return "(" + ",".join(str(int(k)) for k in labels) + ")"


def segmentation_figure(pairs, reconstructions, path, *, labels, predictions, title=None):
    """MultiMNIST inputs (top row) above the reconstructions of their two predicted digits, the
    first in red and the second in green, yellow where they overlap (paper Figure 5); writes `path`.

    pairs [N, 1, H, W] in [0, 1]; reconstructions [N, 2, H*W] (the decoder's outputs from the two
    capsules); labels (L) and predictions (P) integer [N, 2], printed above each column (see
    align_predictions for their order); title: optional, below the images, with the colour key.
    """
    count, _, height, width = pairs.shape
    if tuple(reconstructions.shape) != (count, 2, height * width):
        raise ValueError(f"reconstructions must have shape [{count}, 2, {height * width}] for pairs of shape "
                         f"{list(pairs.shape)}, got {list(reconstructions.shape)}")
    decoded = reconstructions.reshape(count, 2, height, width)
    coloured = torch.stack([decoded[:, 0], decoded[:, 1], torch.zeros_like(decoded[:, 0])], dim=1)  # [N, 3, H, W]
    grid = torch.stack([pairs.expand(-1, 3, -1, -1), coloured])                                    # [2, N, 3, H, W]
    tiled, cell_height, cell_width = _tile(_to_hwc(grid))
    fig = Figure(figsize=(max(4.0, 0.9 * count), 2.6))
    ax = fig.add_subplot()
    _show(ax, tiled)
    ax.set_yticks([height / 2, cell_height + height / 2], ["input", "reconstruction"])
    ax.set_xticks([n * cell_width + width / 2 for n in range(count)],
                  [f"L:{_pair_caption(labels[n])}\nP:{_pair_caption(predictions[n])}" for n in range(count)],
                  fontsize=7)
    ax.xaxis.tick_top()
    key = "L: labels, P: predictions; red: the first predicted digit's reconstruction, green: the second's"
    ax.set_xlabel(f"{title}\n{key}" if title else key, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def align_predictions(predictions, labels):
    """The two predicted classes [N, 2] of each pair ordered as its labels where they share a
    class, so that a right pair reads L:(7,3) P:(7,3), not P:(3,7), and red and green stand for
    the first and second label's digit wherever it was found."""
    swap = (predictions[:, 0] != labels[:, 0]) & ((predictions[:, 1] == labels[:, 0])
                                                  | (predictions[:, 0] == labels[:, 1]))
    return torch.where(swap[:, None], predictions.flip(1), predictions)


def read_log(path):
    """The records of a JSON-lines training log, as a list of dicts; ValueError naming the first
    line that is not a JSON record."""
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}, line {number}, is not a JSON record ({e})") from e
    return records


# What each curve of the training log is: the training records are means over a window of
# augmented steps, whose reconstruction the label masks; validation decodes the prediction.
_CURVES = (("train", "-", "train (mean of each logging window, shifted images)"),
           ("validation", "o-", "validation (each epoch)"))


def training_curves_figure(log_path, path, *, metric="accuracy"):
    """Training and validation loss (left) and error, 100% minus the metric (right), against the
    step, both on log axes, where the last tenths of a percent are visible; the test of the best
    model, when the log has it, as a star at the step where it was chosen (its epoch's validation;
    the last step where the log lacks that epoch). An error of 0, which a log axis cannot show, is
    drawn at 0.01% (one example in 10,000, or in the largest set the log counts where it counts a
    larger one), on a dotted line that the legend names. Writes `path`.

    Reads the JSON-lines log of `capsnet_triton.train`: "train" records (every few steps) and
    "validation" records (every epoch), both with "step", "loss" and "accuracy", and the final
    "test" record.
    """
    records = read_log(log_path)
    fig = Figure(figsize=(10, 4))
    loss_ax, error_ax = fig.subplots(1, 2)
    # Log scales before anything is drawn: a lone point on its dotted line at the floor, autoscaled
    # on a linear axis first, is a range of zero height, which the switch to log warns about.
    loss_ax.set(xlabel="step", ylabel="total loss (margin + weighted reconstruction)", title="loss", yscale="log")
    error_ax.set(xlabel="step", ylabel=f"error (%), 100 - {metric}", title=f"error (100% - {metric})", yscale="log")
    # A perfect score would be log(0): it is drawn at 0.01%, or one example of a larger set.
    floor = 100.0 / max([r.get("count", 0) for r in records] + [10_000])
    below = []                                                        # the errors drawn at the floor

    def shown(accuracy):
        error = 100.0 * (1.0 - accuracy)
        # An error of one example at the floor's count computes a hair under it (1 - 0.9999 is
        # 9.99999999999989e-05): it is measured, not drawn there for want of a log 0.
        if error < floor * (1 - 1e-9):
            below.append(error)
        return max(floor, error)

    for event, style, label in _CURVES:
        points = [r for r in records if r.get("event") == event]
        if not points:
            continue
        steps = [r["step"] for r in points]
        # A line through one point draws nothing: a lone record (one logging window) is a dot.
        style = style if len(points) > 1 else "o"
        loss_ax.plot(steps, [r["loss"] for r in points], style, label=label)
        error_ax.plot(steps, [shown(r["accuracy"]) for r in points], style, label=label)
    test = [r for r in records if r.get("event") == "test"]
    steps = [r["step"] for r in records if "step" in r]
    if test and steps:
        best_epoch = test[-1].get("best_epoch", "?")
        # At the step where best.pt was chosen (its epoch's validation), where the log has it.
        chosen = [r["step"] for r in records if r.get("event") == "validation" and r.get("epoch") == best_epoch]
        step = chosen[-1] if chosen else max(steps)
        # The count says which test this is: the run's own (--limit-test), not a later evaluate's.
        count = test[-1].get("count")
        label = f"test of best.pt (epoch {best_epoch}{'' if count is None else f', {count} examples'})"
        loss_ax.plot([step], [test[-1]["loss"]], "*", markersize=12, label=label)
        error_ax.plot([step], [shown(test[-1]["accuracy"])], "*", markersize=12, label=label)
    if below:
        # Else a point at the floor reads as a measured error of that size.
        note = (f"error 0 drawn at {floor:.2g}% (a log axis has no 0)" if not any(below)
                else f"errors under {floor:.2g}% drawn at {floor:.2g}%")
        error_ax.axhline(floor, color="gray", linestyle=":", linewidth=1, label=note)
    for ax in (loss_ax, error_ax):
        _plain_log_ticks(ax.yaxis)
        ax.grid(alpha=0.3, which="both")
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def write_figures(model, split, out_dir, *, dataset, model_name, metric="accuracy", log_path=None, count=8):
    """Write the figures of a model on the first `count` samples of `split` into `out_dir`.

    model: a CapsNet (not DDP-wrapped); split: an evaluation split on the model's device (see
    `evaluate.evaluate`); dataset: the name of the set `split` comes from, and model_name: which
    model it is (its checkpoint's file name), both written on each figure;
    metric: what the training curves' accuracy counts. reconstructions.png (segmentation.png for
    MultiMNIST pairs) and perturbations.png need the decoder; training_curves.png needs the log.
    Returns the paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    title = f"{model_name} on the {dataset} test set, first {min(count, len(split))}"
    if log_path is not None and os.path.isfile(log_path):
        written.append(training_curves_figure(log_path, os.path.join(out_dir, "training_curves.png"), metric=metric))
    if model.decoder is None:
        return written
    was_training = model.training
    model.eval()
    try:
        batch = split.batch(torch.arange(min(count, len(split)), device=next(model.parameters()).device))
        images = batch.images                                             # [N, C, H, W]
        if batch.labels.ndim == 2:
            # Each of the K longest capsules decoded alone, as in the paper's Figure 5.
            predictions = model(images).lengths.topk(batch.labels.shape[1], dim=1).indices  # [N, K]
            predictions = align_predictions(predictions, batch.labels)
            written.append(segmentation_figure(
                images, model(images, predictions).reconstruction, os.path.join(out_dir, "segmentation.png"),
                labels=batch.labels, predictions=predictions, title=title,
            ))
        else:
            output = model(images)                                        # decoder masked by the prediction
            written.append(reconstruction_figure(
                images, output.reconstruction, os.path.join(out_dir, "reconstructions.png"),
                labels=batch.labels, predictions=output.lengths.argmax(dim=1), title=title,
            ))
        capsule, grid = capsule_perturbations(model, images[0])
        label = batch.labels[0]
        label = _pair_caption(label) if label.ndim else str(int(label))
        written.append(perturbation_figure(
            grid, os.path.join(out_dir, "perturbations.png"), capsule=capsule,
            title=f"{model_name} on {dataset} test example 0 (label {label}): dimension perturbations"))
    finally:
        model.train(was_training)
    return written
