"""Training-step throughput: the full step as training runs it (batch assembly from the memory-mapped table,
latent sampling, CFG dropout, text, forward/backward, clip, optimizer, EMA) against the bare step of the same
model on tensors already in memory (forward/backward, clip, optimizer, EMA), measured side by side in one run;
the full step with online T5 text too; and the optimizer + EMA alone, per-tensor (what they replaced,
`tests/reference_optim.py`) against multi-tensor.

    python tests/benchmarks/bench_train.py [--size tiny] [--model dit] [--batch 32] [--steps 40] [--optimizer lamb]
                                            [--loader-workers 0]

The full step uses stored (precomputed) text, as both presets do. Each full run is one `train_denoiser` run;
its step time excludes start-up. Last line: `full/bare: R, online/precomputed: O, optimizer+EMA per-tensor ÷
foreach: F` (target: R ≥ 0.95). Run it alone: it is timed on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import t2i.models  # noqa: E402,F401  (torchvision shim)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's `tests`, not site-packages'


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


def store_text(ws: Path, cfg, captions, shards: int):
    """The precomputed text of the captions, as the latents stage stores it."""
    from t2i.data.store import Artifact
    from t2i.tasks.text import null_embedding, text_shard

    text = Artifact(ws, "text", "bench")
    for i in range(shards):
        text_shard.fn(cfg, text, i, captions)
    text.write_manifest(config={}, inputs={}, started=time.time(), extra=null_embedding(cfg, ws))
    return text


def full_rate(job, name: str, **update) -> tuple[float, float]:
    """Samples/s of the training steps of one `train_denoiser` run, and the share of their time spent waiting
    for batches (assembled in the step's own process with `--loader-workers 0`)."""
    from t2i.data.store import Artifact
    from t2i.tasks.train import train_denoiser

    checkpoints = Artifact(job.checkpoints.workspace, "train", name)
    result = train_denoiser.fn(job.model_copy(update={"checkpoints": checkpoints, **update}))
    timing = result["timing"]
    return job.train.steps * job.train.batch_size / timing["total"], timing["data"] / timing["total"]


def bare_rate(job, args) -> tuple[float, torch.nn.Module]:
    """Samples/s of forward/backward, clip, optimizer and EMA on tensors in memory; and the model."""
    from t2i.data.train_data import collate_text_rows
    from t2i.models.architectures import build_denoiser
    from t2i.models.ema import EMA
    from t2i.models.objectives import Epsilon
    from t2i.tasks.train import make_optimizer, train_tables

    table, _ = train_tables(job)
    torch.manual_seed(0)
    sizes = {"latent_channels": 4, "latent_size": 16, "text_dim": table.words.shape[1]}
    model = build_denoiser(args.model, args.size, patch_size=job.train.patch_size, **sizes)
    ema, opt, objective = EMA(model, 0.9999), make_optimizer(model, job.train), Epsilon()
    z = torch.randn(args.batch, 4, 16, 16)
    text, mask = collate_text_rows(table.embeddings_of(range(args.batch)))
    text = text.float()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = objective.loss(model, z, text, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
    return args.steps * args.batch / (time.perf_counter() - t0), model


def optimizer_ratio(model: torch.nn.Module) -> float:
    """Optimizer (LAMB) + EMA per step on this model's parameters: per-tensor ÷ multi-tensor."""
    from tests.benchmarks.bench_optim import IMPLEMENTATIONS, time_steps

    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = {name: time_steps(model, *classes, steps=5)["total"] for name, classes in IMPLEMENTATIONS.items()}
    return times["per-tensor"] / times["foreach"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--model", default="dit")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--optimizer", default="lamb", choices=["lamb", "adamw"])
    ap.add_argument(
        "--loader-workers", type=int, default=0, help="0: batches assembled in the step's process"
    )
    args = ap.parse_args()

    from t2i.data.store import Artifact
    from t2i.flows.config import load_config
    from t2i.flows.plan import Plan
    from t2i.tasks.train_job import TrainJob

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        latents, captions, shards = make_artifacts(ws, args.samples, 512)
        overrides = [
            f"train.size={args.size}",
            f"train.model={args.model}",
            f"train.batch_size={args.batch}",
            f"train.steps={args.steps}",
            "train.log_every=100000",
            "train.checkpoint_every=100000",
            f"train.optimizer={args.optimizer}",
            "text.mode=precomputed",
            f"train.loader_workers={args.loader_workers}",
        ]
        cfg = load_config("tiny", overrides, str(ws))
        text = store_text(ws, cfg.text, captions, shards)
        inputs = {"latents": latents, "captions": captions, "num_shards": shards, "text_embeddings": (text,)}
        plan = Plan(cfg)
        inputs["train_tables"] = (plan.train_table_of(latents, captions, text),)
        checkpoints = Artifact(ws, "train", "bench")
        job = TrainJob(train=cfg.train, text=cfg.text, checkpoints=checkpoints, latent_norm=1.0, **inputs)
        bare, model = bare_rate(job, args)
        full, data = full_rate(job, "full")
        online, _ = full_rate(
            job,
            "online",
            text=cfg.text.model_copy(update={"mode": "online"}),
            text_embeddings=(),
            train_tables=(plan.train_table_of(latents, captions, None),),
        )
        bare_again, _ = bare_rate(job, args)  # on each side of the full runs: the machine's drift shows
    ratio = optimizer_ratio(model)
    bare = max(bare, bare_again)
    model_name = f"{args.model}-{args.size} (patch {model.config.patch_size})"
    threads = torch.get_num_threads()
    print(f"model: {model_name}, batch {args.batch}, {args.steps} steps, {args.optimizer}, ", end="")
    print(f"{args.loader_workers} loader workers, {threads} threads")
    print(f"full step, precomputed text: {full:8.1f} samples/s (waiting for batches: {data:.1%})")
    print(f"full step, online text:      {online:8.1f} samples/s")
    print(f"bare step:                   {bare:8.1f} samples/s")
    print(f"full/bare: {full / bare:.2f}, online/precomputed step time: {full / online:.2f}, ", end="")
    print(f"optimizer+EMA per-tensor ÷ foreach: {ratio:.2f}")


if __name__ == "__main__":
    main()
