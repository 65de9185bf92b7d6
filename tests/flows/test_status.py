"""The disk precomputed text takes, as `t2i config` and `t2i status` print it: one estimate function, known
before any work, measured once captions or embeddings exist."""

import json

import pyarrow as pa
import pytest

from t2i.data.schemas import CAPTIONS
from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from t2i.flows.status import OFFSET_BYTES, encoder_dim, text_disk, text_disk_bytes


def test_the_estimate_scales_with_captions_and_halves_from_float32_to_bfloat16():
    one = text_disk_bytes(1_000_000, 150, 2048, "bfloat16")
    assert one == pytest.approx(1_000_000 * (150 * 2048 * 2 + OFFSET_BYTES) + OFFSET_BYTES)
    assert text_disk_bytes(2_560_000, 150, 2048, "bfloat16") == pytest.approx(2.56 * one, rel=1e-9)
    assert text_disk_bytes(1_000_000, 150, 2048, "float32") == pytest.approx(2 * one, rel=1e-4)
    assert text_disk_bytes(1_000_000, 150, 2048, "float16") == one
    assert text_disk_bytes(1_000_000, 75, 2048, "bfloat16") == pytest.approx(one / 2, rel=1e-4)


def test_encoder_width_is_read_never_guessed(tmp_path, workspace):
    assert encoder_dim("google/flan-t5-xl")[0] == 2048
    assert [encoder_dim(f"google/flan-t5-{s}")[0] for s in ("base", "large", "xxl")] == [768, 1024, 4096]
    built = json.loads(next((workspace / "models").glob("tiny-t5-*/config.json")).read_text())
    assert encoder_dim("tiny:t5")[0] == built["d_model"]  # read from t2i.models.tiny without building it
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"d_model": 1536}))
    assert encoder_dim(str(tmp_path / "enc")) == (1536, f"d_model from {tmp_path / 'enc' / 'config.json'}")
    dim, why = encoder_dim(str(tmp_path / "nothing-here"))
    assert dim is None and "unknown" in why
    assert (
        text_disk(load_config("tiny", [f"text.encoder={tmp_path}/nothing-here"], str(tmp_path))).bytes is None
    )


def test_the_imagenet_preset_before_download_is_per_million_captions(tmp_path):
    est = text_disk(load_config("imagenet256", [], str(tmp_path / "ws")))
    assert est.captions is None and est.mean_tokens == 201  # 200 new tokens + </s>, under max_length 256
    line = est.line()
    assert line.startswith("precomputed text: ~823 GB per million captions (")
    assert "× 2048 (d_model of google/flan-t5-xl) × 2 bytes (bf16)" in line
    assert "estimated from recaption.max_new_tokens=200" in line and line.endswith(
        "text.mode=online needs none"
    )
    assert not (tmp_path / "ws").exists()  # neither the source listed nor a model built
    capped = text_disk(load_config("imagenet256", ["recaption.max_new_tokens=400"], str(tmp_path / "ws")))
    assert capped.mean_tokens == 256
    bounded = text_disk(load_config("imagenet256", ["download.max_images=1000"], str(tmp_path / "ws")))
    assert bounded.captions == 2000 and "at most: download.max_images=1000" in bounded.line()
    online = text_disk(load_config("imagenet256", ["text.mode=online"], str(tmp_path / "ws"))).line()
    assert online.startswith(
        "precomputed text: none (text.mode=online); text.mode=precomputed would take ~823 GB"
    )


def test_captions_give_a_measured_mean_before_any_embedding(tmp_path):
    cfg = load_config(
        "tiny",
        [
            "download.max_images=64",
            "download.shard_size=32",
            "cutmix.enabled=false",
            "recaption.backend=vllm",
        ],
        str(tmp_path),
    )
    assert text_disk(cfg).captions == 64 and text_disk(cfg).mean_tokens == 33  # max_new_tokens 32 + </s>
    captions = Plan(cfg).captions
    rows = [{"key": f"k{i}", "caption": "x", "tokens": t} for i, t in enumerate([9, 19, None, 200])]
    captions.write_shard(0, pa.Table.from_pylist(rows, schema=CAPTIONS))
    est = text_disk(cfg)
    assert est.mean_tokens == pytest.approx((10 + 20 + 64) / 3)  # + </s>, capped at text.max_length=64
    assert "measured over 3 captions' generated tokens" in est.line()
