"""The latents flow: `images` shards → VAE posterior moments (float16), plus latent statistics and VAE
reconstruction quality; with `text.mode: precomputed`, also every caption's T5 embedding. Like recaption, a
run can do one part k/n of the shards, or fan out as child runs over a pool's workers."""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.data.store import Artifact
from t2i.flows.config import PipelineConfig, with_overrides
from t2i.flows.parts import fans_out, part_shards, run_parts
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import StageRun, run_on_devices, run_sharded_stage, skipped_summary
from t2i.tasks.device_workers import device_groups
from t2i.tasks.latents import latent_statistics, latents_shard, reconstruction_quality
from t2i.tasks.shards import run_logger
from t2i.tasks.text import null_embedding, text_shard


@flow(
    name="latents",
    description="Encode images (and composites) with the VAE into Parquet shards.",
    log_prints=True,
)
def latents_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    if fans_out(cfg, cfg.latents.part):  # the parts encode every shard; this run then writes the manifests
        plan.require_inputs("latents")  # a missing input fails here, not in every part
        run_parts("latents", cfg, lambda k, n: with_overrides(cfg, [f"latents.part={k}/{n}"]))
    summaries = {}
    for name, images in plan.image_sets():
        images = plan.require(name, images)
        artifact = plan.latents_of(images)
        label = "latents" if name == "download" else "latents-composites"
        summaries[name] = encode_image_set(cfg, plan, label, artifact, images)
        if summaries[name]["complete"] and not summaries[name]["skipped"]:
            quality = artifact.read_manifest().get("reconstruction") or {}
            if quality:
                shapes_score = quality.get("shapes_score")
                run_logger().info(
                    f"[{label}] VAE reconstructions of {quality['images']} images: PSNR {quality['psnr']:.1f} dB"
                    + (f", shapes score {100 * shapes_score:.1f}%" if shapes_score is not None else "")
                )
        captions = plan.captions_of(images)
        if (text := plan.text_of(captions)) is not None:
            summaries[f"text-{name}"] = precompute_text(
                cfg, plan, text, plan.require("recaption", captions), name
            )
    return {
        **summaries["download"],
        "composites": summaries.get("cutmix"),
        "text": summaries.get("text-download"),
        "composite_text": summaries.get("text-cutmix"),
    }


def encode_image_set(
    cfg: PipelineConfig, plan: Plan, label: str, artifact: Artifact, images: Artifact
) -> dict:
    """One VAE per GPU: a single device encodes in this process, several in one worker process each."""

    def extra() -> dict[str, Any]:
        return {
            "vae": cfg.latents.vae,
            **latent_statistics(artifact, plan.num_shards),
            "reconstruction": reconstruction_quality(cfg.latents, artifact, images, plan.num_shards),
        }

    groups = (
        device_groups(1, cfg.latents.gpus, cfg.latents.workers) if cfg.latents.device == "auto" else [None]
    )
    shards = part_shards(plan.num_shards, cfg.latents.part_index)
    if len(groups) == 1:
        runner = latents_shard.with_options(task_run_name=f"{label}-{{index}}")
        return run_sharded_stage(
            label, artifact, plan.num_shards,
            lambda i: runner(cfg=cfg.latents, artifact=artifact, index=i, images=images), extra=extra,
            shards=shards,
        )  # fmt: skip
    if artifact.is_complete():
        return skipped_summary(label, artifact)
    run = StageRun(label, artifact, plan.num_shards, shards)
    if run.todo:
        run_on_devices("latents", run, cfg.latents, images, groups)
    return run.finish(extra)


def precompute_text(cfg: PipelineConfig, plan: Plan, text: Artifact, captions: Artifact, name: str) -> dict:
    """`text.mode: precomputed`: every caption's T5 embedding, one shard per captions shard."""
    label = "text" if name == "download" else "text-composites"
    runner = text_shard.with_options(task_run_name=f"{label}-{{index}}")
    return run_sharded_stage(
        label,
        text,
        plan.num_shards,
        lambda i: runner(cfg=cfg.text, artifact=text, index=i, captions=captions),
        extra=lambda: {"encoder": cfg.text.encoder, **null_embedding(cfg.text, text.workspace)},
        shards=part_shards(plan.num_shards, cfg.latents.part_index),
    )
