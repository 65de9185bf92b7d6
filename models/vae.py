"""The VAE interface: what is stored is the raw posterior (mean, std); scaling happens at load time.

Following EDM2's encoders, the stored moments never need recomputing when the latent scale changes.
"""

from __future__ import annotations

import numpy as np
import torch


def load_vae(path: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None):
    """A local folder, a Hub id, or a Hub id with a subfolder (`owner/name/vae`: a pipeline repo's VAE)."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    subfolder = None
    if not Path(path).exists() and path.count("/") >= 2 and not path.startswith((".", "/", "~")):
        owner, name, subfolder = path.split("/", 2)
        path = f"{owner}/{name}"
    vae = AutoencoderKL.from_pretrained(
        path, subfolder=subfolder, revision=revision, torch_dtype=getattr(torch, dtype)
    )
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_moments(vae, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images: (B, 3, H, W) float32 in [-1, 1] → posterior mean and std, float16, (B, C, h, w)."""
    param = next(vae.parameters())
    x = torch.from_numpy(images).to(device=param.device, dtype=param.dtype)
    dist = vae.encode(x).latent_dist
    # std = exp(logvar / 2) in numpy, not torch: torch's multi-threaded exp on CPU can differ in the last bit
    # between processes (seen on the half of a batch a second thread computes), and a resumed stage must write
    # the same shards as an uninterrupted one.
    std = np.exp(0.5 * dist.logvar.double().cpu().numpy())
    return dist.mean.float().cpu().numpy().astype(np.float16), std.astype(np.float16)


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Unscaled latents (B, C, h, w) → uint8 images (B, H, W, 3)."""
    param = next(vae.parameters())
    x = vae.decode(latents.to(device=param.device, dtype=param.dtype)).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
