"""Train CapsNet on MNIST or Fashion-MNIST with the paper's recipe (SPEC section 6), or on the
MNIST-derived sets of its other experiments (SPEC section 9: --dataset multimnist, mnist40).

    python -m capsnet_triton.train --data DIR --out runs/mnist            (or: capsnet-train ...)
    python -m capsnet_triton.train --out runs/mnist --resume              (continue a run)
    torchrun --nproc-per-node 4 -m capsnet_triton.train --data DIR --out runs/mnist

Defaults are the paper's: Adam, lr 1e-3 decayed continuously by x0.96 every 2,000 steps (as
the official code's tf.train.exponential_decay, floored at 1e-6, or at --lr where that is
smaller), global batch 128, 3 routing iterations, reconstruction weight 0.0005, random shifts
of up to 2 pixels. 5,000 training images are held out for validation; the model with the best
validation accuracy is kept as RUN_DIR/best.pt and evaluated on the test set once, at the end.

RUN_DIR receives log.jsonl (one JSON record per line: "train" every --log-every steps,
"validation" every epoch, "test" at the end), last.pt (the full training state), best.pt (the
best model) and the figures (see `capsnet_triton.figures`).

Exact resume (`training.checkpoint`): last.pt is written atomically every epoch and every
--checkpoint-every steps, so a run killed at any moment and resumed with --resume ends
bit-identical on CPU to one never interrupted. Ctrl-C stops a single-process run at the next
step boundary (after an epoch's validation when it came in that epoch's last step), with last.pt
saved there, and exits with status 130; a second Ctrl-C, or one outside the training steps,
stops at once with one line and status 130 (the command only: `main(argv)` called from Python
leaves Ctrl-C to its caller). SIGTERM, a scheduler's warning before it kills a job, stops the
training steps the same way, with status 143. The run writing RUN_DIR holds RUN_DIR/.lock (an flock that ends
with its process), so a second run into the same folder is refused.

Distributed (`training.distributed`): under torchrun every rank trains on its shard of each
global batch through DistributedDataParallel; --batch-size is the global batch. Only rank 0
logs and writes files; across nodes, RUN_DIR must be on a file system they share.

Before the first step every file is checked: the MD5s of the dataset's four files (unless
--no-verify-data), their shapes and labels, and that RUN_DIR can be written. Every --log-every
steps, at each save and at each epoch's end, the run checks that no loss, gradient or parameter
became NaN or infinite; if one did, it stops with exit status 1 and a one-line message, and
saves nothing of that state. Errors are one line (exit 2 for bad options, unusable checkpoints
and a run folder in use, 1 for failures); --verbose adds the traceback.

On Linux the command (not `main(argv)` called from Python) first tells glibc's malloc to keep
freed blocks of up to 1 GiB for reuse instead of returning them to the system
(`training.allocator`): on a 2-core CPU the training epochs then ran 5-15% faster, and the
process's memory stays near its peak between steps. Setting MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES or LD_PRELOAD leaves the allocator to you.

This module is the command; the run itself lives in `capsnet_triton.training`.
"""

import functools
import os
import sys

from .training.starting import command_name, is_command, until_running

# A Ctrl-C while torch loads ends the command with one line (training.starting).
with until_running(command_name("capsnet-train", "capsnet_triton.train"), is_command(__name__, "capsnet-train")):
    from .training.allocator import keep_freed_memory
    from .training.config import build_parser, resolve_config
    from .training.errors import run_command
    from .training.loop import train

__all__ = ["build_parser", "main", "train"]


def _after_ctrl_c(run_dir):
    """What is left to do after a Ctrl-C outside a training step (or a second one): continue
    from the run's last checkpoint, or, before its first, start again."""
    last = os.path.join(run_dir, "last.pt")
    if os.path.exists(last):
        return f"continue from {last} with --out {run_dir} --resume"
    return "nothing of the run was saved yet; start it again"


def main(argv=None):
    """Console entry point (`capsnet-train`, `python -m capsnet_triton.train`)."""
    parser = build_parser()
    # Only as the process's own command: a program that passes argv (the tests) keeps its
    # allocator and its Ctrl-C.
    command = argv is None
    with until_running(parser.prog, command):
        config, checkpoint, lock = resolve_config(argv, parser)
    with lock:
        if command:
            keep_freed_memory()
        status = run_command(parser.prog, config["verbose"], functools.partial(train, signals_stop=command),
                             config, checkpoint, owns_ctrl_c=command,
                             after_ctrl_c=functools.partial(_after_ctrl_c, config["out"]))
    if status == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker ends here without Python's teardown: with gloo, torch 2.13 sometimes
        # aborts a rank at interpreter exit ("terminate called without an active exception"),
        # after every file is written, and torchrun then reports the whole run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return status


if __name__ == "__main__":
    sys.exit(main())
