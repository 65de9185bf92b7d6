"""The definitional per-tensor LAMB step and EMA update, kept as the oracle for the tests of the multi-tensor
(`torch._foreach_*`) versions in `models/lamb.py` and `models/ema.py`, and as the baseline of
`tests/benchmarks/bench_optim.py`.

Both are copied unchanged from the implementations they replaced (one Python iteration and a dozen or so
kernels per tensor; the EMA rebuilds `state_dict(keep_vars=True)` every update). Their state layouts are the
ones checkpoints hold: LAMB's `step` (a Python int), `exp_avg`, `exp_avg_sq` per parameter; the EMA's
`decay`, `warmup`, `num_updates`, `shadow`. Do not "optimise" this file: it is what the fast versions must
equal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from t2i.models.ema import unwrap_model


class ReferenceLamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019), one tensor at a time: Adam's update (plus weight decay) rescaled by the trust
    ratio ‖w‖ / ‖update‖ (1 where either norm is 0); a group with `trust_ratio=False` takes the plain step."""

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            use_trust = group.get("trust_ratio", True)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                ratio = 1.0
                if use_trust:
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * ratio, alpha=-group["lr"])
        return loss


def _tracked(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers, by name (what `state_dict` would hold, without copying)."""
    return unwrap_model(model).state_dict(keep_vars=True)


class ReferenceEMA:
    """Shadow copy of a model's parameters and buffers, updated one tensor at a time:
    ema ← ema + (1 − decay)(θ − ema) for floating entries (float32 shadow for half-precision weights), integer
    buffers copied; `warmup=True` uses decay min(decay, (1 + n)/(10 + n)) at update n."""

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {name: value.clone() for name, value in self.shadow.items()},
        }
