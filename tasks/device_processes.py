"""A machine's GPUs, grouped, and a sharded stage's processes on them: one process per group (or, without a
GPU, per CPU process asked for), each taking shards through the stage's claims and reporting each finished
shard on stdout (`t2i.tasks.stage_process` is the process's entry point). Recaption (one vLLM engine per
`tensor_parallel_size` GPUs) and latents (one VAE per GPU) run through it, and `t2i worker` groups a machine's
GPUs for its Prefect workers with the same `gpu_groups`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from t2i.tasks.reporting import run_logger

REPORT = "T2I-SHARD "
READY = "T2I-READY "


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as the ids a child's CUDA_VISIBLE_DEVICES must name: the entries of our
    own CUDA_VISIBLE_DEVICES (a scheduler's allocation, UUIDs included) or 0..n-1, one per device CUDA sees."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in visible.split(",")] if visible is not None else []
    return (ids if visible is not None else [str(i) for i in range(count)])[:count]


def gpu_groups(
    per_group: int, select: int | Sequence[int] | None = None, limit: int | None = None
) -> list[list[str] | None]:
    """The visible GPUs in groups of `per_group` (one engine, VAE or Prefect worker each). `select`: how many
    to use (an int) or which, by their ordinals among the visible ones (as `cuda:N` counts them); `limit`: at
    most this many groups. Without a GPU: `limit` (default 1) groups that use the CPU, marked None."""
    ids = visible_gpus()
    if isinstance(select, int):
        if ids and select > len(ids):
            raise ValueError(f"{select} GPUs asked for, {len(ids)} visible ({_describe(ids)})")
        ids = ids[:select]
    elif select is not None:
        unknown = [g for g in select if not 0 <= g < len(ids)]
        if unknown:
            raise ValueError(f"GPU {unknown[0]} is not visible: {len(ids)} visible ({_describe(ids)})")
        ids = [ids[g] for g in select]
    if not ids:
        return [None] * (limit or 1)
    if len(ids) % per_group:
        raise ValueError(
            f"{per_group} GPUs per group does not divide the {len(ids)} GPUs {','.join(ids)}: choose the GPUs"
        )
    groups = [ids[i : i + per_group] for i in range(0, len(ids), per_group)]
    return groups[:limit] if limit else groups


def _describe(ids: list[str]) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else f"physical {','.join(ids)}"


@task(name="stage-process", cache_policy=NO_CACHE)
def run_stage_process(
    stage: str,
    cfg: Any,
    sets: list[dict[str, Any]],
    gpus: list[str] | None,
    process: int,
    claim_timeout: float,
    report: Callable[[str, int, int, int, float], None],
) -> None:
    """One device process (`t2i.tasks.stage_process`) on `gpus`, taking shards of `sets` (references made by
    `t2i.flows.stage_runner`) until none is left to claim; each finished shard goes to `report`."""
    log = run_logger()
    spec = {"stage": stage, "cfg": cfg.model_dump(mode="json"), "sets": sets, "claim_timeout": claim_timeout}
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    command = [sys.executable, "-m", "t2i.tasks.stage_process"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    for line in proc.stdout:
        if line.startswith(READY):
            ready = json.loads(line[len(READY) :])
            log.info(
                f"[{stage}] process {process}: pid {ready['pid']}, CUDA_VISIBLE_DEVICES={ready['devices']}"
            )
        elif line.startswith(REPORT):
            r = json.loads(line[len(REPORT) :])
            log.info(f"[{stage}] process {process} (GPUs {gpus}): {r['label']} shard {r['index']:05d} done")
            report(r["label"], r["index"], r["rows"], r["rejects"], r["seconds"])
    if proc.wait() != 0:
        raise RuntimeError(f"{stage} process {process} (GPUs {gpus}) exited with {proc.returncode}")
