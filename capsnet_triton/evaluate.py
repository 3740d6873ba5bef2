"""Evaluate a trained CapsNet checkpoint on the test set and draw its figures.

    python -m capsnet_triton.evaluate RUN_DIR/best.pt --data DIR
    python -m capsnet_triton.evaluate RUN_DIR/best.pt --dataset affnist-generated   (a mnist40 model)

prints the test accuracy (both-digit accuracy for MultiMNIST), keeps it with the loss terms and the
number of examples in evaluation.json (with the checkpoint, its SHA-256 and the data scored), and writes reconstructions.png and
perturbations.png (paper Figures 3 and 4; segmentation.png, the paper's Figure 5, instead of
reconstructions.png for MultiMNIST), each naming the checkpoint and the set it shows, and, when
the run's log.jsonl sits beside the checkpoint, training_curves.png. They go into the
checkpoint's folder only for what the run's own figures show, its best.pt on its whole test set;
any other checkpoint, dataset or --limit gets a subfolder named after them (last/, affnist/,
last-affnist/, first-100/), so that the run's figures stay (for another dataset without the
training curves, which are not about it). It writes a run folder only under the run's lock, so
not while that run is still training there (see --out). The checkpoint's checksum and
the test files' MD5s (unless --no-verify-data) are checked first, so a corrupt checkpoint or
another dataset's files are refused, not scored.

Also home of `evaluate`, the accuracy and loss of a model over a whole split, which training
uses for its validation and test passes.
"""

import contextlib
import hashlib
import json
import math
import os

from .training.starting import command_name, is_command, until_running

# A Ctrl-C while torch loads ends the command with one line (training.starting).
with until_running(command_name("capsnet-evaluate", "capsnet_triton.evaluate"), is_command(__name__, "capsnet-evaluate")):
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from .data import DATASETS, dataset_spec, load_split
    from .files import atomic_write
    from .figures import write_figures
    from .losses import capsnet_loss, check_labels, correct_predictions
    from .model import build_model
    from .training.checkpoint import LOCK_NAME, SCORES_NAME, load_checkpoint, lock_run_folder
    from .training.config import check_run_config, missing_data_folder, unwritable_folder
    from .training.distributed import resolve_device
    from .training.errors import ArgumentParser, run_command

__all__ = ["evaluate", "example_count", "load_model", "main", "SCORES_NAME"]


@torch.no_grad()
def evaluate(model, split, *, batch_size=256, reconstruction_weight=0.0005, amp=False, progress=None):
    """Loss terms and accuracy of `model` over a whole evaluation split (on the model's device).

    split: a `data.Split` or any object with len() and batch(index) -> `data.Batch` (MultiMNIST's
    `mnist_variants.PairSplit`). As SPEC section 4 has it for evaluation, the decoder sees the
    longest capsule, not the true label's; the margin loss uses the labels, and the accuracy
    counts the longest capsule. Examples of K labels (MultiMNIST, SPEC 9) count as right only
    when the K longest capsules are their K classes, and each digit is reconstructed from its own
    class's capsule, since each reconstruction is scored against that digit's canvas. Under
    torch.distributed each rank evaluates a contiguous share and the sums are all-reduced, so
    every rank returns the totals of the whole split.
    The labels are checked once for the whole split, not per batch (each check waits for the device).
    progress: the label of a progress bar over the batches (on rank 0; gone when done), or None.
    Returns a dict: loss, margin, reconstruction (batch means), accuracy, count.
    """
    check_labels(split.labels, len(split), model.num_classes)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sums = torch.zeros(3, dtype=torch.float64, device=device)     # total, margin, reconstruction
    correct = torch.zeros((), dtype=torch.float64, device=device)
    share = torch.tensor_split(torch.arange(len(split), device=device), world)[rank]
    # A rank's share is empty where the split has fewer examples than there are ranks; split()
    # would still give it one batch, an empty one, which the loss refuses.
    batches = share.split(batch_size) if len(share) else ()
    try:
        for index in tqdm(batches, desc=progress, disable=progress is None or rank != 0, leave=False,
                          dynamic_ncols=True, unit="batch"):
            batch = split.batch(index)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                output = model(batch.images, batch.labels if batch.labels.ndim == 2 else None, validate=False)
            terms = capsnet_loss(output, batch.targets, batch.labels, reconstruction_weight=reconstruction_weight,
                                 validate=False)
            loss_sums += torch.stack(terms).double() * len(index)
            correct += correct_predictions(output.lengths, batch.labels).sum()
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


def example_count(split):
    """How many examples an evaluation split holds, in words for the final line: "N images" ("1
    image"), or "N pairs" for MultiMNIST's examples of two digits (labels [N, 2])."""
    noun = "pair" if split.labels.ndim == 2 else "image"
    return f"{len(split)} {noun}{'' if len(split) == 1 else 's'}"


def load_model(path, device="cpu", *, digest=None):
    """Rebuild the model saved in a training checkpoint (best.pt or last.pt).

    Returns (model in eval mode on `device`, the checkpoint dict). digest: optional hashlib object
    fed the file's bytes as read (see `load_checkpoint`). ValueError, in one line, for
    a checkpoint that cannot be loaded (see `load_checkpoint`), whose config no option of the
    training command could have given (training.config.check_run_config) or whose weights do not
    fit the model its config describes.
    """
    checkpoint = load_checkpoint(path, digest=digest)
    check_run_config(checkpoint["config"], path)
    try:
        model = build_model(checkpoint["config"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: the weights do not fit the model its config describes ({reason}); "
                         f"was the checkpoint written by another version or edited?") from e
    return model.to(device).eval(), checkpoint


def build_parser():
    parser = ArgumentParser(
        prog=command_name("capsnet-evaluate", "capsnet_triton.evaluate"),
        description="Test-set accuracy and figures of a trained CapsNet checkpoint.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by training (RUN_DIR/best.pt or last.pt)")
    parser.add_argument("--data", help="dataset directory (default: the one the run was trained on)")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="default: the run's dataset; a mnist40 model also scores on affnist-generated "
                             "(an affNIST-like set generated from the MNIST test digits) or affnist (its files)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available (default: auto)")
    parser.add_argument("--batch-size", type=int, default=256, help="images (or pairs) per batch (default: 256)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N test images (or pairs)")
    parser.add_argument("--out", metavar="DIR", help="where to write the figures (default: the checkpoint's "
                        "folder for a best.pt on its run's whole test set, else a subfolder of it named "
                        "after the checkpoint, --dataset and --limit, as last-affnist-first-100)")
    parser.add_argument("--no-verify-data", dest="verify_data", action="store_false",
                        help="skip the MD5 check of the test files (for deliberately modified data)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    try:
        with until_running(parser.prog, argv is None):
            device = resolve_device(args.device)
            # The file's SHA-256 (as sha256sum gives it), of the bytes loaded, names the model scored
            # in evaluation.json: a running training may replace best.pt while this one is scored.
            sha256 = hashlib.sha256()
            model, checkpoint = load_model(args.checkpoint, device, digest=sha256)
            datasets = _datasets(args, checkpoint)
    except ValueError as e:
        parser.error(str(e))
    spec, trained_on = datasets
    run_dir, name = os.path.split(os.path.abspath(args.checkpoint))
    own = spec.name == trained_on.name
    folder = args.out or _figure_folder(run_dir, name, spec.name, own, args.limit)
    # Before the data is read and scored (minutes on a whole test set), not after.
    problem = unwritable_folder(folder, "the figures' folder", create=False)
    if problem:
        parser.error(f"--out {folder}: {problem}" if args.out else f"{folder}: {problem} (choose another with --out)")
    data = os.path.abspath(args.data or checkpoint["config"]["data"])
    problem = missing_data_folder(data, None if args.data else "the checkpoint")
    if problem:
        parser.error(problem)
    with contextlib.ExitStack() as lock:
        # A run folder is written under its lock: a training run still writing it would replace
        # best.pt and these figures under the scores of the model it had (checkpoint.lock_run_folder).
        if os.path.realpath(folder) == os.path.realpath(run_dir) or os.path.exists(os.path.join(folder, LOCK_NAME)):
            try:
                lock.enter_context(lock_run_folder(folder))
            except ValueError as e:
                parser.error(str(e))
        return run_command(parser.prog, args.verbose, _evaluate_checkpoint, args, model, checkpoint,
                           sha256.hexdigest(), device, spec, data, os.path.join(run_dir, "log.jsonl") if own else None,
                           folder, owns_ctrl_c=argv is None)


def _figure_folder(run_dir, checkpoint_name, dataset, own, limit):
    """Where evaluate writes its figures by default: run_dir itself for what the training run's
    own figures show (best.pt on the run's dataset, its whole test set), else a subfolder named
    after what differs (the checkpoint's stem, the dataset, the limit), so that nothing
    overwrites the run's figures with those of another model or set."""
    stem = os.path.splitext(checkpoint_name)[0]
    parts = (([] if stem == "best" else [stem]) + ([] if own else [dataset])
             + ([] if limit is None else [f"first-{limit}"]))
    return os.path.join(run_dir, "-".join(parts)) if parts else run_dir


def _datasets(args, checkpoint):
    """(the dataset to score, the one the model was trained on), or a ValueError where the model
    cannot take the first's images or classes (a usage error: said before any data is read)."""
    trained_on = dataset_spec(checkpoint["config"]["dataset"])
    spec = dataset_spec(args.dataset or trained_on.name)
    if (spec.image_shape, spec.num_classes) != (trained_on.image_shape, trained_on.num_classes):
        raise ValueError(f"the model was trained on {trained_on.name} ({list(trained_on.image_shape)}, "
                         f"{trained_on.num_classes} classes) and cannot score {spec.name} "
                         f"({list(spec.image_shape)}, {spec.num_classes} classes)")
    return spec, trained_on


def _evaluate_checkpoint(args, model, checkpoint, sha256, device, spec, data, log_path, folder):
    config = checkpoint["config"]
    # The MD5s tell the datasets apart: a folder of MNIST is refused as Fashion-MNIST's.
    test = load_split(data, spec.name, train=False, verify=args.verify_data)
    test = spec.evaluation_split(test, True)
    if args.limit is not None:
        test = test.subset(slice(0, args.limit))
    test = test.to(device)
    metrics = evaluate(model, test, batch_size=args.batch_size, progress=f"{spec.name} test",
                       reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
    print(f"{spec.name} test {spec.metric} {metrics['accuracy']:.2%} (error {1 - metrics['accuracy']:.2%}) on "
          f"{example_count(test)}, loss {metrics['loss']:.5f}")
    # The score kept beside the figures (stdout alone loses it): strict JSON, as the run's log.
    scores = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": sha256,
              "data": data, "dataset": spec.name, "metric": spec.metric,
              "limit": args.limit,
              **{key: value if math.isfinite(value) else None for key, value in metrics.items()}}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SCORES_NAME)
    with atomic_write(path) as f:
        f.write((json.dumps(scores, indent=1, allow_nan=False) + "\n").encode())
    print(f"wrote {path}")
    for path in write_figures(model, test, folder, dataset=spec.name, metric=spec.metric, log_path=log_path,
                              model_name=os.path.basename(args.checkpoint)):
        print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
