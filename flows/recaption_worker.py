"""An engine worker process: reads its job (config, artifacts, shard list) as JSON on stdin, loads one
engine on the GPUs it was given, captions its shards in order, and reports each on stdout."""

from __future__ import annotations

import json
import sys
import time

import t2i.models  # noqa: F401  (the torchvision shim, before torch is imported)
from t2i.data.store import Artifact


def main() -> int:
    from t2i.flows.config import RecaptionConfig
    from t2i.tasks.recaption import caption_shard

    spec = json.loads(sys.stdin.read())
    cfg = RecaptionConfig.model_validate(spec["cfg"])
    artifact = Artifact.from_ref(spec["artifact"])
    images = Artifact.from_ref(spec["images"])
    shards = spec["shards"]
    for pos, index in enumerate(shards):
        started = time.time()
        nxt = shards[pos + 1] if pos + 1 < len(shards) else None
        info = caption_shard(cfg, artifact, index, images, next_index=nxt)
        report = {
            "index": index,
            "rows": info.rows,
            "rejects": info.rejects,
            "seconds": time.time() - started,
        }
        print("T2I-SHARD " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
