"""The PyTorch CapsNet (capsnet_triton.model / layers) end to end, tied to the NumPy reference."""

import dataclasses

import numpy as np
import pytest
import torch
from kernel_checks import DEVICE, saved_numel

from capsnet_triton import CapsNet
from capsnet_triton.layers import Decoder, DigitCaps, PrimaryCaps, predict, recomputed_convolutions
from capsnet_triton.losses import capsnet_loss
from capsnet_triton.data import DATASETS
from capsnet_triton.model import CapsNetOutput, build_model
from capsnet_triton.numerics import TOLERANCE, as_float64, assert_agrees, relative_error
from capsnet_triton.reference import (CapsNetConfig, init_params, network_backward, network_forward,
                                      parameter_shapes, prediction_forward, squash_forward)

# A network small enough for float64 and the interpreter: 12x12 images, 3x3 kernels, conv1 -> 10x10,
# primary grid 4x4, I = 2 types * 16 = 32 capsules of 3 dims, 3 classes of 4 dims, decoder (6, 8).
TINY = dict(in_channels=1, image_size=12, num_classes=3, conv_channels=4, kernel_size=3,
            primary_types=2, primary_dims=3, digit_dims=4, decoder_hidden=(6, 8))




def tiny_batch(batch=5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(batch, 1, 12, 12, generator=generator, dtype=dtype)
    labels = torch.arange(batch) % TINY["num_classes"]
    return images, labels


def test_default_network_has_the_papers_parameters():
    model = CapsNet()
    assert sum(p.numel() for p in model.parameters()) == 8_215_568
    assert sum(p.numel() for p in CapsNet(decoder=False).parameters()) == 6_804_224
    assert sum(p.numel() for p in CapsNet(routing_bias=True).parameters()) == 8_215_568 + 10 * 16

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == parameter_shapes(CapsNetConfig())
    assert list(shapes) == [
        "conv1.weight", "conv1.bias", "primary_caps.conv.weight", "primary_caps.conv.bias",
        "digit_caps.weight", "decoder.fc1.weight", "decoder.fc1.bias", "decoder.fc2.weight",
        "decoder.fc2.bias", "decoder.fc3.weight", "decoder.fc3.bias",
    ]
    with_bias = CapsNet(routing_bias=True).state_dict()
    assert tuple(with_bias["digit_caps.bias"].shape) == (10, 16)
    assert list(with_bias) == list(parameter_shapes(CapsNetConfig(routing_bias=True)))


def _run_config(dataset):
    return dict(dataset=dataset, conv_channels=4, primary_types=2, routing_iterations=2, routing_gradient="full",
                routing_bias=False, decoder=True, decoder_hidden=[6, 8])


def test_build_model_takes_shape_and_classes_from_the_dataset_entry(monkeypatch):
    assert build_model(_run_config("fashion-mnist")).image_size == 28
    monkeypatch.setitem(DATASETS, "wide", dataclasses.replace(DATASETS["mnist"], name="wide",
                                                              image_shape=(3, 20, 20), num_classes=4))
    model = build_model(_run_config("wide"))
    assert (model.in_channels, model.image_size, model.num_classes) == (3, 20, 4)
    out = model(torch.rand(2, 3, 20, 20))
    assert out.v.shape == (2, 4, 16) and out.reconstruction.shape == (2, 3 * 20 * 20)
    assert model.digit_caps.weight.shape[0] == 2 * 2 * 2                  # 20 -> 12 -> 2x2 grid, 2 types
    monkeypatch.setitem(DATASETS, "oblong", dataclasses.replace(DATASETS["mnist"], name="oblong",
                                                                image_shape=(1, 28, 36)))
    with pytest.raises(ValueError, match="square images"):
        build_model(_run_config("oblong"))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        build_model(_run_config("cifar"))


def test_digit_caps_weight_initialisation():
    weight = CapsNet().digit_caps.weight.detach()
    assert tuple(weight.shape) == (1152, 10, 16, 8)
    assert abs(weight.std().item() - 0.01) < 1e-4 and abs(weight.mean().item()) < 1e-4
    assert not CapsNet(routing_bias=True).digit_caps.bias.any()


def test_tiny_forward_shapes():
    images, labels = tiny_batch(batch=5)
    out = CapsNet(**TINY)(images, labels)
    assert isinstance(out, CapsNetOutput)
    assert out.v.shape == (5, 3, 4) and out.lengths.shape == (5, 3)
    assert out.reconstruction.shape == (5, 144)
    assert torch.allclose(out.lengths, out.v.norm(dim=-1))
    assert ((out.reconstruction > 0) & (out.reconstruction < 1)).all()

    no_decoder = CapsNet(**TINY, decoder=False)(images)
    assert no_decoder.reconstruction is None and no_decoder.v.shape == (5, 3, 4)


def test_primary_caps_groups_channels_of_one_position():
    layer = PrimaryCaps(in_channels=2, types=3, dims=4, kernel_size=3, stride=2).double()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    conv = layer.conv(x)                                                # [B, T*P, h, w]
    u = layer(x)                                                        # [B, I, P]
    _, _, h, w = conv.shape
    assert u.shape == (2, 3 * h * w, 4)
    for b in range(2):
        for t in range(3):
            for y in range(h):
                for x_ in range(w):
                    s = conv[b, t * 4:(t + 1) * 4, y, x_].detach().numpy()
                    i = t * h * w + y * w + x_
                    np.testing.assert_allclose(u[b, i].detach().numpy(), squash_forward(s), rtol=1e-13)


def test_prediction_vectors_match_reference(rng):
    u = rng.normal(size=(3, 7, 5))
    weight = rng.normal(size=(7, 4, 6, 5))
    expected, _ = prediction_forward(u, weight)
    u_hat = predict(torch.from_numpy(u), torch.from_numpy(weight))
    assert u_hat.shape == (3, 7, 4, 6)
    assert_agrees(u_hat, expected, torch.float64, "u_hat")


def _tied_pair(gradient, routing_bias, backend, rng):
    """The reference's parameters for TINY, and a float64 CapsNet holding the same values."""
    config = CapsNetConfig(**TINY, routing_bias=routing_bias)
    params = init_params(config, rng)
    # Larger prediction weights and a non-zero bias than at initialisation, so that the
    # couplings move away from uniform and the agreement term of the gradient matters.
    params["digit_caps.weight"] = params["digit_caps.weight"] * 40.0
    if routing_bias:
        params["digit_caps.bias"] = rng.normal(0.0, 0.1, size=params["digit_caps.bias"].shape)
    model = CapsNet(**TINY, routing_gradient=gradient, routing_bias=routing_bias,
                    routing_backend=backend).double().to(DEVICE if backend == "triton" else "cpu")
    model.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
    return config, params, model


@pytest.mark.parametrize("routing_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("gradient", ["full", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_matches_reference_loss_and_every_gradient(gradient, routing_bias, backend, rng):
    config, params, model = _tied_pair(gradient, routing_bias, backend, rng)
    images = rng.uniform(size=(4, 1, 12, 12))
    labels = np.array([0, 2, 1, 2])

    ref_total, cache = network_forward(params, images, labels, config, routing_iterations=3,
                                       routing_gradient=gradient)
    ref_grads = network_backward(cache)

    device = next(model.parameters()).device
    images_t, labels_t = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    output = model(images_t, labels_t)
    terms = capsnet_loss(output, images_t, labels_t)
    terms.total.backward()

    assert_agrees(terms.total, ref_total, torch.float64, "loss")
    assert_agrees(terms.margin, cache["margin_loss"], torch.float64, "margin loss")
    assert_agrees(output.v, cache["v"], torch.float64, "v")
    assert_agrees(output.reconstruction, cache["reconstruction"], torch.float64, "reconstruction")
    grads = dict(model.named_parameters())
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        assert_agrees(grads[name].grad, ref_grad, torch.float64, name)


def test_gradient_policies_differ_on_the_tied_network(rng):
    """The tie above could not tell the two gradient policies apart if the agreement term were
    negligible at its scale; it is not."""
    config, params, _ = _tied_pair("full", False, "torch", rng)
    images, labels = rng.uniform(size=(4, 1, 12, 12)), np.array([0, 2, 1, 2])
    full = network_backward(network_forward(params, images, labels, config, routing_gradient="full")[1])
    last = network_backward(network_forward(params, images, labels, config, routing_gradient="last")[1])
    assert relative_error(last["digit_caps.weight"], full["digit_caps.weight"]) > 1e-3


def _decoder_input(model, images, labels=None):
    seen = []
    handle = model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    output = model(images, labels)
    handle.remove()
    return output, seen[0].view(output.v.shape)


def test_decoder_sees_only_the_labelled_or_longest_capsule():
    model = CapsNet(**TINY)
    with torch.no_grad():
        model.digit_caps.weight.mul_(40.0)                       # distinct lengths per class
    images, _ = tiny_batch(batch=6)

    out_longest, seen_longest = _decoder_input(model, images)
    longest = out_longest.lengths.argmax(dim=1)
    # Labels that differ from the longest capsule in every sample.
    labels = (longest + 1) % TINY["num_classes"]
    out_labelled, seen_labelled = _decoder_input(model, images, labels)

    for seen, chosen, out in [(seen_longest, longest, out_longest), (seen_labelled, labels, out_labelled)]:
        rows = torch.arange(images.shape[0])
        assert torch.equal(seen[rows, chosen], out.v[rows, chosen].detach())
        others = torch.ones_like(out.lengths, dtype=torch.bool)
        others[rows, chosen] = False
        assert not seen[others].any()
    assert not torch.allclose(out_longest.reconstruction, out_labelled.reconstruction)
    # Labels equal to the longest capsule reproduce the evaluation-time reconstruction.
    assert torch.equal(model(images, longest).reconstruction, out_longest.reconstruction)


def test_adam_steps_cut_the_loss():
    torch.manual_seed(3)
    model = CapsNet(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, labels = tiny_batch(batch=8)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = capsnet_loss(model(images, labels), images, labels).total
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_bfloat16_forward_is_finite_and_close_to_float32():
    model = CapsNet(**TINY)
    with torch.no_grad():
        model.digit_caps.weight.mul_(40.0)
    images, labels = tiny_batch(batch=6)
    reference = model(images, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, labels)
        terms = capsnet_loss(low, images, labels)
    assert low.lengths.dtype == torch.float32 and terms.total.dtype == torch.float32
    for name in ("v", "lengths", "reconstruction"):
        value = getattr(low, name)
        assert torch.isfinite(value).all(), name
        assert (relative_error(value.detach().float().numpy(), getattr(reference, name).detach().numpy())
                <= TOLERANCE["bfloat16"]), name
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_compile_matches_eager():
    model = CapsNet(**TINY)
    images, labels = tiny_batch(batch=4)
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(images, labels)
    compiled_out = compiled(images, labels)
    for name in ("v", "lengths", "reconstruction"):
        torch.testing.assert_close(getattr(compiled_out, name), getattr(eager_out, name), rtol=1e-5, atol=1e-6)

    eager_loss = capsnet_loss(eager_out, images, labels).total
    compiled_loss = capsnet_loss(compiled_out, images, labels).total
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape, match", [
    ((2, 2, 12, 12), r"expects images of shape \[B, 1, 12, 12\], got \[2, 2, 12, 12\]"),
    ((2, 1, 14, 14), r"expects images of shape \[B, 1, 12, 12\], got \[2, 1, 14, 14\]"),
    ((1, 12, 12), r"expects images of shape \[B, 1, 12, 12\], got \[1, 12, 12\]"),
])
def test_model_rejects_wrong_image_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        CapsNet(**TINY)(torch.rand(shape))


def test_model_rejects_bad_inputs_and_configs():
    model = CapsNet(**TINY)
    started = []                               # bad input is refused before the forward's work
    model.digit_caps.register_forward_pre_hook(lambda *_: started.append(1))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 12, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model(torch.rand(2, 1, 12, 12), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(2, 1, 12, 12), torch.tensor([0.0, 1.0]))
    # In the model's words, not Conv1's ("Input type (double) and bias type (float)") or a later layer's.
    with pytest.raises(TypeError, match=r"images are torch.float64 but the model's parameters are torch.float32"):
        model(torch.rand(2, 1, 12, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="images are on meta but the model is on cpu"):
        model(torch.rand(2, 1, 12, 12, device="meta"))
    with pytest.raises(ValueError, match=r"labels are on meta but the images are on cpu; .*labels.to\(images.device\)"):
        model(torch.rand(2, 1, 12, 12), torch.tensor([0, 1], device="meta"))
    assert started == []
    with torch.autocast("cpu", dtype=torch.bfloat16):           # autocast casts Conv1's input itself,
        with pytest.raises(TypeError, match=r"torch.float64 .* \(autocast leaves float64 alone\)"):
            model(torch.rand(2, 1, 12, 12, dtype=torch.float64))    # but not a float64 one
        assert model.to(torch.bfloat16)(torch.rand(2, 1, 12, 12)).lengths.dtype == torch.float32
    with pytest.raises(ValueError, match="too small"):
        CapsNet(image_size=16)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        CapsNet(**TINY, decoder=False)(torch.rand(2, 1, 12, 12), torch.tensor([0, 3]))  # unused, still checked
    for fused in (True, False):                # u of another dtype than W: an error both ways, outside autocast
        with pytest.raises((TypeError, RuntimeError), match="dtype|scalar type"):
            DigitCaps(32, 3, 3, 4, fused=fused)(torch.rand(2, 32, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"u of shape \[B, I, P\] = \[B, 32, 3\]"):
        DigitCaps(32, 3, 3, 4)(torch.rand(2, 32, 4))
    with pytest.raises(ValueError, match="two hidden layers"):
        Decoder(12, hidden=(6,), out_features=144)
    # PrimaryCaps built a conv of 0 channels, failing only at its forward, or took "2" for a size.
    for option, value in (("types", 0), ("dims", "2"), ("kernel_size", 2.0), ("stride", True)):
        with pytest.raises(ValueError, match=f"{option} must be an integer >= 1"):
            PrimaryCaps(4, **{option: value})
    with pytest.raises(ValueError, match=r"PrimaryCaps expects x of shape \[B, C, H, W\], got \[4, 12, 12\]"):
        PrimaryCaps(4, types=2, dims=3, kernel_size=3)(torch.rand(4, 12, 12))


@pytest.mark.parametrize("option, value, error, words", [
    ("image_size", 12.0, ValueError, "image_size must be an integer >= 1, got 12.0"),
    ("in_channels", "1", ValueError, "in_channels must be an integer >= 1"),
    ("kernel_size", 0, ValueError, "kernel_size must be an integer >= 1"),
    ("num_classes", -1, ValueError, "num_classes must be an integer >= 1"),
    ("decoder_hidden", 8, ValueError, "^decoder_hidden must give the widths of the two hidden layers"),
    ("decoder_hidden", (0, 8), ValueError, r"^decoder_hidden\[0\] must be an integer >= 1"),
    ("routing_iterations", 0, ValueError, "^routing_iterations must be an integer >= 1"),
    ("routing_gradient", "x", ValueError, r"^routing_gradient must be one of \('full', 'last'\), got 'x'"),
    ("routing_backend", "cuda", ValueError, "^routing_backend must be None, 'torch' or 'triton', got 'cuda'"),
    ("fused", "no", TypeError, "fused must be True or False, got 'no'"),
    ("decoder", "no", TypeError, "decoder must be True or False"),
    ("routing_bias", "yes", TypeError, "routing_bias must be True or False"),
    ("recompute_convolutions", 1, TypeError, "recompute_convolutions must be True or False"),
])
def test_constructor_options_of_the_wrong_type_or_size_name_themselves(option, value, error, words):
    """They failed inside torch ("empty() takes 1 positional argument"), at the first forward
    (a size of 0), or were taken for True ("no")."""
    with pytest.raises(error, match=words):
        CapsNet(**{**TINY, option: value})
    if option == "decoder_hidden":                           # checked even where no decoder is built
        with pytest.raises(error, match=words):
            CapsNet(**{**TINY, option: value, "decoder": False})


@pytest.mark.parametrize("fused", [True, False])
def test_a_model_on_the_meta_device_runs_its_forward(fused):
    """Asking autocast about 'meta' raised; a model there is how shapes and memory are planned."""
    model = CapsNet(**TINY, fused=fused).to("meta")
    output = model(torch.empty(2, 1, 12, 12, device="meta"))
    assert output.v.device.type == "meta" and output.v.shape == (2, 3, TINY["digit_dims"])


def test_build_model_refuses_an_unknown_digitcaps_choice():
    config = dict(dataset="mnist", conv_channels=8, primary_types=2, routing_iterations=3, routing_gradient="full",
                  routing_bias=False, decoder=True, decoder_hidden=[16, 32])
    assert not build_model({**config, "digitcaps": "unfused"}).digit_caps.fused
    with pytest.raises(ValueError, match=r"digitcaps must be one of \['fused', 'unfused'\], got 'Fused'"):
        build_model({**config, "digitcaps": "Fused"})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [16, 5, 64])
def test_recomputed_convolutions_equal_the_modules_called_directly(chunk, bias):
    """Outputs and every gradient (weights, biases, and the images' when they need one) as
    autograd through the two modules, for a batch that chunks do not divide (37 = 2 x 16 + 5),
    other strides and padding than the network's, and one chunk larger than the batch."""
    generator = torch.Generator().manual_seed(3)
    first = torch.nn.Conv2d(2, 5, 3, padding=1, bias=bias).double()
    second = torch.nn.Conv2d(5, 4, 3, stride=2, bias=bias).double()
    images = torch.randn(37, 2, 9, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(37, 4, 4, 4, generator=generator, dtype=torch.float64)
    results = []
    for call in (lambda: second(torch.relu(first(images))),
                 lambda: recomputed_convolutions(images, first, second, chunk)):
        out = call()
        tensors = [images, *first.parameters(), *second.parameters()]
        results.append([out, *torch.autograd.grad(out, tensors, grad)])
    for expected, got in zip(*results):
        assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_recomputed_convolutions_refuse_padding_they_would_get_wrong():
    images = torch.rand(2, 1, 8, 8)
    for first in (torch.nn.Conv2d(1, 2, 3, padding="same"), torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError, match="integer zero padding"):
            recomputed_convolutions(images, first, torch.nn.Conv2d(2, 2, 3), 4)


def test_recomputed_convolutions_under_autocast_compute_in_bfloat16_and_give_float32_gradients():
    """Under autocast both the plain convolutions and the recomputed ones hold SPEC 8's bfloat16
    rule against the float64 convolutions of the values autocast rounds to bfloat16: the output,
    and the gradients taken together (a few biases alone round by chance too little to measure
    against). The 3e-2 ceiling alone passed a recomputed gradient 1% off."""
    first, second = torch.nn.Conv2d(1, 6, 3), torch.nn.Conv2d(6, 4, 3, stride=2)
    images = torch.rand(9, 1, 11, 11)
    parameters = [*first.parameters(), *second.parameters()]
    exact = [p.detach().to(torch.bfloat16).double().requires_grad_() for p in parameters]
    features = torch.relu(torch.nn.functional.conv2d(images.to(torch.bfloat16).double(), exact[0], exact[1]))
    expected = torch.nn.functional.conv2d(features, exact[2], exact[3], stride=2)
    expected_grads = torch.autograd.grad(expected.square().sum(), exact)
    for name, call in (("autocast", lambda: second(torch.relu(first(images)))),
                       ("recomputed", lambda: recomputed_convolutions(images, first, second, 4))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call()
        grads = torch.autograd.grad(out.float().square().sum(), parameters)
        assert out.dtype == torch.bfloat16 and all(grad.dtype == torch.float32 for grad in grads), name
        assert_agrees(out, as_float64(expected), torch.bfloat16, f"{name} output")
        assert_agrees(torch.cat([grad.flatten() for grad in grads]),
                      np.concatenate([as_float64(grad).ravel() for grad in expected_grads]), torch.bfloat16,
                      f"{name} gradients", output_dtype=torch.bfloat16)


def _saved_shapes(model, images, labels):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = capsnet_loss(model(images, labels), images, labels).total
    return loss, [shape for shape in shapes if shape[1:] == (256, 20, 20)]


def test_a_cpu_training_forward_keeps_no_activation_of_conv1():
    """The MNIST network at B = 8: autograd kept relu(conv1(images)), [8, 256, 20, 20], for the
    ReLU's and PrimaryCaps' backward; now it is recomputed there (unless the model is told not to)."""
    model = CapsNet()
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8)
    model.recompute_convolutions = False
    assert _saved_shapes(model, images, labels)[1]
    model.recompute_convolutions = True
    loss, activations = _saved_shapes(model, images, labels)
    assert not activations
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # A gradient penalty's second derivative reaches the capsule ops, which refuse it by name; it
    # came back as zeros while the recomputed convolutions' backward was not differentiable.
    images.requires_grad_(True)
    grad, = torch.autograd.grad(capsnet_loss(model(images, labels), images, labels).total, images,
                                create_graph=True)
    with pytest.raises(NotImplementedError, match="is differentiable once: its gradient has no derivative"):
        torch.autograd.grad(grad.square().sum(), list(model.parameters()), allow_unused=True)


class _Convolutions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, images):
        return recomputed_convolutions(images, self.first, self.second, 2)


def test_recomputed_convolutions_have_a_second_derivative():
    module = _Convolutions().double()
    names = [name for name, _ in module.named_parameters()]

    def convolutions(images, *weights):
        return torch.func.functional_call(module, dict(zip(names, weights)), (images,))

    images = torch.randn(5, 2, 7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                         requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradgradcheck(convolutions, (images, *weights))


def test_a_model_under_vmap_runs_its_convolutions_as_modules():
    """torch.func.vmap over stacked models (an ensemble), gradients recorded: the recomputed
    convolutions' autograd.Function cannot join vmap, so the modules run as they are."""
    models = [CapsNet(**TINY) for _ in range(3)]
    parameters, buffers = torch.func.stack_module_state(models)
    images = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(2))

    def outputs(parameters, buffers):
        out = torch.func.functional_call(models[0], (parameters, buffers), (images,))
        return torch.cat([out.lengths, out.reconstruction], dim=1)

    stacked = torch.vmap(outputs)(parameters, buffers)
    for model, got in zip(models, stacked):
        out = model(images)
        assert torch.allclose(got, torch.cat([out.lengths, out.reconstruction], dim=1), rtol=1e-5, atol=1e-6)
    stacked.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in parameters.values())


def test_every_forward_path_is_the_reference_network(rng):
    """The reference tie above runs the path that recomputes the convolutions (a CPU step with
    gradients); evaluation under no_grad, and training with the activation kept (GPUs,
    recompute_convolutions=False), must be the same network."""
    config, params, model = _tied_pair("full", False, "torch", rng)
    images, labels = rng.uniform(size=(4, 1, 12, 12)), np.array([0, 2, 1, 2])
    _, cache = network_forward(params, images, labels, config, routing_iterations=3, routing_gradient="full")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    with torch.no_grad():
        assert_agrees(model(x, y).v, cache["v"], torch.float64, "v under no_grad")
    model.recompute_convolutions = False
    assert_agrees(model(x, y).v, cache["v"], torch.float64, "v with the activation kept")


def test_build_model_builds_what_every_config_entry_says():
    """A checkpoint's config rebuilds its model: no entry may fall back to its default."""
    config = dict(dataset="mnist", conv_channels=4, primary_types=2, routing_iterations=1, routing_gradient="last",
                  routing_bias=True, decoder=True, decoder_hidden=[6, 8], digitcaps="unfused")
    model = build_model(config)
    caps = model.digit_caps
    assert (caps.routing_iterations, caps.gradient, caps.bias is not None, caps.fused) == (1, "last", True, False)
    assert (model.conv1.out_channels, model.primary_caps.types) == (4, 2)
    assert (model.decoder.fc1.out_features, model.decoder.fc2.out_features) == (6, 8)
    assert build_model({**config, "decoder": False}).decoder is None
