"""The source is read once: the listing is cached in the workspace, shards mix classes, a moved dataset maps to
the same artifacts, and nothing after `download` re-opens the raw source."""

import io
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from t2i.flows.cli import main as cli_main
from t2i.flows.config import load_config
from t2i.flows.cutmix import cutmix_flow
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.flows.recaption import recaption_flow
from t2i.flows.status import stage_statuses


def class_folder(root, classes: int, per_class: int, side: int = 16):
    """ImageNet's layout, class-sorted on disk: `n00000000/0000.JPEG`, … small random JPEGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
            (folder / f"{c:04d}_{i:04d}.JPEG").write_bytes(buf.getvalue())
    return root


def shard_classes(art, num_shards: int) -> list[set[str]]:
    return [
        set(art.read_shard(i, columns=["class_name"])["class_name"].to_pylist()) for i in range(num_shards)
    ]


def stage_files(ws) -> dict:
    """mtime of every artifact file (the listing cache under sources/ is allowed to grow)."""
    return {
        p: p.stat().st_mtime_ns
        for p in ws.rglob("*")
        if p.is_file() and p.relative_to(ws).parts[0] not in ("models", "sources")
    }


RENAME = [
    "download.shard_size=8",
    "cutmix.partner_shards=1",
    "recaption.backend=template",
]


def _all_stages(cfg) -> list[dict]:
    """download → cutmix → recaption → latents (with text embeddings), each stage's summary in order."""
    download, cutmix = download_flow(cfg), cutmix_flow(cfg)
    recaption, latents = recaption_flow(cfg), latents_flow(cfg)
    return [
        download,
        cutmix,
        recaption,
        recaption["composites"],
        latents,
        latents["composites"],
        latents["text"],
        latents["composite_text"],
    ]


def test_a_renamed_source_folder_maps_to_the_same_artifacts(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=6, per_class=4)
    cfg = load_config("tiny", [*RENAME, f"download.source=folder:{src}"], str(workspace))
    first = _all_stages(cfg)
    assert all(s["complete"] for s in first) and first[0]["rows"] == 24
    before = stage_files(workspace)
    assert len(before) > 20
    fingerprints = [(label, a.fingerprint) for label, _, a in Plan(cfg).artifacts()]

    moved = src.rename(tmp_path / "mounted-elsewhere")
    cfg2 = load_config("tiny", [*RENAME, f"download.source=folder:{moved}"], str(workspace))
    assert [(label, a.fingerprint) for label, _, a in Plan(cfg2).artifacts()] == fingerprints
    again = _all_stages(cfg2)
    assert all(s["skipped"] and s["complete"] for s in again), again
    assert stage_files(workspace) == before


def test_plan_and_status_after_download_never_touch_the_source(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=5, per_class=4)
    overrides = ["cutmix.enabled=false", "download.shard_size=6", f"download.source=folder:{src}"]
    cfg = load_config("tiny", overrides, str(workspace))
    download_flow(cfg)
    fingerprint = Plan(cfg).images.fingerprint
    shutil.rmtree(src)
    for listing in (workspace / "sources").rglob("*.parquet"):  # the plan reads the small summary only
        listing.unlink()

    plan = Plan(load_config("tiny", overrides, str(workspace)))
    assert plan.images.fingerprint == fingerprint and plan.images.is_complete()
    assert plan.num_shards == 4
    download = stage_statuses(load_config("tiny", overrides, str(workspace)))[0]
    assert (download.stage, download.state) == ("download", "complete")
    assert download_flow(cfg)["skipped"] is True


def test_every_shard_of_a_class_sorted_folder_mixes_many_classes(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=100, per_class=10)
    cfg = load_config(
        "tiny",
        [
            "cutmix.enabled=false",
            "download.max_images=null",
            "download.shard_size=50",
            f"download.source=folder:{src}",
            "download.workers=4",
        ],
        str(workspace),
    )
    assert download_flow(cfg)["rows"] == 1000
    plan = Plan(cfg)
    assert plan.num_shards == 20
    # A shard is 50 draws without replacement from 1000 images, 10 per class: a class is absent with
    # probability C(990, 50) / C(1000, 50) = 0.597, so a shard holds 100 × 0.403 ≈ 40.3 classes on average
    # (sd ≈ 2.5). 30 is four sd below; class-sorted shards hold 5.
    counts = [len(c) for c in shard_classes(plan.images, 20)]
    assert min(counts) >= 30, counts
    keys = [k for i in range(20) for k in plan.images.read_shard(i, columns=["key"])["key"].to_pylist()]
    assert len(set(keys)) == 1000
    for i in range(20):  # within a shard, files stay in listing order (directory locality when reading)
        shard_keys = plan.images.read_shard(i, columns=["key"])["key"].to_pylist()
        assert shard_keys == sorted(shard_keys)


def test_cutmix_partners_of_a_100_class_folder_cover_most_classes(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=100, per_class=10)
    cfg = load_config(
        "tiny",
        [
            "download.max_images=null",
            "download.shard_size=50",
            f"download.source=folder:{src}",
            "cutmix.multiplier=4",
            "cutmix.resolution=16",
            "cutmix.partner_shards=3",
            "cutmix.workers=4",
            "download.workers=4",
        ],
        str(workspace),
    )
    download_flow(cfg)
    assert cutmix_flow(cfg)["rows"] == 4000
    plan = Plan(cfg)
    met = defaultdict(list)
    for i in range(plan.num_shards):
        for row in plan.composites.read_shard(i, columns=["class_name", "attributes"]).to_pylist():
            met[row["class_name"]].append(json.loads(row["attributes"])["partner_class_name"])
    assert len(met) == 100 and all(len(v) == 40 for v in met.values())
    distinct = [len(set(v)) for v in met.values()]
    # "Most" = as wide as the recipe's draw from the whole dataset: each class has 40 composites, and 40
    # uniform draws over the other 99 classes give 99 × (1 − (98/99)^40) ≈ 32.9 distinct partner classes
    # (sd ≈ 2.4). We ask for a mean ≥ 28 (85% of that) and every class ≥ 20: with class-sorted shards a pool
    # of 4 shards holds 20 classes, so no class could ever meet more than 19.
    assert np.mean(distinct) >= 28 and min(distinct) >= 20, sorted(distinct)
    assert all(c not in partners for c, partners in met.items())  # always another class


def test_max_images_is_a_seeded_sample_of_the_whole_folder(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=100, per_class=10)

    def sample(ws, seed: int) -> set[str]:
        overrides = [
            "cutmix.enabled=false",
            "download.max_images=200",
            "download.shard_size=100",
            f"download.seed={seed}",
            f"download.source=folder:{src}",
        ]
        cfg = load_config("tiny", overrides, str(ws))
        assert download_flow(cfg)["rows"] == 200
        art = Plan(cfg).images
        return {k for i in range(2) for k in art.read_shard(i, columns=["key"])["key"].to_pylist()}

    kept = sample(workspace, 0)
    # 200 of 1000 images, 10 per class: a class is missed with probability C(990, 200) / C(1000, 200) ≈ 0.107,
    # so the sample spans 100 × 0.893 ≈ 89 classes (sd ≈ 3); the first 200 sorted files span 20.
    classes = {k.split("/")[0] for k in kept}
    assert len(kept) == 200 and len(classes) >= 75, len(classes)
    shutil.copytree(workspace / "models", tmp_path / "other" / "models")
    assert sample(tmp_path / "other", 0) == kept  # same seed elsewhere: the same sample
    other_seed = sample(workspace, 1)
    assert other_seed != kept and len(other_seed & kept) < 100  # ~40 in common by chance


def test_relist_sees_a_changed_folder_and_leaves_old_artifacts_alone(prefect_harness, workspace, tmp_path):
    src = class_folder(tmp_path / "imagenet", classes=3, per_class=4)
    overrides = ["cutmix.enabled=false", "download.shard_size=5", f"download.source=folder:{src}"]
    cfg = load_config("tiny", overrides, str(workspace))
    download_flow(cfg)
    old = Plan(cfg).images
    before = {p: p.stat().st_mtime_ns for p in old.root.iterdir()}

    Image.new("RGB", (16, 16), (9, 9, 9)).save(src / "n00000001" / "new.JPEG")
    assert Plan(cfg).images.fingerprint == old.fingerprint  # the cached listing holds until a relist
    args = ["download", "--relist", "--preset", "tiny", "--workspace", str(workspace)]
    assert cli_main([*args, *(a for o in overrides for a in ("--set", o))]) == 0
    new = Plan(cfg).images
    assert new.fingerprint != old.fingerprint and new.read_manifest()["rows"] == 13
    assert {p: p.stat().st_mtime_ns for p in old.root.iterdir()} == before


def test_a_moved_hf_dataset_keeps_its_fingerprint(prefect_harness, workspace, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.new("RGB", (16, 16), (i * 20, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    overrides = ["cutmix.enabled=false", "download.max_images=4", "download.shard_size=2"]
    cfg = load_config("tiny", [*overrides, f"download.source=hf:{tmp_path / 'saved'}"], str(workspace))
    download_flow(cfg)
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    cfg2 = load_config("tiny", [*overrides, f"download.source=hf:{tmp_path / 'moved'}"], str(workspace))
    assert Plan(cfg2).images.fingerprint == Plan(cfg).images.fingerprint
    assert download_flow(cfg2)["skipped"] is True


def test_moved_tars_keep_their_artifacts_and_a_changed_tar_must_be_relisted(
    prefect_harness, workspace, tmp_path
):
    src = class_folder(tmp_path / "imagenet", classes=5, per_class=8)
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "in-%03d.tar"), maxcount=16, verbose=0) as sink:
        for path in sorted(src.rglob("*.JPEG")):
            sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "cls": path.parent.name})
    overrides = ["cutmix.enabled=false", "download.shard_size=16", "download.max_images=30"]
    cfg = load_config(
        "tiny", [*overrides, f"download.source=wds:{shards}/in-{{000..002}}.tar"], str(workspace)
    )
    assert download_flow(cfg)["rows"] == 30
    fingerprint = Plan(cfg).images.fingerprint
    assert len(set().union(*shard_classes(Plan(cfg).images, 2))) == 5  # a seeded sample of all the tars

    moved = shards.rename(tmp_path / "scratch-copy")
    cfg2 = load_config("tiny", [*overrides, f"download.source=wds:{moved}"], str(workspace))
    assert Plan(cfg2).images.fingerprint == fingerprint and download_flow(cfg2)["skipped"] is True
    shutil.rmtree(moved)  # status reads the workspace only
    assert stage_statuses(cfg2)[0].state == "complete"

    changed = class_folder(tmp_path / "other", classes=2, per_class=3)
    moved.mkdir()
    with wds.ShardWriter(str(moved / "in-%03d.tar"), maxcount=16, verbose=0) as sink:
        for path in sorted(changed.rglob("*.JPEG")):
            sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "cls": path.parent.name})
    cfg3 = load_config(
        "tiny", [*overrides, "download.max_images=5", f"download.source=wds:{moved}"], str(workspace)
    )
    with pytest.raises(FileNotFoundError, match="download.source: 2 listed tars .* are missing"):
        Plan(cfg3).open_source()  # the cached listing names three tars; two are gone
    (moved / "in-001.tar").write_bytes((moved / "in-000.tar").read_bytes())
    (moved / "in-002.tar").write_bytes((moved / "in-000.tar").read_bytes())
    with pytest.raises(RuntimeError, match="changed since they were listed.*--relist"):
        Plan(cfg3).open_source()
    relisted = Plan(cfg3, relist=True).source_summary  # three copies of one tar: its samples once
    assert relisted.count == 18 and relisted.wds["rejected"] == {"duplicate key": 12}


@pytest.mark.parametrize("overrides", [[], ["download.max_images=192", "download.shard_size=48"]])
def test_the_shapes_source_keeps_its_fingerprint(overrides, tmp_path):
    """Published tiny-preset figures were made under these fingerprints; the shapes output did not change."""
    expected = {(): "28659fa78497a24d", ("download.max_images=192",): "85c063ce4bee87a8"}
    cfg = load_config("tiny", overrides, str(tmp_path / "ws"))
    assert Plan(cfg).images.fingerprint == expected[tuple(overrides[:1])]
    assert not (tmp_path / "ws").exists()  # no listing for a generated source
