"""The sampler that matches a model's training objective, with CAD-I's latent self-conditioning carried
between steps (`SelfConditionedSampling`), as the evaluation, the training previews and `t2i generate` sample."""

from __future__ import annotations

from torch import Tensor, nn

from t2i.models.cad import CAD, SelfConditionedSampling
from t2i.models.diffusion import ddim_sample, ddpm_sample
from t2i.models.flow_matching import euler_sample

SAMPLERS = {"epsilon": {"ddim": ddim_sample, "ddpm": ddpm_sample}, "rectified_flow": {"euler": euler_sample}}
DEFAULT_SAMPLER = {"epsilon": "ddim", "rectified_flow": "euler"}


def resolve_sampler(objective: str, sampler: str) -> str:
    """The sampler's name (`auto`: the objective's default); one that does not fit the objective is refused."""
    name = DEFAULT_SAMPLER[objective] if sampler == "auto" else sampler
    if name not in SAMPLERS[objective]:
        allowed = ", ".join(["auto", *SAMPLERS[objective]])
        raise ValueError(f"evaluate.sampler: {name!r} does not fit a {objective} model; allowed: {allowed}")
    return name


def sample_latents(
    objective: str, sampler: str, model: nn.Module, shape, text, mask, null_text, null_mask, **kwargs
) -> Tensor:
    """Sample with the sampler that matches the objective the model was trained with."""
    model_fn = SelfConditionedSampling(model) if isinstance(model, CAD) else model
    return SAMPLERS[objective][resolve_sampler(objective, sampler)](
        model_fn, shape, text, mask, null_text, null_mask, **kwargs
    )
