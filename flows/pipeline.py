"""The whole pipeline as one flow: each stage is a subflow, skipped when its artifact is complete.

download → cutmix → recaption (images and composites) → latents (both) → train → evaluate.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.cutmix import cutmix_flow
from t2i.flows.download import download_flow
from t2i.flows.evaluate import evaluate_flow
from t2i.flows.latents import latents_flow
from t2i.flows.recaption import recaption_flow
from t2i.flows.train import train_flow
from t2i.tasks.model_cache import release_models

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
    results = {}
    for stage, run in STAGE_FLOWS.items():
        results[stage] = run(cfg)
        release_models()  # the captioner's engine, the VAE: nothing of one stage stays on the next one's GPU
    return results
