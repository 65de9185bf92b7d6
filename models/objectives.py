"""The training objectives and their samplers, one class each: the paper's ε-prediction (`Epsilon`) and
SD3's rectified flow (`RectifiedFlow`). Pure torch, no I/O.

Both run time from t = 0 (the clean latent) to t = 1 (pure noise). Each class holds its noise path, its
`loss`, the law its training times are drawn from (`sample_t`), its sampler's time grid (`times`) and one
sampler `step`; `Objective.sample` is the one sampling loop, shared by the evaluation, the training
previews and the exported pipeline (through its scheduler, which steps with the same methods).

`model_fn(x_t, t, text, text_mask) -> prediction` everywhere (the signature of `DiT.forward`); t is a (B,)
float. A model that returns more channels than the latent has (learn_sigma) is read on its first C. A
sampling callable that sets `branch_aware = True` (CAD-I's `SelfConditionedSampling`) is also told which
rows of each call are the conditional branch of guidance (`conditional=`, (B,) bool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def pad_text(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Pad (or cut) tokens and mask to `length`; new positions are zero and masked out."""
    current = text.shape[1]
    if length <= current:
        return text[:, :length], mask[:, :length].bool()
    extra = length - current
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


def guide(
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    mask: Tensor,
    null_text: Tensor | None,
    null_mask: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance p = p_u + s(p_c − p_u) of an ε or velocity prediction, in one model call on a
    doubled batch (unconditional rows first).

    `null_text` (1 or B, L0, D) is the unconditional text (the empty prompt, or one per sample); it is
    broadcast to the batch and padded to the text length (padding masked). With `null_text=None` the
    conditional model is used alone.
    """
    mask = mask.bool()
    batch = x.shape[0]
    if null_text is None:
        return call_branches(model_fn, x, t, text, mask, x.new_ones(batch, dtype=torch.bool))[:, : x.shape[1]]
    null_text = null_text.expand(batch, -1, -1)
    null_mask = null_mask.bool().expand(batch, -1)
    length = max(text.shape[1], null_text.shape[1])
    text, mask = pad_text(text, mask, length)
    null_text, null_mask = pad_text(null_text.to(text.dtype), null_mask, length)
    conditional_rows = torch.arange(2 * batch, device=x.device) >= batch
    both = call_branches(
        model_fn,
        torch.cat([x, x]),
        torch.cat([t, t]),
        torch.cat([null_text, text]),
        torch.cat([null_mask, mask]),
        conditional_rows,
    )
    unconditional, conditional = both[:, : x.shape[1]].chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def call_branches(model_fn: ModelFn, x: Tensor, t: Tensor, text: Tensor, mask: Tensor, conditional: Tensor):
    """`model_fn(x, t, text, mask)`, plus `conditional` (B,) bool when the callable is `branch_aware`."""
    if getattr(model_fn, "branch_aware", False):
        return model_fn(x, t, text, mask, conditional=conditional)
    return model_fn(x, t, text, mask)


def sampling_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    """Noise drawn where the generator lives, then moved to `device`: a CPU generator (evaluation seeds one
    per prompt batch) gives the same samples on a GPU as on a CPU, and never meets a CUDA tensor."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


class Objective:
    """What both objectives share: the MSE loss on the objective's target and the sampling loop."""

    samplers: ClassVar[tuple[str, ...]]
    default_steps: ClassVar[int]
    sampler: str

    def noisy(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t on the objective's path from x0 (t = 0) to ε (t = 1), for a (B,) vector of times."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        """What the network learns to predict from x_t."""
        raise NotImplementedError

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """(batch,) training times, drawn with `generator` (on its device unless `device` is given)."""
        if device is None and generator is not None:
            device = generator.device
        return self.draw_t(batch, generator, device)

    def draw_t(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        """The objective's law of training times."""
        raise NotImplementedError

    def times(self, steps: int, device=None) -> Tensor:
        """The `steps + 1` times the sampler visits, from noise down to 0, in float64."""
        raise NotImplementedError

    def step(self, x: Tensor, prediction: Tensor, t_now: Tensor, t_next: Tensor, generator=None) -> Tensor:
        """The sample at t_next from the one at t_now and the (guided) prediction there."""
        raise NotImplementedError

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
        """Mean-squared error on the target. Pass `t` when the caller chose it first (e.g. for CutMix at
        t > 0.4), `eps` when it drew the noise.

        `info` holds detached per-sample values: `t` and `mse` (B,).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], generator=generator, device=x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        prediction = model_fn(self.noisy(x0, t, eps), t, text, mask)[:, : x0.shape[1]]
        target = self.target(x0, eps)
        mse = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return mse.mean(), {"t": t.detach(), "mse": mse.detach()}

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        text: Tensor,
        mask: Tensor,
        null_text: Tensor | None = None,
        null_mask: Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        progress: Callable[[Iterable[int]], Iterable[int]] = iter,
        unguided_steps: int = 0,
    ) -> Tensor:
        """From pure noise (drawn with `sampling_noise`) down the `times` grid in `steps` steps, guided from
        step `unguided_steps` on (the first ones call the conditional model alone; the paper's sampler: 1).

        `progress` wraps the step indices (the exported pipeline passes its progress bar).
        """
        if unguided_steps < 0:
            raise ValueError(f"unguided_steps: {unguided_steps}; allowed: 0 or more")
        device = text.device
        x = sampling_noise(shape, generator, device)
        times = self.times(steps or self.default_steps, device)
        for i in progress(range(len(times) - 1)):
            t_batch = torch.full((shape[0],), float(times[i]), device=device)
            null = (null_text, null_mask) if i >= unguided_steps else (None, None)
            prediction = guide(model_fn, x, t_batch, text, mask, *null, guidance_scale).float()
            x = self.step(x, prediction, times[i], times[i + 1], generator)
        return x


@dataclass
class Epsilon(Objective):
    """The paper's objective: x_t = √γ(t)·x0 + √(1−γ(t))·ε with γ(t) = 1 − t, the network predicts ε,
    t ~ U(t_min, t_max).

    t is kept a hair away from 0 and 1 so an x0 estimate (x_t − √(1−γ)ε̂)/√γ stays finite and t = 0 is
    never fed to the model exactly. Sampling is DDIM from `t_start` < 1 (γ > 0 there) down to 0: `ddim`
    (eta = 0) or `ddpm` (eta = 1, DDPM's ancestral sampler); `clamp_x0` optionally clamps the x0 estimate
    to ±clamp_x0 and recomputes ε from it (off by default: latents are not bounded).

    `gamma_min` switches to the paper's grid: t_i = 1 − i/N computed in float32 as its sampler does, from
    pure noise, with γ floored at `gamma_min` where it would fall below (the paper: 1e-9, at t = 1 only);
    `t_start` is then unused.
    """

    samplers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")
    default_steps: ClassVar[int] = 250
    sampler: str = "ddim"
    t_min: float = 1e-5
    t_max: float = 1.0 - 1e-5
    t_start: float = 1.0 - 1e-3
    clamp_x0: float | None = None
    gamma_min: float | None = None

    def __post_init__(self) -> None:
        if self.clamp_x0 is not None and not self.clamp_x0 > 0:
            raise ValueError(f"clamp_x0: {self.clamp_x0}; allowed: a positive number or None")
        if self.gamma_min is not None and not 0 < self.gamma_min < 1:
            raise ValueError(f"gamma_min: {self.gamma_min}; allowed: a number in (0, 1) or None")

    @staticmethod
    def gamma(t: Tensor) -> Tensor:
        """Signal fraction γ(t) = 1 − t (ᾱ in DDPM notation)."""
        return 1.0 - t

    def noisy(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        g = per_sample(self.gamma(t), x0).to(x0.dtype).clamp(0.0, 1.0)
        return g.sqrt() * x0 + (1.0 - g).sqrt() * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps

    def draw_t(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        u = torch.rand(batch, generator=generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u

    def times(self, steps: int, device=None) -> Tensor:
        """The `steps + 1` times DDIM visits, t_start (or, with gamma_min, 1 − gamma_min) down to 0, in
        float64."""
        if self.gamma_min is None:
            return torch.linspace(self.t_start, 0.0, steps + 1, device=device, dtype=torch.float64)
        paper = 1 - torch.arange(steps + 1, device=device, dtype=torch.float32) / steps
        times = paper.to(torch.float64)
        return torch.where(1 - times < self.gamma_min, 1 - self.gamma_min, times)

    def step(self, x: Tensor, prediction: Tensor, t_now: Tensor, t_next: Tensor, generator=None) -> Tensor:
        """One DDIM update from t_now to t_next given the (guided) ε; eta = 1 (`ddpm`) adds fresh noise."""
        eta = 1.0 if self.sampler == "ddpm" else 0.0
        eps, g_now, g_next = prediction, self.gamma(t_now), self.gamma(t_next)
        x0 = (x - (1 - g_now).sqrt() * eps) / g_now.sqrt()
        if self.clamp_x0 is not None:
            x0 = x0.clamp(-self.clamp_x0, self.clamp_x0)
            eps = (x - g_now.sqrt() * x0) / (1 - g_now).sqrt()
        sigma = eta * ((1 - g_next) / (1 - g_now) * (1 - g_now / g_next)).clamp_min(0).sqrt()
        x = g_next.sqrt() * x0 + (1 - g_next - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and t_next > 0:
            x = x + sigma * sampling_noise(tuple(x.shape), generator, x.device)
        return x


@dataclass
class RectifiedFlow(Objective):
    """SD3's rectified flow: the straight path x_t = (1 − t)·x0 + t·ε, the network predicts the velocity
    v = dx_t/dt = ε − x0, t = sigmoid(N(logit_mean, logit_std²)) spends more steps on the middle of the
    path, where the target is hardest to guess.

    Sampling integrates dx/dt = v̂ from t = 1 down to 0 in Euler steps; `shift` warps the uniform grid with
    SD3's resolution shift (3.0 at 1024 px; 1.0 leaves it uniform).
    """

    samplers: ClassVar[tuple[str, ...]] = ("euler",)
    default_steps: ClassVar[int] = 50
    sampler: str = "euler"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def noisy(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        t = per_sample(t, x0).to(x0.dtype)
        return (1.0 - t) * x0 + t * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps - x0

    def draw_t(self, batch: int, generator: torch.Generator | None, device) -> Tensor:
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def shift_time(self, t: Tensor) -> Tensor:
        """SD3's shift t' = s·t / (1 + (s − 1)·t): s > 1 spends more of the schedule at high noise."""
        if self.shift == 1.0:
            return t
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def times(self, steps: int, device=None) -> Tensor:
        """The `steps + 1` times the Euler sampler visits, 1 down to 0 (warped by `shift`), in float64."""
        return self.shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64))

    def step(self, x: Tensor, prediction: Tensor, t_now: Tensor, t_next: Tensor, generator=None) -> Tensor:
        """One Euler step of dx/dt = v̂ from t_now to t_next."""
        return x + float(t_next - t_now) * prediction


OBJECTIVES: dict[str, type[Objective]] = {"epsilon": Epsilon, "rectified_flow": RectifiedFlow}


def objective(name: str, sampler: str = "auto", **options) -> Objective:
    """The objective `name` (`epsilon`, `rectified_flow`) sampling with `sampler` (`auto`: its first); a
    sampler or an option that does not fit the objective is refused. `options` are the class's fields."""
    cls = OBJECTIVES[name]
    sampler = cls.samplers[0] if sampler == "auto" else sampler
    if sampler not in cls.samplers:
        allowed = ", ".join(["auto", *cls.samplers])
        raise ValueError(f"evaluate.sampler: {sampler!r} does not fit a {name} model; allowed: {allowed}")
    known = [f.name for f in fields(cls) if f.name != "sampler"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"evaluate.{', evaluate.'.join(unknown)}: not an option of a {name} model's sampler; its options: "
            f"{', '.join(known)}"
        )
    return cls(sampler=sampler, **options)
