"""The whole pipeline as one flow: each stage is a subflow, skipped when its artifact is complete.

download → cutmix → recaption (images and composites) → latents (both) → train → evaluate.

Started on every node of a multi-node job (`train.nodes`, each with its `train.node_rank`) over one shared
workspace, the nodes share every data stage shard by shard (each shard is claimed before it is computed) and
each waits for a stage's manifest before the next stage; training runs as one job across them, and node 0
evaluates while the others say where its result will be.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.cutmix import cutmix_flow
from t2i.flows.download import download_flow
from t2i.flows.evaluate import evaluate_flow
from t2i.flows.latents import latents_flow
from t2i.flows.parts import check_fan_out
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_flow
from t2i.tasks.model_cache import release_models
from t2i.tasks.reporting import run_logger
from t2i.tasks.trackers import require_trackers

STAGE_FLOWS = {
    "download": download_flow,
    "cutmix": cutmix_flow,
    "recaption": recaption_flow,
    "latents": latents_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}


@flow(name="pipeline", description="Run every stage in order; finished stages are skipped.", log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> dict[str, Any]:
    check_fan_out(cfg)  # a split that cannot happen fails here, before the first stage
    if not Plan(cfg).checkpoints.is_complete():  # and a tracker the training would need but cannot load
        require_trackers(cfg.train.trackers)
    results = {}
    for stage, run in STAGE_FLOWS.items():
        if stage == "evaluate" and cfg.train.node_rank != 0:
            where = Plan(cfg).evaluation.root
            run_logger().info(f"[evaluate] runs on node 0 only; its result will be in {where}")
            results[stage] = {"stage": stage, "path": str(where), "skipped": True, "on_node": 0}
            continue
        results[stage] = run(cfg)
        release_models()  # the captioner's engine, the VAE: nothing of one stage stays on the next one's GPU
    return results
