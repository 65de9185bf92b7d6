"""The download flow: a source → `images` shards (safe decoding, RGB, size cap, rejects with reasons).

The only stage that opens the raw source, and only when there is work: a complete stage is skipped from the
workspace alone. `relist` lists a folder (or loads a dataset) again, for a source whose content changed.
"""

from __future__ import annotations

import functools
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from t2i.data.listing import shard_items
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import run_sharded_stage
from t2i.tasks.download import download_shard


@flow(name="download", description="Fetch and decode images into Parquet shards.", log_prints=True)
def download_flow(cfg: PipelineConfig, relist: bool = False) -> dict[str, Any]:
    plan = Plan(cfg, relist=relist)
    artifact, size = plan.images, cfg.download.shard_size
    source, order = functools.cache(plan.open_source), functools.cache(plan.item_order)
    runner = download_shard.with_options(task_run_name="download-{index}")

    def submit(i: int):
        items = shard_items(order(), i, size)
        params = dict(cfg=cfg.download, artifact=artifact, index=i, source=source(), items=items)
        return pool.submit(runner, parameters=params)

    def extra() -> dict[str, Any]:
        summary = plan.source_summary
        listing = {k: getattr(summary, k) for k in ("digest", "count", "listing")} if summary else None
        return {
            "source": cfg.download.source,
            "ignored_files": summary.ignored if summary else 0,
            "listing": listing,
        }

    with ThreadPoolTaskRunner(max_workers=cfg.download.workers) as pool:
        return run_sharded_stage("download", artifact, plan.num_shards, submit, concurrent=True, extra=extra)
