"""The README's Python examples run as written and do what their comments say."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_the_examples_these_tests_run():
    assert len(_python_blocks()) == 2


def test_use_it_runs_as_written():
    namespace = {}
    exec(_python_blocks()[0], namespace)
    u_hat, u, v, model = (namespace[name] for name in ("u_hat", "u", "v", "model"))
    assert u_hat.grad is not None and u_hat.grad.shape == (128, 1152, 10, 16)
    assert v.shape == (128, 10, 16) and u.shape == (128, 1152, 8)
    # "the paper's MNIST network, 8,215,568 parameters"
    assert sum(p.numel() for p in model.parameters()) == 8_215_568


def test_the_multimnist_example_runs_with_the_shapes_its_comment_gives():
    generator = torch.Generator().manual_seed(0)
    count = 5
    namespace = {"images": torch.rand(40, 1, 28, 28, generator=generator),
                 "labels": torch.arange(40) % 10, "count": count}
    exec(_python_blocks()[1], namespace)
    pairs, labels, parts = (namespace[name] for name in ("pairs", "labels", "parts"))
    assert pairs.shape == (count, 1, 36, 36) and labels.shape == (count, 2)
    assert parts.shape == (count, 2, 1, 36, 36)
    assert bool((labels[:, 0] != labels[:, 1]).all())
