"""The latents flow: `images` shards → VAE posterior moments (float16), plus latent statistics."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.plan import Plan
from flows.stage_runner import run_sharded_stage
from tasks.latents import latent_statistics, latents_shard


@flow(
    name="latents",
    description="Encode images (and composites) with the VAE into Parquet shards.",
    log_prints=True,
)
def latents_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    summaries = {}
    for name, images in plan.image_sets():
        images = plan.require(name, images)
        artifact = plan.latents_of(images)
        label = "latents" if name == "download" else "latents-composites"
        runner = latents_shard.with_options(task_run_name=f"{label}-{{index}}")
        summaries[name] = run_sharded_stage(
            label,
            artifact,
            plan.num_shards,
            lambda i, a=artifact, im=images, r=runner: r(cfg=cfg.latents, artifact=a, index=i, images=im),
            extra=lambda a=artifact: {"vae": cfg.latents.vae, **latent_statistics(a, plan.num_shards)},
        )
    return {**summaries["download"], "composites": summaries.get("cutmix")}
