"""Recaptioning on the real engines: vLLM (CPU build) on the tiny LLaVA, transformers as the reference."""

import numpy as np
import pytest
from PIL import Image

from flows.config import load_config
from flows.download import download_flow
from flows.plan import Plan
from flows.recaption import recaption_flow
from models.captioners import Caption, TransformersCaptioner, postprocess_caption
from tasks.recaption import caption_isolating_failures, load_captioner


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_postprocess_keeps_one_line_up_to_the_last_full_stop():
    assert postprocess_caption("A cat.\nIt sits on a mat. And then") == "A cat. It sits on a mat."
    assert postprocess_caption("  no full stop here \n") == "no full stop here"


@pytest.fixture(scope="module")
def vllm_captioner(tiny_models):
    cfg = load_config("tiny", ["recaption.max_new_tokens=12"], str(tiny_models.parent))
    return load_captioner(cfg.recaption, tiny_models.parent)


def test_vllm_greedy_tokens_match_transformers_generate(vllm_captioner, tiny_models):
    batch = images(6)
    ours = vllm_captioner.caption(batch, [""] * 6)
    reference = TransformersCaptioner(
        str(tiny_models / "tiny-llava-v1"),
        prompt="describe the image",
        max_new_tokens=12,
        dtype="float32",
        batch_size=3,
    ).caption(batch, [""] * 6)
    assert all(c.tokens == 12 and c.finish_reason == "length" for c in ours)  # random weights never stop
    vllm_ids = [
        list(o.outputs[0].token_ids)
        for o in vllm_captioner.llm.generate(
            [{"prompt": vllm_captioner.prompt, "multi_modal_data": {"image": im}} for im in batch],
            vllm_captioner.sampling,
            use_tqdm=False,
        )
    ]
    hf_ids = _hf_token_ids(tiny_models, batch)
    assert [ids[:8] for ids in vllm_ids] == [ids[:8] for ids in hf_ids]
    assert sum(a.text.strip()[:5] == b.text.strip()[:5] for a, b in zip(ours, reference, strict=True)) >= 5


def _hf_token_ids(tiny_models, batch):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models.captioners import chat_prompt

    path = str(tiny_models / "tiny-llava-v1")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    prompt = chat_prompt(processor, "describe the image")
    out = []
    for im in batch:
        inputs = processor(images=[im], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        out.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return out


class FlakyBackend:
    """A backend that fails on whole batches containing a poisoned image, like an engine rejecting one input."""

    model_id = "flaky"

    def __init__(self, poisoned: set[int]):
        self.poisoned, self.calls = poisoned, 0

    def caption(self, batch, names):
        self.calls += 1
        if any(id(im) in self.poisoned for im in batch):
            raise ValueError("engine rejected the batch")
        return [Caption(text=f"ok {n}") for n in names]


def test_a_failing_item_is_isolated_and_the_rest_kept():
    batch = images(10)
    backend = FlakyBackend({id(batch[3]), id(batch[7])})
    result = caption_isolating_failures(backend, batch, [str(i) for i in range(10)])
    assert [c.error is not None for c in result] == [i in (3, 7) for i in range(10)]
    assert [c.text for c in result if c.error is None] == [f"ok {i}" for i in range(10) if i not in (3, 7)]
    assert "engine rejected" in result[3].error


def test_recaption_stage_aligns_with_image_shards(prefect_harness, workspace):
    overrides = ["download.max_images=40", "download.shard_size=16", "recaption.max_new_tokens=8"]
    cfg = load_config("tiny", overrides, str(workspace))
    download_flow(cfg)
    summary = recaption_flow(cfg)
    plan = Plan(cfg)
    assert summary["rows"] == 40
    manifest = plan.captions.read_manifest()
    assert manifest["model"] == "tiny:llava" and manifest["sampling"]["max_new_tokens"] == 8
    assert (
        manifest["truncated"] == 40 and manifest["truncated_share"] == 1.0
    )  # random weights never emit </s>
    for i in range(3):
        assert plan.captions.read_shard(i)["key"].to_pylist() == plan.images.read_shard(i)["key"].to_pylist()
        assert set(plan.captions.read_shard(i)["tokens"].to_pylist()) == {8}


def test_template_backend_writes_class_name_captions(prefect_harness, workspace):
    cfg = load_config("tiny", ["download.max_images=10", "recaption.backend=template"], str(workspace))
    download_flow(cfg)
    recaption_flow(cfg)
    plan = Plan(cfg)
    rows = plan.captions.read_shard(0).to_pylist()
    names = plan.images.read_shard(0)["class_name"].to_pylist()
    assert [r["caption"] for r in rows] == [f"An image of {n}" for n in names]
    assert {r["model"] for r in rows} == {"template"}
