"""reference/optim.py's Adam against Algorithm 1 of Kingma & Ba (2015), worked by hand, and
against torch.optim.Adam where torch is installed."""

import numpy as np
import pytest

from capsnet_triton.reference.optim import Adam


def test_first_two_steps_by_hand():
    """Step 1: m = 0.1 g, v = 0.001 g^2, bias-corrected to g and g^2, so theta moves by
    lr g / (|g| + eps). Step 2 with g2: m = 0.09 g1 + 0.1 g2, v = 0.000999 g1^2 + 0.001 g2^2,
    corrected by 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999."""
    g1 = np.array([2.0, -0.5, 1e-4, 0.0])
    g2 = np.array([1.0, 0.5, -3e-4, 1.0])
    params = {"w": np.zeros(4)}
    adam = Adam(params, lr=0.01)
    adam.step(params, {"w": g1})
    expected1 = -0.01 * g1 / (np.abs(g1) + 1e-8)
    np.testing.assert_allclose(params["w"], expected1, rtol=1e-12, atol=0)
    adam.step(params, {"w": g2})
    m_hat = (0.09 * g1 + 0.1 * g2) / 0.19
    v_hat = (0.000999 * g1**2 + 0.001 * g2**2) / 0.001999
    np.testing.assert_allclose(params["w"], expected1 - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-12)


def test_matches_torch_over_steps_of_gradients_of_every_scale():
    """Two parameters, so that the step count is the optimizer's, not a parameter's; the defaults
    (lr 1e-3, SPEC 6) are torch's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    params = {name: value.copy() for name, value in start.items()}
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in start.items()}
    adam, adam_t = Adam(params), torch.optim.Adam(tensors.values())
    for _ in range(5):
        grads = {name: rng.normal(size=value.shape) * rng.uniform(1e-6, 10) for name, value in start.items()}
        adam.step(params, grads)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[name])
        adam_t.step()
    assert adam.step_count == 5
    for name, tensor in tensors.items():
        np.testing.assert_allclose(params[name], tensor.detach().numpy(), rtol=1e-12, atol=1e-15)
