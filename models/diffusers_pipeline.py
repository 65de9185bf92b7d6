"""The trained model as a diffusers pipeline: what `t2i export-model` writes and
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads, without this project installed.

It samples as `t2i generate` does: T5 embeddings rounded to the dtype training stored them in, the empty
prompt as the unconditional branch of classifier-free guidance, the sampling loop of the scheduler's
objective (`Objective.sample`, noise drawn from the caller's generator), the latent normalisation undone
before the VAE decodes.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from t2i.models.latent_norm import to_vae_latents


class T2IPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        latent_norm: dict | None = None,
        text_max_length: int = 120,
        text_dtype: str = "float32",
        default_steps: int = 50,
        default_guidance: float = 4.0,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
        )
        self.register_to_config(
            latent_norm=latent_norm,
            text_max_length=text_max_length,
            text_dtype=text_dtype,
            default_steps=default_steps,
            default_guidance=default_guidance,
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D) float32, zero past each prompt's end; mask (B, L) bool)."""
        batch = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.config.text_max_length,
            return_tensors="pt",
        ).to(self._execution_device)
        hidden = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.attention_mask.bool()
        text = hidden.last_hidden_state.float() * mask[..., None]
        return text.to(getattr(torch, self.config.text_dtype)).float(), mask

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for each prompt (prompt-major order). `output_type`: `pil`, `np` (uint8 (B, H, W, 3)) or
        `latent`. Steps and guidance default to the values the model was evaluated with."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps or self.config.default_steps
        guidance = self.config.default_guidance if guidance_scale is None else guidance_scale
        text, mask = self.encode_prompt([p for p in prompts for _ in range(num_images_per_prompt)])
        null_text, null_mask = self.encode_prompt([""])
        shape = (text.shape[0], *self.transformer.config.sample_shape)
        model_fn, objective = self.transformer.sampling_fn(), self.scheduler.objective
        x = objective.sample(
            model_fn, shape, text, mask, null_text, null_mask, steps, guidance, generator, self.progress_bar
        )
        if output_type == "latent":
            images = x
        else:
            param = next(self.vae.parameters())
            latents = to_vae_latents(x, self.config.latent_norm or 1.0)
            pixels = self.vae.decode(latents.to(device=param.device, dtype=param.dtype)).sample
            pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = pixels.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = [Image.fromarray(px) for px in images]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
