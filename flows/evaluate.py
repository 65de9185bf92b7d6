"""The evaluate flow: the trained EMA weights + a prompt set → images, grid, metrics.json, report.md."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import skipped_summary
from t2i.tasks.evaluate import evaluate_checkpoint


@flow(name="evaluate", description="Sample prompts with CFG and score the images.", log_prints=True)
def evaluate_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    checkpoints = plan.require("train")
    artifact = plan.evaluation
    if artifact.is_complete():
        return skipped_summary("evaluate", artifact)
    started = time.time()
    metrics = evaluate_checkpoint(cfg.evaluate, cfg.latents, artifact, checkpoints)
    artifact.write_manifest(
        config=artifact.extra["config"],
        inputs=artifact.extra["inputs"],
        started=started,
        extra={"metrics": metrics},
    )
    return {"stage": "evaluate", "path": str(artifact.root), "skipped": False, "metrics": metrics}
