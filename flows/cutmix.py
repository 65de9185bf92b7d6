"""The cutmix flow: `images` → an `images` artifact of CutMix composites (recaptioned and encoded later)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import ShardSet, in_process, run_stage
from t2i.tasks.cutmix import cutmix_shard, layout_counts


@flow(name="cutmix", description="Make CutMix composites of the images (four layouts).", log_prints=True)
def cutmix_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    if plan.composites is None:
        return {"stage": "cutmix", "skipped": True, "complete": True, "path": None, "disabled": True}
    n, artifact, images = plan.num_shards, plan.composites, plan.require("download")
    runner = cutmix_shard.with_options(task_run_name="cutmix-{index}")

    def run(s: ShardSet, i: int, _next: int | None):
        return runner(cfg=cfg.cutmix, artifact=s.artifact, index=i, images=s.source, num_shards=n)

    shards = ShardSet(
        "cutmix", artifact, n, list(range(n)), images, lambda: {"layouts": layout_counts(artifact, n)}
    )
    return run_stage([shards], in_process(run, lanes=cfg.cutmix.workers), cfg.cluster.claim_timeout)[0]
