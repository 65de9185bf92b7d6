"""The paper's diffusion objective and its samplers: pure torch, no I/O.

Noise process x_t = √γ(t)·x0 + √(1−γ(t))·ε with γ(t) = 1 − t, t ~ U(0, 1): t = 0 is the clean latent,
t = 1 is pure noise. The network predicts ε and is trained with plain MSE.

`model_fn(x_t, t, text, text_mask) -> ε̂` everywhere (the signature of `DiT.forward`); t is a (B,) float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def gamma(t: Tensor) -> Tensor:
    """Signal fraction γ(t) = 1 − t (ᾱ in DDPM notation)."""
    return 1.0 - t


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = √γ(t)·x0 + √(1−γ(t))·ε for a (B,) vector of times."""
    g = _per_sample(gamma(t), x0).clamp(0.0, 1.0)
    return g.sqrt() * x0 + (1.0 - g).sqrt() * eps


def _eps_part(prediction: Tensor, x: Tensor) -> Tensor:
    """The ε channels of a prediction (a learn_sigma model returns ε and variance stacked)."""
    return prediction[:, : x.shape[1]]


@dataclass
class EpsilonObjective:
    """ε-prediction with plain MSE, t ~ U(t_min, t_max).

    t is kept a hair away from 0 and 1 so an x0 estimate (x_t − √(1−γ)ε̂)/√γ stays finite and t = 0 is
    never fed to the model exactly; the loss itself is finite everywhere.
    """

    t_min: float = 1e-5
    t_max: float = 1.0 - 1e-5

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        if device is None and generator is not None:
            device = generator.device
        u = torch.rand(batch, generator=generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u

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
        """Mean-squared error on ε. Pass `t` when the caller chose it first (e.g. for CutMix at t > 0.4).

        `info` holds detached per-sample values: `t` and `mse` (B,).
        """
        batch = x0.shape[0]
        if t is None:
            t = self.sample_t(batch, generator=generator, device=x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = add_noise(x0, t, eps)
        prediction = _eps_part(model_fn(x_t, t, text, mask), x0)
        per_sample = F.mse_loss(prediction.float(), eps.float(), reduction="none").flatten(1).mean(1)
        return per_sample.mean(), {"t": t.detach(), "mse": per_sample.detach()}


def _pad_tokens(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def guided_eps(
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    mask: Tensor,
    null_text: Tensor | None,
    null_mask: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance ε = ε_u + s(ε_c − ε_u), in one model call on a doubled batch.

    `null_text` (1 or B, L0, D) is the empty-prompt embedding; it is broadcast to the batch and padded to
    the text length (padding masked). With `null_text=None` the conditional model is used alone.
    """
    mask = mask.bool()
    if null_text is None:
        return _eps_part(model_fn(x, t, text, mask), x)
    batch = x.shape[0]
    null_text = null_text.expand(batch, -1, -1)
    null_mask = null_mask.bool().expand(batch, -1)
    length = max(text.shape[1], null_text.shape[1])
    text, mask = _pad_tokens(text, mask, length)
    null_text, null_mask = _pad_tokens(null_text.to(text.dtype), null_mask, length)
    eps = _eps_part(
        model_fn(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([null_text, text]),
            torch.cat([null_mask, mask]),
        ),
        x,
    )
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def sampling_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Noise drawn where the generator lives, then moved to `device`: a CPU generator (evaluation seeds one
    per prompt batch) gives the same samples on a GPU as on a CPU, and never meets a CUDA tensor."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    text: Tensor,
    mask: Tensor,
    null_text: Tensor | None = None,
    null_mask: Tensor | None = None,
    steps: int = 250,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    t_max: float = 1.0 - 1e-3,
    clip_x0: float | None = None,
) -> Tensor:
    """DDIM for γ(t) = 1 − t on t_max -> 0 in `steps` uniform steps; eta = 1 is DDPM's ancestral sampler.

    Starts from pure noise at t_max < 1, where γ > 0, so the x0 estimate never divides by zero.
    `clip_x0` optionally clamps that estimate (off by default: latents are not bounded).
    """
    device = text.device
    x = sampling_noise(shape, generator, device)
    times = ddim_times(steps, t_max, device)
    for t_now, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = torch.full((shape[0],), float(t_now), device=device)
        eps = guided_eps(model_fn, x, t_batch, text, mask, null_text, null_mask, guidance_scale).float()
        x = ddim_step(x, eps, t_now, t_next, eta=eta, clip_x0=clip_x0, generator=generator)
    return x


def ddim_times(steps: int, t_max: float = 1.0 - 1e-3, device=None) -> Tensor:
    """The `steps + 1` times DDIM visits, t_max down to 0, in float64."""
    return torch.linspace(t_max, 0.0, steps + 1, device=device, dtype=torch.float64)


def ddim_step(
    x: Tensor,
    eps: Tensor,
    t_now: Tensor,
    t_next: Tensor,
    eta: float = 0.0,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update from t_now to t_next given the (guided) ε prediction; eta > 0 adds fresh noise."""
    g_now, g_next = gamma(t_now), gamma(t_next)
    x0 = (x - (1 - g_now).sqrt() * eps) / g_now.sqrt()
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - g_now.sqrt() * x0) / (1 - g_now).sqrt()
    sigma = eta * ((1 - g_next) / (1 - g_now) * (1 - g_now / g_next)).clamp_min(0).sqrt()
    x = g_next.sqrt() * x0 + (1 - g_next - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0 and t_next > 0:
        x = x + sigma * sampling_noise(tuple(x.shape), generator, x.device)
    return x


def ddpm_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    text: Tensor,
    mask: Tensor,
    null_text: Tensor | None = None,
    null_mask: Tensor | None = None,
    steps: int = 250,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    t_max: float = 1.0 - 1e-3,
    clip_x0: float | None = None,
) -> Tensor:
    """Ancestral (DDPM) sampling: DDIM with eta = 1 draws from the DDPM posterior q(x_s | x_t, x0̂)."""
    return ddim_sample(
        model_fn,
        shape,
        text,
        mask,
        null_text,
        null_mask,
        steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        eta=1.0,
        t_max=t_max,
        clip_x0=clip_x0,
    )
