"""The evaluate flow: the trained EMA weights + a prompt set → images, grid, metrics.json, report.md.

It runs once per artifact: started on several machines at once (or by the nodes of one `t2i run`), the first to
claim it evaluates and the others wait for its manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from t2i.data.claims import ShardClaims
from t2i.data.store import MANIFEST, Artifact
from t2i.flows.assets import commit
from t2i.flows.config import PipelineConfig
from t2i.flows.plan import Plan
from t2i.flows.stage_runner import skipped_summary, write_once
from t2i.tasks.evaluate import evaluate_checkpoint
from t2i.tasks.reporting import run_logger


def heldout_artifacts(plan: Plan, prompts: str) -> tuple[Artifact, Artifact] | None:
    """For `heldout:<recaption artifact folder>` prompts, that captions artifact and the images it captioned
    (the plan finds them by the fingerprint its manifest names); None for other prompt sets."""
    kind, _, rest = prompts.partition(":")
    if kind != "heldout":
        return None
    folder = Path(rest).expanduser()
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(
            f"evaluate.prompts: {folder} is not a complete recaption artifact (no manifest.json); "
            "pass the folder `t2i status` prints for recaption"
        )
    captions = Artifact(folder.parents[1], "recaption", folder.name)
    return captions, plan.captioned_images(captions)


@flow(name="evaluate", description="Sample prompts with CFG and score the images.", log_prints=True)
def evaluate_flow(cfg: PipelineConfig) -> dict[str, Any]:
    plan = Plan(cfg)
    checkpoints = plan.require("train", plan.sampled)  # `evaluate.run`, or this config's own run
    artifact = plan.evaluation
    if artifact.is_complete():
        return skipped_summary("evaluate", artifact)
    started = time.time()

    def evaluate() -> None:
        heldout = heldout_artifacts(plan, cfg.evaluate.prompts)
        metrics = evaluate_checkpoint(cfg.evaluate, cfg.latents, artifact, checkpoints, heldout)
        config, inputs = artifact.extra["config"], artifact.extra["inputs"]
        commit(
            "evaluate",
            artifact,
            [checkpoints],
            lambda: artifact.write_manifest(
                config=config, inputs=inputs, started=started, extra={"metrics": metrics}
            ),
        )

    artifact.root.mkdir(parents=True, exist_ok=True)
    claims = ShardClaims(artifact.root, cfg.cluster.claim_timeout, run_logger())
    wrote = write_once(artifact, claims, evaluate, "evaluate manifest")
    metrics = artifact.read_manifest()["metrics"]
    return {"stage": "evaluate", "path": str(artifact.root), "skipped": not wrote, "metrics": metrics}
