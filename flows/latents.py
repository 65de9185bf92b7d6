"""The latents flow: `images` shards → VAE posterior moments (float16), plus latent statistics."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.plan import Plan
from flows.stage_runner import run_sharded_stage
from tasks.latents import latent_statistics, latents_shard


@flow(name="latents", description="Encode images with the VAE into Parquet shards.", log_prints=True)
def latents_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    images = plan.require("download")
    artifact = plan.latents
    runner = latents_shard.with_options(task_run_name="latents-{index}")
    return run_sharded_stage(
        "latents",
        artifact,
        plan.num_shards,
        lambda i: runner(cfg=cfg.latents, artifact=artifact, index=i, images=images),
        extra=lambda: {"vae": cfg.latents.vae, **latent_statistics(artifact, plan.num_shards)},
    )
