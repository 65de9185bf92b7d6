"""The whole pipeline as one flow: each stage is a subflow, skipped when its artifact is complete.

download → cutmix → recaption (images and composites) → latents (both) → train → evaluate.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.cutmix import cutmix_flow
from flows.download import download_flow
from flows.evaluate import evaluate_flow
from flows.latents import latents_flow
from flows.recaption import recaption_flow
from flows.train import train_flow

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
    return {stage: run(cfg) for stage, run in STAGE_FLOWS.items()}
