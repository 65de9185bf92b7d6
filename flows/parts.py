"""Fan-out of a sharded GPU stage over Prefect workers.

A `recaption` or `latents` run started from a deployment with `cluster.parts: N > 1` does no shard itself: it
starts N child runs of its own deployment, part k/N each, on the pool's `parts` queue, and waits for them.
Whichever worker is free picks a part up; each part is a flow run of its own in the UI, with its logs and
progress. The part that completes the last shard writes the manifest, as a `--part k/n` run always has.

Every child run has an idempotency key made of the root run's id, the stage, the config and k/N. So Retry on
the parent (or on the pipeline above it) finds the same child runs again: it leaves the Completed ones alone,
reschedules the Failed or Crashed ones in place (what `prefect flow-run retry` does) and waits for the ones
still running. Finished shards are never rewritten: every part skips the shards already on disk.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from t2i.tasks.reporting import run_logger

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from t2i.flows.config import PipelineConfig
    from t2i.flows.plan import Plan

PARTS_QUEUE = "parts"  # the pool's queue for parts: `t2i worker` serves it with one worker per GPU group
POLL_SECONDS = 3.0


class PartsFailed(RuntimeError):
    """Some parts of a fanned-out stage ended in a state other than Completed."""


def part_shards(num_shards: int, part: tuple[int, int]) -> list[int]:
    """Shards of part k of n: interleaved (k-1, k-1+n, ...), so parts get similar work and never overlap."""
    k, n = part
    return list(range(k - 1, num_shards, n))


def fans_out(cfg: PipelineConfig, part: str) -> bool:
    """A run fans out when it came from a deployment (`cluster.deployment`, filled in by `t2i deploy`), asks
    for several parts, and is not itself a part."""
    return bool(cfg.cluster.deployment) and cfg.cluster.parts > 1 and part == "1/1"


def check_fan_out(cfg: PipelineConfig) -> None:
    """A config that asks for parts must be able to start them, which is checked before any work: a Prefect
    server (a command-line run on a temporary server has none that workers could reach) that holds the
    deployments the parts are runs of. Raises RuntimeError naming what is missing."""
    if cfg.cluster.parts <= 1 or not cfg.cluster.deployment:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    name, url = cfg.cluster.deployment, PREFECT_API_URL.value()
    if not url:
        raise RuntimeError(
            f"cluster.parts={cfg.cluster.parts} starts child runs of the deployment '{name}' on a Prefect "
            "server, and PREFECT_API_URL is not set"
        )
    with get_client(sync_client=True) as client:
        for stage in ("recaption", "latents"):
            try:
                client.read_deployment_by_name(f"{stage}/{name}")
            except ObjectNotFound:
                raise RuntimeError(
                    f"cluster.parts={cfg.cluster.parts} starts runs of '{stage}/{name}', which the server at "
                    f"{url} does not have: run `t2i deploy --pool POOL --name {name}` with this config first"
                ) from None


def run_parts_if_asked(stage: str, cfg: PipelineConfig, plan: Plan) -> None:
    """Before a `recaption` or `latents` run does its own work: if it fans out, check it can, check its inputs
    (a missing one fails here, not in every part) and run its parts; it then finds their shards on disk and
    writes the manifests."""
    if not fans_out(cfg, getattr(cfg, stage).part):
        return
    from t2i.flows.config import with_overrides

    check_fan_out(cfg)
    plan.require_inputs(stage)
    run_parts(stage, cfg, lambda k, n: with_overrides(cfg, [f"{stage}.part={k}/{n}"]))


def run_parts(stage: str, cfg: PipelineConfig, part_config: Callable[[int, int], PipelineConfig]) -> None:
    """Start (or find again) the N part runs of `stage`, reschedule the ones that failed, wait for all; raise
    `PartsFailed` naming the parts that did not complete."""
    from prefect.client.orchestration import get_client

    n, logger = cfg.cluster.parts, run_logger()
    name = f"{stage}/{cfg.cluster.deployment}"
    with get_client(sync_client=True) as client:
        runs = {k: _start_part(client, name, stage, part_config(k, n), k, n) for k in range(1, n + 1)}
        logger.info(f"[{stage}] {n} parts on the '{PARTS_QUEUE}' queue: " + _describe(runs))
        while not all(r.state and r.state.is_final() for r in runs.values()):
            time.sleep(POLL_SECONDS)
            runs = {k: client.read_flow_run(r.id) for k, r in runs.items()}
    failed = {k: r for k, r in runs.items() if not r.state.is_completed()}
    if failed:
        raise PartsFailed(
            f"[{stage}] {len(failed)} of {n} parts did not complete: {_describe(failed)}. Retry a part "
            "(`prefect flow-run retry <name>`, or Retry on its page), or retry this run to rerun every part "
            "that is not Completed"
        )
    logger.info(f"[{stage}] all {n} parts completed")


def _start_part(client, name: str, stage: str, cfg: PipelineConfig, k: int, n: int) -> FlowRun:
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run
    from prefect.states import Scheduled

    params = {"cfg": cfg.model_dump(mode="json")}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    run = run_deployment(
        name,
        parameters=params,
        timeout=0,
        idempotency_key=f"{flow_run.root_flow_run_id}:{stage}:{digest}:{k}/{n}",
        work_queue_name=PARTS_QUEUE,
        flow_run_name=f"{stage}-part-{k}-of-{n}",
        tags=["t2i", "part"],
    )
    if run.state and run.state.is_final() and not run.state.is_completed():
        client.set_flow_run_state(
            run.id, Scheduled(message="Rescheduled by a retry of its parent"), force=True
        )
        run = client.read_flow_run(run.id)
    return run


def _describe(runs: dict[int, FlowRun]) -> str:
    return ", ".join(
        f"part {k} '{r.name}' ({r.state.name if r.state else 'no state'})" for k, r in runs.items()
    )
