"""Train CapsNet on MNIST or Fashion-MNIST with the paper's recipe (SPEC section 6).

    python -m capsnet_triton.train --data DIR --out runs/mnist            (or: capsnet-train ...)
    python -m capsnet_triton.train --out runs/mnist --resume              (continue a run)
    torchrun --nproc-per-node 4 -m capsnet_triton.train --data DIR --out runs/mnist

Defaults are the paper's: Adam, lr 1e-3 decayed continuously by x0.96 every 2,000 steps (as
the official code's tf.train.exponential_decay, floored at 1e-6), global batch 128, 3 routing
iterations, reconstruction weight 0.0005, random shifts of up to 2 pixels. 5,000 training
images are held out for validation; the model with the best validation accuracy is kept as
RUN_DIR/best.pt and evaluated on the test set once, at the end.

RUN_DIR receives log.jsonl (one JSON record per line: "train" every --log-every steps,
"validation" every epoch, "test" at the end), last.pt (the full training state), best.pt (the
best model) and the figures (see `capsnet_triton.figures`).

Exact resume: every random draw of the data pipeline is a pure function of (seed, epoch,
step) (see `capsnet_triton.data`), and last.pt holds the model, the optimizer, the scheduler,
the RNG states (torch, NumPy, Python, CUDA), the position (epoch, step), the running sums of
the metrics and the length of the log. It is written atomically every epoch and every
--checkpoint-every steps, so a run killed at any moment and resumed with --resume ends
bit-identical on CPU to one never interrupted.

Distributed: under torchrun (RANK / WORLD_SIZE in the environment) every rank trains on its
shard of each global batch through DistributedDataParallel (NCCL on GPUs, gloo on CPUs);
--batch-size is the global batch. Only rank 0 logs and writes files, but every rank reads
RUN_DIR/best.pt for the final test (and last.pt on --resume): across nodes, RUN_DIR must be on a
file system they share (on one node any folder will do).
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .data import (DATASETS, default_permissions, download, epoch_order, load_split, random_shift,
                   shift_generator, to_float, validation_split)
from .evaluate import build_model, evaluate, resolve_device
from .figures import write_figures
from .losses import capsnet_loss

__all__ = ["build_parser", "main", "train", "save_atomic", "MIN_LR"]

# The official code floors the decayed learning rate (tf.maximum(learning_rate, 1e-6)).
MIN_LR = 1e-6
CHECKPOINT_FORMAT = 1

# Options a resumed run may change: they do not alter the trajectory of the parameters, except
# --device (CPU and GPU round differently, so a run resumed on the other loses bit-exactness).
# Every other option is part of the run and must match the checkpoint's.
RESUMABLE = ("data", "download", "epochs", "device", "checkpoint_every", "log_every", "limit_test")


def build_parser(suppress_defaults=False):
    """The command-line parser. With suppress_defaults, options not given are absent from the
    result, which is how a resumed run tells what the user changed from what they left out."""
    parser = argparse.ArgumentParser(
        prog="python -m capsnet_triton.train",
        description="Train CapsNet with dynamic routing (Sabour et al. 2017) on MNIST or Fashion-MNIST.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(group, *flags, default=None, **kwargs):
        if not suppress_defaults:
            kwargs["default"] = default
        group.add_argument(*flags, **kwargs)

    data = parser.add_argument_group("data")
    add(data, "--data", metavar="DIR", help="folder with the IDX files (flat, or torchvision's MNIST/raw layout)")
    add(data, "--dataset", default="mnist", choices=sorted(DATASETS), help="which dataset's files to load")
    add(data, "--download", default=False, action="store_true",
        help="fetch the .gz files from the canonical mirrors into DIR/<MNIST|FashionMNIST>/raw, "
             "keeping those already there that pass their checksum")
    add(data, "--validation-size", default=5000, type=int, help="training images held out for model selection")
    add(data, "--split-seed", default=0, type=int, help="seed of the validation split (fixed across runs)")
    add(data, "--max-shift", default=2, type=int, help="random shift augmentation in pixels (0: none)")
    add(data, "--limit-train", type=int, metavar="N", help="train on N images of the shuffled training split only (smoke runs)")
    add(data, "--limit-val", type=int, metavar="N", help="validate on N images only")
    add(data, "--limit-test", type=int, metavar="N", help="test on N images only")

    optim = parser.add_argument_group("optimisation")
    add(optim, "--epochs", default=50, type=int, help="passes over the training split")
    add(optim, "--batch-size", default=128, type=int, help="global batch, split over the ranks")
    add(optim, "--lr", default=1e-3, type=float, help="Adam learning rate")
    add(optim, "--lr-decay", default=0.96, type=float, help="learning rate factor per --lr-decay-steps")
    add(optim, "--lr-decay-steps", default=2000, type=int, help="steps per --lr-decay factor (applied continuously)")
    add(optim, "--reconstruction-weight", default=0.0005, type=float, help="weight of the reconstruction loss")
    add(optim, "--seed", default=0, type=int, help="seed of the initialisation, the batch order and the shifts")
    add(optim, "--amp", default=False, action="store_true", help="bfloat16 autocast")

    model = parser.add_argument_group("model")
    add(model, "--routing-iterations", default=3, type=int, help="r of Procedure 1")
    add(model, "--no-agreement-grad", dest="agreement_grad", default=True, action="store_false",
        help="treat u_hat as a constant inside the routing agreement (stop-gradient variant)")
    add(model, "--routing-bias", default=False, action="store_true", help="learned bias added to s_j")
    add(model, "--no-decoder", dest="decoder", default=True, action="store_false", help="no reconstruction network")
    add(model, "--conv-channels", default=256, type=int, help="channels of Conv1")
    add(model, "--primary-types", default=32, type=int, help="capsule types of PrimaryCaps")
    add(model, "--decoder-hidden", default=[512, 1024], type=int, nargs=2, metavar=("H1", "H2"),
        help="widths of the decoder's two hidden layers")

    run = parser.add_argument_group("run")
    add(run, "--out", default="runs/capsnet", metavar="RUN_DIR", help="folder of the log, checkpoints and figures")
    add(run, "--resume", default=False, action="store_true", help="continue the run in RUN_DIR from last.pt")
    add(run, "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    add(run, "--checkpoint-every", default=500, type=int, metavar="STEPS",
        help="also checkpoint every STEPS steps (0: only at epoch ends)")
    add(run, "--log-every", default=50, type=int, metavar="STEPS", help="steps per 'train' record of the log")
    return parser


def _check_config(config, error):
    positive = ("epochs", "batch_size", "lr_decay_steps", "routing_iterations", "conv_channels",
                "primary_types", "validation_size", "log_every")
    for key in positive:
        if config[key] < 1:
            error(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    for key in ("limit_train", "limit_val", "limit_test"):
        if config[key] is not None and config[key] < 1:
            error(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    if config["checkpoint_every"] < 0 or config["max_shift"] < 0:
        error("--checkpoint-every and --max-shift must not be negative")
    if not config["lr"] > 0 or not 0 < config["lr_decay"] <= 1:
        error(f"need --lr > 0 and 0 < --lr-decay <= 1, got {config['lr']} and {config['lr_decay']}")
    if min(config["decoder_hidden"]) < 1:
        error(f"--decoder-hidden widths must be positive, got {config['decoder_hidden']}")


def _resolve_config(argv, parser):
    """The run configuration and, with --resume, the checkpoint it continues from."""
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    last = os.path.join(args.out, "last.pt")
    checkpoint = None
    if args.resume:
        if not os.path.isfile(last):
            parser.error(f"--resume: there is no checkpoint {last} to continue")
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            parser.error(f"--resume: {last} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
        config = dict(checkpoint["config"])
        for key, value in explicit.items():
            if key in RESUMABLE:
                config[key] = value
            elif key not in ("out", "resume") and value != config[key]:
                parser.error(f"--{key.replace('_', '-')} {value} differs from the run's {config[key]}; "
                             f"a resumed run keeps its training configuration")
        config["out"] = args.out
    else:
        if os.path.exists(last):
            parser.error(f"{args.out} already holds a run (last.pt): pass --resume to continue it, "
                         f"or choose another --out")
        config = {key: value for key, value in vars(args).items() if key != "resume"}
    if config["data"] is None:
        parser.error("--data DIR is required (the folder with the MNIST IDX files)")
    config["data"] = os.path.abspath(config["data"])
    _check_config(config, parser.error)
    return config, checkpoint


@dataclass
class Context:
    """This process's place in a (possibly single-process) distributed run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self, device):
        if self.distributed:
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _init_distributed(device_name):
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(), resolve_device(device_name)
    context = Context(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = resolve_device(device_name, context.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context, device


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a reader (or a resumed run
    after a kill) sees either the old file or the complete new one, never a partial write."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    default_permissions(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(device):
    """Every global RNG state as tensors and plain numbers (loadable with weights_only=True)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _learning_rate_factor(config):
    """Multiplier of the base lr after `step` steps: decay^(step / decay_steps), at least MIN_LR."""
    decay, decay_steps, floor = config["lr_decay"], config["lr_decay_steps"], MIN_LR / config["lr"]
    return lambda step: max(decay ** (step / decay_steps), floor)


def _load_data(config, context, device):
    """(train, validation) splits on `device`: the held-out split, then the --limit-* cuts."""
    if config["download"] and context.local_rank == 0:
        download(config["data"], config["dataset"])
    context.barrier(device)
    full = load_split(config["data"], config["dataset"], train=True)
    train_index, val_index = validation_split(len(full), config["validation_size"], config["split_seed"])
    train_set = full.subset(train_index[:config["limit_train"]])
    val_set = full.subset(val_index[:config["limit_val"]])
    return train_set.to(device), val_set.to(device)


# The running sums kept for the log: total, margin and reconstruction loss (times the batch),
# correct predictions, samples.
_EMPTY_SUMS = [0.0, 0.0, 0.0, 0.0, 0.0]


def _means(sums):
    total, margin, reconstruction, correct, count = sums
    return dict(loss=total / count, margin=margin / count, reconstruction=reconstruction / count,
                accuracy=correct / count)


def _train_step(model, optimizer, scheduler, images, labels, config, context):
    """One Adam step on this rank's shard; returns the global batch's sums (see _EMPTY_SUMS)."""
    images = to_float(images)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=config["amp"]):
        output = model(images, labels)
    # Each rank's loss is the mean over its equal shard, so DDP's average of the gradients is
    # the gradient of the global batch mean.
    terms = capsnet_loss(output, images, labels, reconstruction_weight=config["reconstruction_weight"])
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    scheduler.step()
    correct = (output.lengths.argmax(dim=1) == labels).sum()
    sums = torch.cat([torch.stack(terms).detach().double() * labels.shape[0],
                      torch.stack([correct.double(), correct.new_tensor(labels.shape[0]).double()])])
    if context.distributed:
        dist.all_reduce(sums)
    return sums.tolist()


class _Log:
    """The JSON-lines log, written by rank 0 only; other ranks hold a closed stand-in."""

    def __init__(self, path, enabled, truncate_to=None):
        self.path, self.file = path, None
        if not enabled:
            return
        if truncate_to is None:
            # A fresh run: the log of an earlier run in RUN_DIR that never reached a checkpoint goes.
            self.file = open(path, "w")
            return
        # Records written after the checkpoint belong to steps that are about to be redone.
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
        self.file = open(path, "a")

    def write(self, **record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def size(self):
        return self.file.tell() if self.file is not None else 0

    def close(self):
        if self.file is not None:
            self.file.close()


def train(config, checkpoint=None):
    """Run (or, given last.pt's contents, continue) the training that `config` describes.

    Returns the test metrics of the best model (a dict; see `evaluate.evaluate`).
    """
    context, device = _init_distributed(config["device"])
    try:
        return _train(config, checkpoint, context, device)
    finally:
        if context.distributed:
            dist.destroy_process_group()


def _train(config, checkpoint, context, device):
    run_dir = config["out"]
    os.makedirs(run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in ("last.pt", "best.pt", "log.jsonl")}
    batch_size, world = config["batch_size"], context.world_size
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {world} ranks")
    shard = batch_size // world

    _seed_everything(config["seed"])
    train_set, val_set = _load_data(config, context, device)
    steps_per_epoch = len(train_set) // batch_size                    # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images do not fill one batch of {batch_size}")

    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config))
    epoch, step_in_epoch = 0, 0
    best = {"accuracy": -1.0, "epoch": 0}
    sums = {"epoch": list(_EMPTY_SUMS), "window": list(_EMPTY_SUMS)}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        epoch, step_in_epoch = checkpoint["position"]["epoch"], checkpoint["position"]["step_in_epoch"]
        best, sums = dict(checkpoint["best"]), {k: list(v) for k, v in checkpoint["sums"].items()}
        # Restored last: building the model above drew from the RNGs, which the uninterrupted run
        # had not done at this point of its trajectory.
        _set_rng_state(checkpoint["rng"], device)
    log = _Log(paths["log.jsonl"], context.is_main, None if checkpoint is None else checkpoint["log_bytes"])
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if context.distributed else model)

    def save_last(position_epoch, position_step):
        if context.is_main:
            save_atomic({
                "format": CHECKPOINT_FORMAT, "config": config, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "position": {"epoch": position_epoch, "step_in_epoch": position_step,
                             "global_step": position_epoch * steps_per_epoch + position_step},
                "best": best, "sums": sums, "log_bytes": log.size(), "rng": _rng_state(device),
                "world_size": world,
            }, paths["last.pt"])

    try:
        for epoch in range(epoch, config["epochs"]):
            started = time.perf_counter()
            order = epoch_order(len(train_set), config["seed"], epoch).to(device)
            progress = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{config['epochs']}",
                            disable=not context.is_main, dynamic_ncols=True)
            for step_in_epoch in range(step_in_epoch, steps_per_epoch):
                step = epoch * steps_per_epoch + step_in_epoch          # global index of this step
                index = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
                # The whole global batch is shifted with the step's generator, then sharded, so
                # every world size sees the same augmented batch.
                images = random_shift(train_set.images[index], config["max_shift"],
                                      generator=shift_generator(config["seed"], step))
                mine = slice(context.rank * shard, (context.rank + 1) * shard)
                step_sums = _train_step(trained, optimizer, scheduler, images[mine], train_set.labels[index][mine],
                                        config, context)
                for key in sums:
                    sums[key] = [a + b for a, b in zip(sums[key], step_sums)]
                running = _means(sums["epoch"])
                progress.set_postfix(loss=f"{running['loss']:.4f}", acc=f"{running['accuracy']:.2%}", refresh=False)
                progress.update()
                if (step + 1) % config["log_every"] == 0:
                    log.write(event="train", epoch=epoch + 1, step=step + 1, lr=scheduler.get_last_lr()[0],
                              **_means(sums["window"]))
                    sums["window"] = list(_EMPTY_SUMS)
                every = config["checkpoint_every"]
                if every and (step + 1) % every == 0 and step_in_epoch + 1 < steps_per_epoch:
                    save_last(epoch, step_in_epoch + 1)
            progress.close()

            validation = evaluate(model, val_set, batch_size=batch_size,
                                  reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
            improved = validation["accuracy"] > best["accuracy"]
            if improved:
                best = {"accuracy": validation["accuracy"], "epoch": epoch + 1}
                if context.is_main:
                    save_atomic({"format": CHECKPOINT_FORMAT, "config": config, "model": model.state_dict(),
                                 "epoch": epoch + 1, "global_step": (epoch + 1) * steps_per_epoch,
                                 "validation": validation}, paths["best.pt"])
            train_means = _means(sums["epoch"])
            log.write(event="validation", epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                      train_loss=train_means["loss"], train_accuracy=train_means["accuracy"],
                      best=improved, seconds=time.perf_counter() - started, **validation)
            if context.is_main:
                tqdm.write(f"epoch {epoch + 1}: train loss {train_means['loss']:.4f} acc {train_means['accuracy']:.2%}"
                           f" | validation loss {validation['loss']:.4f} acc {validation['accuracy']:.2%}"
                           + (" (best)" if improved else ""))
            sums = {"epoch": list(_EMPTY_SUMS), "window": sums["window"]}
            step_in_epoch = 0
            save_last(epoch + 1, 0)

        # The test set, once, with the model chosen on validation.
        context.barrier(device)
        best_state = torch.load(paths["best.pt"], map_location="cpu", weights_only=True)
        model.load_state_dict(best_state["model"])
        test_set = load_split(config["data"], config["dataset"], train=False)
        test_set = test_set.subset(slice(0, config["limit_test"])).to(device)
        test = evaluate(model, test_set, batch_size=batch_size,
                        reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
        log.write(event="test", best_epoch=best_state["epoch"], **test)
    finally:
        log.close()
    if context.is_main:
        print(f"test accuracy {test['accuracy']:.2%} (error {1 - test['accuracy']:.2%}) on {test['count']} images, "
              f"best model from epoch {best_state['epoch']} "
              f"(validation accuracy {best_state['validation']['accuracy']:.2%})")
        write_figures(model, test_set, run_dir, log_path=paths["log.jsonl"])
    return test


def main(argv=None):
    """Console entry point (`capsnet-train`, `python -m capsnet_triton.train`)."""
    parser = build_parser()
    config, checkpoint = _resolve_config(argv, parser)
    train(config, checkpoint)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker ends here without Python's teardown: with gloo, torch 2.13 sometimes
        # aborts a rank at interpreter exit ("terminate called without an active exception"),
        # after every file is written, and torchrun then reports the whole run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
