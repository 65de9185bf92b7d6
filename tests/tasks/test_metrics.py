"""Image-set metrics: torch-fidelity on the small random-conv features, the Inception weights rule, CLIPScore."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.data import shapes
from t2i.tasks.metrics import clip_score, fidelity_metrics


def _shapes(start: int, count: int) -> list[Image.Image]:
    return [shapes.render(shapes.scene(i)) for i in range(start, start + count)]


def _noise(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)]


def _flat(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(count)]


def test_small_features_put_a_set_next_to_itself_and_its_distribution():
    real = _shapes(0, 40)
    itself = fidelity_metrics(real, real, feature_extractor="small")
    same_world = fidelity_metrics(real, _shapes(40, 40), feature_extractor="small")
    noise = fidelity_metrics(real, _noise(40), feature_extractor="small")
    assert abs(itself["fid"]) < 1e-3
    assert itself["precision"] == 1.0 and itself["recall"] == 1.0
    assert noise["fid"] > 20 * same_world["fid"] > 0
    # KID's unbiased estimate of zero is noisy (and can be negative) at 40 samples; noise is far above it.
    assert abs(itself["kid_mean"]) < 0.2 * noise["kid_mean"]
    assert abs(same_world["kid_mean"]) < 0.2 * noise["kid_mean"]
    assert noise["precision"] == 0.0 and noise["recall"] == 0.0
    assert same_world["precision"] > 0.9 and same_world["recall"] > 0.9


def test_small_features_tell_shapes_from_flat_colour():
    real = _shapes(0, 40)
    same_world = fidelity_metrics(real, _shapes(40, 40), feature_extractor="small")
    flat = fidelity_metrics(real, _flat(40), feature_extractor="small")
    assert flat["fid"] > 20 * same_world["fid"]
    assert flat["kid_mean"] > 5 * abs(same_world["kid_mean"])
    assert flat["precision"] < 0.1  # no flat image looks like a shapes scene


def test_small_results_are_labelled_deterministic_and_work_on_tiny_sets():
    real, fake = _shapes(0, 6), _noise(6)  # arrays and PIL images both accepted
    first = fidelity_metrics(real, fake, feature_extractor="small")  # default kid_subset_size=1000
    torch.manual_seed(123)  # the extractor's weights come from its own seed, not the global RNG
    again = fidelity_metrics(real, fake, feature_extractor="small")
    assert first == again
    assert first["feature_extractor"] == "small" and "not Inception" in first["note"]
    assert "isc_mean" not in first  # IS needs Inception's class logits
    assert first["kid_subset_size"] == 6 and first["num_real"] == first["num_fake"] == 6
    assert all(math.isfinite(first[k]) for k in ("fid", "kid_mean", "kid_std", "precision", "recall"))


def test_bad_inputs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="at least 4"):
        fidelity_metrics(_shapes(0, 3), _shapes(3, 3), feature_extractor="small")
    mixed = _shapes(0, 4) + [Image.new("RGB", (32, 32))]
    with pytest.raises(ValueError, match="several sizes"):
        fidelity_metrics(mixed, _shapes(0, 5), feature_extractor="small")


def test_missing_inception_weights_say_how_to_get_them(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    for weights in (None, tmp_path / "pt_inception-2015-12-05-6726825d.pth"):
        with pytest.raises(FileNotFoundError, match="evaluate.inception_weights") as err:
            fidelity_metrics(_shapes(0, 4), _shapes(4, 4), inception_weights=weights)
        assert URL_INCEPTION_V3 in str(err.value)


@pytest.mark.skipif(
    not Path(os.environ.get("T2I_INCEPTION_WEIGHTS", "/nonexistent")).is_file(),
    reason="set T2I_INCEPTION_WEIGHTS to the TF-FID Inception weights file to run the real-Inception check",
)
def test_real_inception_scores():
    weights = os.environ["T2I_INCEPTION_WEIGHTS"]
    real = _shapes(0, 4)  # few images: Inception at 299 px is slow on a CPU
    itself = fidelity_metrics(real, real, inception_weights=weights)
    noise = fidelity_metrics(real, _noise(4), inception_weights=weights)
    assert itself["feature_extractor"] == "inception" and abs(itself["fid"]) < 1e-2
    assert noise["fid"] > 10
    assert itself["isc_mean"] >= 1.0 and math.isfinite(noise["isc_mean"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP with a character-level CLIPTokenizer, built offline: 16 text positions to test truncation."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = list(alphabet) + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            small,
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def _cosine_by_hand(path: Path, image: Image.Image, prompt: str) -> float:
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
    return F.cosine_similarity(img, txt).item()


def test_clip_score_is_hundred_times_positive_cosine(tiny_clip):
    scenes = [shapes.scene(i) for i in range(4)]
    images, prompts = [shapes.render(s) for s in scenes], [s.caption[:12] for s in scenes]  # fit 16 tokens
    cosines = [_cosine_by_hand(tiny_clip, im, p) for im, p in zip(images, prompts, strict=True)]
    assert any(c > 0 for c in cosines)  # the seed gives a non-trivial case, not only clamped zeros
    for image, prompt, cos in zip(images, prompts, cosines, strict=True):
        repeated = clip_score([image] * 3, [prompt] * 3, tiny_clip)
        assert repeated == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
    mixed = clip_score(images, prompts, tiny_clip, batch_size=3)  # a padded batch and a ragged last one
    assert mixed == pytest.approx(sum(100 * max(c, 0.0) for c in cosines) / 4, abs=1e-4)
    assert 0.0 <= mixed <= 100.0 and clip_score(images, prompts, tiny_clip, batch_size=3) == mixed


def test_clip_score_truncates_prompts_past_the_text_positions(tiny_clip):
    image = shapes.render(shapes.scene(0))
    long = "a small red circle above a large blue square " * 5  # far more than 16 tokens
    score = clip_score([image], [long], tiny_clip)
    assert math.isfinite(score) and 0.0 <= score <= 100.0
    with pytest.raises(ValueError, match="prompts"):
        clip_score([image], [long, long], tiny_clip)
