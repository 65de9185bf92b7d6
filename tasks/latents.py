"""Latents stage unit of work: one image shard → VAE posterior mean and std (float16) per image."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from prefect import task

from data.imaging import RejectedImage, center_crop_resize, decode_image, to_tensor_range
from data.schemas import LATENTS
from data.store import Artifact, Reject, ShardInfo
from models.tiny import resolve_model
from models.vae import encode_moments
from tasks.model_cache import cached_model, pick_device
from tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from flows.config import LatentsConfig

VERSION = 1
SHAPE_META_KEY = b"t2i.latent_shape"


def load_vae_for(cfg: LatentsConfig, artifact: Artifact):
    path = resolve_model(cfg.vae, artifact.workspace)
    return cached_model(
        "vae", path=path, device=pick_device(cfg.device), dtype=cfg.dtype, revision=cfg.revision
    )


@task(name="latents-shard", **SHARD_TASK_OPTIONS)
def latents_shard(cfg: LatentsConfig, artifact: Artifact, index: int, images: Artifact) -> ShardInfo:
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    vae = load_vae_for(cfg, artifact)
    rows = images.read_shard(index, columns=["key", "image"]).to_pylist()
    keys, arrays, rejects = [], [], []
    for row in rows:
        try:
            image = decode_image(row["image"])
        except RejectedImage as err:
            rejects.append(Reject(row["key"], err.reason, err.detail))
            continue
        keys.append(row["key"])
        arrays.append(to_tensor_range(center_crop_resize(image, cfg.resolution)))
    means, stds = [], []
    for start in range(0, len(arrays), cfg.batch_size):
        mean, std = encode_moments(vae, np.stack(arrays[start : start + cfg.batch_size]))
        means.extend(mean)
        stds.extend(std)
    shape = list(means[0].shape) if means else []
    table = pa.Table.from_pydict(
        {"key": keys, "mean": [m.tobytes() for m in means], "std": [s.tobytes() for s in stds]},
        schema=LATENTS,
    ).replace_schema_metadata({SHAPE_META_KEY: json.dumps(shape).encode()})
    return artifact.write_shard(index, table, rejects)


def latent_statistics(artifact: Artifact, num_shards: int, max_rows: int = 4096) -> dict:
    """Mean/std of sampled latents over (up to) the first rows: what 'auto' latent scaling uses."""
    total, total_sq, count = 0.0, 0.0, 0
    rng = np.random.default_rng(0)
    shape = None
    for i in range(num_shards):
        table = artifact.read_shard(i)
        shape = json.loads(table.schema.metadata[SHAPE_META_KEY])
        for mean_b, std_b in zip(table["mean"].to_pylist(), table["std"].to_pylist(), strict=True):
            mean = np.frombuffer(mean_b, np.float16).astype(np.float64)
            std = np.frombuffer(std_b, np.float16).astype(np.float64)
            z = mean + std * rng.standard_normal(mean.shape)
            total += z.sum()
            total_sq += (z**2).sum()
            count += z.size
            if count >= max_rows * z.size:
                break
        if count >= max_rows * (np.prod(shape) if shape else 1):
            break
    mu = total / max(count, 1)
    sigma = float(np.sqrt(max(total_sq / max(count, 1) - mu**2, 1e-12)))
    return {"latent_shape": shape, "latent_mean": float(mu), "latent_std": sigma}
