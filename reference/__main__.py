"""Train a reduced-width CapsNet on MNIST with nothing but NumPy, to show the reference learns.

    python -m capsnet_triton.reference --data DIR [--steps 300] [--batch 32] [--eval 1000] [--seed 0]

DIR holds MNIST's IDX files (train-images-idx3-ubyte.gz etc., gzipped or not), flat or in
torchvision's MNIST/raw layout below it, as the training command's --download writes. The network is
the paper's (Section 4) with fewer channels so that a few hundred Adam steps take minutes on a
laptop CPU. It holds the last --eval training images out for validation and prints the loss
falling and the validation accuracy rising; the first --eval test images are scored once, at the
end (as SPEC section 6 asks: choose on validation, report test once). So --eval must leave training
images and find that many test images; what does not fit the data is refused as a usage error
(exit 2) before any training. A batch is drawn with replacement, so it may be larger than the
training images; one too large for the machine's memory ends the run with one line (exit 1).
"""

import argparse
import sys
import time

import numpy as np

from .mnist import load_mnist
from .network import CapsNetConfig, classify, init_params, network_backward, network_forward, parameter_count
from .optim import Adam


def _small_config(image_size):
    """The paper's network at a quarter of the conv width and a half of the decoder's."""
    return CapsNetConfig(image_size=image_size, conv_channels=64, primary_types=8, decoder_hidden=(256, 512))


def _as_input(images):
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [0, 1]."""
    return images[:, None, :, :].astype(np.float32) / 255


def _accuracy(params, images, labels, config, batch=100):
    """The fraction of `images` classified as their label, scored `batch` at a time.

    Scoring takes a second or two per thousand images on a CPU, so on a terminal a counter on
    stderr shows a long one moving; pipes and logs, where it would be clutter, never get it.
    """
    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    counter = f"scoring {len(images):,} images:"
    correct = 0
    try:
        for start in range(0, len(images), batch):
            if on_terminal:
                print(f"{counter} {start / len(images):4.0%}", end="\r", file=sys.stderr, flush=True)
            classes, _ = classify(params, _as_input(images[start:start + batch]), config, reconstruct=False)
            correct += int(np.sum(classes == labels[start:start + batch]))
    finally:
        if on_terminal:
            # Erased, also when Ctrl-C stops the scoring, so that the next line is not written over it.
            print(" " * len(f"{counter} 100%"), end="\r", file=sys.stderr, flush=True)
    return correct / len(images)


def _load_splits(parser, args):
    """(training, validation, test) splits of --data, each (images, labels), after refusing
    through `parser` the data and the --eval that do not fit it, before any training."""
    try:
        train_images, train_labels = load_mnist(args.data, train=True)
        test_images, test_labels = load_mnist(args.data, train=False)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    (height, width), test_size = train_images.shape[1:], test_images.shape[1:]
    if height != width or test_size != (height, width):
        # The network is sized for square training images (_small_config): found now, not at the
        # first step or at the final scoring.
        parser.error(f"the training images in {args.data} are {height} x {width}, the test images "
                     f"{test_size[0]} x {test_size[1]}: the demo takes square images, all of one size")
    if args.eval >= len(train_images):
        parser.error(f"--eval {args.eval} leaves no training images of the {len(train_images)} in {args.data}")
    if args.eval > len(test_images):
        # Else the final line would score fewer test images than --eval says, without a word.
        parser.error(f"--eval {args.eval} asks for more test images than the {len(test_images)} in {args.data}")
    kept = len(train_images) - args.eval        # the training images left after holding out --eval
    return ((train_images[:kept], train_labels[:kept]),
            (train_images[kept:], train_labels[kept:]),
            (test_images[:args.eval], test_labels[:args.eval]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m capsnet_triton.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="DIR", help="folder with MNIST's IDX files")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--eval", type=int, default=1000,
                        help="training images held out for validation, and test images scored at the end (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.eval < 1:
        parser.error("--steps, --batch and --eval must be positive")
    if args.seed < 0:
        # NumPy's generators take only non-negative seeds; said here, not as its traceback.
        parser.error(f"--seed must be 0 or more, got {args.seed}")

    steps_done = 0      # for the line Ctrl-C ends with
    try:
        (train_images, train_labels), (val_images, val_labels), (test_images, test_labels) = _load_splits(parser, args)
        config = _small_config(train_images.shape[1])
        rng = np.random.default_rng(args.seed)
        params = init_params(config, rng, dtype=np.float32)
        optimizer = Adam(params)
        print(f"NumPy CapsNet: conv {config.conv_channels} ch, {config.primary_types} primary types, "
              f"{parameter_count(config):,} parameters; {len(train_images):,} training images, "
              f"{len(val_images):,} held out for validation")

        report_every = max(1, args.steps // 6)
        losses, started = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            chosen = rng.integers(0, len(train_images), size=args.batch)
            loss, cache = network_forward(params, _as_input(train_images[chosen]), train_labels[chosen], config)
            optimizer.step(params, network_backward(cache))
            steps_done = step
            losses.append(float(loss))
            if step % report_every == 0 or step == args.steps:
                accuracy = _accuracy(params, val_images, val_labels, config)
                print(f"step {step:5d}  loss {np.mean(losses):.4f}  validation accuracy {100 * accuracy:5.1f}%  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                losses = []
        accuracy = _accuracy(params, test_images, test_labels, config)
        print(f"test accuracy {100 * accuracy:.1f}% on {len(test_images):,} test images")
    except KeyboardInterrupt:
        # Ctrl-C is how a run is cut short: one line, not a traceback, with the status a shell
        # reports for a process that SIGINT ended (128 + 2).
        print(f"{parser.prog}: interrupted (Ctrl-C) after {steps_done} of {args.steps} steps", file=sys.stderr)
        return 130
    except MemoryError:
        # A batch's activations (about 0.7 MB an image here) that the machine cannot hold.
        print(f"{parser.prog}: out of memory at step {steps_done + 1} with --batch {args.batch}: "
              f"pass a smaller one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
