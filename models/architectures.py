"""The two denoiser architectures, DiT-I (`t2i.models.dit`) and CAD-I (`t2i.models.cad`), chosen by name in
one place: building one of a named size, rebuilding a trained one from its config, calling it while
sampling, and sampling latents with the objective it was trained with."""

from __future__ import annotations

from dataclasses import fields

from torch import Tensor, nn

from t2i.models.cad import CAD, CADConfig, SelfConditionedSampling, build_cad
from t2i.models.dit import DiT, DiTConfig, build_dit
from t2i.models.objectives import ModelFn, objective

ARCHITECTURES = {"dit": (DiTConfig, DiT, build_dit), "cad": (CADConfig, CAD, build_cad)}


def _architecture(name: str):
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture: {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_denoiser(architecture: str, size: str, **overrides) -> nn.Module:
    """DiT-I or CAD-I of a named size; `patch_size=None` keeps the size's own."""
    if overrides.get("patch_size", 0) is None:
        del overrides["patch_size"]
    return _architecture(architecture)[2](size, **overrides)


def denoiser_from_config(architecture: str, model_config: dict) -> nn.Module:
    """The denoiser a run's `model_config` (the DiTConfig/CADConfig fields) describes, freshly initialised.
    Fields the config class does not have (a run of an older layout) are refused by name."""
    config_class, model_class, _ = _architecture(architecture)
    unknown = sorted(set(model_config) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(
            f"model_config of this {architecture} run has fields {config_class.__name__} does not know: "
            f"{', '.join(unknown)} (a run of an older {architecture} layout; it cannot be loaded by this version)"
        )
    return model_class(config_class(**model_config))


def sampling_fn(model: nn.Module) -> ModelFn:
    """What one sampling run calls at each step: CAD-I carries its latent tokens from step to step and
    gives the unconditional branch coherence 0 (one `SelfConditionedSampling` per run), DiT-I is called as
    it is."""
    return SelfConditionedSampling(model) if isinstance(model, CAD) else model


def sample_latents(
    objective_name: str,
    sampler: str,
    model: nn.Module,
    shape,
    text,
    mask,
    null_text,
    null_mask,
    *,
    clamp_x0: float | None = None,
    gamma_min: float | None = None,
    **kwargs,
) -> Tensor:
    """Sample with the objective the model was trained with (`epsilon`, `rectified_flow`) and `sampler`
    (`auto`: the objective's default). `clamp_x0` and `gamma_min` (ε objective only; None: off) are the
    objective's sampling options (`Epsilon`); `kwargs` go to `Objective.sample` (steps, guidance_scale,
    generator, unguided_steps)."""
    options = {k: v for k, v in {"clamp_x0": clamp_x0, "gamma_min": gamma_min}.items() if v is not None}
    return objective(objective_name, sampler, **options).sample(
        sampling_fn(model), shape, text, mask, null_text, null_mask, **kwargs
    )
