"""The download flow: a source → `images` shards (safe decoding, RGB, size cap, rejects with reasons).

The only stage that opens the raw source, and only when there is work: a complete stage is skipped from the
workspace alone. `relist` lists a folder (or loads a dataset) again, for a source whose content changed.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from prefect import flow

from t2i.data.listing import shard_items
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import ShardSet, in_process, run_stage
from t2i.tasks.download import download_shard


@flow(name="download", description="Fetch and decode images into Parquet shards.", log_prints=True)
def download_flow(cfg: PipelineConfig, relist: bool = False) -> dict[str, Any]:
    plan = Plan(cfg, relist=relist)
    size, opening = cfg.download.shard_size, threading.Lock()
    source, order = functools.cache(plan.open_source), functools.cache(plan.item_order)
    runner = download_shard.with_options(task_run_name="download-{index}")

    def run(s: ShardSet, i: int, _next: int | None):
        with opening:  # the lanes' first shards would otherwise open the source once each
            opened, items = source(), shard_items(order(), i, size)
        return runner(cfg=cfg.download, artifact=s.artifact, index=i, source=opened, items=items)

    def extra() -> dict[str, Any]:
        summary = plan.source_summary
        listing = {k: getattr(summary, k) for k in ("digest", "count", "listing")} if summary else None
        return {
            "source": cfg.download.source,
            "ignored_files": summary.ignored if summary else 0,
            "listing": listing,
            # wds: damaged tars, samples rejected or without a class at listing time
            "wds": summary.wds if summary else None,
        }

    shards = ShardSet("download", plan.images, plan.num_shards, list(range(plan.num_shards)), summary=extra)
    compute = in_process(run, lanes=cfg.download.workers)
    return run_stage([shards], compute, cfg.cluster.claim_timeout)[0]
