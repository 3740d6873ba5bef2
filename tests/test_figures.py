"""What the figures say: the training curves' axes and marks, the segmentation figure's order
and key. (That training and evaluate write them is tests/test_train.py's.)"""

import json

import pytest
import torch

from capsnet_triton import figures


@pytest.fixture
def drawn(monkeypatch):
    """The Figure objects the figure functions save, drawn, instead of only their PNG files."""
    saved = []

    def keep(fig, path):
        figures.FigureCanvasAgg(fig).draw()
        saved.append(fig)
        return str(path)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def _log(tmp_path, records):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_curves_plot_the_error_on_log_axes_with_the_test_of_the_best_model(tmp_path, drawn):
    log = _log(tmp_path, [
        {"event": "train", "step": 10, "loss": 0.6, "accuracy": 0.5},
        {"event": "train", "step": 20, "loss": 0.3, "accuracy": 0.9},
        {"event": "validation", "epoch": 1, "step": 20, "loss": 0.2, "accuracy": 0.99, "count": 500},
        {"event": "train", "step": 30, "loss": 0.1, "accuracy": 0.995},
        {"event": "validation", "epoch": 2, "step": 30, "loss": 0.05, "accuracy": 1.0, "count": 500},
        {"event": "test", "best_epoch": 1, "loss": 0.06, "accuracy": 0.996, "count": 1000},
    ])
    figures.training_curves_figure(log, tmp_path / "curves.png", metric="accuracy")
    (fig,) = drawn
    loss_ax, error_ax = fig.axes
    assert loss_ax.get_yscale() == error_ax.get_yscale() == "log"
    assert error_ax.get_ylabel() == "error (%), 100 - accuracy"
    lines = {line.get_label(): line for line in error_ax.get_lines()}
    assert list(lines["train (mean of each logging window, shifted images)"].get_ydata()) == pytest.approx(
        [50.0, 10.0, 0.5])
    # A perfect validation score is drawn at 0.01% (the sets here are smaller), not at log(0).
    assert list(lines["validation (each epoch)"].get_ydata()) == pytest.approx([1.0, 0.01])
    star = lines["test of best.pt (epoch 1, 1000 examples)"]   # at the step where best.pt was chosen
    assert list(star.get_xdata()) == [20] and list(star.get_ydata()) == pytest.approx([0.4])
    # Log axes labelled in plain numbers, not 6x10^-1.
    labels = [t.get_text() for ax in (loss_ax, error_ax) for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and not any("10^" in text or "e-" in text or "times" in text for text in labels), labels


def test_predictions_are_ordered_as_the_labels_they_share():
    labels = torch.tensor([[7, 3], [2, 3], [1, 0], [4, 6]])
    predictions = torch.tensor([[3, 7], [2, 3], [7, 1], [5, 4]])
    assert figures.align_predictions(predictions, labels).tolist() == [[7, 3], [2, 3], [1, 7], [4, 5]]


def test_the_segmentation_figure_says_what_its_colours_and_letters_mean(tmp_path, drawn):
    pairs = torch.rand(3, 1, 6, 6)
    labels = torch.tensor([[1, 2], [3, 4], [5, 6]])
    figures.segmentation_figure(pairs, torch.rand(3, 2, 36), tmp_path / "s.png", labels=labels, predictions=labels,
                                title="best.pt on the multimnist test set, first 3")
    (fig,) = drawn
    caption = fig.axes[0].get_xlabel()
    assert caption.startswith("best.pt on the multimnist test set") and "L: labels, P: predictions" in caption
    assert "red: the first predicted digit's" in caption and "green: the second's" in caption
