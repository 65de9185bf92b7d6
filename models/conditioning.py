"""The recipe's per-sample training-batch decisions: CFG text dropout, CutMix gating, latent crops.

Pure torch, no I/O. Every random choice takes an explicit `torch.Generator`, so a training step is
reproducible from its seed and each decision can be tested on its own. Text is always a pair
(tokens (B, L, D), mask (B, L) bool, True = real token); padding positions are zero and masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(batch: int, generator: torch.Generator) -> Tensor:
    return torch.rand(batch, generator=generator, device=generator.device)


def pad_text(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Pad (or cut) tokens and mask to `length`; new positions are zero and masked out."""
    current = text.shape[1]
    if length <= current:
        return text[:, :length], mask[:, :length].bool()
    extra = length - current
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


def _real_length(mask: Tensor) -> int:
    """Length up to and including the last real token in any row (1 at least), so cutting loses no token."""
    columns = mask.bool().any(dim=0).nonzero()
    return int(columns.max()) + 1 if len(columns) else 1


def _per_sample(gate: Tensor, like: Tensor) -> Tensor:
    return gate.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def cfg_dropout_mask(batch: int, p: float, generator: torch.Generator) -> Tensor:
    """(B,) bool, True = train this sample on the empty prompt (p = 0.1 in the recipe) so CFG has a u-model."""
    return _uniform(batch, generator) < p


def apply_text_dropout(
    text: Tensor, mask: Tensor, drop: Tensor, null_text: Tensor, null_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Replace the rows where `drop` is True by the empty-text embedding `null_text` (1, L0, D).

    The batch keeps its text length unless the null prompt's real tokens need more; the null embedding's
    own trailing padding is cut, never its tokens. Dropped rows are zero and masked past the null length.
    """
    null_text, null_mask = pad_text(null_text, null_mask, _real_length(null_mask))
    length = max(text.shape[1], null_text.shape[1])
    text, mask = pad_text(text, mask, length)
    null_text, null_mask = pad_text(null_text.to(device=text.device, dtype=text.dtype), null_mask, length)
    null_mask = null_mask.to(mask.device)
    text = torch.where(_per_sample(drop, text), null_text.expand_as(text), text)
    mask = torch.where(_per_sample(drop, mask), null_mask.expand_as(mask), mask)
    return text, mask


def cutmix_gate(t: Tensor, generator: torch.Generator, threshold: float = 0.4, p: float = 0.5) -> Tensor:
    """(B,) bool, True = use the CutMix composite: only when t > threshold (noisy enough to hide the seams)
    and a coin with probability p says so — ≈30% of samples for t ~ U(0, 1) with the paper's values.

    The coin is drawn for every sample, so the generator advances the same way whatever t is.
    """
    coin = _uniform(t.shape[0], generator).to(t.device) < p
    return (t > threshold) & coin


def swap_in(
    plain_latent: Tensor,
    plain_text: Tensor,
    plain_mask: Tensor,
    comp_latent: Tensor,
    comp_text: Tensor,
    comp_mask: Tensor,
    gate: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, take latent, text tokens and mask all from the composite where `gate`, else all plain.

    Texts are padded to the longer of the two lengths, so every row keeps its own tokens and mask.
    """
    length = max(plain_text.shape[1], comp_text.shape[1])
    plain_text, plain_mask = pad_text(plain_text, plain_mask, length)
    comp_text, comp_mask = pad_text(comp_text.to(plain_text.dtype), comp_mask, length)
    latent = torch.where(_per_sample(gate, plain_latent), comp_latent.to(plain_latent.dtype), plain_latent)
    text = torch.where(_per_sample(gate, plain_text), comp_text, plain_text)
    mask = torch.where(_per_sample(gate, plain_mask), comp_mask, plain_mask)
    return latent, text, mask


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
