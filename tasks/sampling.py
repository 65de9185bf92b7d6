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
    from t2i.flows.config import EvaluateConfig, LatentsConfig


def decoding_vae(
    latents_cfg: LatentsConfig, workspace: Path, device: str, meta: dict[str, Any] | None = None
):
    """The VAE that decodes samples to pixels, in float32: the one the run names (an imported run's decoder),
    else the latents stage's."""
    vae = (meta or {}).get("vae") or {"vae": latents_cfg.vae, "revision": latents_cfg.revision}
    path = resolve_model(vae["vae"], workspace)
    return cached_model("vae", path=path, device=device, dtype="float32", revision=vae.get("revision"))


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


def sampling_options(evaluate_cfg: EvaluateConfig) -> dict[str, Any]:
    """The sampler and its settings from `evaluate` (besides steps and guidance); the paper's settings only
    when set, so the records and digests of the defaults stay what they were."""
    options: dict[str, Any] = {"sampler": evaluate_cfg.sampler}
    for name in ("clamp_x0", "unconditional", "gamma_min", "unguided_steps"):
        value = getattr(evaluate_cfg, name)
        if value != type(evaluate_cfg).model_fields[name].default:
            options[name] = value
    return options


def unconditional_text(encoder: OnlineText, options: dict[str, Any], batch: int, generator):
    """Guidance's unconditional branch: the empty text (what training dropped captions to), or the paper's
    random words, drawn from the batch's generator."""
    if options.get("unconditional", "empty") == "empty":
        return encoder.encode([None])
    import torch

    from t2i.models.cad_official import paper_unconditional_prompts

    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    return encoder.encode(paper_unconditional_prompts(batch, seed))


def sample_images(
    model,
    meta,
    vae,
    encoder: OnlineText,
    texts: list[str],
    options: dict[str, Any],
    steps: int,
    guidance: float,
    generator,
) -> np.ndarray:
    """One batch of prompts → uint8 images (B, H, W, 3) with a finished run's denoiser and its `meta`
    (`final/config.json`), sampled with `options` (`sampling_options`). `t2i evaluate` and `t2i generate`
    both sample here."""
    text, mask = encoder.encode(texts)
    null_text, null_mask = unconditional_text(encoder, options, len(texts), generator)
    extra = {k: options[k] for k in ("clamp_x0", "gamma_min", "unguided_steps") if k in options}
    return sample_pixels(
        meta.get("objective", "epsilon"),
        options["sampler"],
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
        **extra,
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
