"""The training loop of the paper's recipe (SPEC section 6): Adam with the official code's
learning-rate decay, shifted batches, a validation pass per epoch that picks best.pt, and the
test set once, at the end. Ctrl-C or SIGTERM can stop a single-process run at the next step
boundary, after saving last.pt there (`_StopRequest`)."""

import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import dataset_spec, download, epoch_order, load_split, validation_split
from ..evaluate import evaluate, example_count
from ..figures import write_figures
from ..losses import capsnet_loss, correct_predictions
from ..model import build_model
from .checkpoint import (RUN_FILES, best_model_in, load_checkpoint, remove_stale_temporaries, restore_best_model,
                         restore_training_state, save_best_model, save_training_state, seed_everything)
from .distributed import init_distributed
from .errors import TrainingDiverged, TrainingInterrupted
from .log import RunLog

__all__ = ["MIN_LR", "train"]

# The official code floors the decayed learning rate (tf.maximum(learning_rate, 1e-6)).
MIN_LR = 1e-6

# The running sums kept on the device for the log: total, margin and reconstruction loss (times
# the batch), correct predictions, samples. A step adds one more entry, 1 when its loss or
# gradient is not finite, which goes to a separate count (see `_check_finite`).
SUM_COUNT = 5


def _means(sums):
    total, margin, reconstruction, correct, count = sums
    return dict(loss=total / count, margin=margin / count, reconstruction=reconstruction / count,
                accuracy=correct / count)


def _learning_rate_factor(config):
    """Multiplier of the base lr after `step` steps: decay^(step / decay_steps), the decayed lr
    floored at MIN_LR, or at the base lr where that is smaller (the official code would raise
    such an lr to MIN_LR from the first step: a run 10x or 1000x faster than asked)."""
    decay, decay_steps, floor = config["lr_decay"], config["lr_decay_steps"], min(1.0, MIN_LR / config["lr"])
    return lambda step: max(decay ** (step / decay_steps), floor)


def _load_data(config, context, device):
    """(train, validation, test) sets: train and validation on `device`, test on the CPU until
    the end, each in its dataset entry's training or evaluation form (`data.DatasetSpec`), cut by
    the --limit-* flags. Every file is found, checked (MD5s unless --no-verify-data, shapes,
    label range) and read here, before the first step, so bad data never costs a training run."""
    spec = dataset_spec(config["dataset"])
    if config["download"] and context.local_rank == 0:
        download(config["data"], config["dataset"])
    context.barrier(device)
    full = load_split(config["data"], config["dataset"], train=True, verify=config["verify_data"])
    test_set = load_split(config["data"], config["dataset"], train=False, verify=config["verify_data"])
    train_index, val_index = validation_split(len(full), config["validation_size"], config["split_seed"])
    train_set = spec.training_split(full.subset(train_index[:config["limit_train"]]))
    val_set = spec.evaluation_split(full.subset(val_index), False).subset(slice(0, config["limit_val"]))
    test_set = spec.evaluation_split(test_set, True).subset(slice(0, config["limit_test"]))
    return train_set.to(device), val_set.to(device), test_set


def _shard(train_set, order, step_in_epoch, step, config, context):
    """This rank's `data.Batch` of global step `step`, the `step_in_epoch`-th batch of `order`.

    The whole global batch is drawn (shifts, MultiMNIST's partners) from the step's generator,
    on the data's device, then sharded, so every world size sees the same augmented batch.
    """
    batch_size = config["batch_size"]
    shard = batch_size // context.world_size
    index = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
    batch = train_set.augmented(index, config["seed"], step, config["max_shift"])
    return batch.shard(slice(context.rank * shard, (context.rank + 1) * shard))


def _train_step(model, optimizer, scheduler, batch, config, context):
    """One Adam step on this rank's shard (a `data.Batch`), without waiting for the device.

    Returns the global batch's sums on the device (see SUM_COUNT), plus the non-finite flag.
    The labels were checked once for the whole split, so the model and the loss skip the check
    that would read them back every step.
    """
    with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=config["amp"]):
        output = model(batch.images, batch.labels, validate=False)
    # Each rank's loss is the mean over its equal shard, so DDP's average of the gradients is
    # the gradient of the global batch mean.
    terms = capsnet_loss(output, batch.targets, batch.labels, reconstruction_weight=config["reconstruction_weight"],
                         validate=False)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    # The largest |gradient|, finite exactly where every gradient is: the 2-norm's sum of squares
    # overflows float32 for finite gradients from about 1e19 on, and called that divergence.
    gradient_max = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None],
                                                 norm_type=float("inf"))
    optimizer.step()
    scheduler.step()
    count = batch.labels.shape[0]
    correct = correct_predictions(output.lengths, batch.labels).sum()
    diverged = ~(torch.isfinite(terms.total) & torch.isfinite(gradient_max))
    sums = torch.stack([*(term.detach().double() * count for term in terms), correct.double(),
                        correct.new_full((), count, dtype=torch.float64), diverged.double()])
    if context.distributed:
        dist.all_reduce(sums)
    return sums


def _check_finite(model, optimizer, diverged_steps, where):
    """Raise TrainingDiverged if a step since the start had a non-finite loss or gradient, or a
    parameter or its optimizer state is not finite: a finite gradient beyond about 6e20 overflows
    Adam's running square to inf, after which its parameter never moves again. Reads the device
    once: called at log points, saves and epoch ends."""
    named = list(model.named_parameters())
    # Adam's moments have the parameter's shape (its step count is a scalar, kept on the CPU).
    states = [[value for value in optimizer.state[p].values() if value.shape == p.shape] for _, p in named]
    bad = torch.stack([diverged_steps > 0, *(torch.stack([~torch.isfinite(t).all() for t in (p, *state)]).any()
                                             for (_, p), state in zip(named, states))]).tolist()
    if any(bad):
        what = "the loss or a gradient" if bad[0] else f"parameter {named[bad.index(True) - 1][0]} or its Adam state"
        raise TrainingDiverged(f"{what} became NaN or infinite {where}; stopped without saving that state "
                               f"(last.pt and best.pt, if there, hold earlier finite ones)")


class _StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM, the signal a cluster's scheduler sends before it kills a job,
    as a request to stop: while active, the first of either only sets `requested` (the signal's
    number), which the loop reads at its next step boundary, and hands that signal back to the
    handler it replaced, so a second one acts as it always did.

    Enabled for single-process runs only: under torchrun each rank would see the request at
    another step and wait forever for the others in the next all-reduce. It takes over a signal
    only where the process has its default action: a process started with SIGINT ignored (a
    shell script's background job) keeps it ignored, and a handler a program installed stays.
    """

    _DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, enabled):
        self.taken = [signum for signum, default in self._DEFAULTS.items()
                      if enabled and signal.getsignal(signum) is default]
        self.requested = None
        self.previous = {}

    def __enter__(self):
        for signum in self.taken:
            self.previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        self.requested = self.requested or signum
        signal.signal(signum, self.previous[signum])
        # Said at once (a step, then the save, can take seconds), so that a second press is a
        # choice: to the file descriptor, as a write to sys.stderr may be what was interrupted.
        name, again = (("Ctrl-C", "press Ctrl-C again") if signum == signal.SIGINT
                       else (signal.Signals(signum).name, f"a second {signal.Signals(signum).name}"))
        try:
            os.write(2, f"\n{name}: stopping after this step to save last.pt; {again} to quit without "
                        f"saving\n".encode())
        except OSError:             # stderr closed or a broken pipe: the stop itself still happens
            pass

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(config, checkpoint=None, *, signals_stop=False):
    """Run (or, given last.pt's contents, continue) the training that `config` describes.

    signals_stop: a single-process run takes over Ctrl-C and SIGTERM (`_StopRequest`), to stop at
    the next step boundary with last.pt saved there and raise TrainingInterrupted; only for the process's
    own command, since it must run in the main thread and a program around it (a test runner)
    expects Ctrl-C to reach it.
    Returns the test metrics of the best model (a dict; see `evaluate.evaluate`).
    """
    context, device = init_distributed(config["device"])
    try:
        return _train(config, checkpoint, context, device, signals_stop and not context.distributed)
    finally:
        if context.distributed:
            dist.destroy_process_group()


def _train(config, checkpoint, context, device, signals_stop):
    run_dir = config["out"]
    os.makedirs(run_dir, exist_ok=True)
    if context.is_main:
        remove_stale_temporaries(run_dir)
    paths = {name: os.path.join(run_dir, name) for name in RUN_FILES}
    batch_size, world = config["batch_size"], context.world_size         # check_config: a multiple of world

    seed_everything(config["seed"])
    spec = dataset_spec(config["dataset"])
    train_set, val_set, test_set = _load_data(config, context, device)
    steps_per_epoch = len(train_set) // batch_size                    # the last partial batch is dropped
    if steps_per_epoch == 0:
        # What cut the training images short: --limit-train where it did, else --validation-size.
        limited = config["limit_train"] == len(train_set)
        raise ValueError(f"{len(train_set)} training images do not fill one batch of {batch_size}; lower "
                         + ("--batch-size or raise --limit-train" if limited else
                            f"--batch-size or hold out fewer than --validation-size {config['validation_size']}"))

    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config))
    epoch, step_in_epoch, seconds_in_epoch = 0, 0, 0.0
    best = {"accuracy": -1.0, "epoch": 0}
    sums = {"epoch": [0.0] * SUM_COUNT, "window": [0.0] * SUM_COUNT}
    if checkpoint is not None:
        epoch, step_in_epoch, seconds_in_epoch, best, sums = restore_training_state(checkpoint, model, optimizer,
                                                                                  scheduler, device)
        held = best_model_in(checkpoint)
        if held is not None and context.is_main and restore_best_model(paths["best.pt"], held):
            print(f"{paths['best.pt']} was not the best model that {paths['last.pt']} holds (the run stopped "
                  f"between its two saves at the end of epoch {held['epoch']}, or the file was changed): "
                  f"written again from it", file=sys.stderr)
        if epoch < config["epochs"] and context.is_main:
            print(f"resuming at epoch {epoch + 1}/{config['epochs']}, step {step_in_epoch} of {steps_per_epoch}")
        saved_world = checkpoint.get("world_size", 1)
        if saved_world != world and context.is_main:
            # Each rank reduces its shard of the batch: another split rounds the sums differently.
            print(f"resuming a run of {saved_world} process(es) with {world}: it continues the same training, "
                  f"but no longer bit for bit as it would have", file=sys.stderr)
    sums = {key: torch.tensor(value, dtype=torch.float64, device=device) for key, value in sums.items()}
    diverged_steps = torch.zeros((), dtype=torch.float64, device=device)
    log = RunLog(paths["log.jsonl"], context.is_main, checkpoint)
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if context.distributed else model)

    def save_last(position_epoch, position_step):
        _check_finite(model, optimizer, diverged_steps,
                      f"before step {position_epoch * steps_per_epoch + position_step + 1}")
        if context.is_main:
            save_training_state(paths["last.pt"], config=config, model=model, optimizer=optimizer,
                                scheduler=scheduler, epoch=position_epoch, step_in_epoch=position_step,
                                steps_per_epoch=steps_per_epoch,
                                seconds_in_epoch=time.perf_counter() - started if position_step else 0.0, best=best,
                                sums={key: value.tolist() for key, value in sums.items()}, log=log,
                                device=device, world_size=world)

    def interrupted(position_epoch, position_step):
        by = "" if stop.requested == signal.SIGINT else f" by {signal.Signals(stop.requested).name}"
        return TrainingInterrupted(f"interrupted{by} after step {position_epoch * steps_per_epoch + position_step}, "
                                   f"saved in {paths['last.pt']}; continue with --out {run_dir} --resume",
                                   status=128 + stop.requested)

    if epoch == config["epochs"] and context.is_main:
        print(f"nothing to train: {paths['last.pt']} has finished all --epochs {epoch}; testing its best model "
              f"again (pass a larger --epochs to train more)")
    stop = _StopRequest(signals_stop)
    try:
        with stop:
            for epoch in range(epoch, config["epochs"]):
                started = time.perf_counter() - seconds_in_epoch          # a resumed epoch counts its first part
                seconds_in_epoch = 0.0
                order = epoch_order(len(train_set), config["seed"], epoch).to(device)
                # Closed on every exit, so that an error's line is not written onto the bar's.
                with tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{config['epochs']}",
                          disable=not context.is_main, dynamic_ncols=True) as progress:
                    for step_in_epoch in range(step_in_epoch, steps_per_epoch):
                        step = epoch * steps_per_epoch + step_in_epoch          # global index of this step
                        batch = _shard(train_set, order, step_in_epoch, step, config, context)
                        lr = scheduler.get_last_lr()[0]         # this step's rate: the step advances it
                        step_sums = _train_step(trained, optimizer, scheduler, batch, config, context)
                        for key in sums:
                            sums[key] += step_sums[:SUM_COUNT]
                        diverged_steps += step_sums[SUM_COUNT]
                        progress.update()
                        if (step + 1) % config["log_every"] == 0:
                            # The one place a step reads the device: every --log-every steps.
                            _check_finite(model, optimizer, diverged_steps, f"by step {step + 1}")
                            running = _means(sums["epoch"].tolist())
                            progress.set_postfix(loss=f"{running['loss']:.4f}", acc=f"{running['accuracy']:.2%}",
                                                 refresh=False)
                            log.write(event="train", epoch=epoch + 1, step=step + 1, lr=lr,
                                      **_means(sums["window"].tolist()))
                            sums["window"].zero_()
                        every = config["checkpoint_every"]
                        due = stop.requested or (every and (step + 1) % every == 0)
                        # The epoch's last step is saved, and a stop made, after its validation.
                        if due and step_in_epoch + 1 < steps_per_epoch:
                            save_last(epoch, step_in_epoch + 1)
                            if stop.requested:
                                raise interrupted(epoch, step_in_epoch + 1)

                _check_finite(model, optimizer, diverged_steps, f"in epoch {epoch + 1}")
                validation = evaluate(model, val_set, batch_size=batch_size, progress="validation",
                                      reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
                if not math.isfinite(validation["loss"]):
                    raise TrainingDiverged(f"the validation loss of epoch {epoch + 1} is {validation['loss']}; "
                                           f"stopped before saving this model")
                improved = validation["accuracy"] > best["accuracy"]
                if improved:
                    best = {"accuracy": validation["accuracy"], "epoch": epoch + 1, "validation": validation}
                train_means = _means(sums["epoch"].tolist())
                log.write(event="validation", epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                          train_loss=train_means["loss"], train_accuracy=train_means["accuracy"],
                          best=improved, seconds=time.perf_counter() - started, **validation)
                if context.is_main:
                    tqdm.write(f"epoch {epoch + 1}: train loss {train_means['loss']:.4f} acc "
                               f"{train_means['accuracy']:.2%} | validation loss {validation['loss']:.4f} acc "
                               f"{validation['accuracy']:.2%}" + (" (best)" if improved else ""))
                sums["epoch"].zero_()
                step_in_epoch = 0
                # last.pt first: stopped between the two saves, a run resumes with last.pt holding
                # the best model, from which it writes best.pt again (checkpoint.best_model_in).
                save_last(epoch + 1, 0)
                if improved and context.is_main:
                    save_best_model(paths["best.pt"], config=config, model=model.state_dict(), epoch=epoch + 1,
                                    global_step=(epoch + 1) * steps_per_epoch, validation=validation)
                if stop.requested:
                    raise interrupted(epoch + 1, 0)

        # The test set, once, with the model chosen on validation.
        context.barrier(device)
        best_state = load_checkpoint(paths["best.pt"])
        model.load_state_dict(best_state["model"])
        test_set = test_set.to(device)
        test = evaluate(model, test_set, batch_size=batch_size, progress=f"{spec.name} test",
                        reconstruction_weight=config["reconstruction_weight"], amp=config["amp"])
        log.write(event="test", best_epoch=best_state["epoch"], metric=spec.metric, **test)
    finally:
        log.close()
    if context.is_main:
        print(f"{spec.name} test {spec.metric} {test['accuracy']:.2%} (error {1 - test['accuracy']:.2%}) "
              f"on {example_count(test_set)}, "
              f"best model from epoch {best_state['epoch']} "
              f"(validation {spec.metric} {best_state['validation']['accuracy']:.2%})")
        write_figures(model, test_set, run_dir, dataset=spec.name, model_name="best.pt", metric=spec.metric,
                      log_path=paths["log.jsonl"])
    return test
