"""Offline CutMix composites: the four paste layouts of the paper, partner choice and compositing.

The paper's recipe (its "Image augmentation" section) makes one composite per base image, offline: a second
image, from another class, is pasted over the base with a hard mask in one of four layouts chosen uniformly.
At 256 px:

1. ``half``: the right or bottom half of the second image over the same half of the base (128x256 / 256x128);
2. ``quarter``: the whole second image at 128x128 in one of the four corners;
3. ``ninth``: the whole second image at 85x85 flush against one of the four borders, random offset along it;
4. ``sixteenth``: the whole second image at 64x64 anywhere with a margin of at least 12 px from every border,
   not overlapping the central square of half-side 25 px.

Other sizes scale these numbers proportionally (``size // 2``, ``round(size / 3)``, ``size // 4``,
``round(12 * size / 256)``, ``round(25 * size / 256)``).

Unlike the official code, the partner is never of the base's class (see :func:`pick_partner`). Everything is
numpy + Pillow and deterministic: :func:`plan_composite` draws from ``default_rng([seed, index, copy])`` so a
sharded, resumable job produces the same composite for the same image whatever the shard layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from t2i.data.imaging import center_crop_resize

__all__ = [
    "LAYOUTS",
    "UNLABELLED",
    "CutmixBox",
    "choose_layout",
    "compose",
    "pick_partner",
    "plan_composite",
    "sample_box",
]

LAYOUTS = ("half", "quarter", "ninth", "sixteenth")
UNLABELLED = -1  # label of an image whose class is unknown
MIN_SIZE = 4  # below this the sixteenth layout degenerates
_PARTNER_TRIES = 64  # rejection-sampling draws before the exact O(N) fallback
_SIXTEENTH_TRIES = 64


@dataclass(frozen=True)
class CutmixBox:
    """Where the second image lands on the base: pixel columns ``[left, left + width)``, rows ``[top, top + height)``."""

    layout: str
    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def as_dict(self) -> dict:
        return asdict(self)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def _sixteenth_geometry(size: int) -> tuple[int, int, int, float, float]:
    """(side, lowest position, highest position, central square start, central square end)."""
    side = size // 4
    margin = round(12 * size / 256)
    half_side = round(25 * size / 256)
    centre = size / 2
    return side, margin, size - margin - side, centre - half_side, centre + half_side


def _clear_of_centre(pos: np.ndarray, side: int, c0: float, c1: float) -> np.ndarray:
    """Whether the span ``[pos, pos + side)`` stays out of the central span ``[c0, c1)`` (touching is fine)."""
    return (pos + side <= c0) | (pos >= c1)


def sample_box(layout: str, size: int, rng: np.random.Generator) -> CutmixBox:
    """Draw the paste box of ``layout`` on a ``size`` x ``size`` image (the recipe's numbers are for 256)."""
    _check_size(size)
    if layout == "half":
        band = size // 2
        if rng.integers(2) == 0:  # right half
            return CutmixBox(layout, size - band, 0, band, size)
        return CutmixBox(layout, 0, size - band, size, band)  # bottom half
    if layout == "quarter":
        side = size // 2
        corner = int(rng.integers(4))
        left = 0 if corner in (0, 2) else size - side
        top = 0 if corner in (0, 1) else size - side
        return CutmixBox(layout, left, top, side, side)
    if layout == "ninth":
        side = round(size / 3)
        border = int(rng.integers(4))  # 0 top, 1 bottom, 2 left, 3 right
        offset = int(rng.integers(size - side + 1))
        if border == 0:
            return CutmixBox(layout, offset, 0, side, side)
        if border == 1:
            return CutmixBox(layout, offset, size - side, side, side)
        if border == 2:
            return CutmixBox(layout, 0, offset, side, side)
        return CutmixBox(layout, size - side, offset, side, side)
    if layout == "sixteenth":
        side, lo, hi, c0, c1 = _sixteenth_geometry(size)
        if hi < lo:
            raise ValueError(f"no room for the sixteenth layout at size {size}")
        # Uniform over the allowed positions: rejection (valid ~55% of the time at any size), then exact.
        xy = rng.integers(lo, hi + 1, size=(_SIXTEENTH_TRIES, 2))
        ok = _clear_of_centre(xy[:, 0], side, c0, c1) | _clear_of_centre(xy[:, 1], side, c0, c1)
        hits = np.flatnonzero(ok)
        if hits.size:
            left, top = (int(v) for v in xy[hits[0]])
            return CutmixBox(layout, left, top, side, side)
        pos = np.arange(lo, hi + 1)
        clear = _clear_of_centre(pos, side, c0, c1)
        valid = np.argwhere(clear[:, None] | clear[None, :])
        if not valid.size:
            raise ValueError(f"no room for the sixteenth layout at size {size}")
        i, j = valid[int(rng.integers(len(valid)))]
        return CutmixBox(layout, int(pos[i]), int(pos[j]), side, side)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _layout_probabilities(weights: Mapping[str, float]) -> np.ndarray:
    probs = np.zeros(len(LAYOUTS))
    for key, value in weights.items():
        if key not in LAYOUTS:
            raise ValueError(f"unknown layout {key!r} in weights; expected one of {LAYOUTS}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight of layout {key!r} must be a number, got {value!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of layout {key!r} must be finite and >= 0, got {value!r}")
        probs[LAYOUTS.index(key)] = value
    total = probs.sum()
    if total <= 0:
        raise ValueError(f"layout weights must have a positive sum, got {dict(weights)!r}")
    return probs / total


def choose_layout(rng: np.random.Generator, weights: Mapping[str, float] | None = None) -> str:
    """One layout, uniformly by default; ``weights`` maps layout names to non-negative weights (absent = 0)."""
    if weights is None:
        return LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    probs = _layout_probabilities(weights)
    return LAYOUTS[int(rng.choice(len(LAYOUTS), p=probs))]


def pick_partner(index: int, labels: np.ndarray, rng: np.random.Generator) -> int:
    """A uniformly random index whose (known) label differs from ``labels[index]``.

    ``labels`` holds one integer class per image, :data:`UNLABELLED` (-1) for an unknown class. For a
    labelled base the partner must carry a known, different label (an unlabelled partner might secretly be of
    the same class). When no such partner exists, or the base itself is unlabelled (its class is unknown, so
    nothing can be excluded), the partner is any other index, uniformly: single-class and unlabelled data
    still get composites, just not cross-class ones.

    Cost: one vectorised batch of rejection draws, O(1) in ``len(labels)``; for ImageNet (largest class
    ~0.1%) it practically always succeeds. Only when all draws hit the base's class (a dominant class, or no
    other class at all) does it fall back to an exact O(N) scan.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least two images to pick a partner, got {n}")
    index = int(index)
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} labels")

    def any_other(draws: np.ndarray) -> np.ndarray:
        return draws + (draws >= index)  # uniform over [0, n) minus {index}

    own = labels[index]
    if own == UNLABELLED:
        return int(any_other(rng.integers(n - 1, size=1))[0])
    draws = any_other(rng.integers(n - 1, size=_PARTNER_TRIES))
    drawn = labels[draws]
    hits = np.flatnonzero((drawn != own) & (drawn != UNLABELLED))
    if hits.size:
        return int(draws[hits[0]])
    candidates = np.flatnonzero((labels != own) & (labels != UNLABELLED))
    if candidates.size:
        return int(candidates[int(rng.integers(candidates.size))])
    return int(any_other(rng.integers(n - 1, size=1))[0])


def compose(base: Image.Image, pasted: Image.Image, box: CutmixBox, size: int) -> Image.Image:
    """Paste ``pasted`` over ``base`` (both center-cropped/resized to ``size``) with a hard mask at ``box``.

    ``half`` copies the pasted image's own half (same pixels region) over the base's; the other layouts shrink
    the whole pasted image to the box and paste it there.
    """
    _check_size(size)
    if box.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {box.layout!r}; expected one of {LAYOUTS}")
    if (
        box.width < 1
        or box.height < 1
        or box.left < 0
        or box.top < 0
        or box.right > size
        or box.bottom > size
    ):
        raise ValueError(f"box {box} does not fit in a {size}x{size} image")
    out = center_crop_resize(base, size).copy()
    second = center_crop_resize(pasted, size)
    region = (box.left, box.top, box.right, box.bottom)
    if box.layout == "half":
        patch = second.crop(region)
    else:
        patch = second.resize((box.width, box.height), resample=Image.Resampling.BICUBIC)
    out.paste(patch, region[:2])
    return out


def plan_composite(
    index: int,
    labels: np.ndarray,
    size: int,
    seed: int,
    weights: Mapping[str, float] | None = None,
    copy: int = 0,
    shard: int | None = None,
) -> dict:
    """The composite for image ``index``: ``{"layout", "box", "partner"}``, a pure function of
    ``(seed, [shard,] index, copy)`` (and the labels, size and weights), so shards and resumed runs agree.
    ``shard`` keys the draws when ``index`` is local to a shard's partner pool.
    """
    for name, value in (("seed", seed), ("index", index), ("copy", copy), ("shard", shard or 0)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    key = (
        [int(seed), int(index), int(copy)]
        if shard is None
        else [int(seed), int(shard), int(index), int(copy)]
    )
    rng = np.random.default_rng(key)
    layout = choose_layout(rng, weights)
    box = sample_box(layout, size, rng)
    partner = pick_partner(index, labels, rng)
    return {"layout": layout, "box": box.as_dict(), "partner": partner}
