"""A training step never waits for the device (issue: sync-free training loop).

On a GPU every read of a device value from the host (`.item()`, `.tolist()`, `int(t)`,
`bool(t)`, a Python `if` on a tensor) stalls the host until the device catches up. The step is
run here on the CPU with every such read counted: aten::_local_scalar_dense (behind item, int,
float, bool) through a TorchDispatchMode, and Tensor.tolist / Tensor.numpy, which bypass the
dispatcher, by wrapping them.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from capsnet_triton.data import Split, dataset_spec, epoch_order
from capsnet_triton.losses import capsnet_loss, margin_loss
from capsnet_triton.model import build_model
from capsnet_triton.training import loop
from capsnet_triton.training.config import build_parser
from capsnet_triton.training.distributed import Context


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values by the host, except those of `ignored` tensors."""

    def __init__(self, ignored=()):
        super().__init__()
        self.ignored = {t.data_ptr() for t in ignored}
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.ignored:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """A function that makes a HostReads mode which also counts Tensor.tolist and Tensor.numpy."""
    modes = []
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            for mode in modes:
                mode.reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def make(ignored=()):
        modes.append(HostReads(ignored))
        return modes[-1]

    return make


@pytest.mark.parametrize("dataset", ["mnist", "multimnist"])    # multimnist: partners drawn in the step
def test_training_steps_make_no_device_to_host_read(counted, dataset):
    argv = ["--data", ".", "--batch-size", "8", "--conv-channels", "8", "--primary-types", "2",
            "--decoder-hidden", "16", "32", "--device", "cpu", "--dataset", dataset]
    config = vars(build_parser().parse_args(argv))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, loop._learning_rate_factor(config))
    generator = torch.Generator().manual_seed(0)
    train_set = dataset_spec(dataset).training_split(
        Split(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=generator),
              torch.randint(0, 10, (32,), generator=generator)))
    order, context = epoch_order(len(train_set), 0, 0), Context()
    sums = torch.zeros(loop.SUM_COUNT, dtype=torch.float64)
    diverged_steps = torch.zeros((), dtype=torch.float64)

    def step(index):
        batch = loop._shard(train_set, order, index, index, config, context)
        step_sums = loop._train_step(model, optimizer, scheduler, batch, config, context)
        sums.add_(step_sums[:loop.SUM_COUNT])
        diverged_steps.add_(step_sums[loop.SUM_COUNT])

    step(0)                                               # Adam creates its state in its first step
    # Adam's step counters are host tensors on every device (capturable=False), so reading
    # them is no wait for the device.
    counters = [state["step"] for state in optimizer.state.values()]
    with counted(ignored=counters) as reads:
        for index in range(1, 4):
            step(index)
    assert reads.reads == []
    # The counter does see reads: the log point reads the sums, once.
    with counted(ignored=counters) as reads:
        loop._check_finite(model, optimizer, diverged_steps, "here")
        sums.tolist()
    assert reads.reads.count("tolist") == 2 and sums[4].item() == 32


def test_label_checks_read_the_device_only_when_asked(counted):
    lengths, labels = torch.rand(4, 10), torch.tensor([0, 3, 9, 1])
    with counted() as reads:
        margin_loss(lengths, labels, validate=False)
    assert reads.reads == []
    with counted() as reads:
        margin_loss(lengths, labels)
    assert reads.reads                                    # the default checks the values
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):   # refused by default
        margin_loss(lengths, torch.tensor([0, 3, 10, 1]))
    config = vars(build_parser().parse_args(["--conv-channels", "8", "--primary-types", "2",
                                             "--decoder-hidden", "16", "32"]))
    model = build_model(config)
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model(images, torch.tensor([0, -1]))
    with counted() as reads, torch.no_grad():
        output = model(images, torch.tensor([0, 1]), validate=False)
        capsnet_loss(output, images, torch.tensor([0, 1]), validate=False)
    assert reads.reads == []
