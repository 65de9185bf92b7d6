"""Exponential moving average of a model's weights: ema ← ema + (1 − decay)(θ − ema).

The official T2I-ImageNet update lerps the EMA almost all the way to the live weights, so it does not
average; this one is the standard update, with decay 0.9999 from step 0 as in the paper.

An update is one `torch._foreach_lerp_` per (shadow dtype, live dtype, device) group, with no host
synchronisation; the live tensors are resolved once per model, not looked up every step. Half-precision
weights are staged in float32 a chunk at a time. The per-tensor definition it must equal is
`tests/reference_optim.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from t2i.models.lamb import CHUNK_NUMEL, DEFAULT_CHUNK_NUMEL, numel_chunks


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


@dataclass
class _Group:
    """Shadows of one dtype and device, fed by live tensors of one dtype and device.

    Parameters are held as resolved (the objects, which `.to(dtype)` and `.half()` keep); buffers are looked up in
    their module at each update (a module may assign a new tensor to a buffer, and `.to()` replaces buffers),
    which costs little: models have few.
    """

    names: list[str]  # the shadows' names: parameters, then buffers
    params: list[Tensor]
    buffers: list[tuple[nn.Module, str]]
    floating: bool
    # Half-precision live values are copied to float32 before the lerp, a chunk of the group at a time, into
    # views of one reused buffer the size of the largest chunk: (chunk, its views).
    staging: list[tuple[slice, list[Tensor]]] | None = field(default=None)

    def live(self) -> list[Tensor]:
        if not self.buffers:
            return self.params
        return self.params + [module._buffers[key] for module, key in self.buffers]

    def stage(self, shadows: list[Tensor]) -> list[tuple[slice, list[Tensor]]]:
        if self.staging is None:
            device = shadows[0].device
            chunks = list(numel_chunks(shadows, CHUNK_NUMEL.get(device.type, DEFAULT_CHUNK_NUMEL)))
            size = max(sum(s.numel() for s in shadows[c]) for c in chunks)
            buffer = torch.empty(size, dtype=shadows[0].dtype, device=device)
            self.staging = []
            for c in chunks:
                views, offset = [], 0
                for s in shadows[c]:
                    views.append(buffer[offset : offset + s.numel()].view(s.shape))
                    offset += s.numel()
                self.staging.append((c, views))
        return self.staging


class EMA:
    """Shadow copy of a model's parameters and buffers.

    Floating-point entries are averaged; integer buffers (e.g. BatchNorm's step counter) are copied.
    Half-precision weights get a float32 shadow, since bf16 cannot represent a 1e-4 step.
    `warmup=True` uses decay min(decay, (1 + n)/(10 + n)) at update n, so early averages are not
    dominated by the random init; off by default, as the paper uses 0.9999 from step 0.

    `update` resolves the model's tensors by name the first time it sees a module (at construction) and
    reuses them while it is passed the same module, bare or wrapped (DDP's `.module`, torch.compile's
    `._orig_mod`); replacing a parameter object (e.g. `load_state_dict(..., assign=True)`) after that is not
    seen; in-place changes, and dtype conversions (`.to(dtype)`, `.half()`, which swap a parameter's data), are. Half-precision live weights are
    converted through a reused float32 buffer of one chunk (`models/lamb.py`'s `CHUNK_NUMEL`).
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
        self._module: nn.Module | None = None
        self._groups: list[_Group] = []
        self._bind(unwrap_model(model))

    @staticmethod
    def _shadow_copy(value: Tensor) -> Tensor:
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            return value.to(torch.float32, copy=True)
        return value.clone()

    def _bind(self, module: nn.Module) -> None:
        """Resolve `module`'s tracked tensors once and group them with their shadows."""
        tracked = module.state_dict(keep_vars=True)
        unknown = tracked.keys() - self.shadow.keys()
        if unknown:
            raise KeyError(f"EMA does not track {sorted(unknown)}")
        owners = {id(t): (m, key) for m in module.modules() for key, t in m._buffers.items() if t is not None}
        groups: dict[tuple, _Group] = {}
        for name, value in tracked.items():
            shadow = self.shadow[name]
            key = (shadow.dtype, shadow.device, value.dtype, value.device)
            group = groups.setdefault(key, _Group([], [], [], shadow.is_floating_point()))
            if isinstance(value, nn.Parameter) or id(value) not in owners:
                group.names.insert(len(group.params), name)
                group.params.append(value)  # the Parameter itself: `.half()` swaps its data
            else:
                group.names.append(name)
                group.buffers.append(owners[id(value)])
        self._module, self._groups = module, list(groups.values())

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        module = unwrap_model(model)
        if module is not self._module:
            self._bind(module)
        weight = 1.0 - self.current_decay()
        for group in self._groups:
            shadows = [self.shadow[name] for name in group.names]
            live = group.live()
            if not group.floating:
                torch._foreach_copy_(shadows, live)
                continue
            if live[0].dtype == shadows[0].dtype:
                torch._foreach_lerp_(shadows, live, weight)  # ema + weight·(θ − ema)
                continue
            for c, staged in group.stage(shadows):  # half-precision weights, float32 shadow
                torch._foreach_copy_(staged, live[c])
                torch._foreach_lerp_(shadows[c], staged, weight)
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
