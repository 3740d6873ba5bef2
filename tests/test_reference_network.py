"""The whole CapsNet as NumPy functions: parameter layout and counts, capsule grouping, the
total-loss gradient against finite differences and a torch autograd run of the same math."""

import dataclasses

import numpy as np
import pytest

from capsnet_triton.reference import (
    CapsNetConfig,
    conv2d_forward,
    init_params,
    network_backward,
    network_forward,
    parameter_count,
    parameter_shapes,
    classify,
    squash_forward,
)
from capsnet_triton.numerics import FD_TOLERANCE, numerical_gradient, relative_error, sample_indices

TINY = CapsNetConfig(in_channels=1, image_size=12, conv_channels=4, kernel_size=3, primary_types=2, primary_dims=3,
                     num_classes=3, digit_dims=4, decoder_hidden=(6, 8))


def tiny_problem(config, seed, batch=3):
    rng = np.random.default_rng(seed)
    params = init_params(config, rng)
    # Larger weights than at the start of training, so that primary capsules and output capsules
    # have lengths around 0.5: routing then matters and both branches of the margin loss are active.
    params["primary_caps.conv.weight"] *= 5
    params["digit_caps.weight"] *= 30
    if config.routing_bias:
        params["digit_caps.bias"] = rng.normal(size=params["digit_caps.bias"].shape) * 0.1
    images = rng.uniform(size=(batch, config.in_channels, config.image_size, config.image_size))
    labels = rng.integers(0, config.num_classes, size=batch)
    return params, images, labels, rng


def test_default_parameter_counts_are_the_papers():
    assert parameter_count(CapsNetConfig()) == 8_215_568
    assert parameter_count(CapsNetConfig(), include_decoder=False) == 6_804_224
    assert parameter_count(CapsNetConfig(routing_bias=True)) == 8_215_568 + 10 * 16


def test_parameter_names_and_shapes_of_the_default_model():
    shapes = parameter_shapes(CapsNetConfig())
    assert shapes == {
        "conv1.weight": (256, 1, 9, 9), "conv1.bias": (256,),
        "primary_caps.conv.weight": (256, 256, 9, 9), "primary_caps.conv.bias": (256,),
        "digit_caps.weight": (1152, 10, 16, 8),
        "decoder.fc1.weight": (512, 160), "decoder.fc1.bias": (512,),
        "decoder.fc2.weight": (1024, 512), "decoder.fc2.bias": (1024,),
        "decoder.fc3.weight": (784, 1024), "decoder.fc3.bias": (784,),
    }
    assert parameter_shapes(CapsNetConfig(routing_bias=True))["digit_caps.bias"] == (10, 16)


def test_init_params_follows_torch_defaults(rng):
    params = init_params(TINY, rng)
    assert {name: p.shape for name, p in params.items()} == parameter_shapes(TINY)
    for name, fan_in in (("conv1", 9), ("primary_caps.conv", 36), ("decoder.fc1", 12), ("decoder.fc3", 8)):
        for suffix in (".weight", ".bias"):
            assert np.abs(params[name + suffix]).max() <= 1 / np.sqrt(fan_in)
        assert np.abs(params[name + ".weight"]).max() >= 0.7 / np.sqrt(fan_in)  # the bound, not smaller
    big = init_params(dataclasses.replace(CapsNetConfig(), routing_bias=True), rng, dtype=np.float32)
    assert big["digit_caps.weight"].dtype == np.float32
    assert big["digit_caps.weight"].std() == pytest.approx(0.01, rel=0.01)
    assert np.array_equal(big["digit_caps.bias"], np.zeros((10, 16), dtype=np.float32))
    # Biases of hundreds of entries reach their bound too (TINY's are too few to say).
    for name, fan_in in (("conv1.bias", 81), ("decoder.fc2.bias", 512)):
        assert 0.7 / np.sqrt(fan_in) <= np.abs(big[name]).max() <= 1 / np.sqrt(fan_in), name


def test_capsule_i_is_the_P_channels_of_type_t_at_one_position():
    params, images, labels, _ = tiny_problem(TINY, 0)
    _, cache = network_forward(params, images, labels, TINY)
    features = np.maximum(conv2d_forward(images, params["conv1.weight"], params["conv1.bias"])[0], 0)
    primary, _ = conv2d_forward(features, params["primary_caps.conv.weight"], params["primary_caps.conv.bias"], 2)
    T, P, h = TINY.primary_types, TINY.primary_dims, TINY.primary_grid
    u = cache["prediction"][0]                                       # the squashed capsules [B, I, P]
    for b, t, y, x in np.ndindex(images.shape[0], T, h, h):
        i = t * h * h + y * h + x
        np.testing.assert_array_equal(cache["s_primary"][b, i], primary[b, t * P:(t + 1) * P, y, x])
        np.testing.assert_allclose(u[b, i], squash_forward(primary[b, t * P:(t + 1) * P, y, x]), rtol=1e-14)


def total_loss(params, images, labels, config, **options):
    return network_forward(params, images, labels, config, **options)[0]


@pytest.mark.parametrize("routing_bias, iterations", [(False, 3), (True, 2)])
def test_gradient_of_the_total_loss_matches_finite_differences(routing_bias, iterations):
    config = dataclasses.replace(TINY, routing_bias=routing_bias)
    params, images, labels, rng = tiny_problem(config, 1)
    # A reconstruction weight of 0.1 rather than 0.0005 keeps the decoder's gradients well above
    # the finite-difference noise, and the total loss small enough for that noise to stay small.
    options = dict(routing_iterations=iterations, reconstruction_weight=0.1)
    _, cache = network_forward(params, images, labels, config, **options)
    grads = network_backward(cache)
    assert grads.keys() == params.keys()
    for name, param in params.items():
        assert grads[name].shape == param.shape and grads[name].dtype == param.dtype
        indices = sample_indices(param.shape, rng, 20)
        numeric = numerical_gradient(lambda: total_loss(params, images, labels, config, **options), param, indices)
        assert relative_error(grads[name].ravel()[indices], numeric) <= FD_TOLERANCE, name


def torch_network_loss(params, images, labels, config, iterations, routing_gradient, reconstruction_weight):
    """The same network written with torch ops, for autograd to differentiate."""
    import torch
    import torch.nn.functional as F

    from capsnet_triton.baselines import routing
    from capsnet_triton.baselines import squash as torch_squash

    T, P, h = config.primary_types, config.primary_dims, config.primary_grid
    B = images.shape[0]
    features = F.relu(F.conv2d(images, params["conv1.weight"], params["conv1.bias"]))
    primary = F.conv2d(features, params["primary_caps.conv.weight"], params["primary_caps.conv.bias"], stride=2)
    u = torch_squash(primary.view(B, T, P, h, h).permute(0, 1, 3, 4, 2).reshape(B, T * h * h, P))
    u_hat = torch.einsum("ijdp,bip->bijd", params["digit_caps.weight"], u)
    v = routing(u_hat, iterations, bias=params.get("digit_caps.bias"), gradient=routing_gradient)
    lengths = v.norm(dim=-1)
    target = F.one_hot(labels, config.num_classes).to(v.dtype)
    margin = (target * F.relu(0.9 - lengths) ** 2 + 0.5 * (1 - target) * F.relu(lengths - 0.1) ** 2).sum(1).mean()
    masked = (v * target[..., None]).flatten(1)
    hidden = F.relu(F.linear(masked, params["decoder.fc1.weight"], params["decoder.fc1.bias"]))
    hidden = F.relu(F.linear(hidden, params["decoder.fc2.weight"], params["decoder.fc2.bias"]))
    reconstruction = torch.sigmoid(F.linear(hidden, params["decoder.fc3.weight"], params["decoder.fc3.bias"]))
    recon_loss = ((reconstruction - images.flatten(1)) ** 2).sum(1).mean()
    return margin + reconstruction_weight * recon_loss


@pytest.mark.parametrize("routing_bias, routing_gradient", [(False, "full"), (True, "full"), (True, "last")])
def test_loss_and_gradients_match_torch_autograd(routing_bias, routing_gradient):
    torch = pytest.importorskip("torch")
    config = dataclasses.replace(TINY, routing_bias=routing_bias)
    params, images, labels, _ = tiny_problem(config, 2, batch=4)
    params_t = {name: torch.tensor(p, requires_grad=True) for name, p in params.items()}
    loss_t = torch_network_loss(params_t, torch.tensor(images), torch.tensor(labels), config, 3, routing_gradient, 0.0005)
    loss_t.backward()
    loss, cache = network_forward(params, images, labels, config, routing_gradient=routing_gradient)
    grads = network_backward(cache)
    assert relative_error(loss, loss_t.item()) <= 1e-12
    for name in params:
        assert relative_error(grads[name], params_t[name].grad.numpy()) <= 1e-10, name


def test_cache_exposes_the_pieces_of_the_loss():
    params, images, labels, _ = tiny_problem(TINY, 3)
    loss, cache = network_forward(params, images, labels, TINY, reconstruction_weight=0.25)
    B, J, D = images.shape[0], TINY.num_classes, TINY.digit_dims
    assert cache["v"].shape == (B, J, D) and cache["lengths"].shape == (B, J)
    assert cache["reconstruction"].shape == (B, 144)
    assert ((cache["reconstruction"] > 0) & (cache["reconstruction"] < 1)).all()
    assert loss == pytest.approx(cache["margin_loss"] + 0.25 * cache["reconstruction_loss"], rel=1e-15)
    np.testing.assert_allclose(cache["lengths"], np.linalg.norm(cache["v"], axis=-1), rtol=1e-14)


def test_classify_picks_the_longest_capsule_and_reconstructs_from_it():
    params, images, _, _ = tiny_problem(TINY, 4, batch=5)
    classes, reconstruction = classify(params, images, TINY)
    assert np.array_equal(classify(params, images, TINY, reconstruct=False)[0], classes)
    assert classify(params, images, TINY, reconstruct=False)[1] is None
    lengths = network_forward(params, images, np.zeros(5, dtype=int), TINY)[1]["lengths"]
    assert np.array_equal(classes, np.argmax(lengths, axis=1))
    # Feeding the predicted classes as labels must mask the same capsule, so the same image.
    _, cache = network_forward(params, images, classes, TINY)
    np.testing.assert_array_equal(reconstruction, cache["reconstruction"])


def test_bad_input_raises():
    params, images, labels, _ = tiny_problem(TINY, 5)
    with pytest.raises(ValueError, match=r"images must have shape \[B, C, H, W\]"):
        network_forward(params, images[:, :, :10], labels, TINY)
    with pytest.raises(ValueError, match=r"images must have shape \[B, C, H, W\]"):
        classify(params, images[0], TINY)
    with pytest.raises(TypeError, match="floating point"):
        network_forward(params, (images * 255).astype(np.uint8), labels, TINY)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        network_forward(params, images, labels + 3, TINY)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\], one class per image"):
        network_forward(params, images, np.stack([labels, (labels + 1) % 3], axis=1), TINY)   # [B, K]
    # As torch's capsnet_loss refuses them: a negative weight rewards a bad reconstruction.
    for weight in (-0.0005, np.nan, "0.0005"):
        with pytest.raises(ValueError, match="reconstruction_weight must be a finite number >= 0"):
            network_forward(params, images, labels, TINY, reconstruction_weight=weight)
    with pytest.raises(ValueError, match=r"missing \['digit_caps.bias'\]"):
        network_forward(params, images, labels, dataclasses.replace(TINY, routing_bias=True))
    wrong = dict(params, **{"conv1.bias": np.zeros(5)})
    with pytest.raises(ValueError, match=r"params\['conv1.bias'\] must have shape \(4,\)"):
        network_forward(wrong, images, labels, TINY)
    with pytest.raises(ValueError, match="too small"):
        CapsNetConfig(image_size=16)
    with pytest.raises(ValueError, match="decoder_hidden"):
        CapsNetConfig(decoder_hidden=(512,))
    for sizes in (dict(conv_channels=0), dict(num_classes=0), dict(kernel_size=0), dict(image_size=28.0)):
        with pytest.raises(ValueError, match=f"{next(iter(sizes))} must be a positive integer"):
            CapsNetConfig(**sizes)
    with pytest.raises(ValueError, match="a decoder_hidden width must be a positive integer, got 0"):
        CapsNetConfig(decoder_hidden=(512, 0))
