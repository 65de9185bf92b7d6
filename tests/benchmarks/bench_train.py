"""Training-step throughput: the full step (batch assembly from stored moments, latent sampling, CFG
dropout, online T5 encoding, forward/backward, clip, optimizer, EMA) against a bare forward/backward/
optimizer step of the same model on tensors already in memory, measured side by side; the full step with
precomputed text embeddings too.

    python tests/benchmarks/bench_train.py [--size tiny] [--batch 32] [--steps 40] [--samples 2048]

Last line: `data-wait share: S, full/bare: R` (targets: S ≤ 0.05, R ≥ 0.9). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import t2i.models  # noqa: E402,F401  (torchvision shim)


def make_artifacts(root: Path, samples: int, shard: int):
    import numpy as np
    import pyarrow as pa

    from t2i.data import shapes
    from t2i.data.schemas import CAPTIONS, LATENTS
    from t2i.data.store import Artifact
    from t2i.tasks.latents import SHAPE_META_KEY

    rng = np.random.default_rng(0)
    latents, captions = Artifact(root, "latents", "bench"), Artifact(root, "recaption", "bench")
    for i in range(-(-samples // shard)):
        n = min(shard, samples - i * shard)
        keys = [f"k{i * shard + j}" for j in range(n)]
        mean = rng.standard_normal((n, 4, 16, 16)).astype(np.float16)
        std = (0.1 + 0.05 * rng.random((n, 4, 16, 16))).astype(np.float16)
        table = pa.Table.from_pydict(
            {"key": keys, "mean": [m.tobytes() for m in mean], "std": [s.tobytes() for s in std]},
            schema=LATENTS,
        ).replace_schema_metadata({SHAPE_META_KEY: json.dumps([4, 16, 16]).encode()})
        latents.write_shard(i, table)
        texts = [shapes.scene(i * shard + j).caption for j in range(n)]
        captions.write_shard(
            i,
            pa.Table.from_pylist(
                [
                    {"key": k, "caption": c, "model": "gt", "tokens": 0, "finish_reason": "stop"}
                    for k, c in zip(keys, texts, strict=True)
                ],
                schema=CAPTIONS,
            ),
        )
    return latents, captions, -(-samples // shard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--model", default="dit")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=2048)
    args = ap.parse_args()

    import torch

    from t2i.data.store import Artifact
    from t2i.flows.config import load_config
    from t2i.models.diffusion import EpsilonObjective
    from t2i.models.ema import EMA
    from t2i.models.tiny import resolve_model
    from t2i.tasks.model_cache import cached_model
    from t2i.tasks.text import null_embedding, text_shard
    from t2i.tasks.train import build_denoiser, make_optimizer, train_denoiser
    from t2i.tasks.train_job import TrainJob

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        latents, captions, shards = make_artifacts(ws, args.samples, 512)
        cfg = load_config("tiny", [f"train.size={args.size}", f"train.model={args.model}", f"train.batch_size={args.batch}",
                                   f"train.steps={args.steps}", "train.log_every=100000", "train.checkpoint_every=100000",
                                   "text.mode=online"],
                          str(ws))  # fmt: skip
        artifact = Artifact(ws, "train", "bench")
        job = TrainJob(train=cfg.train, text=cfg.text, checkpoints=artifact, latents=latents, captions=captions,
                       num_shards=shards, latent_norm=1.0)  # fmt: skip
        full = train_denoiser.fn(job)
        sec = full["timing"]
        full_rate = args.steps * args.batch / sec["total"]

        # the same full step with precomputed text embeddings (text.mode=precomputed)
        stored_cfg = cfg.text.model_copy(update={"mode": "precomputed"})
        text_art = Artifact(ws, "text", "bench")
        for i in range(shards):
            text_shard.fn(stored_cfg, text_art, i, captions)
        text_art.write_manifest(
            config={}, inputs={}, started=time.time(), extra=null_embedding(stored_cfg, ws)
        )
        stored = train_denoiser.fn(job.model_copy(update={
            "text": stored_cfg, "checkpoints": Artifact(ws, "train", "bench-stored"), "text_embeddings": (text_art,),
        }))  # fmt: skip
        stored_rate = args.steps * args.batch / stored["timing"]["total"]

        # bare: the same model and optimizer on tensors already in memory (text encoded once)
        encoder = cached_model(
            "text",
            path=resolve_model("tiny:t5", ws),
            max_length=cfg.text.max_length,
            device="cpu",
            revision=None,
        )
        torch.manual_seed(0)
        model = build_denoiser(
            args.model, args.size, latent_channels=4, latent_size=16, text_dim=encoder.dim,
            patch_size=cfg.train.patch_size,
        )  # fmt: skip
        ema, opt, objective = EMA(model, 0.99), make_optimizer(model, cfg.train), EpsilonObjective()
        z = torch.randn(args.batch, 4, 16, 16)
        text, mask = encoder.encode(captions.read_shard(0)["caption"].to_pylist()[: args.batch])
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = objective.loss(model, z, text, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
        bare_rate = args.steps * args.batch / (time.perf_counter() - t0)

    share = sec["data"] / sec["total"]
    print(
        f"model: {args.model}-{args.size} (patch {model.config.patch_size}), batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads"
    )
    print(
        f"full step: {full_rate:8.1f} samples/s  (data {share:.1%}, text encoding {sec['text'] / sec['total']:.1%})"
    )
    print(f"full step, precomputed text: {stored_rate:8.1f} samples/s")
    print(f"bare step: {bare_rate:8.1f} samples/s")
    print(f"data-wait share: {share:.3f}, full/bare: {full_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
