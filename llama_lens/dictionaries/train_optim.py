"""The two optimisers of the training recipes, with their whole state as named tensors, so that a checkpoint is a
safetensors file and a resumed run continues bit for bit.

- `ScheduleFreeSignum`: sparsify's default, `ScheduleFreeWrapper(SignSGD(params, lr), momentum=0.95)` of the
  schedulefree package: the base step z -= lr * sign(grad) is taken at y, an interpolation of z and the running
  average x; the average x is what is saved (sparsify calls `optimizer.eval()` before saving). The same
  operations in the same order as the wrapper, so the same numbers.
- `Adam`: torch's Adam (SAELens' optimiser for the standard SAE, betas 0.9 and 0.999, constant lr).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ScheduleFreeSignum:
    """Schedule-free Signum on `params` (held at y between steps); `averaged()` gives x, the weights to keep."""

    def __init__(self, params: Sequence[nn.Parameter], names: Sequence[str], *, lr: float, momentum: float) -> None:
        self.params, self.names = list(params), list(names)
        self.lr, self.momentum = lr, momentum
        self.z: list[torch.Tensor] | None = None  # created on the first step, from y (as the wrapper does)
        self.weight_sum = 0.0
        self.n_steps = 0

    @torch.no_grad()
    def step(self) -> None:
        if self.z is None:
            self.z = [p.detach().clone() for p in self.params]
        m = self.momentum
        # Every step weighs lr_max ** 2 (weight_lr_power 2, r 0): with a constant lr, x is the plain mean of the z's.
        weight = self.lr**2
        self.weight_sum += weight
        ckp1 = weight / self.weight_sum
        for p, z in zip(self.params, self.z):
            if p.grad is None:
                continue
            p.lerp_(z, 1 - 1 / m)  # y -> x
            z.add_(p.grad.sign(), alpha=-self.lr)  # the base step, at z
            p.lerp_(z, ckp1)  # the new average x
            p.lerp_(z, 1 - m)  # x -> y
        self.n_steps += 1

    @torch.no_grad()
    def averaged(self) -> dict[str, torch.Tensor]:
        """The average x of every parameter (the wrapper's eval mode), without changing the parameters."""
        if self.z is None:
            return {name: p.detach().clone() for name, p in zip(self.names, self.params)}
        return {name: p.lerp(z, 1 - 1 / self.momentum) for name, p, z in zip(self.names, self.params, self.z)}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {"optim.weight_sum": torch.tensor(self.weight_sum, dtype=torch.float64)}
        state["optim.n_steps"] = torch.tensor(self.n_steps)
        if self.z is not None:
            state |= {f"optim.z.{name}": z for name, z in zip(self.names, self.z)}
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.weight_sum = float(state["optim.weight_sum"])
        self.n_steps = int(state["optim.n_steps"])
        if f"optim.z.{self.names[0]}" in state:
            self.z = [state[f"optim.z.{name}"].clone() for name in self.names]


class Adam:
    """torch.optim.Adam with its state as named tensors; the parameters themselves are the weights to keep."""

    def __init__(self, params: Sequence[nn.Parameter], names: Sequence[str], *, lr: float) -> None:
        self.params, self.names = list(params), list(names)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))

    def step(self) -> None:
        self.optimizer.step()

    def averaged(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in zip(self.names, self.params)}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in zip(self.names, self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"optim.{key}.{name}"] = torch.as_tensor(value)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in zip(self.names, self.params):
            found = {key: state.get(f"optim.{key}.{name}") for key in ("step", "exp_avg", "exp_avg_sq")}
            if all(value is not None for value in found.values()):
                self.optimizer.state[p] = {key: value.clone() for key, value in found.items()}
