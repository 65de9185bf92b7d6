"""Sampling a trained denoiser into images: the decoding VAE, the prompt encoder, guided sampling to pixels,
and the image grid, as `t2i evaluate`, `t2i generate`, the exported model and the training previews use them.

Guidance samples the empty prompt's branch beside the prompts' (classifier-free guidance); the latents are
taken out of the denoiser's normalisation before the VAE decodes them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from t2i.data.store import atomic_path
from t2i.models.architectures import sample_latents
from t2i.models.latent_norm import to_vae_latents
from t2i.models.loading import resolve_model
from t2i.models.vae import decode_latents
from t2i.tasks.model_cache import cached_model
from t2i.tasks.text import OnlineText

if TYPE_CHECKING:
    from t2i.flows.config import LatentsConfig


def decoding_vae(latents_cfg: LatentsConfig, workspace: Path, device: str):
    """The VAE of the latents stage, in float32, that decodes samples to pixels."""
    path = resolve_model(latents_cfg.vae, workspace)
    return cached_model("vae", path=path, device=device, dtype="float32", revision=latents_cfg.revision)


def prompt_encoder(meta: dict[str, Any], workspace: Path, device: str) -> OnlineText:
    """The run's text encoder for new prompts, its outputs rounded like the training batches' embeddings."""
    text_cfg = meta["text_encoder"]
    text_dtype = text_cfg.get("dtype", "float32")
    return OnlineText(
        cached_model(
            "text",
            path=resolve_model(text_cfg["encoder"], workspace),
            max_length=text_cfg["max_length"],
            device=device,
            dtype=text_dtype,
            revision=text_cfg.get("revision"),
        ),
        text_dtype,
    )


def sample_pixels(
    objective: str,
    sampler: str,
    model,
    vae,
    latent_shape: tuple[int, ...],
    latent_norm,
    text,
    mask,
    null_text,
    null_mask,
    **sampling,
) -> np.ndarray:
    """Guided sampling of `len(text)` latents → uint8 images (B, H, W, 3): the latent normalisation undone,
    decoded by the VAE. `sampling`: `steps`, `guidance_scale`, `generator` of the objective's sampler."""
    shape = (len(text), *latent_shape)
    z = sample_latents(objective, sampler, model, shape, text, mask, null_text, null_mask, **sampling)
    return decode_latents(vae, to_vae_latents(z, latent_norm))


def sample_images(
    model,
    meta,
    vae,
    encoder: OnlineText,
    texts: list[str],
    sampler: str,
    steps: int,
    guidance: float,
    generator,
) -> np.ndarray:
    """One batch of prompts → uint8 images (B, H, W, 3) with a finished run's denoiser and its `meta`
    (`final/config.json`). `t2i evaluate` and `t2i generate` both sample here."""
    text, mask = encoder.encode(texts)
    null_text, null_mask = encoder.encode([None])
    return sample_pixels(
        meta.get("objective", "epsilon"),
        sampler,
        model,
        vae,
        meta["latent_shape"],
        meta["latent_norm"],
        text,
        mask,
        null_text,
        null_mask,
        steps=steps,
        guidance_scale=guidance,
        generator=generator,
    )


def image_grid(images: list[Image.Image], columns: int = 8, cell: int = 128) -> Image.Image:
    """The images resized to `cell` pixels (nearest neighbour), `columns` to a row, on white."""
    rows = max(1, math.ceil(len(images) / columns))
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Written atomically: a reader sees the whole file or none."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
