"""The trained shapes-world models: committed with their record, and retrained reproducibly by the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from t2i.flows.cli import main
from t2i.models.loading import resolve_model
from t2i.models.shapes_models import WEIGHTS_DIR, CaptionerRecipe, VAERecipe, train_captioner, train_vae


def test_committed_models_carry_the_command_seed_and_quality_that_made_them():
    captioner = json.loads((WEIGHTS_DIR / "shapes-captioner" / "training.json").read_text())
    vae = json.loads((WEIGHTS_DIR / "shapes-vae" / "training.json").read_text())
    assert captioner["command"].startswith("t2i train-shapes-models captioner")
    assert captioner["recipe"] == json.loads(json.dumps(CaptionerRecipe().__dict__))  # the defaults made it
    assert vae["recipe"] == json.loads(json.dumps(VAERecipe().__dict__))
    assert captioner["quality"]["exact"] >= 0.95  # greedy captions of 500 unseen scenes
    assert vae["quality"]["shapes_score"] >= 0.95 and vae["quality"]["psnr"] >= 30
    assert resolve_model("tiny:shapes-captioner", "/nonexistent") == str(WEIGHTS_DIR / "shapes-captioner")


def _weights(path):
    files = sorted(path.glob("*.safetensors"))
    assert files
    return {k: v for f in files for k, v in load_file(f).items()}


def test_training_is_deterministic_for_a_seed(tmp_path):
    quiet = lambda _: None  # noqa: E731
    for name, train, recipe in (
        ("captioner", train_captioner, CaptionerRecipe(steps=3, batch_size=8)),
        ("vae", train_vae, VAERecipe(steps=2, batch_size=4, full_steps=1, full_batch_size=2)),
    ):
        train(tmp_path / f"{name}-a", recipe, quiet)
        train(tmp_path / f"{name}-b", recipe, quiet)
        a, b = _weights(tmp_path / f"{name}-a"), _weights(tmp_path / f"{name}-b")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_cli_retrains_into_a_folder_with_its_record(tmp_path, capsys):
    assert main(["train-shapes-models", "vae", "--out", str(tmp_path), "--steps", "2"]) == 0
    record = json.loads((tmp_path / "shapes-vae" / "training.json").read_text())
    assert record["recipe"]["steps"] == 2 and record["recipe"]["full_steps"] == 1
    assert record["command"].endswith("--steps 2")
    assert set(record["quality"]) == {"psnr", "shapes_score"}
    assert record["quality"]["shapes_score"] < 0.5  # two steps learn nothing: the grading is real
    # a second run replaces the folder as a whole
    assert main(["train-shapes-models", "vae", "--out", str(tmp_path), "--steps", "1"]) == 0
    assert json.loads((tmp_path / "shapes-vae" / "training.json").read_text())["recipe"]["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-vae"]


def test_missing_weights_name_the_command_that_makes_them(monkeypatch, tmp_path):
    import t2i.models.loading as loading

    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="t2i train-shapes-models vae"):
        resolve_model("tiny:shapes-vae", tmp_path)
