"""The loop every data stage shares: skip if complete, run the missing shards, write the manifest last."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from t2i.data.store import Artifact, ShardInfo
from t2i.tasks.device_workers import run_stage_worker
from t2i.tasks.shards import Progress, run_logger


def skipped_summary(stage: str, artifact: Artifact) -> dict[str, Any]:
    manifest = artifact.read_manifest()
    run_logger().info(f"[{stage}] already complete: {artifact.root}")
    return {
        "stage": stage,
        "path": str(artifact.root),
        "skipped": True,
        "complete": True,
        **_counts(manifest),
    }


def _counts(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("rows", "rejects", "rejects_by_reason") if k in manifest}


class StageRun:
    """One run of a sharded stage over `shards` (default: all): what is left to do, progress, finalization."""

    def __init__(
        self, stage: str, artifact: Artifact, num_shards: int, shards: list[int] | None = None
    ) -> None:
        self.stage, self.artifact, self.num_shards = stage, artifact, num_shards
        self.shards = list(range(num_shards)) if shards is None else shards
        self.started = time.time()
        artifact.root.mkdir(parents=True, exist_ok=True)
        artifact.clean_stale_temporaries()
        self.todo = [i for i in self.shards if not artifact.has_shard(i)]
        done = len(self.shards) - len(self.todo)
        run_logger().info(
            f"[{stage}] {done} of {len(self.shards)} shards already done, {len(self.todo)} to run → {artifact.root}"
        )
        self.progress = Progress(stage, len(self.shards), done=done)

    def report(self, info: ShardInfo, seconds: float) -> None:
        self.progress.advance(
            f"(part {info.index:05d}: {info.rows} rows, {info.rejects} rejects, {seconds:.1f}s, "
            f"{info.rows / max(seconds, 1e-9):.0f}/s)"
        )

    def finish(self, extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the manifest if every shard of the stage is on disk (other parts may still be running)."""
        art, logger = self.artifact, run_logger()
        present = len(art.done_shards(self.num_shards))
        if present < self.num_shards:
            logger.info(
                f"[{self.stage}] this run's shards are done; {present} of {self.num_shards} shards on disk, "
                "the manifest is written by the run that completes the last one"
            )
            return {"stage": self.stage, "path": str(art.root), "skipped": False, "complete": False}
        manifest = art.finalize_shards(
            num_shards=self.num_shards,
            config=art.extra.get("config", {}),
            inputs=art.extra.get("inputs", {}),
            started=self.started,
            extra=extra() if extra else None,
        )
        logger.info(
            f"[{self.stage}] complete: {manifest['rows']} rows, {manifest['rejects']} rejects "
            f"{manifest['rejects_by_reason'] or ''} in {manifest['seconds']:.1f}s → {art.root}"
        )
        return {
            "stage": self.stage,
            "path": str(art.root),
            "skipped": False,
            "complete": True,
            **_counts(manifest),
        }


def run_sharded_stage(
    stage: str,
    artifact: Artifact,
    num_shards: int,
    run_shard: Callable[[int], Any],
    *,
    concurrent: bool = False,
    extra: Callable[[], dict[str, Any]] | None = None,
    shards: list[int] | None = None,
) -> dict[str, Any]:
    """Run `run_shard(i)` for every shard (of `shards`, default all) not yet on disk, in order, then finalize.

    With `concurrent`, `run_shard` returns Prefect futures (task.submit) and shards run on the task runner.
    """
    if artifact.is_complete():
        return skipped_summary(stage, artifact)
    run = StageRun(stage, artifact, num_shards, shards)
    if concurrent:
        t0 = time.time()
        for fut in [run_shard(i) for i in run.todo]:
            run.report(fut.result(), time.time() - t0)
    else:
        for i in run.todo:
            t0 = time.time()
            run.report(run_shard(i), time.time() - t0)
    return run.finish(extra)


def run_on_devices(stage: str, run: StageRun, cfg: Any, images: Artifact, groups: list) -> None:
    """The shards this run has left, interleaved over one worker process per device group (so the workers
    get similar work), each a Prefect task of its own."""
    run_logger().info(f"[{run.stage}] {len(groups)} workers: {groups}")
    futures = [
        run_stage_worker.with_options(task_run_name=f"{run.stage}-worker-{w}").submit(
            stage, cfg, run.artifact, images, run.todo[w :: len(groups)], gpus, w
        )
        for w, gpus in enumerate(groups)
    ]
    for fut in futures:
        fut.result()
