"""Rectified flow as in SD3, the modern alternative to the paper's ε-objective: pure torch, no I/O.

Straight-line path x_t = (1 − t)·x0 + t·ε: t = 0 is the clean latent, t = 1 is pure noise (the same time
direction as `t2i.models.diffusion`). The network predicts the velocity v = dx_t/dt = ε − x0 and is trained
with plain MSE; t is logit-normal, which spends more steps on the middle of the path where the target
is hardest to guess.

`model_fn(x_t, t, text, text_mask) -> v̂` everywhere (the signature of `DiT.forward`); t is a (B,) float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i.models.diffusion import ModelFn, guided_eps, sampling_noise


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε for a (B,) vector of times."""
    t = _per_sample(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target v = dx_t/dt = ε − x0 (constant along each straight path)."""
    return eps - x0


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift t' = s·t / (1 + (s − 1)·t): s > 1 spends more of the schedule at high noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass
class RectifiedFlowObjective:
    """Velocity MSE with logit-normal t = sigmoid(N(logit_mean, logit_std²)) (SD3's default: 0, 1)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        text: Tensor,
        mask: Tensor,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        eps: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean-squared error on v = ε − x0. Pass `t` when the caller chose it first (e.g. for CutMix).

        `info` holds detached per-sample values: `t` and `mse` (B,).
        """
        batch = x0.shape[0]
        if t is None:
            t = self.sample_t(batch, generator=generator, device=x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = interpolate(x0, t, eps)
        # A learn_sigma model returns extra channels; only the first C are the prediction.
        prediction = model_fn(x_t, t, text, mask)[:, : x0.shape[1]]
        target = velocity(x0, eps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_sample.mean(), {"t": t.detach(), "mse": per_sample.detach()}


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    text: Tensor,
    mask: Tensor,
    null_text: Tensor | None = None,
    null_mask: Tensor | None = None,
    steps: int = 50,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
) -> Tensor:
    """Integrate dx/dt = v̂ from pure noise at t = 1 down to t = 0 in `steps` Euler steps.

    Guidance v = v_u + s(v_c − v_u) on a doubled batch (`guided_eps` only combines two predictions, so it
    serves velocities as well); `null_text=None` samples the conditional model alone. `shift` warps the
    uniform grid with `shift_time` (SD3 uses 3.0 at 1024 px; 1.0 leaves it uniform).
    """
    device = text.device
    x = sampling_noise(shape, generator, device)
    times = euler_times(steps, shift, device)
    for t_now, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = torch.full((shape[0],), float(t_now), device=device)
        v = guided_eps(model_fn, x, t_batch, text, mask, null_text, null_mask, guidance_scale).float()
        x = euler_step(x, v, t_now, t_next)
    return x


def euler_times(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """The `steps + 1` times the Euler sampler visits, 1 down to 0 (warped by `shift`), in float64."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


def euler_step(x: Tensor, v: Tensor, t_now: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step of dx/dt = v̂ from t_now to t_next."""
    return x + float(t_next - t_now) * v
