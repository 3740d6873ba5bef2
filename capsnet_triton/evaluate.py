"""Evaluate a trained CapsNet checkpoint on the test set and draw its figures.

    python -m capsnet_triton.evaluate RUN_DIR/best.pt --data DIR

prints the test accuracy and writes reconstructions.png, perturbations.png (paper Figures 3
and 4) and, when the run's log.jsonl sits beside the checkpoint, training_curves.png.

Also home of `evaluate`, the accuracy and loss of a model over a whole split, which training
uses for its validation and test passes.
"""

import argparse
import os

import torch
import torch.distributed as dist

from .data import DATASETS, load_split, to_float
from .figures import write_figures
from .losses import capsnet_loss
from .model import build_model
from .training.checkpoint import load_checkpoint
from .training.distributed import resolve_device

__all__ = ["evaluate", "load_model", "main"]


@torch.no_grad()
def evaluate(model, split, *, batch_size=256, reconstruction_weight=0.0005, amp=False):
    """Loss terms and accuracy of `model` over a whole `data.Split` (on the model's device).

    As SPEC section 4 has it for evaluation, the decoder sees the longest capsule, not the true
    label's; the margin loss uses the labels, and the accuracy counts the longest capsule. Under
    torch.distributed each rank evaluates a contiguous share and the sums are all-reduced, so
    every rank returns the totals of the whole split.
    Returns a dict: loss, margin, reconstruction (batch means), accuracy, count.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = model.training
    model.eval()
    device = split.images.device
    loss_sums = torch.zeros(3, dtype=torch.float64, device=device)     # total, margin, reconstruction
    correct = torch.zeros((), dtype=torch.float64, device=device)
    share = torch.tensor_split(torch.arange(len(split), device=device), world)[rank]
    try:
        for index in share.split(batch_size):
            images, labels = to_float(split.images[index]), split.labels[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                output = model(images)
            terms = capsnet_loss(output, images, labels, reconstruction_weight=reconstruction_weight)
            loss_sums += torch.stack(terms).double() * len(index)
            correct += (output.lengths.argmax(dim=1) == labels).sum()
    finally:
        model.train(was_training)
    sums = torch.cat([loss_sums, correct[None], loss_sums.new_tensor([len(share)])])
    if distributed:
        dist.all_reduce(sums)
    total, margin, reconstruction, correct, count = sums.tolist()
    if count == 0:
        raise ValueError("cannot evaluate an empty split")
    return dict(loss=total / count, margin=margin / count, reconstruction=reconstruction / count,
                accuracy=correct / count, count=int(count))


def load_model(path, device="cpu"):
    """Rebuild the model saved in a training checkpoint (best.pt or last.pt).

    Returns (model in eval mode on `device`, the checkpoint dict).
    """
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m capsnet_triton.evaluate",
        description="Test-set accuracy and figures of a trained CapsNet checkpoint.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by training (RUN_DIR/best.pt or last.pt)")
    parser.add_argument("--data", help="dataset directory (default: the one the run was trained on)")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="default: the run's dataset")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N test images")
    parser.add_argument("--out", metavar="DIR", help="where to write the figures (default: the checkpoint's folder)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    device = resolve_device(args.device)
    try:
        model, checkpoint = load_model(args.checkpoint, device)
    except ValueError as e:
        parser.error(str(e))
    config = checkpoint["config"]
    test = load_split(args.data or config["data"], args.dataset or config["dataset"], train=False)
    if args.limit is not None:
        test = test.subset(slice(0, args.limit))
    test = test.to(device)
    metrics = evaluate(model, test, batch_size=args.batch_size,
                       reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
    print(f"test accuracy {metrics['accuracy']:.2%} (error {1 - metrics['accuracy']:.2%}) on "
          f"{metrics['count']} images, loss {metrics['loss']:.5f}")
    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    for path in write_figures(model, test, args.out or run_dir, log_path=os.path.join(run_dir, "log.jsonl")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
