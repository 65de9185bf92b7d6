"""Behaviour of the shapes world: generation, captions, the analytic detector and generation scoring."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i.data.shapes import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ObjectGuess,
    Scene,
    ShapeObject,
    caption_scores,
    chance_levels,
    detect_objects,
    dominant_colour,
    parse_caption,
    render,
    scene,
    score_class_generation,
    score_generation,
)


def truth(s: Scene) -> list[ObjectGuess]:
    return [o.guess() for o in s.objects]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ------------------------------------------------------------------------------------------- generation


def test_same_index_gives_identical_pixels_and_caption():
    a, b = scene(123, seed=7, split="val"), scene(123, seed=7, split="val")
    assert a == b
    assert np.array_equal(pixels(render(a)), pixels(render(b)))
    assert render(a).size == (IMAGE_SIZE, IMAGE_SIZE) and render(a).mode == "RGB"


def test_different_seeds_and_splits_give_different_scenes():
    base = [scene(i, seed=0, split="train") for i in range(50)]
    for other in (
        [scene(i, seed=1, split="train") for i in range(50)],
        [scene(i, seed=0, split="val") for i in range(50)],
        [scene(i, seed=0, split="test") for i in range(50)],
    ):
        assert sum(a != b for a, b in zip(base, other, strict=True)) >= 45
    images = [pixels(render(s)) for s in base[:10]]
    assert not np.array_equal(images[0], pixels(render(scene(0, seed=1))))
    assert len({im.tobytes() for im in images}) == 10


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError):
        scene(0, split="validation")


def test_scenes_cover_the_whole_world():
    scenes = [scene(i) for i in range(600)]
    objects = [o for s in scenes for o in s.objects]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == {"small", "large"}
    assert {o.cell for o in objects} == {(r, c) for r in range(3) for c in range(3)}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.jitter for o in objects} == {(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)}
    for s in scenes:
        cells = [o.cell for o in s.objects]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)


def test_render_at_other_sizes_is_a_nearest_upscale():
    s = scene(5)
    big = render(s, 128)
    assert big.size == (128, 128)
    assert np.array_equal(pixels(big)[::2, ::2], pixels(render(s)))


def test_invalid_objects_are_rejected():
    with pytest.raises(ValueError):
        ShapeObject("hexagon", "red", "small", (0, 0))
    with pytest.raises(ValueError):
        ShapeObject("circle", "pink", "small", (0, 0))
    with pytest.raises(ValueError):
        ShapeObject("circle", "red", "small", (3, 0))
    with pytest.raises(ValueError):
        Scene((0, 0, 0), (ShapeObject("circle", "red", "small", (1, 1)),) * 2)


def test_attributes_are_json_serialisable_and_complete():
    s = scene(3)
    attrs = json.loads(json.dumps(s.attributes()))
    assert attrs["count"] == len(s.objects)
    assert attrs["background"] == list(s.background)
    assert [tuple(o["cell"]) for o in attrs["objects"]] == [o.cell for o in s.objects]
    assert set(attrs["objects"][0]) == {"shape", "colour", "size", "cell", "jitter"}


# ------------------------------------------------------------------------------------- classes, captions


def test_class_names_are_colour_times_shape():
    assert len(CLASS_NAMES) == 18
    assert CLASS_NAMES[:3] == ("red circle", "red square", "red triangle")
    assert CLASS_NAMES[-1] == "orange triangle"


def test_class_name_is_largest_object_first_in_row_major_order_on_ties():
    small_blue = ShapeObject("square", "blue", "small", (0, 0))
    large_red = ShapeObject("circle", "red", "large", (2, 2))
    large_green = ShapeObject("triangle", "green", "large", (1, 0))
    s = Scene((0, 0, 0), (small_blue, large_red))
    assert s.class_name == "red circle" and CLASS_NAMES[s.label] == "red circle"
    # Given out of order: the row-major first large object, (1, 0), wins over (2, 2).
    s = Scene((0, 0, 0), (large_red, small_blue, large_green))
    assert s.class_name == "green triangle"
    assert Scene((0, 0, 0), (small_blue,)).label == CLASS_NAMES.index("blue square")
    assert {scene(i).label for i in range(400)} == set(range(18))


def test_caption_grammar():
    objs = (
        ShapeObject("circle", "red", "large", (0, 0)),
        ShapeObject("square", "blue", "small", (1, 1)),
        ShapeObject("triangle", "green", "large", (2, 1)),
    )
    assert Scene((255, 255, 255), objs).caption == (
        "a large red circle in the top left, a small blue square in the center "
        "and a large green triangle at the bottom"
    )
    assert (
        Scene((0, 0, 0), objs[1:]).caption
        == "a small blue square in the center and a large green triangle at the bottom"
    )
    assert Scene((0, 0, 0), objs[:1]).caption == "a large red circle in the top left"


def test_caption_parse_round_trip():
    for i in range(500):
        s = scene(i, split="test")
        assert parse_caption(s.caption) == truth(s), s.caption


def test_parse_noisy_captions_marks_unknowns_as_none():
    parsed = parse_caption("A red circle in the top left and a large purple thing top right")
    assert parsed == [
        ObjectGuess(shape="circle", colour="red", size=None, cell=(0, 0)),
        ObjectGuess(shape=None, colour="purple", size="large", cell=(0, 2)),
    ]
    assert parse_caption("a small green square somewhere") == [ObjectGuess("square", "green", "small", None)]
    assert parse_caption("") == []


def test_caption_scores():
    s = Scene(
        (0, 0, 0),
        (ShapeObject("circle", "red", "large", (0, 0)), ShapeObject("square", "blue", "small", (2, 2))),
    )
    perfect = caption_scores(
        "A large red circle in the top left, and a small blue square in the bottom right.", s
    )
    assert perfect == {"count": 1.0, "size": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0, "exact": 0.0}
    assert caption_scores(s.caption.upper() + ".", s)["exact"] == 1.0
    wrong = caption_scores("a large red square in the top left and a small blue square at the top", s)
    assert wrong == {"count": 1.0, "size": 1.0, "colour": 1.0, "shape": 0.5, "position": 0.5, "exact": 0.0}
    assert caption_scores("a large red circle in the top left", s)["count"] == 0.0


# ------------------------------------------------------------------------------------------- detection


def test_detects_every_attribute_exactly_on_rendered_scenes():
    misses = [
        i for i in range(500) if detect_objects(render(scene(i, split="val"))) != truth(scene(i, split="val"))
    ]
    assert misses == []


def test_detects_exactly_on_larger_renders_and_arrays():
    for i in range(200):
        s = scene(i, seed=3)
        assert detect_objects(render(s, 128)) == truth(s)
        assert detect_objects(pixels(render(s, 96))) == truth(s)


def test_detection_survives_mild_blur_and_colour_noise():
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(300):
        s = scene(i, seed=5, split="test")
        blurred = pixels(render(s).filter(ImageFilter.GaussianBlur(0.7))).astype(np.int16)
        noisy = np.clip(blurred + rng.integers(-15, 16, blurred.shape), 0, 255).astype(np.uint8)
        hits += detect_objects(noisy) == truth(s)
    assert hits / 300 >= 0.95


def test_no_ghost_objects_on_noise_or_plain_backgrounds():
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert detect_objects(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) == []
        assert detect_objects(np.clip(rng.normal(128, 40, (80, 80, 3)), 0, 255).astype(np.uint8)) == []
    for bg in BACKGROUNDS:
        assert detect_objects(Image.new("RGB", (64, 64), bg)) == []
        jittered = np.clip(np.full((64, 64, 3), bg) + rng.integers(-15, 16, (64, 64, 3)), 0, 255)
        assert detect_objects(jittered.astype(np.uint8)) == []


# -------------------------------------------------------------------------------- generation scoring


def test_own_rendering_scores_perfectly():
    for i in range(100):
        s = scene(i, split="test")
        result = score_generation(render(s), s)
        assert result["overall"] == 1.0 and result["colour_shape"] == 1.0
        assert result == score_generation(render(s), s.objects)


def test_applicable_categories_depend_on_object_count():
    one = Scene((0, 0, 0), (ShapeObject("circle", "red", "large", (1, 1)),))
    two = Scene((0, 0, 0), (*one.objects, ShapeObject("square", "blue", "large", (0, 0))))
    r1, r2 = score_generation(render(one), one), score_generation(render(two), two)
    assert r1["single_object"] == 1.0 and r1["two_objects"] is None and r1["colour_attribution"] is None
    assert r2["single_object"] is None and r2["two_objects"] == 1.0 and r2["colour_attribution"] == 1.0


def test_swapped_colours_fail_attribution_but_keep_colours_and_shapes():
    prompt = Scene(
        (255, 255, 255),
        (ShapeObject("circle", "red", "large", (0, 0)), ShapeObject("square", "blue", "large", (2, 2))),
    )
    swapped = Scene(
        prompt.background,
        (replace(prompt.objects[0], colour="blue"), replace(prompt.objects[1], colour="red")),
    )
    result = score_generation(render(swapped), prompt)
    assert result["two_objects"] == 1.0 and result["colours"] == 1.0 and result["counting"] == 1.0
    assert result["colour_attribution"] == 0.0 and result["position"] == 0.0 and result["colour_shape"] == 0.0
    assert result["overall"] == pytest.approx(3 / 5)


def test_dominant_colour_reads_blurred_blobs_but_not_noise():
    for i in range(50):
        s = scene(i, split="test")
        single = Scene(s.background, s.objects[:1])
        blob = render(single).filter(ImageFilter.GaussianBlur(1.5))  # soft edges, the colour stays
        assert dominant_colour(blob) == single.objects[0].colour
        assert score_class_generation(render(single), single)["dominant_colour"] == 1.0
    rng = np.random.default_rng(3)
    assert dominant_colour(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is None
    assert all(dominant_colour(Image.new("RGB", (64, 64), bg)) is None for bg in BACKGROUNDS)
    chance = chance_levels(n=300, class_prompts=True)
    assert 0.1 < chance["dominant_colour"] < 0.3  # six colours, a little above 1/6 from shared colours


def test_noise_scores_near_chance():
    chance = chance_levels(n=300)
    assert 0.0 < chance["overall"] < 0.4
    assert chance["colour_shape"] < 0.2 and chance["position"] < 0.05
    rng = np.random.default_rng(2)
    noise_overall = [
        score_generation(np.clip(rng.normal(128, 60, (64, 64, 3)), 0, 255).astype(np.uint8), scene(i))[
            "overall"
        ]
        for i in range(100)
    ]
    assert np.mean(noise_overall) <= chance["overall"] + 0.05
