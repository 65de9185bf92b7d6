"""Latent normalisation: the model sees (z − shift) × scale of the VAE's latents z, per channel.

A run records it as `{"shift": [C], "scale": [C]}`, or as one float (a scale with no shift) — the
`train.scale_factor` / `train.shift_factor` settings resolved by the train flow. Pure torch.
"""

from __future__ import annotations

import torch

LatentNorm = dict[str, list[float]] | float


def latent_norm_tensors(norm: LatentNorm, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) shaped (1, C, 1, 1): the model sees (z − shift) × scale."""
    if not isinstance(norm, dict):
        norm = {"shift": [0.0] * channels, "scale": [float(norm)] * channels}
    shift, scale = (
        torch.tensor(norm[k], dtype=torch.float32).reshape(1, -1, 1, 1) for k in ("shift", "scale")
    )
    if shift.shape[1] != channels or scale.shape[1] != channels:
        raise ValueError(f"latent normalisation has {shift.shape[1]} channels, the latents {channels}")
    return shift, scale


def per_channel_latent_norm(norm: LatentNorm, channels: int) -> dict[str, list[float]]:
    """The normalisation as per-channel lists (a single scale becomes C equal ones)."""
    shift, scale = latent_norm_tensors(norm, channels)
    return {"shift": shift.flatten().tolist(), "scale": scale.flatten().tolist()}


def describe_latent_norm(norm: LatentNorm) -> str:
    if not isinstance(norm, dict):
        return f"scale {norm:g}"
    shift, scale = (", ".join(f"{v:.3f}" for v in norm[k]) for k in ("shift", "scale"))
    return f"per-channel shift [{shift}], scale [{scale}]"


def to_vae_latents(z: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Model-space latents back to what the VAE decodes."""
    shift, scale = latent_norm_tensors(norm, z.shape[1])
    return z / scale.to(z.device) + shift.to(z.device)
