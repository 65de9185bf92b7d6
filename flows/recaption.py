"""The recaption flow: `images` shards → `captions` shards aligned 1:1 (vLLM, transformers or template)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.plan import Plan
from flows.stage_runner import run_sharded_stage
from tasks.recaption import caption_summary, recaption_shard


@flow(name="recaption", description="Caption every image with a VLM into Parquet shards.", log_prints=True)
def recaption_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    images = plan.require("download")
    artifact = plan.captions
    runner = recaption_shard.with_options(task_run_name="recaption-{index}")
    return run_sharded_stage(
        "recaption",
        artifact,
        plan.num_shards,
        lambda i: runner(cfg=cfg.recaption, artifact=artifact, index=i, images=images),
        extra=lambda: caption_summary(artifact, plan.num_shards, cfg.recaption),
    )
