"""Tests for t2i.data.cutmix: the recipe's four layouts, exact at 256 and scaled elsewhere, partners and pasting."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from t2i.data.cutmix import (
    LAYOUTS,
    CutmixBox,
    choose_layout,
    compose,
    pick_partner,
    plan_composite,
    sample_box,
)

DRAWS = 2000


def boxes(layout: str, size: int, n: int = DRAWS, seed: int = 0) -> list[CutmixBox]:
    rng = np.random.default_rng(seed)
    return [sample_box(layout, size, rng) for _ in range(n)]


# Expected numbers: (half band, quarter side, ninth side, sixteenth side, margin, central half-side).
GEOMETRY = {
    256: (128, 128, 85, 64, 12, 25),
    64: (32, 32, 21, 16, 3, 6),
    320: (160, 160, 107, 80, 15, 31),
    200: (100, 100, 67, 50, 9, 20),
}


@pytest.mark.parametrize("size", sorted(GEOMETRY))
def test_half_is_the_right_or_bottom_half(size):
    band = GEOMETRY[size][0]
    seen = Counter()
    for box in boxes("half", size):
        assert box.layout == "half"
        if box.width == band:
            assert (box.left, box.top, box.height) == (size - band, 0, size)
            seen["right"] += 1
        else:
            assert (box.left, box.top, box.width, box.height) == (0, size - band, size, band)
            seen["bottom"] += 1
    assert set(seen) == {"right", "bottom"}


@pytest.mark.parametrize("size", sorted(GEOMETRY))
def test_quarter_is_a_corner_square(size):
    side = GEOMETRY[size][1]
    corners = set()
    for box in boxes("quarter", size):
        assert (box.width, box.height) == (side, side)
        assert box.left in (0, size - side) and box.top in (0, size - side)
        corners.add((box.left, box.top))
    assert len(corners) == 4


@pytest.mark.parametrize("size", sorted(GEOMETRY))
def test_ninth_touches_a_border_at_random_offsets(size):
    side = GEOMETRY[size][2]
    borders, offsets = set(), set()
    for box in boxes("ninth", size):
        assert (box.width, box.height) == (side, side)
        assert 0 <= box.left <= size - side and 0 <= box.top <= size - side
        touching = {
            name
            for name, hit in (
                ("top", box.top == 0),
                ("bottom", box.top + side == size),
                ("left", box.left == 0),
                ("right", box.left + side == size),
            )
            if hit
        }
        assert touching, box
        borders |= touching
        offsets.add(box.left if "top" in touching or "bottom" in touching else box.top)
    assert borders == {"top", "bottom", "left", "right"}
    assert len(offsets) > (size - side) // 2  # the offset along the border really varies
    assert {0, size - side} <= offsets


@pytest.mark.parametrize("size", sorted(GEOMETRY))
def test_sixteenth_respects_margin_and_avoids_centre(size):
    expected_side, margin, half_side = GEOMETRY[size][3:]
    c0, c1 = size / 2 - half_side, size / 2 + half_side
    lefts, tops, quadrants = set(), set(), set()
    for box in boxes("sixteenth", size, n=4000):
        assert (box.width, box.height) == (expected_side, expected_side)
        assert box.left >= margin and box.top >= margin
        assert box.left + expected_side <= size - margin and box.top + expected_side <= size - margin
        overlap_x = box.left < c1 and box.left + expected_side > c0
        overlap_y = box.top < c1 and box.top + expected_side > c0
        assert not (overlap_x and overlap_y), box
        lefts.add(box.left)
        tops.add(box.top)
        quadrants.add((box.left + expected_side / 2 > size / 2, box.top + expected_side / 2 > size / 2))
    assert len(quadrants) == 4
    assert min(lefts) == margin and max(lefts) == size - margin - expected_side
    assert min(tops) == margin and max(tops) == size - margin - expected_side


def test_sixteenth_exact_numbers_at_256():
    # The central +-25 px square is [103, 153); a 64 px box must end by 103 or start at 153 on some axis.
    for box in boxes("sixteenth", 256, n=3000, seed=1):
        assert 12 <= box.left <= 180 and 12 <= box.top <= 180
        assert box.left + 64 <= 103 or box.left >= 153 or box.top + 64 <= 103 or box.top >= 153


def test_sample_box_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="layout"):
        sample_box("third", 256, rng)
    with pytest.raises(ValueError, match="size"):
        sample_box("half", 2, rng)


def test_box_as_dict():
    box = CutmixBox("quarter", 0, 128, 128, 128)
    assert box.as_dict() == {"layout": "quarter", "left": 0, "top": 128, "width": 128, "height": 128}


def test_layout_choice_is_uniform():
    rng = np.random.default_rng(3)
    counts = Counter(choose_layout(rng) for _ in range(20_000))
    assert set(counts) == set(LAYOUTS)
    for layout in LAYOUTS:
        assert abs(counts[layout] / 20_000 - 0.25) < 0.03


def test_layout_choice_respects_weights():
    rng = np.random.default_rng(4)
    counts = Counter(
        choose_layout(rng, {"half": 3.0, "quarter": 1.0, "ninth": 0.0, "sixteenth": 0}) for _ in range(8000)
    )
    assert counts["ninth"] == 0 and counts["sixteenth"] == 0
    assert abs(counts["half"] / 8000 - 0.75) < 0.03
    only = Counter(choose_layout(rng, {"sixteenth": 1}) for _ in range(200))
    assert only == {"sixteenth": 200}


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ({"halves": 1.0}, "halves"),
        ({"half": -1.0, "quarter": 1.0}, "half"),
        ({"ninth": float("nan")}, "ninth"),
        ({"quarter": "x"}, "quarter"),
        ({"half": 0.0, "quarter": 0}, "positive sum"),
        ({}, "positive sum"),
    ],
)
def test_layout_weights_are_validated(weights, needle):
    with pytest.raises(ValueError, match=needle):
        choose_layout(np.random.default_rng(0), weights)


def test_partner_is_always_of_another_class():
    rng = np.random.default_rng(5)
    # Skewed: class 0 holds 90% of the images, so a same-class partner would be drawn often if allowed.
    labels = np.concatenate([np.zeros(900, dtype=np.int64), np.arange(1, 101, dtype=np.int64)])
    rng.shuffle(labels)
    partners = Counter()
    for _ in range(10_000):
        index = int(rng.integers(len(labels)))
        partner = pick_partner(index, labels, rng)
        assert partner != index and labels[partner] != labels[index]
        partners[int(labels[index] == 0)] += 1
    assert partners[1] > 8000  # the dominant class was exercised


def test_partner_is_uniform_over_other_classes():
    labels = np.array([0, 0, 1, 2, 3], dtype=np.int64)
    rng = np.random.default_rng(6)
    counts = Counter(pick_partner(0, labels, rng) for _ in range(6000))
    assert set(counts) == {2, 3, 4}
    for i in (2, 3, 4):
        assert abs(counts[i] / 6000 - 1 / 3) < 0.03


def test_partner_skips_unlabelled_for_labelled_base():
    labels = np.array([5, -1, -1, -1, 7], dtype=np.int64)
    rng = np.random.default_rng(7)
    assert {pick_partner(0, labels, rng) for _ in range(200)} == {4}


@pytest.mark.parametrize("labels", [np.full(50, 3), np.full(50, -1)], ids=["single-class", "unlabelled"])
def test_partner_falls_back_to_any_other_index(labels):
    rng = np.random.default_rng(8)
    partners = {pick_partner(10, labels, rng) for _ in range(2000)}
    assert 10 not in partners
    assert partners == set(range(50)) - {10}


def test_partner_rejects_degenerate_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        pick_partner(0, np.array([1]), rng)
    with pytest.raises(IndexError):
        pick_partner(5, np.array([1, 2]), rng)


def test_partner_is_fast_on_imagenet_scale():
    labels = np.repeat(np.arange(1000), 1281)  # 1.28M labels
    rng = np.random.default_rng(9)
    start = time.perf_counter()
    for index in range(0, len(labels), len(labels) // 2000):
        assert labels[pick_partner(index, labels, rng)] != labels[index]
    assert time.perf_counter() - start < 1.0  # ~2000 calls; an O(N) scan per call would take seconds


def test_plan_composite_is_deterministic():
    labels = np.arange(100) % 10
    a = plan_composite(17, labels, 256, seed=42)
    assert a == plan_composite(17, labels, 256, seed=42)
    assert set(a) == {"layout", "box", "partner"}
    assert a["layout"] in LAYOUTS and a["box"]["layout"] == a["layout"]
    assert labels[a["partner"]] != labels[17]
    plans = [plan_composite(17, labels, 256, seed=42, copy=c) for c in range(20)]
    assert len({str(p) for p in plans}) > 1  # copies differ
    others = [plan_composite(i, labels, 256, seed=43) for i in range(20)]
    assert [plan_composite(i, labels, 256, seed=43) for i in range(20)] == others
    assert others != [plan_composite(i, labels, 256, seed=44) for i in range(20)]
    forced = plan_composite(3, labels, 64, seed=0, weights={"ninth": 1.0})
    assert forced["layout"] == "ninth" and forced["box"]["width"] == 21


def solid(color, size=(300, 256)) -> Image.Image:
    return Image.new("RGB", size, color)


RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compose_pastes_inside_box_only(layout):
    rng = np.random.default_rng(10)
    for _ in range(5):
        box = sample_box(layout, 256, rng)
        out = compose(solid(RED), solid(BLUE, (256, 400)), box, 256)
        assert out.size == (256, 256) and out.mode == "RGB"
        pixels = np.asarray(out)
        inside = np.zeros((256, 256), dtype=bool)
        inside[box.top : box.top + box.height, box.left : box.left + box.width] = True
        assert (pixels[inside] == BLUE).all()
        assert (pixels[~inside] == RED).all()


def test_compose_half_uses_the_same_half_of_the_pasted_image():
    pasted = np.zeros((256, 256, 3), dtype=np.uint8)
    pasted[:, :128] = GREEN  # left half green, right half blue
    pasted[:, 128:] = BLUE
    pasted_bottom = np.zeros((256, 256, 3), dtype=np.uint8)
    pasted_bottom[:128] = GREEN  # top half green, bottom half blue
    pasted_bottom[128:] = BLUE
    right = CutmixBox("half", 128, 0, 128, 256)
    bottom = CutmixBox("half", 0, 128, 256, 128)
    out = np.asarray(compose(solid(RED, (256, 256)), Image.fromarray(pasted), right, 256))
    assert (out[:, 128:] == BLUE).all() and (out[:, :128] == RED).all()
    out = np.asarray(compose(solid(RED, (256, 256)), Image.fromarray(pasted_bottom), bottom, 256))
    assert (out[128:] == BLUE).all() and (out[:128] == RED).all()


def test_compose_shrinks_the_whole_pasted_image_into_the_box():
    pasted = np.zeros((256, 256, 3), dtype=np.uint8)
    pasted[:, :128] = GREEN
    pasted[:, 128:] = BLUE
    box = CutmixBox("quarter", 0, 0, 128, 128)
    out = np.asarray(compose(solid(RED, (256, 256)), Image.fromarray(pasted), box, 256)).astype(int)
    # Both halves of the pasted image appear, squeezed into the box (away from the seam's ringing).
    assert (np.abs(out[:128, :60] - GREEN).max(axis=-1) <= 2).all()
    assert (np.abs(out[:128, 68:128] - BLUE).max(axis=-1) <= 2).all()
    assert (out[128:] == RED).all() and (out[:, 128:] == RED).all()


def test_compose_rejects_a_box_outside_the_image():
    with pytest.raises(ValueError, match="fit"):
        compose(solid(RED), solid(BLUE), CutmixBox("quarter", 200, 0, 128, 128), 256)
