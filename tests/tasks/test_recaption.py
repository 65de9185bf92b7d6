"""Recaptioning on the real engines: vLLM (CPU build) on the tiny LLaVA, transformers as the reference."""

import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from t2i.data.imaging import encode_image
from t2i.data.schemas import IMAGES
from t2i.data.store import Artifact
from t2i.data.versions import TINY_MODELS
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.parts import part_shards
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.models.captioners import Caption, TransformersCaptioner, postprocess_caption
from t2i.tasks.recaption import (
    caption_isolating_failures,
    caption_shard,
    load_captioner,
    summary_markdown,
)

PROMPTS = {"caption": "describe the image"}


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_postprocess_keeps_one_line_up_to_the_last_full_stop():
    assert postprocess_caption("A cat.\nIt sits on a mat. And then") == "A cat. It sits on a mat."
    assert postprocess_caption("  no full stop here \n") == "no full stop here"


@pytest.fixture(scope="module")
def vllm_captioner(tiny_models):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", "recaption.model=tiny:llava", "recaption.max_new_tokens=12"],
        str(tiny_models.parent),
    )
    return load_captioner(cfg.recaption, tiny_models.parent)


def test_vllm_greedy_tokens_match_transformers_generate(vllm_captioner, tiny_models):
    batch = images(6)
    ours = vllm_captioner.caption(batch, [""] * 6, PROMPTS)["caption"]
    hf = TransformersCaptioner(
        str(tiny_models / f"tiny-llava-v{TINY_MODELS}"), max_new_tokens=12, dtype="float32", batch_size=1
    )
    reference = hf.caption(batch, [""] * 6, PROMPTS)["caption"]
    assert all(c.tokens == 12 and c.finish_reason == "length" for c in ours)  # random weights never stop
    outputs = vllm_captioner.llm.generate(
        [
            {"prompt": vllm_captioner.render("describe the image"), "multi_modal_data": {"image": im}}
            for im in batch
        ],
        vllm_captioner.sampling,
        use_tqdm=False,
    )
    vllm_ids = [list(o.outputs[0].token_ids) for o in outputs]
    hf_ids = [_hf_ids(hf, im) for im in batch]
    assert [ids[:8] for ids in vllm_ids] == [ids[:8] for ids in hf_ids]
    assert [c.text.strip()[:4] for c in ours] == [c.text.strip()[:4] for c in reference]


def _hf_ids(hf: TransformersCaptioner, image: Image.Image) -> list[int]:
    import torch

    from t2i.models.captioners import chat_prompt

    inputs = hf.processor(
        images=[image], text=[chat_prompt(hf.processor, "describe the image")], return_tensors="pt"
    )
    with torch.inference_mode():
        ids = hf.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return ids[0, inputs["input_ids"].shape[1] :].tolist()


class FlakyBackend:
    """A backend that fails on whole batches containing a poisoned image, like an engine rejecting one input."""

    model_id = "flaky"

    def __init__(self, poisoned: set[int]):
        self.poisoned = poisoned

    def caption(self, batch, names, prompts):
        if any(id(im) in self.poisoned for im in batch):
            raise ValueError("engine rejected the batch")
        return {col: [Caption(text=f"{col} {n}") for n in names] for col in prompts}


def test_a_failing_item_is_isolated_and_the_rest_kept():
    batch = images(10)
    backend = FlakyBackend({id(batch[3]), id(batch[7])})
    prompts = {"caption": "long", "caption_short": "short"}
    result = caption_isolating_failures(backend, batch, [str(i) for i in range(10)], prompts)
    for col in prompts:
        assert [c.error is not None for c in result[col]] == [i in (3, 7) for i in range(10)]
        assert [c.text for c in result[col] if c.error is None] == [
            f"{col} {i}" for i in range(10) if i not in (3, 7)
        ]
    assert "engine rejected" in result["caption"][3].error


def test_undecodable_images_in_a_shard_become_rejects_and_the_rest_is_captioned(workspace):
    good = [encode_image(im) for im in images(5)]
    rows = [
        {"key": f"k{i}", "image": data, "label": 0, "class_name": "x", "width": 64, "height": 64}
        for i, data in enumerate([good[0], b"\x89PNG\r\n\x1a\n garbage", good[1], b"", good[2]])
    ]
    source = Artifact(workspace, "download", "handmade")
    source.write_shard(0, pa.Table.from_pylist(rows, schema=IMAGES))
    cfg = load_config("tiny", ["cutmix.enabled=false", "recaption.max_new_tokens=4"], str(workspace))
    target = Artifact(workspace, "recaption", "handmade")
    info = caption_shard(cfg.recaption, target, 0, source)
    assert (info.rows, info.rejects) == (3, 2)
    assert target.read_shard(0)["key"].to_pylist() == ["k0", "k2", "k4"]
    reasons = {r.key: r.reason for r in target.shard_rejects(0)}
    assert (
        reasons["k3"] == "empty file" and reasons["k1"] in ("truncated", "decode error") and len(reasons) == 2
    )


def test_recaption_stage_aligns_with_image_shards_with_several_prompts(prefect_harness, workspace):
    overrides = [
        "cutmix.enabled=false",
        "download.max_images=40",
        "download.shard_size=16",
        "recaption.model=tiny:llava",  # random weights: every caption runs to max_new_tokens
        "recaption.max_new_tokens=8",
        "recaption.extra_prompts={short: 'describe the image in a few words'}",
    ]
    cfg = load_config("tiny", overrides, str(workspace))
    download_flow(cfg)
    summary = recaption_flow(cfg)
    plan = Plan(cfg)
    assert summary["rows"] == 40 and summary["complete"]
    manifest = plan.captions.read_manifest()
    assert manifest["model"] == "tiny:llava" and manifest["sampling"]["max_new_tokens"] == 8
    assert (
        manifest["truncated"] == 40 and manifest["truncated_share"] == 1.0
    )  # random weights never emit </s>
    assert manifest["captioned"] == 40 and manifest["images_per_second_per_engine"] > 0
    assert set(manifest["prompts"]) == {"caption", "caption_short"}
    for i in range(3):
        shard = plan.captions.read_shard(i)
        assert shard["key"].to_pylist() == plan.images.read_shard(i)["key"].to_pylist()
        assert set(shard["tokens"].to_pylist()) == {8}
        assert shard.column_names[-1] == "caption_short" and None not in shard["caption_short"].to_pylist()


def test_trained_captioner_through_vllm_matches_the_ground_truth(prefect_harness, workspace):
    """The tiny preset's captioner, served by the real engine, graded against the shapes world's truth."""
    cfg = load_config("tiny", ["cutmix.enabled=false", "download.max_images=128"], str(workspace))
    download_flow(cfg)
    summary = recaption_flow(cfg)
    truth = summary["ground_truth"]
    assert truth["images"] == 128 and truth["exact"] >= 0.95
    assert min(truth[k] for k in ("count", "colour", "shape", "size", "position")) >= 0.95
    manifest = Plan(cfg).captions.read_manifest()
    assert manifest["ground_truth"] == truth and manifest["truncated"] == 0
    assert "Against ground truth (128 images)" in summary_markdown(manifest)


def test_released_models_free_the_engine_and_the_next_stage_loads_its_own(prefect_harness, workspace):
    """What the pipeline does between stages: no captioner engine stays alive beside latents and training."""
    import gc
    import weakref

    from t2i.models import captioners
    from t2i.tasks.model_cache import release_models

    cfg = load_config("tiny", ["cutmix.enabled=false", "download.max_images=8", "download.shard_size=8"],
                      str(workspace))  # fmt: skip
    download_flow(cfg)
    recaption_flow(cfg)
    engine = weakref.ref(captioners._ENGINE_SLOT["llm"])
    release_models()
    gc.collect()
    assert engine() is None and not captioners._ENGINE_SLOT
    image = Image.new("RGB", (32, 32), "red")
    again = load_captioner(cfg.recaption, workspace).caption([image], [""], {"caption": "describe the image"})
    assert again["caption"][0].text and captioners._ENGINE_SLOT["llm"] is not None


def test_ground_truth_grading_is_real(prefect_harness, workspace):
    """Class-name captions share no phrase with the scenes' captions: graded, they score zero exact."""
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", "download.max_images=16", "recaption.backend=template"],
        str(workspace),
    )
    download_flow(cfg)
    truth = recaption_flow(cfg)["ground_truth"]
    assert truth["images"] == 16 and truth["exact"] == 0.0 and truth["position"] == 0.0


def test_template_backend_writes_class_name_captions(prefect_harness, workspace):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", "download.max_images=10", "recaption.backend=template"],
        str(workspace),
    )
    download_flow(cfg)
    recaption_flow(cfg)
    plan = Plan(cfg)
    rows = plan.captions.read_shard(0).to_pylist()
    names = plan.images.read_shard(0)["class_name"].to_pylist()
    assert [r["caption"] for r in rows] == [f"An image of {n}" for n in names]
    assert {r["model"] for r in rows} == {"template"}


def test_parts_are_disjoint_and_cover_every_shard():
    parts = [part_shards(10, (k, 3)) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == list(range(10))
    assert parts[0] == [0, 3, 6, 9]


SPLIT = [
    "cutmix.enabled=false",
    "download.max_images=64",
    "download.shard_size=16",
    "recaption.max_new_tokens=6",
]


@pytest.mark.slow
def test_two_parts_with_two_engines_equal_one_worker(prefect_harness, workspace, tmp_path):
    """Part 1/2 on two engine processes, then part 2/2 in-process: exactly the captions of one worker."""
    reference_ws = tmp_path / "reference"
    shutil.copytree(workspace, reference_ws)
    reference = load_config("tiny", SPLIT, str(reference_ws))
    download_flow(reference)
    recaption_flow(reference)

    first = load_config(
        "tiny", ["cutmix.enabled=false", *SPLIT, "recaption.part=1/2", "recaption.workers=2"], str(workspace)
    )
    download_flow(first)
    summary = recaption_flow(first)
    plan = Plan(first)
    assert summary["complete"] is False and not plan.captions.is_complete()
    assert plan.captions.done_shards(4) == [0, 2]
    second = load_config("tiny", ["cutmix.enabled=false", *SPLIT, "recaption.part=2/2"], str(workspace))
    assert recaption_flow(second)["complete"] is True
    assert Plan(second).captions.root == plan.captions.root  # parts and workers never change the fingerprint
    ref = Plan(reference).captions
    for i in range(4):
        assert plan.captions.read_shard(i).equals(ref.read_shard(i))


def test_imported_captions_round_trip_through_export(prefect_harness, workspace, tmp_path):
    from t2i.data.caption_sets import export_captions

    cfg = load_config("tiny", ["cutmix.enabled=false", "download.max_images=30", "download.shard_size=8", "recaption.backend=template",
                               "recaption.template=a picture of a {class_name}"], str(workspace))  # fmt: skip
    download_flow(cfg)
    recaption_flow(cfg)
    plan = Plan(cfg)
    out = tmp_path / "captions.parquet"
    export_captions(plan.captions, plan.images, plan.num_shards, str(out))

    imported = load_config("tiny", ["cutmix.enabled=false", "download.max_images=30", "download.shard_size=8", "recaption.backend=import",
                                    f"recaption.captions_source={out}"], str(workspace))  # fmt: skip
    assert recaption_flow(imported)["rows"] == 30
    again = Plan(imported).captions
    assert again.root != plan.captions.root
    for i in range(plan.num_shards):
        assert (
            again.read_shard(i)["caption"].to_pylist() == plan.captions.read_shard(i)["caption"].to_pylist()
        )

    # a CSV keyed by bare file names (as published caption sets are) aligns too; a missing key is a reject
    csv = tmp_path / "captions.csv"
    keys = [
        k.split("-")[-1] for i in range(plan.num_shards) for k in plan.images.read_shard(i)["key"].to_pylist()
    ]
    csv.write_text("image_id,text\n" + "".join(f"shapes-train-{k}.png,caption {k}\n" for k in keys[1:]))
    by_name = load_config("tiny", ["cutmix.enabled=false", "download.max_images=30", "download.shard_size=8", "recaption.backend=import",
                                   f"recaption.captions_source={csv}"], str(workspace))  # fmt: skip
    summary = recaption_flow(by_name)
    assert summary["rows"] == 29 and summary["rejects_by_reason"] == {"no caption": 1}
    assert Plan(by_name).captions.read_shard(0)["caption"].to_pylist()[0] == f"caption {keys[1]}"


def test_a_shard_where_every_item_fails_is_an_error_not_a_shard_of_rejects(workspace, monkeypatch):
    import t2i.tasks.recaption as rc

    good = [encode_image(im) for im in images(3)]
    rows = [
        {"key": f"k{i}", "image": d, "label": 0, "class_name": "x", "width": 64, "height": 64}
        for i, d in enumerate(good)
    ]
    source = Artifact(workspace, "download", "handmade")
    source.write_shard(0, pa.Table.from_pylist(rows, schema=IMAGES))
    cfg = load_config(
        "tiny",
        [
            "cutmix.enabled=false",
        ],
        str(workspace),
    )

    class BrokenEngine:
        model_id = "broken"

        def caption(self, batch, names, prompts):
            raise RuntimeError("CUDA error: device lost")

    broken = BrokenEngine()
    monkeypatch.setattr(rc, "load_captioner", lambda cfg, ws: broken)  # noqa: ARG005
    target = Artifact(workspace, "recaption", "handmade")
    with pytest.raises(
        RuntimeError, match="every item of shard 0 failed; first error: RuntimeError: CUDA error"
    ):
        caption_shard(cfg.recaption, target, 0, source)
    assert not target.has_shard(0)
