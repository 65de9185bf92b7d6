"""Conditioning works end to end: trained on class-name captions of the shapes world for a fixed number of
steps, the tiny denoiser draws the prompted colour far more often than a model that ignores its prompt.

The full version (more images, steps and prompts) is tests/benchmarks/bench_conditioning.py.
"""

from flows.config import load_config
from flows.pipeline import pipeline_flow
from flows.plan import Plan


def test_class_prompts_get_their_colour_far_above_chance(prefect_harness, workspace):
    cfg = load_config(
        "tiny",
        [
            "cutmix.enabled=false",
            "recaption.backend=template",
            "download.max_images=STEPS_IMAGES",
            "train.steps=STEPS",
            "train.sample_prompts=0",
            "evaluate.prompts=shapes-class:val",
            "evaluate.num_prompts=48",
        ],
        str(workspace),
    )
    pipeline_flow(cfg)
    metrics = Plan(cfg).evaluation.read_manifest()["metrics"]["shapes"]
    scores, chance = metrics["scores"], metrics["chance"]
    assert scores["colours"] >= 0.6 and scores["colours"] >= chance["colours"] + 0.25, (scores, chance)
