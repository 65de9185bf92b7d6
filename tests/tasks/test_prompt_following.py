"""Conditioning works end to end, judged from pixels: the tiny preset's denoiser, trained briefly on the
shapes world's class-name captions ("An image of red circle"), draws the prompted colour in most images.

A short version of `tests/benchmarks/bench_conditioning.py`. Every stage is the real one (synthetic images,
template captions, latents from the trained VAE, the tiny T5, training, sampling with guidance, decoding,
the shapes scorer); a denoiser that ignored its text would land near the chance level the scorer reports.
"""

import pytest

from t2i.flows.config import load_config
from t2i.flows.pipeline import pipeline_flow
from t2i.flows.plan import Plan

STEPS = 1200  # ~75 s on 2 CPU cores; the benchmark trains longer on more images


@pytest.mark.slow
def test_generated_images_show_the_prompted_colour(prefect_harness, workspace):
    cfg = load_config(
        "tiny",
        [
            "cutmix.enabled=false",
            "recaption.backend=template",
            "download.max_images=512",
            "download.shard_size=256",
            f"train.steps={STEPS}",
            f"train.checkpoint_every={STEPS}",
            "train.sample_prompts=0",
            "evaluate.prompts=shapes-class:val",
            "evaluate.num_prompts=64",
        ],
        str(workspace),
    )
    pipeline_flow(cfg)
    shapes = Plan(cfg).evaluation.read_manifest()["metrics"]["shapes"]
    scores, chance = shapes["scores"], shapes["chance"]
    # the image's most-covered colour is the prompted one: most of the time, where chance is ~1 in 5
    assert scores["dominant_colour"] >= 0.5, (scores, chance)
    assert scores["dominant_colour"] >= 2 * chance["dominant_colour"], (scores, chance)
    # and the prompted colour is drawn as a clean object well above what an unprompted model scores
    assert scores["colours"] >= 0.6 and scores["colours"] >= chance["colours"] + 0.25, (scores, chance)
