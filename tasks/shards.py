"""What every shard task shares: Prefect's cache key from (stage fingerprint, shard index), and progress.

The key exists only while the shard file does, so Prefect's cache can skip scheduling work but can never
claim a shard that is not on disk: deleting a shard (or the Prefect database) just means it is redone
(or re-checked) from the files.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from t2i.data.store import Artifact


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    artifact: Artifact = parameters["artifact"]
    index: int = parameters["index"]
    if not artifact.has_shard(index):
        return None
    where = hashlib.sha256(str(artifact.root).encode()).hexdigest()[:8]
    return f"{artifact.stage}-{artifact.fingerprint}-{index:05d}-{where}"


SHARD_TASK_OPTIONS: dict[str, Any] = dict(cache_key_fn=shard_cache_key, persist_result=True, retries=1)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, a plain logger elsewhere (unit tests, scripts)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("t2i")


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A Prefect markdown artifact for the UI; outside a flow run there is nowhere to publish it."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception:  # no flow or task run context (unit tests, scripts)
        pass


class Progress:
    """Per-shard progress: a log line a person can follow, and a Prefect progress artifact for the UI."""

    def __init__(self, stage: str, total: int, done: int = 0) -> None:
        self.stage, self.total, self.done = stage, max(total, 1), done
        self.started = time.time()
        self.artifact_id = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=100.0 * done / self.total,
                key=f"{stage}-progress",
                description=f"{stage}: shards finished",
            )
        except Exception:  # outside a flow run there is nowhere to publish it
            self.artifact_id = None

    def advance(self, message: str) -> None:
        self.done += 1
        filled = round(20 * self.done / self.total)
        bar = "█" * filled + "·" * (20 - filled)
        run_logger().info(f"[{self.stage}] {bar} {self.done}/{self.total} {message}")
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
