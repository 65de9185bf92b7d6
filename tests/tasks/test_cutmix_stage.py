"""The cutmix stage on the shapes world: one composite per image, another class pasted, deterministic, resumable."""

import json
import shutil

import numpy as np

from t2i.data.imaging import decode_image
from t2i.flows.config import load_config
from t2i.flows.cutmix import cutmix_flow
from t2i.flows.download import download_flow
from t2i.flows.plan import Plan

OVERRIDES = ["download.max_images=48", "download.shard_size=12", "cutmix.partner_shards=2"]


def test_composites_record_layout_box_and_a_partner_of_another_class(prefect_harness, workspace, tmp_path):
    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    summary = cutmix_flow(cfg)
    plan = Plan(cfg)
    assert summary["rows"] == 48 and summary["complete"]
    assert set(plan.composites.read_manifest()["layouts"]) <= {"half", "quarter", "ninth", "sixteenth"}
    base = {r["key"]: r for i in range(4) for r in plan.images.read_shard(i).to_pylist()}
    for i in range(4):
        rows = plan.composites.read_shard(i).to_pylist()
        assert [r["key"] for r in rows] == [
            f"cutmix0/{k}" for k in plan.images.read_shard(i)["key"].to_pylist()
        ]
        for row in rows:
            attrs = json.loads(row["attributes"])
            assert attrs["base_key"] in base and attrs["partner_key"] in base
            assert base[attrs["partner_key"]]["label"] != row["label"]  # the pasted image is another class
            box = attrs["box"]
            image = np.asarray(decode_image(row["image"]))
            partner = np.asarray(decode_image(base[attrs["partner_key"]]["image"]))
            assert image.shape == (64, 64, 3)
            inside = image[box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
            if attrs["layout"] == "half":  # the same half of the partner, pixel for pixel
                expected = partner[
                    box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]
                ]
                assert np.array_equal(inside, expected)

    # same config elsewhere: identical composites
    other = load_config("tiny", OVERRIDES, str(tmp_path / "other"))
    shutil.copytree(workspace / "models", tmp_path / "other" / "models")
    download_flow(other)
    cutmix_flow(other)
    for i in range(4):
        assert Plan(other).composites.read_shard(i).equals(plan.composites.read_shard(i))


def test_rerun_redoes_only_missing_shards(prefect_harness, workspace):
    cfg = load_config("tiny", OVERRIDES, str(workspace))
    download_flow(cfg)
    cutmix_flow(cfg)
    art = Plan(cfg).composites
    before = {i: art.shard_path(i).stat().st_mtime_ns for i in range(4)}
    reference = art.read_shard(2)
    art.shard_path(2).unlink()
    art.manifest_path.unlink()
    assert cutmix_flow(cfg)["complete"]
    assert {i: art.shard_path(i).stat().st_mtime_ns for i in (0, 1, 3)} == {i: before[i] for i in (0, 1, 3)}
    assert art.read_shard(2).equals(reference)


def test_disabled_cutmix_is_skipped_and_not_required(prefect_harness, workspace):
    cfg = load_config("tiny", [*OVERRIDES, "cutmix.enabled=false"], str(workspace))
    assert cutmix_flow(cfg)["disabled"] is True
    assert [label for label, _, _ in Plan(cfg).artifacts()] == [
        "download",
        "recaption",
        "latents",
        "text embeddings",
        "train",
        "evaluate",
    ]
