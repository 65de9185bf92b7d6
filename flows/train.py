"""The train flow: latents + captions → denoiser checkpoints; a rerun resumes from the newest checkpoint."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.plan import Plan
from flows.stage_runner import skipped_summary
from models.tiny import resolve_model
from tasks.train import FINAL, launch_distributed, train_denoiser


def resolve_scale_factor(cfg: PipelineConfig, plan: Plan) -> float:
    """'auto' scales latents to unit variance using the std the latents stage measured."""
    if cfg.train.scale_factor != "auto":
        return float(cfg.train.scale_factor)
    return 1.0 / plan.latents.read_manifest()["latent_std"]


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
    if processes > 1:
        result = launch_distributed(*args, processes, vae_path=vae_path, composites=composites)
    else:
        result = train_denoiser(*args, vae_path=vae_path, composites=composites)
    artifact.write_manifest(
        config=artifact.extra["config"],
        inputs=artifact.extra["inputs"],
        started=started,
        extra={**result, "scale_factor": scale, "final": str(artifact.root / FINAL)},
    )
    return {"stage": "train", "path": str(artifact.root), "skipped": False, **result}
