"""The loop every data stage shares: skip if complete, run the missing shards, write the manifest last."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from data.store import Artifact, ShardInfo
from tasks.shards import Progress, run_logger


def skipped_summary(stage: str, artifact: Artifact) -> dict[str, Any]:
    manifest = artifact.read_manifest()
    run_logger().info(f"[{stage}] already complete: {artifact.root}")
    return {"stage": stage, "path": str(artifact.root), "skipped": True, **_counts(manifest)}


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("rows", "rejects", "rejects_by_reason") if k in manifest}


def run_sharded_stage(
    stage: str,
    artifact: Artifact,
    num_shards: int,
    run_shard: Callable[[int], Any],
    *,
    concurrent: bool = False,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run `run_shard(i)` for every shard not yet on disk, in order, then finalize.

    With `concurrent`, `run_shard` returns Prefect futures (task.submit) and shards run on the task runner.
    """
    if artifact.is_complete():
        return skipped_summary(stage, artifact)
    started = time.time()
    artifact.root.mkdir(parents=True, exist_ok=True)
    artifact.clean_stale_temporaries()
    todo = [i for i in range(num_shards) if not artifact.has_shard(i)]
    logger = run_logger()
    logger.info(
        f"[{stage}] {num_shards - len(todo)} of {num_shards} shards already done, {len(todo)} to run → {artifact.root}"
    )
    progress = Progress(stage, num_shards, done=num_shards - len(todo))

    def report(info: ShardInfo, t0: float) -> None:
        dt = time.time() - t0
        progress.advance(
            f"(part {info.index:05d}: {info.rows} rows, {info.rejects} rejects, {dt:.1f}s, {info.rows / max(dt, 1e-9):.0f}/s)"
        )

    if concurrent:
        t0 = time.time()
        futures = [run_shard(i) for i in todo]
        for fut in futures:
            report(fut.result(), t0)
    else:
        for i in todo:
            t0 = time.time()
            report(run_shard(i), t0)
    manifest = artifact.finalize_shards(
        num_shards=num_shards,
        config=artifact.extra.get("config", {}),
        inputs=artifact.extra.get("inputs", {}),
        started=started,
        extra=extra() if extra else None,
    )
    logger.info(
        f"[{stage}] complete: {manifest['rows']} rows, {manifest['rejects']} rejects "
        f"{manifest['rejects_by_reason'] or ''} in {manifest['seconds']:.1f}s → {artifact.root}"
    )
    return {"stage": stage, "path": str(artifact.root), "skipped": False, **_counts(manifest)}
