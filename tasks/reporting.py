"""What a run reports: its log lines (Prefect's run logger, or a plain one outside a run), markdown artifacts
for the UI (relayed by the launching task from a torchrun rank), and per-shard progress."""

from __future__ import annotations

import json
import logging
import os
import time


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, a plain logger elsewhere (unit tests, scripts)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("t2i")


ARTIFACT_LINE = "T2I-ARTIFACT "  # a torchrun rank's artifact, published by the task that launched it
RELAY_ENV = "T2I_RELAY_ARTIFACTS"


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A Prefect markdown artifact for the UI; outside a flow run there is nowhere to publish it. A torchrun
    rank has no run of its own: it hands the artifact to its task on its output."""
    if os.environ.get(RELAY_ENV):
        print(
            ARTIFACT_LINE + json.dumps({"markdown": markdown, "key": key, "description": description}),
            flush=True,
        )
        return
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
