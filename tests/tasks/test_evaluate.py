"""Evaluation plumbing: prompt sets, the shapes scorer on real images, per-batch resume of sampling."""

import numpy as np
import pytest
from PIL import Image

from data import shapes
from tasks.evaluate import image_grid, load_prompts, shapes_metrics


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
