"""`train.compile` on the CPU: the step time of DiT-I with the denoiser compiled by inductor against eager, side
by side in one run, after the compiled run's warm-up (the compile itself is reported apart).

    python tests/benchmarks/bench_compile.py [--size base] [--batch 8] [--steps 6]

Both runs are `Trainer.step` of a run opened as `train_denoiser` opens it (`open_run`), on the same stored
latents and text; one text-length bucket (`train.text_buckets=1`), so the compiled run compiles once. Last line:
`compiled ÷ eager step time: R (compile S s)`. Run it alone: it is timed on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's `tests`, not site-packages'

from tests.benchmarks.bench_train import make_artifacts, store_text  # noqa: E402


def step_times(job, steps: int) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the next `steps`)."""
    from t2i.tasks.train import open_run

    run = open_run(job, logging.getLogger("bench"))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss, _ = run.trainer.step(step, run.batches)
        float(loss)  # the step's work is done (a GPU would still be running it)
        times.append(time.perf_counter() - start)
    return times[0], sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from t2i.data.store import Artifact
    from t2i.flows.config import load_config
    from t2i.flows.plan import Plan
    from t2i.tasks.train_job import TrainJob

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        latents, captions, shards = make_artifacts(ws, 256, 128)
        text = store_text(ws, load_config("tiny", [], str(ws)).text, captions, shards)
        results = {}
        for compiled in (False, True):
            cfg = load_config(
                "tiny",
                [
                    f"train.size={args.size}",
                    f"train.batch_size={args.batch}",
                    f"train.steps={args.steps + 1}",
                    "train.text_buckets=1",
                    "train.optimizer=lamb",
                    "text.mode=precomputed",
                    f"train.compile={compiled}",
                ],
                str(ws),
            )
            job = TrainJob(
                train=cfg.train,
                text=cfg.text,
                checkpoints=Artifact(ws, "train", f"c{compiled}"),
                latents=latents,
                captions=captions,
                num_shards=shards,
                latent_norm=1.0,
                text_embeddings=(text,),
                train_tables=(Plan(cfg).train_table_of(latents, captions, text),),
            )
            results[compiled] = step_times(job, args.steps)
    (_, eager), (first, compiled) = results[False], results[True]
    print(
        f"DiT-I {args.size}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    print(f"eager:    {1e3 * eager:8.1f} ms/step")
    print(f"compiled: {1e3 * compiled:8.1f} ms/step (first step, with the compile: {first:.1f} s)")
    print(f"compiled ÷ eager step time: {compiled / eager:.2f} (compile {first - compiled:.0f} s)")


if __name__ == "__main__":
    main()
