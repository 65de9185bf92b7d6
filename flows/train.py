"""The train flow: latents + captions → denoiser checkpoints; a rerun resumes from the newest checkpoint."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from t2i.data.store import FINAL
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import skipped_summary
from t2i.models.tiny import resolve_model
from t2i.tasks.train import launch_distributed, train_denoiser


def resolve_scale_factor(cfg: PipelineConfig, plan: Plan) -> dict[str, list[float]]:
    """The latent normalisation, per channel: the model sees (z − shift) × scale. 'auto' takes each
    channel's mean and std as the latents stage measured them (a VAE trained with a tiny KL leaves channels
    of very different spread; one global scale would drown the narrow ones in noise early)."""
    stats = plan.latents.read_manifest()
    if "channel_mean" not in stats:  # a manifest from before per-channel statistics: measure them now
        from t2i.tasks.latents import latent_statistics

        stats = latent_statistics(plan.latents, plan.num_shards)
    if cfg.train.scale_factor == "auto":
        return {"shift": stats["channel_mean"], "scale": [1.0 / s for s in stats["channel_std"]]}
    channels = stats["latent_shape"][0]
    return {"shift": [cfg.train.shift_factor] * channels, "scale": [float(cfg.train.scale_factor)] * channels}


def training_processes(cfg: PipelineConfig) -> int:
    """DDP processes on this machine: as configured, else one per visible GPU, else 1."""
    if cfg.train.processes:
        return cfg.train.processes
    import torch

    return max(1, torch.cuda.device_count()) if cfg.train.device in ("auto", "cuda") else 1


@flow(name="train", description="Train the text-to-image denoiser (resumable).", log_prints=True)
def train_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    latents, captions = plan.require("latents"), plan.require("recaption")
    artifact = plan.checkpoints
    if artifact.is_complete():
        return skipped_summary("train", artifact)
    started = time.time()
    scale = resolve_scale_factor(cfg, plan)
    processes = training_processes(cfg)
    args = (cfg.train, cfg.text, artifact, latents, captions, plan.num_shards, scale)
    vae_path = resolve_model(cfg.latents.vae, cfg.workspace_path)
    composites = None
    if plan.composites is not None:
        composites = (
            plan.require("latents", plan.latents_of(plan.composites)),
            plan.require("recaption", plan.captions_of(plan.composites)),
            plan.num_shards,
        )
    text_embeddings = [
        plan.require("latents", text)
        for _, images in plan.image_sets()
        if (text := plan.text_of(plan.captions_of(images))) is not None
    ]
    kwargs = {"vae_path": vae_path, "composites": composites, "text_embeddings": text_embeddings}
    if processes > 1 or cfg.train.nodes > 1:
        result = launch_distributed(*args, processes, **kwargs)
    else:
        result = train_denoiser(*args, **kwargs)
    if cfg.train.node_rank != 0:  # node 0 writes the manifest once the whole job is done
        return {"stage": "train", "path": str(artifact.root), "skipped": False, **result}
    artifact.write_manifest(
        config=artifact.extra["config"],
        inputs=artifact.extra["inputs"],
        started=started,
        extra={**result, "latent_norm": scale, "final": str(artifact.root / FINAL)},
    )
    return {"stage": "train", "path": str(artifact.root), "skipped": False, **result}
