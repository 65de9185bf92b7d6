"""A stage worker process (started by `t2i.tasks.device_workers.run_stage_worker`): reads its job (stage,
config, artifacts, shard list) as JSON on stdin, loads its model once on the GPUs it was given, processes its
shards in order, and reports each on stdout."""

from __future__ import annotations

import json
import sys
import time

import t2i.models  # noqa: F401  (the torchvision shim, before torch is imported)
from t2i.data.store import Artifact
from t2i.tasks.device_workers import REPORT


def shard_runner(stage: str, cfg_json: dict, artifact: Artifact, images: Artifact):
    """`run(index, next_index)` for one shard of `stage`."""
    if stage == "recaption":
        from t2i.flows.config import RecaptionConfig
        from t2i.tasks.recaption import caption_shard

        cfg = RecaptionConfig.model_validate(cfg_json)
        return lambda i, nxt: caption_shard(cfg, artifact, i, images, next_index=nxt)
    if stage == "latents":
        from t2i.flows.config import LatentsConfig
        from t2i.tasks.latents import latents_shard

        cfg = LatentsConfig.model_validate(cfg_json)
        return lambda i, nxt: latents_shard.fn(cfg, artifact, i, images)
    raise ValueError(f"no worker for stage {stage!r}")


def main() -> int:
    spec = json.loads(sys.stdin.read())
    artifact, images, shards = (
        Artifact.from_ref(spec["artifact"]),
        Artifact.from_ref(spec["images"]),
        spec["shards"],
    )
    run = shard_runner(spec["stage"], spec["cfg"], artifact, images)
    for pos, index in enumerate(shards):
        started = time.time()
        info = run(index, shards[pos + 1] if pos + 1 < len(shards) else None)
        report = {
            "index": index,
            "rows": info.rows,
            "rejects": info.rejects,
            "seconds": time.time() - started,
        }
        print(REPORT + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
