"""This process's place in a training run: its device and, under torchrun, its rank.

Under torchrun (RANK / WORLD_SIZE in the environment) every rank trains on its shard of each
global batch through DistributedDataParallel (NCCL on GPUs, gloo on CPUs). Only rank 0 logs,
writes files and holds the run folder's lock, but every rank reads RUN_DIR/best.pt for the final
test (and last.pt and best.pt on --resume):
across nodes, RUN_DIR must be on a file system they share (on one node any folder will do).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "init_distributed", "launched_rank", "launched_world_size", "resolve_device"]


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


def resolve_device(name, local_rank=0):
    """The torch device for --device: "auto" is this rank's CUDA device when there is one, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; pass --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def launched_rank():
    """This process's rank as torchrun set it in the environment (0 without torchrun), known
    before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size():
    """How many processes torchrun started (1 without torchrun), known before the process group
    exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name):
    """(Context, device): join the process group that torchrun describes in the environment, if any."""
    world_size = launched_world_size()
    if world_size == 1:
        return Context(), resolve_device(device_name)
    context = Context(launched_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = resolve_device(device_name, context.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context, device
