"""Checkpoints of a training run: their format, atomic writes, the run folder's lock, and the
global RNG states.

A run folder holds two checkpoints of one format (CHECKPOINT_FORMAT), both loadable with
`torch.load(..., weights_only=True)`:

- last.pt, the full training state: the run configuration, the model, the optimizer, the
  scheduler, the RNG states (torch, NumPy, Python, CUDA), the position (epoch, step), the best
  validation so far, the running sums of the metrics and the length and SHA-256 of the log;
- best.pt, the model with the best validation accuracy: configuration, model, epoch, step and
  its validation metrics.

Each also holds "checksum", the SHA-256 of the rest of its payload (`payload_checksum`), which
every load verifies, so flipped bytes on disk are refused instead of evaluated or trained on.

Exact resume: every random draw of the data pipeline is a pure function of (seed, epoch, step)
(see `capsnet_triton.data`) and last.pt holds every other state, written atomically, so a run
killed at any moment and resumed ends bit-identical on CPU to one never interrupted.
"""

import fcntl
import glob
import hashlib
import io
import os
import random

import numpy as np
import torch

from ..files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "LOCK_NAME", "CHECKPOINT_FILES", "RUN_FILES", "SCORES_NAME", "save_atomic",
           "payload_checksum", "load_checkpoint", "load_training_state", "lock_run_folder", "remove_stale_temporaries",
           "save_training_state", "save_best_model", "best_model_in", "restore_best_model", "restore_training_state",
           "seed_everything", "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = 1

# The file in a run folder that the run writing it holds locked (see `lock_run_folder`).
LOCK_NAME = ".lock"
# The checkpoints in a run folder: the training state, and the model chosen on validation.
CHECKPOINT_FILES = ("last.pt", "best.pt")
# And the log of every step and evaluation beside them.
RUN_FILES = (*CHECKPOINT_FILES, "log.jsonl")
# The scores `evaluate` keeps beside the figures it draws of a checkpoint (of best.pt, in the run folder).
SCORES_NAME = "evaluation.json"

# The first bytes of the zip archive torch.save writes (a local file header).
_ZIP_MAGIC = b"PK\x03\x04"


def save_atomic(obj, path):
    """torch.save to `path` through files.atomic_write. The bytes are made in memory first, so a
    full disk is an OSError naming `path`, not an error of torch's serializer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def lock_run_folder(run_dir):
    """Take the run folder's lock: an exclusive flock on RUN_DIR/.lock, held until the returned
    file is closed or the process ends (a killed run never leaves the folder locked).

    The file is never removed: were a run to delete it on exit, a run that had just opened the old
    file could lock it while a newer one locked a fresh file, and both would write. Raises
    ValueError, in one line, when another process holds it.
    """
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        lock = open(path, "a")
    except OSError as e:                 # another user's .lock in a folder shared with them, say
        raise ValueError(f"cannot open {path} to take the run folder's lock ({e.strerror or e}); "
                         f"choose another --out") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"another run is writing {run_dir} (or an evaluate into it; it holds {path}); wait for "
                         f"it to end, or choose another --out") from None
    return lock


def remove_stale_temporaries(run_dir):
    """Remove the temporary files (files.atomic_write's) of the checkpoints, scores and figures
    that a killed run or evaluate left in `run_dir`.

    Both write a run folder only while they hold its lock (`lock_run_folder`), so at a run's
    start every such file is stale. Those in evaluate's subfolders (last/, affnist/, ...) are not
    the run's: an evaluate may be writing one now.
    """
    for name in (*CHECKPOINT_FILES, SCORES_NAME, "*.png"):
        for partial in glob.glob(os.path.join(glob.escape(run_dir), f".{name}.*.tmp")):
            os.remove(partial)


def payload_checksum(payload):
    """SHA-256 (hex) of a checkpoint payload: its structure, Python values and tensor bytes.

    It is computed over the values, not the file, so it is the same for the payload saved and
    the payload loaded back, and any change of a stored byte changes it.
    """
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def _save_checkpoint(payload, path):
    save_atomic({**payload, "checksum": payload_checksum(payload)}, path)


def load_checkpoint(path, *, digest=None):
    """The contents of a checkpoint (last.pt or best.pt) on the CPU, its checksum verified.

    The file is read once, whole, and loaded from those bytes (for a moment both, about 100 MB
    more for the MNIST last.pt); digest (a hashlib object), when given, is fed the same bytes, so
    that a hash of the file names exactly the checkpoint loaded even if a running training
    replaces the file meanwhile.

    Raises ValueError, in one line naming `path`, for a missing, empty, truncated or corrupt
    file, one whose checksum does not match its contents, and any file that is not one of ours.
    Checkpoints written before checksums existed (no "checksum" entry) load unverified.

    The config of a checkpoint written before the routing gradient became a policy (SPEC 3) has
    a boolean "agreement_grad": True is read as routing_gradient "full"; False was a variant that
    no longer exists, so such a checkpoint is refused.
    """
    if os.path.isdir(path):
        # best.pt first: the model a user scores (evaluate) rather than continues (--resume).
        inside = [name for name in reversed(CHECKPOINT_FILES) if os.path.isfile(os.path.join(path, name))]
        raise ValueError(f"{path} is a folder, not a checkpoint file"
                         + (f": pass the checkpoint in it, {os.path.join(path, inside[0])}" if inside else ""))
    if not os.path.isfile(path):
        raise ValueError(f"there is no checkpoint file {path}")
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        raise ValueError(f"{path} cannot be read as a checkpoint ({e.strerror or e})") from e
    if digest is not None:
        digest.update(contents)
    if not contents.startswith(_ZIP_MAGIC):
        # torch.load would take it for a legacy pickle and fail with advice of its own.
        raise ValueError(f"{path} cannot be read as a checkpoint: it is empty, truncated or corrupt, or another "
                         f"kind of file (not the zip archive torch.save writes)")
    try:
        checkpoint = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails in pickle, zip or torch code, each with its own type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if reason.startswith("Weights only load failed"):
            # torch's own advice, loading without weights_only, would run the file's code.
            reason = "it holds Python objects that a checkpoint of ours never does"
        raise ValueError(f"{path} cannot be read as a checkpoint: it is empty, truncated or corrupt ({reason})") from e
    if (not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT
            or "config" not in checkpoint or "model" not in checkpoint):
        raise ValueError(f"{path} is not a capsnet_triton training checkpoint of format {CHECKPOINT_FORMAT}")
    recorded = checkpoint.pop("checksum", None)
    if recorded is not None and recorded != payload_checksum(checkpoint):
        raise ValueError(f"{path} is corrupt: its contents no longer match the checksum written with them; "
                         f"restore an intact copy of it")
    config = checkpoint["config"]
    if "agreement_grad" in config:
        if not config["agreement_grad"]:
            raise ValueError(f"{path} was trained with agreement_grad=False, a routing gradient variant that "
                             f"was removed (only \"full\" and \"last\" remain); retrain with --routing-gradient")
        config["routing_gradient"] = "full"
        del config["agreement_grad"]
    return checkpoint


def save_training_state(path, *, config, model, optimizer, scheduler, epoch, step_in_epoch, steps_per_epoch,
                        seconds_in_epoch, best, sums, log, device, world_size):
    """Write last.pt: everything a resumed run needs to continue from (epoch, step_in_epoch).

    seconds_in_epoch: the wall time the epoch has taken so far, which its log record adds up;
    sums: the running sums of the metrics, lists of floats; log: the run's `RunLog`, whose
    length and digest last.pt records (after making its records durable).
    """
    log.sync()
    _save_checkpoint({
        "format": CHECKPOINT_FORMAT, "config": config, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "position": {"epoch": epoch, "step_in_epoch": step_in_epoch,
                     "global_step": epoch * steps_per_epoch + step_in_epoch, "seconds_in_epoch": seconds_in_epoch},
        "best": best, "sums": sums, "log_bytes": log.size(), "log_sha256": log.sha256(), "rng": rng_state(device),
        "world_size": world_size,
    }, path)


# What last.pt holds beside the model and that a resumed run reads (best.pt holds none of it).
_TRAINING_STATE = ("optimizer", "scheduler", "position", "best", "sums", "log_bytes", "rng")


def load_training_state(path):
    """load_checkpoint of a last.pt, refusing (ValueError, one line) a checkpoint that holds a
    model but no training state to continue from, such as a best.pt copied over last.pt."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in _TRAINING_STATE if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} holds a model but no training state to continue from (no "
                         f"{', '.join(missing)}): it is a best-model checkpoint, not a last.pt")
    return checkpoint


def _best_model(config, model, epoch, global_step, validation):
    """best.pt's payload: the model chosen on validation (its state_dict), with the metrics that chose it."""
    return {"format": CHECKPOINT_FORMAT, "config": config, "model": model, "epoch": epoch,
            "global_step": global_step, "validation": validation}


def save_best_model(path, *, config, model, epoch, global_step, validation):
    """Write best.pt (see _best_model)."""
    _save_best_model(_best_model(config, model, epoch, global_step, validation), path)


def _save_best_model(payload, path):
    """Write best.pt, and remove evaluate's scores beside it (the run folder's evaluation.json):
    they were computed on the model it replaced, and would read as the new one's."""
    _save_checkpoint(payload, path)
    scores = os.path.join(os.path.dirname(path), SCORES_NAME)
    if os.path.exists(scores):
        os.remove(scores)


def best_model_in(checkpoint):
    """best.pt's payload for the best model that last.pt's training state holds, or None.

    The run saves last.pt at the end of an epoch whose validation improved, recording that
    validation, before it saves best.pt: a run stopped between the two saves (killed, or its
    disk full) left best.pt a best model behind, or none, and last.pt's model is the best one.
    """
    best, position = checkpoint["best"], checkpoint["position"]
    if "validation" not in best or (position["epoch"], position["step_in_epoch"]) != (best["epoch"], 0):
        return None
    return _best_model(checkpoint["config"], checkpoint["model"], best["epoch"], position["global_step"],
                       best["validation"])


def restore_best_model(path, payload):
    """Write best.pt from best_model_in's payload unless it holds it already (the same contents,
    by checksum): what the run would have written. Returns True where it wrote the file."""
    try:
        if payload_checksum(load_checkpoint(path)) == payload_checksum(payload):
            return False
    except ValueError:                  # missing or corrupt: written again too
        pass
    _save_best_model(payload, path)
    return True


def restore_training_state(checkpoint, model, optimizer, scheduler, device):
    """Load last.pt's states into the run's objects and the global RNGs.

    Returns (epoch, step_in_epoch, seconds_in_epoch, best, sums) to continue from; a last.pt of
    an earlier version records no seconds_in_epoch (0).
    """
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    # Restored last: building the model drew from the RNGs, which the uninterrupted run had not
    # done at this point of its trajectory.
    set_rng_state(checkpoint["rng"], device)
    position = checkpoint["position"]
    sums = {key: list(value) for key, value in checkpoint["sums"].items()}
    return (position["epoch"], position["step_in_epoch"], position.get("seconds_in_epoch", 0.0),
            dict(checkpoint["best"]), sums)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device):
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


def set_rng_state(state, device):
    """Restore the global RNGs from `rng_state`'s result."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
