"""The train flow: latents + captions → denoiser checkpoints; a rerun resumes from the newest checkpoint."""

from __future__ import annotations

import functools
import time
from typing import Any

from prefect import flow

from t2i.data.claims import ShardClaims
from t2i.data.store import FINAL, Artifact
from t2i.data.train_data import build_train_table
from t2i.flows.assets import commit
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import skipped_summary, write_once
from t2i.models.loading import resolve_model
from t2i.tasks.trackers import require_trackers
from t2i.tasks.train import table_inputs, train_denoiser
from t2i.tasks.train_job import TrainJob, launch_distributed


def resolve_latent_norm(cfg: PipelineConfig, plan: Plan) -> dict[str, list[float]]:
    """The latent normalisation, per channel: the model sees (z − shift) × scale. 'auto' takes each
    channel's mean and std as the latents stage measured them (a VAE trained with a tiny KL leaves channels
    of very different spread; one global scale would drown the narrow ones in noise early)."""
    stats = plan.latents.read_manifest()
    if "channel_mean" not in stats:  # a manifest from before per-channel statistics: measure them now
        from t2i.tasks.latents import latent_statistics

        stats = latent_statistics(plan.latents, plan.num_shards)
    if cfg.train.scale_factor == "auto":
        return {"shift": stats["channel_mean"], "scale": [1.0 / s for s in stats["channel_std"]]}
    channels = stats["latent_shape"][0]
    return {"shift": [cfg.train.shift_factor] * channels, "scale": [float(cfg.train.scale_factor)] * channels}


def training_processes(cfg: PipelineConfig) -> int:
    """DDP processes on this machine: as configured, else one per visible GPU, else 1."""
    if cfg.train.processes:
        return cfg.train.processes
    import torch

    return max(1, torch.cuda.device_count()) if cfg.train.device in ("auto", "cuda") else 1


def train_job(cfg: PipelineConfig, plan: Plan | None = None, stop_after: int | None = None) -> TrainJob:
    """The training job of this config: what the in-process run and every torchrun worker receive."""
    plan = plan or Plan(cfg)
    if cfg.text.mode == "online":  # a tiny encoder is built here once, not by every rank at the same time
        resolve_model(cfg.text.encoder, cfg.workspace_path)
    composites = None
    if plan.composites is not None:
        composites = (
            plan.require("latents", plan.latents_of(plan.composites)),
            plan.require("recaption", plan.captions_of(plan.composites)),
        )
    text_embeddings = tuple(
        plan.require("latents", text)
        for _, images in plan.image_sets()
        if (text := plan.text_of(plan.captions_of(images))) is not None
    )
    inputs = [(plan.latents_of(images), plan.captions_of(images)) for _, images in plan.image_sets()]
    train_tables = tuple(plan.train_table_of(lat, cap, plan.text_of(cap)) for lat, cap in inputs)
    return TrainJob(
        train=cfg.train,
        text=cfg.text,
        checkpoints=plan.checkpoints,
        latents=plan.require("latents"),
        captions=plan.require("recaption"),
        num_shards=plan.num_shards,
        latent_norm=resolve_latent_norm(cfg, plan),
        vae_path=resolve_model(cfg.latents.vae, cfg.workspace_path),
        composites=composites,
        text_embeddings=text_embeddings,
        train_tables=train_tables,
        stop_after=stop_after,
    )


def build_tables_once(job: TrainJob, claim_timeout: float) -> None:
    """The train tables, built by the first node that gets here while the others wait for them (a node
    that built its own copy would spend the time and the disk again, then start late)."""
    for table, (latents, captions, text) in zip(job.train_tables, table_inputs(job), strict=True):
        build = functools.partial(build_train_table, table, latents, captions, job.num_shards, text)
        claims = ShardClaims(table.root.parent, timeout=claim_timeout)
        write_once(table, claims, build, "train table", name=table.fingerprint)


@flow(name="train", description="Train the text-to-image denoiser (resumable).", log_prints=True)
def train_flow(cfg: PipelineConfig) -> dict[str, Any]:
    return run_train(cfg)


def run_train(cfg: PipelineConfig, stop_after: int | None = None) -> dict[str, Any]:
    """The train flow's work, what `t2i train` runs: nothing if the checkpoints are complete, else the job
    (in this process, or as DDP processes) and then the manifest, once the run has reached `train.steps`.
    `stop_after` ends the run after that step, as an interruption would (the tests' resumed runs)."""
    plan = Plan(cfg)
    artifact = plan.checkpoints
    if artifact.is_complete():
        return skipped_summary("train", artifact)
    require_trackers(cfg.train.trackers)  # a missing extra fails here, before any process starts
    started = time.time()
    job = train_job(cfg, plan, stop_after)
    processes = training_processes(cfg)
    if processes > 1 or cfg.train.nodes > 1:
        build_tables_once(job, cfg.cluster.claim_timeout)
        result = launch_distributed(job, processes)
    else:
        result = train_denoiser(job)
    summary = {"stage": "train", "path": str(artifact.root), "skipped": False, **result}
    if cfg.train.node_rank != 0 or result["step"] < cfg.train.steps:  # node 0 writes it once the job is done
        return summary
    extra = {**result, "latent_norm": job.latent_norm, "final": str(artifact.root / FINAL)}
    config, inputs = artifact.extra["config"], artifact.extra["inputs"]
    commit(
        "train",
        artifact,
        train_inputs(job, plan),
        lambda: artifact.write_manifest(config=config, inputs=inputs, started=started, extra=extra),
    )
    return summary


def train_inputs(job: TrainJob, plan: Plan) -> list[Artifact]:
    """Every artifact the run reads: latents and captions (of the composites too), the precomputed text
    embeddings, and the run it starts from when fine-tuning."""
    inputs = [job.latents, job.captions, *(job.composites or ()), *job.text_embeddings]
    return inputs if plan.initial_run is None else [*inputs, plan.initial_run]
