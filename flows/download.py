"""The download flow: a source → `images` shards (safe decoding, RGB, size cap, rejects with reasons)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import run_sharded_stage
from t2i.tasks.download import download_shard


@flow(name="download", description="Fetch and decode images into Parquet shards.", log_prints=True)
def download_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    artifact = plan.images
    source = plan.source  # already opened: the fingerprint includes its identity
    runner = download_shard.with_options(task_run_name="download-{index}")

    def extra() -> dict[str, Any]:
        return {"source": cfg.download.source, "ignored_files": getattr(source, "ignored", 0)}

    with ThreadPoolTaskRunner(max_workers=cfg.download.workers) as pool:
        return run_sharded_stage(
            "download",
            artifact,
            plan.num_shards,
            lambda i: pool.submit(
                runner, parameters=dict(cfg=cfg.download, artifact=artifact, index=i, source=source)
            ),
            concurrent=True,
            extra=extra,
        )
