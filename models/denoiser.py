"""DiT-I or CAD-I as a diffusers model (`ModelMixin`): the exported pipeline's `transformer`.

The architectures are ours, so the exported folder carries their code (`trust_remote_code`). PixArt-α's
transformer is the nearest diffusers class, and it is not DiT-I: it modulates every block from one shared
timestep projection (adaLN-single), leaves cross-attention unmodulated and does not add pooled text to the
condition, where each DiT-I block has its own adaLN projection of time plus pooled text for all three
sub-layers. Mapping the weights onto it would change the function, so the folder ships the real module.
"""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

# diffusers copies into its module cache only the files an exported file imports itself, so this one
# imports every module `architectures` needs.
from t2i.models.architectures import denoiser_from_config, sampling_fn
from t2i.models.cad import CAD
from t2i.models.dit import DiT
from t2i.models.objectives import ModelFn


class T2IDenoiser(ModelMixin, ConfigMixin):
    """`architecture`: `dit` or `cad`; `model_config`: the DiTConfig/CADConfig fields; `sample_shape`: the
    latent (C, h, w) it was trained on."""

    @register_to_config
    def __init__(
        self, architecture: str = "dit", model_config: dict | None = None, sample_shape=None
    ) -> None:
        super().__init__()
        self.model: DiT | CAD = denoiser_from_config(architecture, model_config or {})

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        return self.model(x, t, text, text_mask)

    def sampling_fn(self) -> ModelFn:
        """What one sampling run calls at each step (CAD-I carries its latents from step to step)."""
        return sampling_fn(self.model)
