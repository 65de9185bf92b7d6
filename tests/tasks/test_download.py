"""The download stage on real files: good images kept (as RGB), bad ones rejected with a reason, nothing lost."""

import io

import numpy as np
import pytest
from PIL import Image

from t2i.data.imaging import decode_image
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.plan import Plan


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """ImageNet layout (class/*.ext) mixing good images and every kind of bad file the issue lists."""
    root = tmp_path / "imagenet"
    good, bad = root / "n01440764", root / "n02102040"
    good.mkdir(parents=True)
    bad.mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    (good / "good1.JPEG").write_bytes(_bytes(rgb, "JPEG"))
    (good / "good2.png").write_bytes(_bytes(rgb, "PNG"))
    (good / "cmyk.jpg").write_bytes(_bytes(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG"))
    (good / "gray.png").write_bytes(_bytes(Image.new("L", (30, 30), 128), "PNG"))
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 15, 30))
    (good / "rgba.png").write_bytes(_bytes(rgba, "PNG"))
    jpeg = _bytes(rgb, "JPEG")
    (bad / "corrupt.JPEG").write_bytes(
        jpeg[:200] + bytes(np.random.default_rng(1).integers(0, 255, 800, dtype=np.uint8))
    )
    png = _bytes(rgb, "PNG")
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "empty.JPEG").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is a text file, not an image\n")
    (root / "README.txt").write_text("ignored: not an image extension")
    return root


def test_folder_source_keeps_every_decodable_image_and_rejects_the_rest(
    prefect_harness, workspace, messy_folder
):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", f"download.source=folder:{messy_folder}", "download.shard_size=3"],
        str(workspace),
    )
    summary = download_flow(cfg)
    art = Plan(cfg).images
    manifest = art.read_manifest()
    rows = [r for i in range(len(manifest["shards"])) for r in art.read_shard(i).to_pylist()]
    kept = {r["key"].split("/")[-1]: r for r in rows}
    assert set(kept) == {"good1.JPEG", "good2.png", "cmyk.jpg", "gray.png", "rgba.png"}
    assert summary["rows"] == 5 and manifest["rejects"] == 4 and len(manifest["shards"]) == 3
    rejects = {
        r["key"].split("/")[-1]: r["reason"] for i in range(3) for r in map(vars, art.shard_rejects(i))
    }
    assert rejects == {
        "corrupt.JPEG": "decode error",
        "truncated.png": "truncated",
        "empty.JPEG": "empty file",
        "notes.jpg": "not an image",
    }
    assert manifest["ignored_files"] == 1
    for row in rows:  # every kept image is stored as RGB with its class from the folder name
        image = decode_image(row["image"])
        assert image.mode == "RGB" and image.size == (row["width"], row["height"])
        assert row["class_name"] in {"n01440764", "n02102040"} and row["label"] in (0, 1)
    red = np.asarray(decode_image(kept["cmyk.jpg"]["image"]))
    assert red[..., 0].mean() > 200 and red[..., 1:].mean() < 60  # CMYK (0,255,255,0) is red
    half = np.asarray(decode_image(kept["rgba.png"]["image"]))
    assert (half[:, :10] > 240).all() and (half[:, 20:, 0] > 240).all() and (half[:, 20:, 1] < 20).all()


def test_rerun_of_a_complete_stage_skips_and_changes_nothing(prefect_harness, workspace, messy_folder):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", f"download.source=folder:{messy_folder}", "download.shard_size=4"],
        str(workspace),
    )
    download_flow(cfg)
    art = Plan(cfg).images
    before = {p.name: p.stat().st_mtime_ns for p in art.root.iterdir()}
    assert download_flow(cfg)["skipped"] is True
    assert {p.name: p.stat().st_mtime_ns for p in art.root.iterdir()} == before


def test_flat_folder_has_no_labels(prefect_harness, workspace, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(flat / f"{i}.png")
    cfg = load_config("tiny", ["cutmix.enabled=false", f"download.source=folder:{flat}"], str(workspace))
    download_flow(cfg)
    rows = Plan(cfg).images.read_shard(0).to_pylist()
    assert [r["key"] for r in rows] == ["0.png", "1.png", "2.png"]
    assert {r["label"] for r in rows} == {-1} and {r["class_name"] for r in rows} == {None}


def test_hf_dataset_saved_locally(prefect_harness, workspace, tmp_path):
    import datasets

    images = [Image.new("RGB", (24, 24), (0, 0, 200)), Image.new("RGB", (24, 24), (200, 0, 0))]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["tench", "goldfish"])}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": [1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", f"download.source=hf:{tmp_path / 'saved'}", "download.max_images=null"],
        str(workspace),
    )
    download_flow(cfg)
    rows = Plan(cfg).images.read_shard(0).to_pylist()
    assert [(r["label"], r["class_name"]) for r in rows] == [(1, "goldfish"), (0, "tench")]
    assert np.asarray(decode_image(rows[0]["image"]))[0, 0].tolist() == [0, 0, 200]


def test_synthetic_source_is_deterministic_with_ground_truth(prefect_harness, workspace):
    cfg = load_config(
        "tiny", ["cutmix.enabled=false", "download.max_images=20", "download.shard_size=8"], str(workspace)
    )
    download_flow(cfg)
    art = Plan(cfg).images
    assert art.read_manifest()["rows"] == 20 and len(art.read_manifest()["shards"]) == 3
    from t2i.data import shapes

    row = art.read_shard(1).to_pylist()[0]
    scene = shapes.scene(8, seed=0, split="train")
    assert row["caption_gt"] == scene.caption and row["class_name"] == scene.class_name
    assert np.array_equal(np.asarray(decode_image(row["image"])), np.asarray(shapes.render(scene)))
