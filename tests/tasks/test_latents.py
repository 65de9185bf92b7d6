"""VAE latents: the stored moments are the real posterior of the configured AutoencoderKL, in float16."""

import json

import numpy as np
import torch

from t2i.data.imaging import center_crop_resize, decode_image, to_tensor_range
from t2i.flows.config import load_config
from t2i.flows.cutmix import cutmix_flow
from t2i.flows.download import download_flow
from t2i.flows.latents import latents_flow
from t2i.flows.plan import Plan
from t2i.models.loading import resolve_model
from t2i.models.vae import decode_latents, load_vae
from t2i.tasks.latents import SHAPE_META_KEY

NO_TEXT = "text.mode=online"  # the preset also embeds captions here; these tests run latents without them


def test_latents_store_posterior_mean_and_std(prefect_harness, workspace):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", NO_TEXT, "download.max_images=12", "download.shard_size=5"],
        str(workspace),
    )
    download_flow(cfg)
    latents_flow(cfg)
    plan = Plan(cfg)
    manifest = plan.latents.read_manifest()
    assert manifest["rows"] == 12 and manifest["latent_shape"] == [4, 16, 16] and manifest["latent_std"] > 0
    table = plan.latents.read_shard(2)
    assert json.loads(table.schema.metadata[SHAPE_META_KEY]) == [4, 16, 16]
    assert table["key"].to_pylist() == plan.images.read_shard(2)["key"].to_pylist()

    vae = load_vae(resolve_model(cfg.latents.vae, workspace))
    image = decode_image(plan.images.read_shard(2)["image"][0].as_py())
    x = torch.from_numpy(to_tensor_range(center_crop_resize(image, 64)))[None]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mean = np.frombuffer(table["mean"][0].as_py(), np.float16).reshape(4, 16, 16)
    std = np.frombuffer(table["std"][0].as_py(), np.float16).reshape(4, 16, 16)
    np.testing.assert_allclose(mean, dist.mean[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(std, dist.std[0].numpy(), rtol=2e-3, atol=1e-4)
    pixels = decode_latents(vae, torch.from_numpy(mean.astype(np.float32))[None])
    assert pixels.shape == (1, 64, 64, 3) and pixels.dtype == np.uint8


def test_changing_resolution_lands_in_a_new_artifact_and_keeps_the_old(prefect_harness, workspace):
    base = ["cutmix.enabled=false", NO_TEXT, "download.max_images=4"]
    a = load_config("tiny", base, str(workspace))
    b = load_config("tiny", [*base, "latents.resolution=32"], str(workspace))
    download_flow(a)
    latents_flow(a)
    latents_flow(b)
    pa_, pb = Plan(a).latents, Plan(b).latents
    assert pa_.root != pb.root and pa_.is_complete() and pb.is_complete()
    assert pb.read_manifest()["latent_shape"] == [4, 8, 8]


def test_manifest_reports_reconstruction_quality_of_the_trained_vae(prefect_harness, workspace):
    cfg = load_config("tiny", ["cutmix.enabled=false", NO_TEXT, "download.max_images=64"], str(workspace))
    download_flow(cfg)
    latents_flow(cfg)
    quality = Plan(cfg).latents.read_manifest()["reconstruction"]
    assert quality["images"] == 64 and quality["psnr"] > 25
    assert quality["shapes_score"] >= 0.95  # every object still readable, with its attributes


def test_reconstruction_quality_tells_a_random_vae_from_the_trained_one(prefect_harness, workspace):
    cfg = load_config(
        "tiny",
        ["cutmix.enabled=false", NO_TEXT, "download.max_images=32", "latents.vae=tiny:vae"],
        str(workspace),
    )
    download_flow(cfg)
    latents_flow(cfg)
    quality = Plan(cfg).latents.read_manifest()["reconstruction"]
    assert quality["psnr"] < 15 and quality["shapes_score"] < 0.2


def test_two_latents_workers_write_what_one_process_writes(
    prefect_harness, workspace, tmp_path, caplog, monkeypatch
):
    """On a machine where a scheduler gave the job GPUs 4 and 5 (CUDA_VISIBLE_DEVICES=4,5, the GPU count faked
    for this CPU machine), each GPU gets a device process with its own VAE, started once for the images and
    the composites, each on its own GPU as the process itself reports; they write what one process writes."""
    import re
    import shutil

    base = [NO_TEXT, "download.max_images=20", "download.shard_size=5"]
    one = load_config("tiny", base, str(workspace))
    download_flow(one)
    cutmix_flow(one)
    shutil.copytree(workspace, tmp_path / "other")
    two = load_config("tiny", base, str(tmp_path / "other"))
    latents_flow(one)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the processes themselves see this CPU's none
    summary = latents_flow(two)
    assert caplog.text.count("[latents] 2 device processes: [['4'], ['5']]") == 1
    reported = re.findall(r"\[latents\] process \d: pid \d+, CUDA_VISIBLE_DEVICES=(\S+)", caplog.text)
    assert sorted(reported) == ["4", "5"]
    assert summary["complete"] and summary["composites"]["complete"]
    for name, images in Plan(two).image_sets():
        ours, theirs = Plan(two).latents_of(images), Plan(one).latents_of(dict(Plan(one).image_sets())[name])
        assert ours.root.name == theirs.root.name and ours.read_manifest()["rows"] == 20
        for i in range(4):
            a, b = theirs.read_shard(i), ours.read_shard(i)
            assert a["key"].to_pylist() == b["key"].to_pylist()
            for column in ("mean", "std"):
                x, y = (np.frombuffer(b"".join(t[column].to_pylist()), np.float16) for t in (a, b))
                np.testing.assert_allclose(
                    x, y, rtol=1e-3, atol=1e-3
                )  # two processes: thread layout may differ
