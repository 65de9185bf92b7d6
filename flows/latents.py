"""The latents flow: `images` shards → VAE posterior moments (float16), plus latent statistics and VAE
reconstruction quality, for the images and the composites in one pass (one VAE per GPU); with
`text.mode: precomputed`, then every caption's T5 embedding. Like recaption, shards are claimed in the
workspace (several machines share the work), and a run can take one part k/n or fan out as child runs."""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.parts import part_shards, run_parts_if_asked
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import ShardSet, in_process, on_devices, run_stage
from t2i.tasks.device_processes import gpu_groups
from t2i.tasks.latents import latent_statistics, latents_shard, reconstruction_quality
from t2i.tasks.reporting import run_logger
from t2i.tasks.text import null_embedding, text_shard

SUFFIX = {"download": "", "cutmix": "-composites"}


@flow(
    name="latents",
    description="Encode images (and composites) with the VAE into Parquet shards.",
    log_prints=True,
)
def latents_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    run_parts_if_asked("latents", cfg, plan)
    latents = encode_images(cfg, plan)
    text = precompute_text(cfg, plan)
    return {
        **latents[0],
        "composites": latents[1] if len(latents) > 1 else None,
        "text": text[0] if text else None,
        "composite_text": text[1] if len(text) > 1 else None,
    }


def encode_images(cfg: PipelineConfig, plan: Plan) -> list[dict[str, Any]]:
    """One VAE per GPU: a single device encodes in this process, several in one device process each, which
    encode the images and the composites."""
    lc, n = cfg.latents, plan.num_shards
    sets = []
    for name, images in plan.image_sets():
        artifact = plan.latents_of(images)
        if not artifact.is_complete():
            images = plan.require(name, images)

        def extra(artifact=artifact, images=images) -> dict[str, Any]:
            return {
                "vae": lc.vae,
                **latent_statistics(artifact, n),
                "reconstruction": reconstruction_quality(lc, artifact, images, n),
            }

        sets.append(
            ShardSet(f"latents{SUFFIX[name]}", artifact, n, part_shards(n, lc.part_index), images, extra)
        )
    groups = gpu_groups(1, lc.gpus, lc.workers) if lc.device == "auto" else [None]
    if len(groups) > 1:
        compute = on_devices("latents", lc, groups)
    else:
        runners = {s.label: latents_shard.with_options(task_run_name=f"{s.label}-{{index}}") for s in sets}
        compute = in_process(
            lambda s, i, _: runners[s.label](cfg=lc, artifact=s.artifact, index=i, images=s.source)
        )
    summaries = run_stage(sets, compute, cfg.cluster.claim_timeout)
    for s, summary in zip(sets, summaries, strict=True):
        quality = (
            summary["complete"]
            and not summary["skipped"]
            and s.artifact.read_manifest().get("reconstruction")
        )
        if quality:
            score = quality.get("shapes_score")
            run_logger().info(
                f"[{s.label}] VAE reconstructions of {quality['images']} images: PSNR {quality['psnr']:.1f} dB"
                + (f", shapes score {100 * score:.1f}%" if score is not None else "")
            )
    return summaries


def precompute_text(cfg: PipelineConfig, plan: Plan) -> list[dict[str, Any]]:
    """`text.mode: precomputed`: every caption's T5 embedding, one shard per captions shard."""
    n, sets = plan.num_shards, []
    for name, images in plan.image_sets():
        captions = plan.captions_of(images)
        if (text := plan.text_of(captions)) is None:
            return []
        if not text.is_complete():
            captions = plan.require("recaption", captions)
        shards = part_shards(n, cfg.latents.part_index)

        def extra(text=text) -> dict[str, Any]:
            return {"encoder": cfg.text.encoder, **null_embedding(cfg.text, text.workspace)}

        sets.append(ShardSet(f"text{SUFFIX[name]}", text, n, shards, captions, extra))
    runners = {s.label: text_shard.with_options(task_run_name=f"{s.label}-{{index}}") for s in sets}
    compute = in_process(
        lambda s, i, _: runners[s.label](cfg=cfg.text, artifact=s.artifact, index=i, captions=s.source)
    )
    return run_stage(sets, compute, cfg.cluster.claim_timeout)
