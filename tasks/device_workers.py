"""A sharded stage on several devices: one worker process per group of GPUs (or per CPU worker), each
walking its share of the stage's shards and reporting each finished shard on stdout. Recaption (one vLLM
engine per `tensor_parallel_size` GPUs) and latents (one VAE per GPU) both run through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from prefect import task

from t2i.data.store import Artifact
from t2i.tasks.shards import run_logger

REPORT = "T2I-SHARD "


def device_groups(per_worker: int, gpus: int | None, workers: int | None) -> list[list[str] | None]:
    """GPU ids of each worker (`per_worker` each, from the visible GPUs, at most `gpus` of them); without a
    GPU, `workers` workers (default 1) that use the CPU."""
    import torch

    if not torch.cuda.is_available():
        return [None] * (workers or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [g for g in visible.split(",") if g]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    ids = ids[:gpus] if gpus else ids
    groups = [ids[i : i + per_worker] for i in range(0, len(ids) - per_worker + 1, per_worker)]
    if not groups:
        raise ValueError(f"{per_worker} GPUs per worker needed, {len(ids)} visible")
    return groups[:workers] if workers else groups


@task(name="stage-worker")
def run_stage_worker(
    stage: str,
    cfg: Any,
    artifact: Artifact,
    images: Artifact,
    shards: list[int],
    gpus: list[str] | None,
    worker: int,
) -> list[dict[str, Any]]:
    """One worker process (`t2i.flows.stage_worker`) on `gpus`, running `stage` on `shards` in order; its
    per-shard reports are relayed to the run log."""
    log = run_logger()
    spec = {"stage": stage, "cfg": cfg.model_dump(mode="json"), "artifact": artifact.ref(),
            "images": images.ref(), "shards": shards}  # fmt: skip
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    proc = subprocess.Popen(
        [sys.executable, "-m", "t2i.flows.stage_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=env, text=True,
    )  # fmt: skip
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    reports = []
    for line in proc.stdout:
        if line.startswith(REPORT):
            report = json.loads(line[len(REPORT) :])
            reports.append(report)
            log.info(
                f"[{stage}] worker {worker}: part {report['index']:05d} done "
                f"({report['rows']} rows, {report['rejects']} rejects, {report['seconds']:.1f}s)"
            )
    if proc.wait() != 0:
        raise RuntimeError(f"{stage} worker {worker} (GPUs {gpus}) exited with {proc.returncode}")
    return reports
