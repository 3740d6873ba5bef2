"""The kernel launchers' contracts with their callers (capsnet_triton.kernels): the buffers they
take, and the launch helpers at the bounds their docstrings give. The kernels run through the
interpreter here and natively on a GPU machine (see conftest.py)."""

import importlib

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


# The launches of each variant, by the kernel modules' attribute names: the variants agree to
# rounding, so only the launches tell them apart (a launcher that ran the other one would pass).
_VARIANT_KERNELS = {
    "routing": {"sample": ("routing._routing_forward_kernel", "routing._routing_backward_ds_all_kernel"),
                "split": ("routing_split.split_forward_kernel", "routing_split.split_backward_ds_all_kernel")},
    "capsule_linear": {
        "sample": ("capsule_linear._capsule_linear_forward_kernel",
                   "capsule_linear._capsule_linear_backward_ds_all_kernel"),
        "split": ("capsule_linear_split.split_forward_kernel", "capsule_linear_split.split_backward_ds_all_kernel")},
}


@pytest.mark.parametrize("variant", [None, "sample", "split"])
@pytest.mark.parametrize("layer", ["routing", "capsule_linear"])
def test_each_variant_launches_its_own_kernels_and_the_default_the_split_ones(layer, variant, rng, monkeypatch):
    """variant="sample": one forward launch and one kernel-A launch, a program per sample;
    "split" (the default, which the ops run): one launch per iteration and one more for the last
    squash, and one kernel-A launch per iteration; neither runs the other's kernels."""
    from capsnet_triton import capsule_linear, dynamic_routing
    launched, grids = [], []

    def spy(name):
        module_name, attribute = name.split(".")
        module = importlib.import_module(f"capsnet_triton.kernels.{module_name}")
        kernel = getattr(module, attribute)

        class Spy:
            def __getitem__(self, grid):
                launched.append(name)
                grids.append(grid)
                return kernel[grid]
        monkeypatch.setattr(module, attribute, Spy())
    for names in _VARIANT_KERNELS[layer].values():
        for name in names:
            spy(name)
    iterations = 3
    launch = {} if variant is None else {"variant": variant}
    if variant == "split":                    # two chunks of I (the sample kernels' launches have none)
        launch.update(splits=2, block_i=2)
    if layer == "routing":
        u_hat = sample(rng, (2, 5, 3, 4), torch.float32)
        _, s_all, couplings = routing_forward(u_hat, iterations, **launch)
        routing_backward(sample(rng, (2, 3, 4), torch.float32), u_hat, s_all, couplings, **launch)
    else:
        u, weight = sample(rng, (2, 5, 2), torch.float32), sample(rng, (5, 3, 4, 2), torch.float32)
        _, s_all, couplings = capsule_linear_forward(u, weight, iterations, **launch)
        capsule_linear_backward(sample(rng, (2, 3, 4), torch.float32), u, weight, s_all, couplings, **launch)
    # The default is "split", as README says: the variant the first GPU run measured faster.
    forward, kernel_a = _VARIANT_KERNELS[layer][variant or "split"]
    counts = (1, 1) if variant == "sample" else (iterations + 1, iterations)
    assert launched == [forward] * counts[0] + [kernel_a] * counts[1]
    if variant == "split":                    # the last squash (and kernel A's first iteration) once a block
        assert [grid[1] for grid in grids] == [2] * iterations + [1] + [2] * (iterations - 1) + [1]
    if variant is None:                       # the public op, on the kernels' backend, launches the same
        launched.clear()
        x = (u_hat if layer == "routing" else u).requires_grad_(True)
        out = (dynamic_routing(x, iterations, backend="triton") if layer == "routing"
               else capsule_linear(x, weight.requires_grad_(True), iterations, backend="triton"))
        out.sum().backward()
        assert launched == [forward] * counts[0] + [kernel_a] * counts[1]
