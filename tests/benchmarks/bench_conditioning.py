"""Conditioning works end to end: a tiny denoiser trained on class-name captions of the shapes world
("An image of red circle") for a fixed number of steps draws the prompted colour and shape.

The real pipeline runs (download → template captions → latents with the trained VAE → train → evaluate on
`shapes-class:val`); the scorer reads the generated pixels. Chance is what a model that ignores its prompt
scores on the same prompts.

    python tests/benchmarks/bench_conditioning.py [--steps 1500] [--images 2048] [--prompts 128]

Last line: `dominant_colour: D (chance d), colours: A (chance a), single_object: B (chance b), colour_shape: C
(chance c)`. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import t2i.models  # noqa: E402,F401  (torchvision shim)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import json

    from t2i.flows.config import load_config
    from t2i.flows.pipeline import pipeline_flow
    from t2i.flows.plan import Plan

    with tempfile.TemporaryDirectory() as ws:
        cfg = load_config(
            "tiny",
            [
                "cutmix.enabled=false",
                "recaption.backend=template",
                f"download.max_images={args.images}",
                "download.shard_size=512",
                f"train.steps={args.steps}",
                f"train.batch_size={args.batch}",
                f"train.checkpoint_every={args.steps}",
                f"train.sample_every={args.steps}",
                "evaluate.prompts=shapes-class:val",
                f"evaluate.num_prompts={args.prompts}",
            ],
            ws,
        )
        started = time.time()
        pipeline_flow(cfg)
        elapsed = time.time() - started
        metrics = json.loads((Plan(cfg).evaluation.root / "metrics.json").read_text())["shapes"]
    scores, chance = metrics["scores"], metrics["chance"]
    print(
        f"\n{args.images} images, {args.steps} steps × batch {args.batch}, {args.prompts} class prompts, "
        f"pipeline {elapsed:.0f} s"
    )
    for key in scores:
        print(f"  {key:16s} {scores[key]:.3f}   chance {chance[key]:.3f}")
    print(
        ", ".join(
            f"{k}: {scores[k]:.3f} (chance {chance[k]:.3f})"
            for k in ("dominant_colour", "colours", "single_object", "colour_shape")
        )
    )


if __name__ == "__main__":
    main()
