"""One process of a distributed training job (started by torchrun from the train task): reads the job
spec, runs the same training loop as the in-process path, and the main process writes the result."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import t2i.models  # noqa: F401  (the torchvision shim, before torch is imported)
from t2i.data.store import Artifact, atomic_path


def main(spec_path: str) -> int:
    from t2i.flows.config import TextConfig, TrainConfig
    from t2i.tasks.train import train_denoiser

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s"
    )
    spec = json.loads(Path(spec_path).read_text())

    result = train_denoiser.fn(
        TrainConfig.model_validate(spec["train"]),
        TextConfig.model_validate(spec["text"]),
        Artifact.from_ref(spec["artifact"]),
        Artifact.from_ref(spec["latents"]),
        Artifact.from_ref(spec["captions"]),
        spec["num_shards"],
        spec["scale_factor"],
        vae_path=spec.get("vae_path"),
        composites=(Artifact.from_ref(comp[0]), Artifact.from_ref(comp[1]), comp[2])
        if (comp := spec.get("composites"))
        else None,
        text_embeddings=[Artifact.from_ref(ref) for ref in spec.get("text_embeddings", [])],
    )
    if rank == 0:
        with atomic_path(Path(spec_path).with_name("result.json")) as tmp:
            tmp.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
