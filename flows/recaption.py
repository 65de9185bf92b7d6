"""The recaption flow: `images` shards → `captions` shards aligned 1:1 (vLLM, transformers, template or
imported captions), for the images and the composites in one pass: one engine in-process, or one engine per
GPU group in engine processes that caption both sets. Shards are claimed in the workspace, so several machines
running it share the work; a run can also take one part k/n, or fan out as child runs over a pool's workers."""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.parts import part_shards, run_parts_if_asked
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import ShardSet, in_process, on_devices, run_stage
from t2i.tasks.recaption import caption_summary, engine_groups, recaption_shard, summary_markdown
from t2i.tasks.reporting import publish_markdown, run_logger

LABELS = {"download": "recaption", "cutmix": "recaption-composites"}


@flow(
    name="recaption",
    description="Caption every image (and composite) with a VLM into Parquet shards.",
    log_prints=True,
)
def recaption_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan, rc = Plan(cfg), cfg.recaption
    run_parts_if_asked("recaption", cfg, plan)
    sets = []
    for name, images in plan.image_sets():
        captions = plan.captions_of(images)
        if not captions.is_complete():
            images = plan.require(name, images)

        def summary(captions=captions, images=images) -> dict[str, Any]:
            return caption_summary(captions, plan.num_shards, rc, images)

        shards = part_shards(plan.num_shards, rc.part_index)
        sets.append(ShardSet(LABELS[name], captions, plan.num_shards, shards, images, summary))
    groups = engine_groups(rc)
    compute = (
        on_devices("recaption", rc, groups)
        if len(groups) > 1
        else in_process(_caption_in_process(rc), lookahead=True)
    )
    summaries = run_stage(sets, compute, cfg.cluster.claim_timeout)
    for s, summary in zip(sets, summaries, strict=True):
        if summary["complete"] and not summary["skipped"]:
            _report(s, summary)
    return {**summaries[0], "composites": summaries[1] if len(summaries) > 1 else None}


def _caption_in_process(rc):
    runners = {
        label: recaption_shard.with_options(task_run_name=f"{label}-{{index}}") for label in LABELS.values()
    }

    def run(s: ShardSet, i: int, nxt: int | None):
        return runners[s.label](cfg=rc, artifact=s.artifact, index=i, images=s.source, next_index=nxt)

    return run


def _report(s: ShardSet, summary: dict[str, Any]) -> None:
    """The captions' accuracy against ground truth (shapes world) in the log, the summary as a UI artifact."""
    manifest = {**s.artifact.read_manifest(), "path": str(s.artifact.root)}
    truth = summary["ground_truth"] = manifest.get("ground_truth")
    if truth:
        details = ", ".join(f"{k} {100 * v:.1f}%" for k, v in truth.items() if k not in ("images", "exact"))
        run_logger().info(
            f"[{s.label}] against ground truth: {100 * truth['exact']:.1f}% exact captions ({details}) "
            f"over {truth['images']} images"
        )
    publish_markdown(summary_markdown(manifest), key=f"{s.label}-summary", description="Recaption summary")
