"""The kernel launchers' contracts with their callers (capsnet_triton.kernels): the buffers they
take, and the launch helpers at the bounds their docstrings give. The kernels run through the
interpreter here and natively on a GPU machine (see conftest.py)."""

import pytest
import torch
import triton.language as tl
from kernel_checks import DEVICE, sample

from capsnet_triton.kernels import (capsule_linear_backward, capsule_linear_forward, launch, routing_backward,
                                    routing_forward, squash_forward)


def test_launchers_refuse_an_out_that_is_not_contiguous(rng):
    """A transposed buffer of the right shape would be filled in the kernel's order, not its own."""
    with pytest.raises(ValueError, match=r"out must be a contiguous .*, not contiguous"):
        squash_forward(sample(rng, (3, 4), torch.float32), out=torch.empty(4, 3, device=DEVICE).t())
    u_hat = sample(rng, (2, 5, 3, 4), torch.float32)
    _, s_all, couplings = routing_forward(u_hat, 2)
    with pytest.raises(ValueError, match=r"out\[0\] \(v\) must be a contiguous .*, not contiguous"):
        routing_forward(u_hat, 2, out=(torch.empty(2, 4, 3, device=DEVICE).transpose(1, 2), s_all, couplings))
    u, weight = sample(rng, (2, 5, 2), torch.float32), sample(rng, (5, 3, 4, 2), torch.float32)
    _, s_all, couplings = capsule_linear_forward(u, weight, 2)
    with pytest.raises(ValueError, match=r"out\[1\] \(s_all\) must be a contiguous .*, not contiguous"):
        capsule_linear_forward(u, weight, 2, out=(None, s_all.transpose(2, 3).contiguous().transpose(2, 3),
                                                  couplings))


def strided(x):
    """x's values in another layout: its last two axes swapped in memory."""
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


@pytest.mark.parametrize("variant", ["sample", "split"])
def test_launchers_take_inputs_that_are_not_contiguous(variant, rng):
    """bias, dv, s_all and the kept couplings are the caller's tensors: strided ones (the same
    values in another layout) must give, bit for bit, what the contiguous ones give."""
    bias = sample(rng, (3, 4), torch.float32)
    u_hat = sample(rng, (2, 9, 3, 4), torch.float32)
    u, weight = sample(rng, (5, 7, 2), torch.float32), sample(rng, (7, 3, 4, 2), torch.float32)
    launch_kwargs = dict(variant=variant, splits=2, block_i=2)
    for forward, backward, inputs in ((routing_forward, routing_backward, (u_hat,)),
                                      (capsule_linear_forward, capsule_linear_backward, (u, weight))):
        expected = forward(*inputs, 3, bias, **launch_kwargs)
        for got, want in zip(forward(*inputs, 3, strided(bias), **launch_kwargs), expected):
            assert torch.equal(got, want)
        _, s_all, couplings = expected
        dv = sample(rng, s_all.shape[1:], torch.float32)
        gradients = backward(dv, *inputs, s_all, couplings, **launch_kwargs)
        for got, want in zip(backward(strided(dv), *inputs, strided(s_all), strided(couplings), **launch_kwargs),
                             gradients):
            assert torch.equal(got, want)


def test_launch_helpers_at_their_bounds(monkeypatch):
    """Each helper's documented limit is inclusive: a tile of exactly Triton's largest tensor, 2048
    elements on 4 warps, a loop step of exactly the staged-bytes limit still pipelined; and on a GPU
    a tile over the register budget for one input still gets one input per block."""
    # Half precision is computed in float32 (the interpreter would let a float16 loop carry
    # float32 values without a word; a GPU compile refuses it).
    assert launch.tl_dtype(torch.float16) == launch.tl_dtype(torch.bfloat16) == tl.float32
    assert launch.tl_dtype(torch.float64) == tl.float64
    launch.check_tile(tl.TRITON_MAX_TENSOR_NUMEL)
    with pytest.raises(ValueError, match="more than a Triton tensor may"):
        launch.check_tile(tl.TRITON_MAX_TENSOR_NUMEL + 1)
    assert launch.launch_options(2048)["num_warps"] == 4 and launch.launch_options(2049)["num_warps"] == 8
    limit = launch._MAX_STAGED_BYTES
    assert launch.split_stages(limit) == launch._SPLIT_STAGES > 1 and launch.split_stages(limit + 1) == 1
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for dtype in (torch.float32, torch.float64):
        assert launch.block_inputs(100, 2 * launch.max_tile(dtype), dtype) == 1
        assert launch.block_inputs(100, launch.max_tile(dtype) // 4, dtype) == 4
