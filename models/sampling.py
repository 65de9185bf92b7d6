"""The sampler that matches a model's training objective, with CAD-I's latent self-conditioning carried
between steps, as the evaluation and the training previews both sample."""

from __future__ import annotations

from torch import Tensor, nn

from t2i.models.cad import CAD
from t2i.models.diffusion import ddim_sample, ddpm_sample
from t2i.models.flow_matching import euler_sample

SAMPLERS = {"epsilon": {"ddim": ddim_sample, "ddpm": ddpm_sample}, "rectified_flow": {"euler": euler_sample}}
DEFAULT_SAMPLER = {"epsilon": "ddim", "rectified_flow": "euler"}


class SelfConditionedSampling:
    """CAD-I at sampling time (RIN): each call feeds back the latent tokens of the previous call, so the
    model is sampled with the self-conditioning it trained with. One instance per sampling run: the
    batch layout (the doubled guidance batch too) is the same at every step of a run."""

    def __init__(self, model: CAD) -> None:
        self.model, self.latents = model, None

    def __call__(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        eps, self.latents = self.model(x, t, text, mask, latents_prev=self.latents, return_latents=True)
        return eps


def sample_latents(
    objective: str, sampler: str, model: nn.Module, shape, text, mask, null_text, null_mask, **kwargs
) -> Tensor:
    """Sample with the sampler that matches the objective the model was trained with."""
    name = DEFAULT_SAMPLER[objective] if sampler == "auto" else sampler
    if name not in SAMPLERS[objective]:
        allowed = ", ".join(["auto", *SAMPLERS[objective]])
        raise ValueError(f"evaluate.sampler: {name!r} does not fit a {objective} model; allowed: {allowed}")
    model_fn = SelfConditionedSampling(model) if isinstance(model, CAD) else model
    return SAMPLERS[objective][name](model_fn, shape, text, mask, null_text, null_mask, **kwargs)
