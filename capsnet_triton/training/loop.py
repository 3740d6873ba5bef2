"""The training loop of the paper's recipe (SPEC section 6): Adam with the official code's
learning-rate decay, shifted batches, a validation pass per epoch that picks best.pt, and the
test set once, at the end."""

import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import download, epoch_order, load_split, random_shift, shift_generator, to_float, validation_split
from ..evaluate import evaluate
from ..figures import write_figures
from ..losses import capsnet_loss
from ..model import build_model
from .checkpoint import load_checkpoint, restore_training_state, save_best_model, save_training_state, seed_everything
from .distributed import init_distributed
from .log import RunLog

__all__ = ["MIN_LR", "train"]

# The official code floors the decayed learning rate (tf.maximum(learning_rate, 1e-6)).
MIN_LR = 1e-6

# The running sums kept for the log: total, margin and reconstruction loss (times the batch),
# correct predictions, samples.
_EMPTY_SUMS = [0.0, 0.0, 0.0, 0.0, 0.0]


def _means(sums):
    total, margin, reconstruction, correct, count = sums
    return dict(loss=total / count, margin=margin / count, reconstruction=reconstruction / count,
                accuracy=correct / count)


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


def train(config, checkpoint=None):
    """Run (or, given last.pt's contents, continue) the training that `config` describes.

    Returns the test metrics of the best model (a dict; see `evaluate.evaluate`).
    """
    context, device = init_distributed(config["device"])
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

    seed_everything(config["seed"])
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
        epoch, step_in_epoch, best, sums = restore_training_state(checkpoint, model, optimizer, scheduler, device)
    log = RunLog(paths["log.jsonl"], context.is_main, None if checkpoint is None else checkpoint["log_bytes"])
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if context.distributed else model)

    def save_last(position_epoch, position_step):
        if context.is_main:
            save_training_state(paths["last.pt"], config=config, model=model, optimizer=optimizer,
                                scheduler=scheduler, epoch=position_epoch, step_in_epoch=position_step,
                                steps_per_epoch=steps_per_epoch, best=best, sums=sums, log_bytes=log.size(),
                                device=device, world_size=world)

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
                    save_best_model(paths["best.pt"], config=config, model=model, epoch=epoch + 1,
                                    global_step=(epoch + 1) * steps_per_epoch, validation=validation)
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
        best_state = load_checkpoint(paths["best.pt"])
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
