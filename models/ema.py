"""Exponential moving average of a model's weights: ema ← ema + (1 − decay)(θ − ema).

The official T2I-ImageNet update lerps the EMA almost all the way to the live weights, so it does not
average; this one is the standard update, with decay 0.9999 from step 0 as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP-style `.module` and torch.compile `._orig_mod` wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _tracked(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers, by name (what `state_dict` would hold, without copying)."""
    return unwrap_model(model).state_dict(keep_vars=True)


class EMA:
    """Shadow copy of a model's parameters and buffers.

    Floating-point entries are averaged; integer buffers (e.g. BatchNorm's step counter) are copied.
    Half-precision weights get a float32 shadow, since bf16 cannot represent a 1e-4 step.
    `warmup=True` uses decay min(decay, (1 + n)/(10 + n)) at update n, so early averages are not
    dominated by the random init; off by default, as the paper uses 0.9999 from step 0.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: self._shadow_copy(value) for name, value in _tracked(model).items()
            }

    @staticmethod
    def _shadow_copy(value: Tensor) -> Tensor:
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            return value.to(torch.float32, copy=True)
        return value.clone()

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, value in _tracked(model).items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), weight)  # ema + weight·(θ − ema)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (e.g. a separate copy used for sampling)."""
        for name, value in _tracked(model).items():
            value.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {name: value.clone() for name, value in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = self.shadow.keys() - state["shadow"].keys()
        unexpected = state["shadow"].keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.num_updates = state["num_updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
