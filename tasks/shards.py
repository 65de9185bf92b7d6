"""The Prefect options every shard task shares (`@task(**SHARD_TASK_OPTIONS)`).

The files on disk are the one record of what is done: a shard is skipped when it is on disk (and readable),
whoever wrote it, and claimed in the workspace before it is computed (`t2i.data.claims`). Prefect keeps no
cache of its own on top (it could only ever skip a shard the runner never submits), so deleting Prefect's
database loses nothing and a shard deleted on disk is simply redone. A failed shard is retried once.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

SHARD_TASK_OPTIONS: dict[str, Any] = dict(cache_policy=NO_CACHE, retries=1)
