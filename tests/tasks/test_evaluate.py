"""Evaluation plumbing: prompt sets, the shapes scorer on real images, per-batch resume of sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data import shapes
from t2i.flows.config import load_config
from t2i.tasks.evaluate import load_prompts, shapes_metrics
from t2i.tasks.sampling import image_grid


def test_prompt_sets(tmp_path):
    items = load_prompts("shapes:val", 3)
    assert [p.text for p in items] == [shapes.scene(i, split="val").caption for i in range(3)]
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\n a blue square \n")
    assert [p.text for p in load_prompts(f"file:{f}", 10)] == ["a red circle", "a blue square"]
    with pytest.raises(FileNotFoundError, match="evaluate.prompts"):
        load_prompts(f"file:{tmp_path / 'missing.txt'}", 1)


def test_shapes_metrics_separate_faithful_images_from_noise():
    scenes = [shapes.scene(i, split="val") for i in range(40)]
    faithful = shapes_metrics([shapes.render(s) for s in scenes], scenes)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in scenes]
    random = shapes_metrics(noise, scenes)
    assert faithful["scores"]["overall"] == 1.0 and faithful["scores"]["colour_shape"] == 1.0
    assert random["scores"]["colour_shape"] <= faithful["chance"]["colour_shape"] + 0.05
    assert random["scores"]["overall"] < 0.5


def test_grid_layout():
    grid = image_grid([Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(10)], columns=4, cell=32)
    assert grid.size == (128, 96)
    assert grid.getpixel((32 + 5, 5)) == (20, 0, 0)


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def trained(prefect_harness, workspace):
    from t2i.flows.download import download_flow
    from t2i.flows.latents import latents_flow
    from t2i.flows.recaption import recaption_flow
    from t2i.flows.train import train_flow

    data = ["cutmix.enabled=false", "download.max_images=16", "recaption.backend=template"]
    base = [*data, "train.steps=2", "train.batch_size=4", "train.sample_prompts=0", "evaluate.steps=2"]
    cfg = load_config("tiny", base, str(workspace))
    for run in (download_flow, recaption_flow, latents_flow, train_flow):
        run(cfg)
    return base, workspace


@pytest.mark.skipif(
    not (SHARED / "geneval").is_dir(), reason="GenEval prompts not available (../shared/data)"
)
def test_geneval_folder_has_the_official_structure(trained):
    from t2i.flows.evaluate import evaluate_flow

    base, workspace = trained
    metadata = SHARED / "geneval" / "evaluation_metadata.jsonl"
    sets = [f"evaluate.prompts=geneval:{metadata}", "evaluate.num_prompts=5", "evaluate.images_per_prompt=2"]
    cfg = load_config("tiny", [*base, *sets], str(workspace))
    metrics = evaluate_flow(cfg)["metrics"]
    out = Path(metrics["benchmark_folder"])
    lines = metadata.read_text().splitlines()
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(5)]
    for i in range(5):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == lines[i] + "\n"
        assert json.loads((folder / "metadata.jsonl").read_text())["prompt"] == json.loads(lines[i])["prompt"]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(folder / "samples" / "0000.png").size == (64, 64)


@pytest.mark.skipif(
    not (SHARED / "dpg_bench").is_dir(), reason="DPG-Bench prompts not available (../shared/data)"
)
def test_dpg_bench_writes_a_2x2_grid_per_prompt_named_by_id(trained):
    from t2i.flows.evaluate import evaluate_flow

    base, workspace = trained
    folder = SHARED / "dpg_bench" / "prompts"
    sets = [f"evaluate.prompts=dpg:{folder}", "evaluate.num_prompts=3", "evaluate.images_per_prompt=4"]
    cfg = load_config("tiny", [*base, *sets], str(workspace))
    out = Path(evaluate_flow(cfg)["metrics"]["benchmark_folder"])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]
    assert Image.open(out / "0.png").size == (128, 128)


def test_heldout_captions_are_prompts_and_their_images_the_fid_reference(trained):
    from t2i.flows.evaluate import evaluate_flow
    from t2i.flows.plan import Plan

    base, workspace = trained
    captions = Plan(load_config("tiny", base, str(workspace))).captions.root  # stands in for a held-out split
    cfg = load_config(
        "tiny", [*base, f"evaluate.prompts=heldout:{captions}", "evaluate.num_prompts=12"], str(workspace)
    )
    metrics = evaluate_flow(cfg)["metrics"]
    assert metrics["prompts"] == 12 and "shapes" not in metrics
    fidelity = metrics["fidelity"]
    assert fidelity["feature_extractor"] == "small" and fidelity["num_real"] == fidelity["num_fake"] == 12
    assert fidelity["fid"] > 0 and 0 <= fidelity["precision"] <= 1
    report = (Plan(cfg).evaluation.root / "report.md").read_text()
    assert "FID (small)" in report and "not Inception" in report


def test_several_checkpoints_get_a_comparison_table(trained):
    from t2i.flows.evaluate import evaluate_flow
    from t2i.flows.plan import Plan

    base, workspace = trained
    cfg = load_config("tiny", [*base, "evaluate.checkpoints=[all]", "evaluate.num_prompts=8"], str(workspace))
    metrics = evaluate_flow(cfg)["metrics"]
    assert list(metrics["checkpoints"]) == ["final", "step-00000002"] and metrics["checkpoint"] == "final"
    for name, m in metrics["checkpoints"].items():
        assert "overall" in m["shapes"]["scores"] and m["fidelity"]["num_fake"] == 8, name
        assert len(list((Plan(cfg).evaluation.root / "images" / name).glob("*.png"))) == 8
    report = (Plan(cfg).evaluation.root / "report.md").read_text()
    assert "| checkpoint | shapes overall | FID (small) |" in report
    assert "| step-00000002 |" in report and "| final |" in report


def test_bad_checkpoint_names_and_missing_metric_models_fail_before_sampling(trained):
    from t2i.flows.evaluate import evaluate_flow
    from t2i.flows.plan import Plan

    base, workspace = trained
    cfg = load_config("tiny", [*base, "evaluate.checkpoints=[step-00000099]"], str(workspace))
    with pytest.raises(FileNotFoundError, match="step-00000099.*step-00000002"):
        evaluate_flow(cfg)
    cfg = load_config(
        "tiny",
        [*base, "evaluate.feature_extractor=inception", f"evaluate.inception_weights={workspace}/none.pth"],
        str(workspace),
    )
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        evaluate_flow(cfg)
    assert not list((Plan(cfg).evaluation.root / "images").glob("*.png"))
    cfg = load_config("tiny", [*base, f"evaluate.clip_model={workspace}/no-clip"], str(workspace))
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model"):
        evaluate_flow(cfg)
    assert not list((Plan(cfg).evaluation.root / "images").glob("*.png"))


def test_use_ema_false_samples_the_raw_weights_of_final(trained):
    from t2i.data.store import CHECKPOINTS, FINAL
    from t2i.flows.plan import Plan
    from t2i.models.loading import load_checkpoint
    from t2i.tasks.checkpoints import load_state

    base, workspace = trained
    root = Plan(load_config("tiny", base, str(workspace))).checkpoints.root
    raw = load_state(root / CHECKPOINTS / "step-00000002")["model"]
    ema = load_checkpoint(root, FINAL, "cpu", use_ema=True)[0].state_dict()
    plain = load_checkpoint(root, FINAL, "cpu", use_ema=False)[0].state_dict()
    assert all(torch.equal(plain[k], v) for k, v in raw.items())
    assert any(not torch.equal(ema[k], v) for k, v in raw.items())  # final alone would sample the EMA
