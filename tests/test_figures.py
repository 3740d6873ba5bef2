"""What the figures say: the training curves' axes and marks, the segmentation figure's order
and key. (That training and evaluate write them is tests/test_train.py's.)"""

import contextlib
import errno
import json
import os

import numpy as np
import pytest
import torch

from capsnet_triton import CapsNet, figures
from capsnet_triton.data import Split, dataset_spec, to_float


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


def _legend(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


@pytest.mark.filterwarnings("error")     # a lone point on the floor's line made matplotlib warn of a singular range
def test_an_error_of_0_is_drawn_at_one_example_and_the_figure_says_so(tmp_path, drawn):
    validations = [{"event": "validation", "epoch": 1, "step": 20, "loss": 0.2, "accuracy": 0.99, "count": 500},
                   {"event": "validation", "epoch": 2, "step": 40, "loss": 0.1, "accuracy": 1.0, "count": 500}]
    figures.training_curves_figure(_log(tmp_path, validations), tmp_path / "c.png")
    figures.training_curves_figure(_log(tmp_path, [*validations, {"event": "test", "best_epoch": 2, "loss": 0.1,
                                                                  "accuracy": 1.0, "count": 60_000}]), tmp_path / "c.png")
    figures.training_curves_figure(_log(tmp_path, validations[:1]), tmp_path / "c.png")
    figures.training_curves_figure(_log(tmp_path, [{"event": "train", "step": 10, "loss": 0.1, "accuracy": 0.99995}]),
                                   tmp_path / "c.png")
    for one_error in ({"event": "validation", "epoch": 1, "step": 20, "loss": 0.2, "accuracy": 0.9999, "count": 10_000},
                      {"event": "validation", "epoch": 1, "step": 20, "loss": 0.1, "accuracy": 59_999 / 60_000,
                       "count": 60_000}):
        figures.training_curves_figure(_log(tmp_path, [one_error]), tmp_path / "c.png")
    figures.training_curves_figure(_log(tmp_path, [{"event": "train", "step": 10, "loss": 0.1, "accuracy": 0.99995},
                                                   {"event": "train", "step": 20, "loss": 0.1, "accuracy": 1.0}]),
                                   tmp_path / "c.png")
    perfect, perfect_of_more, imperfect, under, *measured, mixed = (fig.axes[1] for fig in drawn)
    note = "error 0 drawn at 0.01% (a log axis has no 0)"
    assert note in _legend(perfect)
    (floor,) = [line for line in perfect.get_lines() if line.get_label() == note]
    assert list(floor.get_ydata()) == pytest.approx([0.01, 0.01])    # the dotted line at 0.01%
    # A set of 60,000 counted: the floor is one example of it, and the note says where that is.
    assert "error 0 drawn at 0.0017% (a log axis has no 0)" in _legend(perfect_of_more)
    assert not any("drawn at" in text for text in _legend(imperfect))
    assert "errors under 0.01% drawn at 0.01%" in _legend(under)     # 0.005%, of a window of training steps
    # One error in 10,000 (or in the 60,000 the floor is set by) is a measurement, at the floor.
    assert not any("drawn at" in text for ax in measured for text in _legend(ax))
    assert "errors under 0.01% drawn at 0.01%" in _legend(mixed)     # 0.005% and 0: not all of them 0


def test_a_curve_of_one_record_is_drawn_as_a_dot(tmp_path, drawn):
    """One line through a single point draws nothing: the curve would be in the legend only."""
    figures.training_curves_figure(_log(tmp_path, [{"event": "train", "step": 10, "loss": 0.6, "accuracy": 0.5}]),
                                   tmp_path / "c.png")
    (fig,) = drawn
    for ax in fig.axes:
        (line,) = ax.get_lines()
        assert line.get_marker() == "o" and len(line.get_xdata()) == 1


def test_a_figure_that_cannot_be_written_leaves_the_previous_one_whole_and_names_its_file(tmp_path, monkeypatch):
    log = _log(tmp_path, [{"event": "train", "step": 10, "loss": 0.6, "accuracy": 0.5}])
    path = tmp_path / "training_curves.png"
    figures.training_curves_figure(log, path)
    previous = path.read_bytes()
    assert previous.startswith(b"\x89PNG")
    figures.training_curves_figure(log, tmp_path / "curves.pdf")         # the format its name says
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    os.remove(tmp_path / "curves.pdf")

    def disk_full_midway(fig, target, **options):
        with contextlib.ExitStack() as stack:
            out = target if hasattr(target, "write") else stack.enter_context(open(target, "wb"))
            out.write(previous[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(figures.Figure, "savefig", disk_full_midway)
    with pytest.raises(OSError) as raised:
        figures.training_curves_figure(log, path)
    # The commands print str(error) as their one line: it says which figure, and errno still says why.
    assert str(raised.value) == f"[Errno {errno.ENOSPC}] could not write {path}: No space left on device"
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "training_curves.png"]    # no temporary file left


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


def test_segmentation_draws_the_first_digit_red_the_second_green_and_labels_before_predictions(tmp_path, drawn):
    pairs = torch.rand(2, 1, 6, 6)
    reconstructions = torch.rand(2, 2, 36)
    figures.segmentation_figure(pairs, reconstructions, tmp_path / "s.png", labels=torch.tensor([[1, 2], [3, 4]]),
                                predictions=torch.tensor([[5, 6], [7, 8]]))
    (fig,) = drawn
    ax = fig.axes[0]
    tiled = np.asarray(ax.get_images()[0].get_array())
    row = 6 + 2                                                        # the reconstruction row
    for n in range(2):
        cell = tiled[row:row + 6, n * 8:n * 8 + 6]
        np.testing.assert_allclose(cell[..., 0], reconstructions[n, 0].reshape(6, 6).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(cell[..., 1], reconstructions[n, 1].reshape(6, 6).numpy(), rtol=0, atol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L:(1,2)\nP:(5,6)", "L:(3,4)\nP:(7,8)"]


def test_align_predictions_also_swaps_where_the_first_prediction_is_the_second_label():
    labels, predictions = torch.tensor([[1, 0]]), torch.tensor([[0, 5]])
    assert figures.align_predictions(predictions, labels).tolist() == [[5, 0]]


def test_reconstruction_captions_give_each_columns_label_then_prediction(tmp_path, drawn):
    figures.reconstruction_figure(torch.rand(2, 1, 5, 5), torch.rand(2, 25), tmp_path / "r.png",
                                  labels=torch.tensor([1, 2]), predictions=torch.tensor([3, 4]))
    (fig,) = drawn
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["label 1\npred 3", "label 2\npred 4"]


# A small network for the figures' content: what they show of its output, not how good it is.
TINY = dict(conv_channels=8, primary_types=2, decoder_hidden=(16, 32))


def _capture_figures(monkeypatch):
    got = {}
    for name in ("reconstruction_figure", "segmentation_figure", "perturbation_figure"):
        monkeypatch.setattr(figures, name, lambda *a, _n=name, **k: got.setdefault(_n, (a, k)) and f"{_n}.png")
    return got


def test_write_figures_shows_the_predictions_and_test_example_0(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = CapsNet(**TINY).eval()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5])
    got = _capture_figures(monkeypatch)
    figures.write_figures(model, dataset_spec("mnist").evaluation_split(Split(images, labels), True), tmp_path,
                          dataset="mnist", model_name="best.pt")
    with torch.no_grad():
        lengths = model(to_float(images)).lengths
    _, kwargs = got["reconstruction_figure"]
    assert torch.equal(kwargs["predictions"], lengths.argmax(dim=1)) and torch.equal(kwargs["labels"], labels)
    assert kwargs["title"] == "best.pt on the mnist test set, first 5"
    (grid, _), kwargs = got["perturbation_figure"]
    capsule, expected = figures.capsule_perturbations(model, to_float(images[0]))
    assert kwargs["capsule"] == capsule and torch.equal(grid, expected)
    assert "(label 3)" in kwargs["title"]


def test_write_figures_decodes_each_pair_from_its_two_longest_capsules(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = CapsNet(image_size=36, **TINY).eval()
    with torch.no_grad():           # an untrained network's capsules are ~1e-4 long: make the decoder see them
        model.decoder.fc1.weight.mul_(1e6)
    digits = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    pairs = dataset_spec("multimnist").evaluation_split(Split(digits, torch.arange(30) % 10), True)
    got = _capture_figures(monkeypatch)
    figures.write_figures(model, pairs, tmp_path, dataset="multimnist", model_name="best.pt")
    batch = pairs.batch(torch.arange(8))
    (images, reconstructions, _), kwargs = got["segmentation_figure"]
    with torch.no_grad():
        longest = model(batch.images).lengths.topk(2, dim=1).indices
        assert torch.equal(kwargs["predictions"].sort(dim=1).values, longest.sort(dim=1).values)
        assert not torch.equal(kwargs["predictions"], batch.labels)     # else labels and predictions decode alike
        torch.testing.assert_close(reconstructions, model(batch.images, kwargs["predictions"]).reconstruction)
        assert not torch.allclose(reconstructions, model(batch.images, batch.labels).reconstruction, atol=1e-3)


def _seeing_model(**options):
    torch.manual_seed(0)
    model = CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(16, 32), **options).eval()
    with torch.no_grad():           # an untrained network's capsules are ~1e-4 long: make the decoder see them
        model.decoder.fc1.weight.mul_(1e6)
    return model


def test_the_reconstruction_figure_decodes_the_predicted_capsule(tmp_path, monkeypatch):
    """reconstructions.png shows the decoder masked by the prediction (SPEC 4), not by the label."""
    model = _seeing_model()
    images = torch.randint(0, 256, (5, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    got = {}
    monkeypatch.setattr(figures, "reconstruction_figure", lambda *a, **k: got.setdefault("r", (a, k)) and "r.png")
    monkeypatch.setattr(figures, "perturbation_figure", lambda *a, **k: "p.png")
    with torch.no_grad():
        output = model(to_float(images))
    labels = (output.lengths.argmax(dim=1) + 1) % 10                 # never the prediction
    figures.write_figures(model, Split(images, labels), tmp_path, dataset="mnist", model_name="best.pt")
    (_, reconstructions, _), _ = got["r"]
    torch.testing.assert_close(reconstructions, output.reconstruction)


def test_perturbations_decode_the_chosen_capsule_alone_moved_by_the_papers_steps():
    """Figure 4: each of the chosen capsule's dimensions moved by -0.25 .. 0.25 in steps of 0.05,
    the other capsules masked out."""
    assert figures.PERTURBATIONS == pytest.approx([0.05 * k for k in range(-5, 6)])
    model = _seeing_model().double()             # float64: the scaled decoder amplifies float32 rounding
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    j, grid = figures.capsule_perturbations(model, image)
    with torch.no_grad():
        v = model(image[None]).v[0]
        for d in (0, 7, 15):
            for k, delta in enumerate(figures.PERTURBATIONS):
                masked = torch.zeros_like(v)
                masked[j] = v[j]
                masked[j, d] += delta
                torch.testing.assert_close(grid[d, k], model.decoder(masked.reshape(1, -1)).reshape(image.shape))


def test_read_log_skips_blank_lines_and_names_a_line_that_is_not_json(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "train", "step": 1}\n\n  \n{"event": "train", "step": 2}\n')
    assert [record["step"] for record in figures.read_log(path)] == [1, 2]
    path.write_text('{"event": "train", "step": 1}\n{"event": "tr\n')
    with pytest.raises(ValueError, match="line 2, is not a JSON record"):
        figures.read_log(path)
