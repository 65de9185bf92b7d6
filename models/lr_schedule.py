"""The learning-rate schedule of the denoiser's training: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """The factor on the base learning rate at `step`: linear warmup over `warmup` steps, then cosine decay
    from 1 to `final_ratio` at step `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
