"""The cutmix flow: `images` → an `images` artifact of CutMix composites (recaptioned and encoded later)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import run_sharded_stage
from t2i.tasks.cutmix import cutmix_shard, layout_counts


@flow(name="cutmix", description="Make CutMix composites of the images (four layouts).", log_prints=True)
def cutmix_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    if plan.composites is None:
        return {"stage": "cutmix", "skipped": True, "complete": True, "path": None, "disabled": True}
    images = plan.require("download")
    artifact = plan.composites
    runner = cutmix_shard.with_options(task_run_name="cutmix-{index}")
    n = plan.num_shards
    with ThreadPoolTaskRunner(max_workers=cfg.cutmix.workers) as pool:
        return run_sharded_stage(
            "cutmix",
            artifact,
            n,
            lambda i: pool.submit(
                runner,
                parameters=dict(cfg=cfg.cutmix, artifact=artifact, index=i, images=images, num_shards=n),
            ),
            concurrent=True,
            extra=lambda: {"layouts": layout_counts(artifact, n)},
        )
