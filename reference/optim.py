"""Adam (Kingma & Ba 2015), the optimiser of the paper, for the NumPy network's parameter dict.

At a constant learning rate: the recipe's decay (SPEC section 6, x0.96 every 2,000 steps) is the
training command's (capsnet_triton.training); the reference's demo stops long before its first
step of decay matters."""

import numpy as np

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba 2015) over a dict of NumPy arrays, updated in place."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps, self.step_count = lr, betas, eps, 0
        self.first = {name: np.zeros_like(p) for name, p in params.items()}
        self.second = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, params, grads):
        self.step_count += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.step_count, 1 - beta2**self.step_count
        for name, g in grads.items():
            self.first[name] = beta1 * self.first[name] + (1 - beta1) * g
            self.second[name] = beta2 * self.second[name] + (1 - beta2) * g * g
            step = (self.first[name] / correction1) / (np.sqrt(self.second[name] / correction2) + self.eps)
            params[name] -= self.lr * step
