"""The recaption flow: `images` shards → `captions` shards aligned 1:1 (vLLM, transformers, template or
imported captions), on one engine in-process or one engine per GPU group in worker processes, optionally
for one part k/n of the shards (several machines), or fanned out as child runs over a pool's workers."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from t2i.data.store import Artifact
from t2i.flows.config import PipelineConfig, with_overrides
from t2i.flows.parts import fans_out, part_shards, run_parts
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import StageRun, run_on_devices, skipped_summary
from t2i.tasks.recaption import caption_summary, engine_groups, recaption_shard, summary_markdown
from t2i.tasks.shards import publish_markdown, run_logger


@flow(
    name="recaption",
    description="Caption every image (and composite) with a VLM into Parquet shards.",
    log_prints=True,
)
def recaption_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    if fans_out(cfg, cfg.recaption.part):  # the parts caption every shard; this run then writes the summary
        plan.require_inputs("recaption")  # a missing input fails here, not in every part
        run_parts("recaption", cfg, lambda k, n: with_overrides(cfg, [f"recaption.part={k}/{n}"]))
    summaries = {name: caption_image_set(cfg, plan, name, images) for name, images in plan.image_sets()}
    return {**summaries["download"], "composites": summaries.get("cutmix")}


def caption_image_set(cfg: PipelineConfig, plan: Plan, name: str, images: Artifact) -> dict[str, Any]:
    images = plan.require(name, images)
    artifact = plan.captions_of(images)
    label = "recaption" if name == "download" else "recaption-composites"
    if artifact.is_complete():
        return skipped_summary(label, artifact)
    rc = cfg.recaption
    run = StageRun(label, artifact, plan.num_shards, part_shards(plan.num_shards, rc.part_index))
    groups = engine_groups(rc)
    if len(groups) == 1:
        runner = recaption_shard.with_options(task_run_name=f"{label}-{{index}}")
        for pos, index in enumerate(run.todo):
            t0 = time.time()
            nxt = run.todo[pos + 1] if pos + 1 < len(run.todo) else None
            run.report(
                runner(cfg=rc, artifact=artifact, index=index, images=images, next_index=nxt),
                time.time() - t0,
            )
    elif run.todo:
        run_on_devices("recaption", run, rc, images, groups)
    summary = run.finish(lambda: caption_summary(artifact, plan.num_shards, rc, images))
    if summary["complete"]:
        manifest = {**artifact.read_manifest(), "path": str(artifact.root)}
        truth = summary["ground_truth"] = manifest.get("ground_truth")
        if truth:
            details = ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in truth.items() if k not in ("images", "exact")
            )
            run_logger().info(
                f"[{label}] against ground truth: {100 * truth['exact']:.1f}% exact captions ({details}) "
                f"over {truth['images']} images"
            )
        publish_markdown(summary_markdown(manifest), key=f"{label}-summary", description="Recaption summary")
    return summary
