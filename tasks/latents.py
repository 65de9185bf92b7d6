"""Latents stage unit of work: one image shard → VAE posterior mean and std (float16) per image."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from prefect import task

from t2i.data.imaging import RejectedImage, center_crop_resize, decode_image, to_tensor_range
from t2i.data.schemas import LATENTS, SHAPE_META_KEY
from t2i.data.store import Artifact, Reject, ShardInfo
from t2i.models.loading import resolve_model
from t2i.models.vae import encode_moments
from t2i.tasks.model_cache import cached_model, pick_device
from t2i.tasks.shards import SHARD_TASK_OPTIONS

if TYPE_CHECKING:
    from t2i.flows.config import LatentsConfig

DECODE_THREADS = 4  # Pillow decodes without the GIL: these keep the next batches ready for the GPU


def load_vae_for(cfg: LatentsConfig, artifact: Artifact):
    path = resolve_model(cfg.vae, artifact.workspace)
    return cached_model(
        "vae", path=path, device=pick_device(cfg.device), dtype=cfg.dtype, revision=cfg.revision
    )


def _prepare(row: dict, resolution: int) -> tuple[str, np.ndarray | None, Reject | None]:
    """One image decoded, center-cropped and resized for the VAE, or its reject."""
    try:
        image = decode_image(row["image"])
    except RejectedImage as err:
        return row["key"], None, Reject(row["key"], err.reason, err.detail)
    return row["key"], to_tensor_range(center_crop_resize(image, resolution)), None


@task(name="latents-shard", **SHARD_TASK_OPTIONS)
def latents_shard(cfg: LatentsConfig, artifact: Artifact, index: int, images: Artifact) -> ShardInfo:
    if artifact.has_shard(index):
        return artifact.shard_info(index)
    vae = load_vae_for(cfg, artifact)
    rows = images.read_shard(index, columns=["key", "image"]).to_pylist()
    keys, batch, means, stds, rejects = [], [], [], [], []

    def encode() -> None:
        mean, std = encode_moments(vae, np.stack(batch))
        means.extend(mean)
        stds.extend(std)
        batch.clear()

    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # decoding runs ahead while the VAE encodes
        for key, array, reject in pool.map(functools.partial(_prepare, resolution=cfg.resolution), rows):
            if reject is not None:
                rejects.append(reject)
                continue
            keys.append(key)
            batch.append(array)
            if len(batch) == cfg.batch_size:
                encode()
    if batch:
        encode()
    shape = list(means[0].shape) if means else []
    table = pa.Table.from_pydict(
        {"key": keys, "mean": [m.tobytes() for m in means], "std": [s.tobytes() for s in stds]},
        schema=LATENTS,
    ).replace_schema_metadata({SHAPE_META_KEY: json.dumps(shape).encode()})
    return artifact.write_shard(index, table, rejects)


def latent_statistics(artifact: Artifact, num_shards: int, max_rows: int = 4096) -> dict:
    """Mean/std of sampled latents over (up to) the first rows, overall and per channel: what 'auto'
    latent normalisation uses."""
    rng = np.random.default_rng(0)
    samples, shape = [], None
    for i in range(num_shards):
        table = artifact.read_shard(i)
        shape = json.loads(table.schema.metadata[SHAPE_META_KEY])
        for mean_b, std_b in zip(table["mean"].to_pylist(), table["std"].to_pylist(), strict=True):
            mean = np.frombuffer(mean_b, np.float16).astype(np.float64).reshape(shape)
            std = np.frombuffer(std_b, np.float16).astype(np.float64).reshape(shape)
            samples.append(mean + std * rng.standard_normal(mean.shape))
            if len(samples) >= max_rows:
                break
        if len(samples) >= max_rows:
            break
    if not samples:
        return {"latent_shape": shape}
    z = np.stack(samples)
    return {
        "latent_shape": shape,
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "channel_mean": z.mean(axis=(0, 2, 3)).tolist(),
        "channel_std": np.maximum(z.std(axis=(0, 2, 3)), 1e-6).tolist(),
    }


def reconstruction_quality(
    cfg: LatentsConfig, artifact: Artifact, images: Artifact, num_shards: int, max_images: int = 256
) -> dict:
    """How much the VAE keeps: PSNR of decoded posterior means against the pixels that were encoded, over
    (up to) the first `max_images` images, and, where the source is the shapes world, the shapes scorer's
    overall score on the decoded images (1.0 = every object still readable with the right attributes)."""
    import torch
    from PIL import Image

    from t2i.data import shapes
    from t2i.models.shapes_models import psnr
    from t2i.models.vae import decode_latents

    vae = load_vae_for(cfg, artifact)
    decoded, truth, scores = [], [], []
    for i in range(num_shards):
        table = artifact.read_shard(i)
        shape = json.loads(table.schema.metadata[SHAPE_META_KEY])
        rows = {r["key"]: r for r in images.read_shard(i, columns=["key", "image", "attributes"]).to_pylist()}
        keys = table["key"].to_pylist()[: max_images - len(truth)]
        means = [np.frombuffer(b, np.float16).reshape(shape) for b in table["mean"].to_pylist()[: len(keys)]]
        for start in range(0, len(keys), cfg.batch_size):
            batch = torch.from_numpy(np.stack(means[start : start + cfg.batch_size]).astype(np.float32))
            decoded.extend(decode_latents(vae, batch))
        for key, pixels in zip(keys, decoded[len(truth) :], strict=True):
            truth.append(np.asarray(center_crop_resize(decode_image(rows[key]["image"]), cfg.resolution)))
            scene = shapes.Scene.from_attributes(json.loads(rows[key]["attributes"] or "{}"))
            if scene is not None:
                image = Image.fromarray(pixels)
                if image.size != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
                    image = image.resize((shapes.IMAGE_SIZE,) * 2, Image.Resampling.BILINEAR)
                scores.append(shapes.score_generation(image, scene)["overall"])
        if len(truth) >= max_images:
            break
    if not truth:
        return {}
    result = {"images": len(truth), "psnr": psnr(np.stack(decoded), np.stack(truth))}
    if scores:
        result["shapes_score"] = float(np.mean(scores))
    return result
