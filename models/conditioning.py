"""The recipe's per-sample training-batch decisions: CFG text dropout, CutMix gating, latent crops.

Pure torch, no I/O. Every random choice takes an explicit `torch.Generator`, so a training step is
reproducible from its seed and each decision can be tested on its own. Text is always a pair
(tokens (B, L, D), mask (B, L) bool, True = real token); padding positions are zero and masked.

Text lengths come in a few fixed buckets (`text_buckets`), so a compiled denoiser sees a handful of shapes,
not one per batch. What runs inside the training step reads shapes only, never values: no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from t2i.models.objectives import pad_text, per_sample


def _uniform(batch: int, generator: torch.Generator) -> Tensor:
    return torch.rand(batch, generator=generator, device=generator.device)


def text_buckets(max_length: int, count: int) -> list[int]:
    """The text lengths a batch is padded to: `count` even steps up to `max_length` (4 and 256: 64, 128, 192,
    256), so a batch pads at most a quarter of `max_length` past its longest caption."""
    step = -(-max_length // count)
    return sorted({min(max_length, step * (i + 1)) for i in range(count)})


def bucket_length(length: int, max_length: int, count: int) -> int:
    """The smallest bucket that holds `length` tokens (the longest, `max_length`, when none does)."""
    return next((b for b in text_buckets(max_length, count) if b >= length), max(length, max_length))


def trim_padding(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the trailing columns no row uses (1 column at least). Reads the mask's values: a host sync, for
    set-up (the empty text's embedding), never inside a step."""
    columns = mask.bool().any(dim=0).nonzero()
    return pad_text(text, mask, int(columns.max()) + 1 if len(columns) else 1)


def cfg_dropout_mask(batch: int, p: float, generator: torch.Generator) -> Tensor:
    """(B,) bool, True = train this sample on the empty prompt (p = 0.1 in the recipe) so CFG has a u-model."""
    return _uniform(batch, generator) < p


def apply_text_dropout(
    text: Tensor, mask: Tensor, drop: Tensor, null_text: Tensor, null_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Replace the rows where `drop` is True by the empty-text embedding `null_text` (1, L0, D), on the text's
    device and cut to its real tokens (`trim_padding`).

    The batch keeps its text length unless the null prompt needs more. Dropped rows are zero and masked past
    the null length.
    """
    length = max(text.shape[1], null_text.shape[1])
    text, mask = pad_text(text, mask, length)
    null_text, null_mask = pad_text(null_text.to(text.dtype), null_mask, length)
    text = torch.where(per_sample(drop, text), null_text.expand_as(text), text)
    mask = torch.where(per_sample(drop, mask), null_mask.expand_as(mask), mask)
    return text, mask


def cutmix_gate(t: Tensor, generator: torch.Generator, threshold: float = 0.4, p: float = 0.5) -> Tensor:
    """(B,) bool, True = use the CutMix composite: only when t > threshold (noisy enough to hide the seams)
    and a coin with probability p says so — ≈30% of samples for t ~ U(0, 1) with the paper's values.

    The coin is drawn for every sample, so the generator advances the same way whatever t is.
    """
    coin = _uniform(t.shape[0], generator) < p
    return (t > threshold) & coin


def random_latent_crop(latent: Tensor, size: int | tuple[int, int], generator: torch.Generator) -> Tensor:
    """A random (h, w) window of each (C, H, W) latent, offset drawn per sample, shared by its channels.

    Our reading of the paper's "crop" augmentation: cropping the latent grid rather than the pixels keeps
    the stored VAE latents usable as they are.
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    batch, _, height, width = latent.shape
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(f"crop {crop_h}x{crop_w} does not fit a {height}x{width} latent")
    top = torch.randint(0, height - crop_h + 1, (batch,), generator=generator, device=generator.device)
    left = torch.randint(0, width - crop_w + 1, (batch,), generator=generator, device=generator.device)
    rows = (top.to(latent.device)[:, None] + torch.arange(crop_h, device=latent.device))[:, :, None]
    cols = (left.to(latent.device)[:, None] + torch.arange(crop_w, device=latent.device))[:, None, :]
    samples = torch.arange(batch, device=latent.device)[:, None, None]
    # Advanced indexing around the channel slice puts it last: (B, h, w, C) -> (B, C, h, w).
    return latent[samples, :, rows, cols].permute(0, 3, 1, 2).contiguous()
