"""The "shapes world": a tiny, fully known text-to-image domain for fast end-to-end checks.

Every sample is a 64x64 RGB image on a plain background (one of 4 colours, never named in the caption)
holding 1-3 shapes (circle / square / triangle) in one of 6 colours and 2 sizes, each in its own cell of a
3x3 grid with +/-2 px jitter. Captions list the objects in row-major cell order::

    "a large red circle in the top left, a small blue square in the center and a large green triangle at the bottom"

Because the generator is known exactly, the module can also *read* images back (`detect_objects`, a purely
analytic detector) and therefore grade both captioners (`caption_scores`) and generators
(`score_generation`, GenEval-like) without any learned model. `chance_levels` gives the score a model that
ignores its prompt would get, so results can be read against a floor.

Everything is a pure function of (seed, split, index): the same index always gives the same pixels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (200, 200, 200), (90, 90, 90), (0, 0, 0))
SIZES: dict[str, int] = {"small": 10, "large": 18}  # bounding-box side in pixels at 64x64
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3}
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted(
        {w for p in POSITIONS.values() for w in p.split()}
        | set(SHAPES)
        | set(COLOURS)
        | set(SIZES)
        | {"a", "and", ","}
    )
)

_CELL = IMAGE_SIZE / 3  # side of one grid cell in pixels


# --------------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ObjectGuess:
    """An object read back from text or pixels; any attribute that could not be determined is None.

    Kept separate from `ShapeObject` so ground truth can never contain holes, while noisy model output can.
    """

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None

    @property
    def key(self) -> tuple[str | None, str | None, str | None, tuple[int, int] | None]:
        """(size, colour, shape, cell): the probe's comparison tuple."""
        return (self.size, self.colour, self.shape, self.cell)


@dataclass(frozen=True)
class ShapeObject:
    """One ground-truth shape; `jitter` is the (dx, dy) pixel offset from its cell centre."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    jitter: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside rendering or scoring.
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if tuple(self.cell) not in POSITIONS:
            raise ValueError(f"cell {self.cell!r} is not in the 3x3 grid")
        object.__setattr__(self, "cell", tuple(int(v) for v in self.cell))
        object.__setattr__(self, "jitter", tuple(int(v) for v in self.jitter))

    @property
    def key(self) -> tuple[str, str, str, tuple[int, int]]:
        """(size, colour, shape, cell): what a caption can express (jitter is not described)."""
        return (self.size, self.colour, self.shape, self.cell)

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    def guess(self) -> ObjectGuess:
        """This object as a fully-known `ObjectGuess`, to compare with parsed or detected objects."""
        return ObjectGuess(shape=self.shape, colour=self.colour, size=self.size, cell=self.cell)


@dataclass(frozen=True)
class Scene:
    """A background colour plus 1-3 objects, kept in row-major cell order (the caption order)."""

    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        if len({o.cell for o in objs}) != len(objs):
            raise ValueError("two objects share a grid cell")
        if not objs:
            raise ValueError("a scene needs at least one object")
        object.__setattr__(self, "objects", objs)
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))

    @property
    def caption(self) -> str:
        """Ground-truth caption: phrases joined by ", " with " and " before the last one."""
        phrases = [f"a {o.size} {o.colour} {o.shape} {POSITIONS[o.cell]}" for o in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    @property
    def class_name(self) -> str:
        """The dominant object's "colour shape": largest size category, first in row-major order on ties."""
        biggest = max(SIZES[o.size] for o in self.objects)
        return next(o.class_name for o in self.objects if SIZES[o.size] == biggest)

    @property
    def label(self) -> int:
        """Index of `class_name` in CLASS_NAMES, for class-conditional models."""
        return CLASS_NAMES.index(self.class_name)

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any]) -> Scene | None:
        """The scene an `attributes()` dict describes, or None when the dict is not a shapes scene."""
        try:
            objects = tuple(
                ShapeObject(
                    shape=o["shape"],
                    colour=o["colour"],
                    size=o["size"],
                    cell=tuple(o["cell"]),
                    jitter=tuple(o.get("jitter", (0, 0))),
                )
                for o in attributes["objects"]
            )
            return cls(background=tuple(attributes["background"]), objects=objects)
        except (KeyError, TypeError, ValueError):
            return None

    def attributes(self) -> dict[str, Any]:
        """JSON-serialisable description (lists instead of tuples) for manifests and metadata files."""
        return {
            "background": list(self.background),
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "cell": list(o.cell),
                    "jitter": list(o.jitter),
                }
                for o in self.objects
            ],
            "count": len(self.objects),
        }


# ------------------------------------------------------------------------------------ generation, drawing


def scene(index: int, seed: int = 0, split: str = "train") -> Scene:
    """The scene at `index`: a pure function of (seed, split, index), so datasets need no storage."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    n = int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    colour_names = list(COLOURS)
    size_names = list(SIZES)
    objects = []
    for c in cells:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = colour_names[int(rng.integers(len(colour_names)))]
        size = size_names[int(rng.integers(len(size_names)))]
        jitter = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
        objects.append(
            ShapeObject(shape=shape, colour=colour, size=size, cell=(c // 3, c % 3), jitter=jitter)
        )
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(background=background, objects=tuple(objects))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene at 64x64; other sizes are NEAREST-resized so every resolution shows the same pixels."""
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(im)
    for o in scene.objects:
        row, col = o.cell
        cx = (col + 0.5) * _CELL + o.jitter[0]
        cy = (row + 0.5) * _CELL + o.jitter[1]
        h = SIZES[o.size] / 2
        fill = COLOURS[o.colour]
        box = [cx - h, cy - h, cx + h, cy + h]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    if size != IMAGE_SIZE:
        im = im.resize((size, size), Image.NEAREST)
    return im


# ---------------------------------------------------------------------------------------- text side


def words(text: str) -> list[str]:
    """Normalise text to lower-case words, keeping commas as tokens (the probe's tokenisation)."""
    return re.findall(r"[a-z]+|,", text.lower())


_PHRASE_TO_CELL = {tuple(p.split()): cell for cell, p in POSITIONS.items()}
_ATTRIBUTE_WORDS = set(SHAPES) | set(COLOURS) | set(SIZES)


def _loose_cell(ws: Sequence[str]) -> tuple[int, int] | None:
    """Cell from position keywords when the phrase is not verbatim (e.g. "top left" without "in the")."""
    vertical = {"top": 0, "bottom": 2}
    horizontal = {"left": 0, "right": 2}
    rows = {vertical[w] for w in ws if w in vertical}
    cols = {horizontal[w] for w in ws if w in horizontal}
    if len(rows) > 1 or len(cols) > 1:
        return None  # contradictory ("top bottom"): better unknown than a guess
    if not rows and not cols:
        return (1, 1) if ("center" in ws or "centre" in ws) else None
    return (rows.pop() if rows else 1, cols.pop() if cols else 1)


def parse_caption(text: str) -> list[ObjectGuess]:
    """Parse a (possibly noisy) caption into one `ObjectGuess` per object phrase, in text order.

    Always returns `ObjectGuess` (never `ShapeObject`) so callers handle a single type; compare with ground
    truth through `.key` or `ShapeObject.guess()`. Phrases are split at "and", commas and a new "a". On
    well-formed captions this equals the probe's parser; on noisy text it is more lenient: attributes are
    found by vocabulary wherever they sit in the phrase (missing ones are None), and the position is read
    from the words after the shape, verbatim phrase first, else from top/bottom/left/right/center keywords.
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    for w in words(text):
        if w in ("and", ",") or (w == "a" and current):
            if current:
                chunks.append(current)
            current = [] if w != "a" else ["a"]
        else:
            current.append(w)
    if current:
        chunks.append(current)

    out = []
    for chunk in chunks:
        ws = [w for w in chunk if w != "a"]
        if not ws:
            continue
        size = next((w for w in ws if w in SIZES), None)
        colour = next((w for w in ws if w in COLOURS), None)
        shape = next((w for w in ws if w in SHAPES), None)
        attribute_idx = [i for i, w in enumerate(ws) if w in _ATTRIBUTE_WORDS]
        tail = ws[attribute_idx[-1] + 1 :] if attribute_idx else ws
        cell = _PHRASE_TO_CELL.get(tuple(tail))
        if cell is None:
            cell = _loose_cell(tail)
        out.append(ObjectGuess(shape=shape, colour=colour, size=size, cell=cell))
    return out


def caption_scores(text: str, scene: Scene) -> dict[str, float]:
    """Per-attribute correctness of a predicted caption against the scene (the probe's attribute_scores).

    Objects are aligned by index (both lists are in row-major order), so an omitted object shifts the rest;
    that is deliberate: the caption grammar fixes the order. `exact` is word-level equality.
    """
    pred = parse_caption(text)
    truth = [o.key for o in scene.objects]
    scores = {"count": float(len(pred) == len(truth))}
    for k, name in enumerate(("size", "colour", "shape", "position")):
        hits = sum(1 for j, t in enumerate(truth) if j < len(pred) and pred[j].key[k] == t[k])
        scores[name] = hits / len(truth)
    scores["exact"] = float(words(text) == words(scene.caption))
    return scores


# ------------------------------------------------------------------------------------- pixel side

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)

# Detector thresholds, all at 64x64. The nearest palette colour to any background is >= 105 RGB units away,
# so 55 separates objects from backgrounds with room for +/-15 noise and VAE colour drift (~20 levels).
_FG_DIST = 55.0  # a pixel this far from the background may be an object pixel
_PALETTE_DIST = 75.0  # ... and votes for its nearest palette colour only if that colour is this close
_MIN_VOTES = 12  # votes a colour needs in a cell core (a small triangle has ~50, blur noise ghosts ~0)
_MIN_MAJORITY = 0.6  # share of the core's votes the winning colour must hold (uniform noise: ~0.25)
_MIN_PLAIN_BORDER = 0.6  # share of border pixels that must match the background colour
_MAX_SPREAD = 20.0  # median absolute deviation of an object's colour (flat fill + noise/VAE drift: < 12)
_MIN_SOLIDITY = 0.4  # an object fills at least this share of its bounding box
_CORE = 7  # half-width of the cell core: every object covers it, no neighbour ever reaches it
_WINDOW = 13  # half-width of the measurement window: holds the largest jittered object in the cell
_RESIDUAL = 50.0  # max distance of a pixel from the background->object colour line (rejects other colours)
_MAX_REACH = 12.0  # no object pixel centre is further from its cell centre (2 jitter + 9 half-size + 0.5)
_CUT_REACH = 9.5  # ... and no neighbour's pixel centre is closer than 21.33 - 11.5 = 9.83
_LARGE_SIDE = 14.5  # bounding-box side between small (10-11 px) and large (18-19 px)
_SQUARE_FILL = 0.88  # bbox fill ratio: square ~1.0, circle ~0.79, triangle ~0.55
_TRIANGLE_ASYMMETRY = 1.6  # bottom-half / top-half area: triangle (apex up) ~3, circle and square ~1


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Float HxWx3 array at 64x64: BOX when shrinking (exact for integer factors), BILINEAR when growing."""
    if isinstance(image, np.ndarray):
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        shrinking = image.size[0] >= IMAGE_SIZE and image.size[1] >= IMAGE_SIZE
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX if shrinking else Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _background(img: np.ndarray) -> tuple[np.ndarray, float]:
    """(most common border colour, share of the border close to it).

    The mode is taken over coarse colour bins, then refined by a median, so pixel noise does not split the
    vote. The share tells a plain background (~1.0; shapes only graze the border) from noise (< 0.55).
    """
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bins = (border // 32).astype(np.int64)
    codes = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    mode = np.bincount(codes).argmax()
    estimate = np.median(border[codes == mode], axis=0)
    close = ((border - estimate) ** 2).sum(axis=1) < 45.0**2
    return np.median(border[close], axis=0), float(close.mean())


def _span(centre: float, half: int) -> slice:
    c = int(round(centre))
    return slice(max(c - half, 0), min(c + half + 1, IMAGE_SIZE))


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """4-connected region of `allowed` reachable from `seed` (flood fill by repeated dilation)."""
    region = seed & allowed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def _object_mask(
    seed: np.ndarray, allowed: np.ndarray, window: tuple[slice, slice], centre: tuple[float, float]
) -> np.ndarray:
    """The object's pixels: the `allowed` region connected to `seed`, cut off from touching neighbours.

    Two large same-colour shapes in adjacent cells can touch or even overlap by a pixel line (jittered boxes
    cross the cell border by up to 0.7 px) and flood-fill into one region. No pixel of this cell's object lies
    more than `_MAX_REACH` px from the cell centre, so a region reaching further is cut at `_CUT_REACH`, which
    no neighbour crosses; losing a line or two of its own edge does not change a shape's size or class.
    """
    mask = _grow(seed, allowed)
    for axis in (0, 1):
        coords = np.arange(window[axis].start, window[axis].stop) + 0.5 - centre[axis]
        for side in (-1, 1):
            if not mask.any(axis=1 - axis)[side * coords > _MAX_REACH].any():
                continue
            keep = side * coords < _CUT_REACH
            allowed = allowed & (keep[:, None] if axis == 0 else keep[None, :])
            mask = _grow(seed, allowed)
    return mask


def _crop(mask: np.ndarray) -> np.ndarray:
    """The mask cut to its bounding box."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _classify(box: np.ndarray) -> tuple[str, str]:
    """(shape, size) from an object's cropped pixel mask: size from the bbox side, shape from mass layout.

    The bbox side separates sizes independently of shape (by area a small square, ~121 px, and a large
    triangle, ~170 px, are close). A triangle (apex up) is told apart by its bottom-heavy mass, which survives
    blur better than its fill ratio; squares and circles then differ by fill ratio (~1.0 vs ~0.79).
    """
    height, width = box.shape
    size = "large" if max(height, width) > _LARGE_SIDE else "small"
    fill = box.mean()
    top = box[: height // 2].sum()
    bottom = box[(height + 1) // 2 :].sum()
    if bottom > _TRIANGLE_ASYMMETRY * max(top, 1):
        shape = "triangle"
    elif fill > _SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"
    return shape, size


def detect_objects(image: Image.Image | np.ndarray) -> list[ObjectGuess]:
    """Read the shapes back from pixels, analytically (no model), in row-major cell order.

    Per grid cell: pixels far from the border-estimated background vote for their nearest palette colour in
    the cell core; a clear winner is an object (noise and blur halos give no clear winner). Its pixel mask is
    the region connected to those votes whose colour lies past halfway on the background->object colour
    line (a 50 % matte, so soft VAE edges neither grow nor shrink it); size and shape come from that mask.
    Accepts a PIL image or HxWx3 uint8 array of any size.
    """
    img = _as_array(image)
    bg, plain = _background(img)
    if plain < _MIN_PLAIN_BORDER:
        return []  # no plain background, so no shapes-world scene (e.g. noise or a photo)
    foreground = ((img - bg) ** 2).sum(axis=2) > _FG_DIST**2
    # Squared distances to the palette via |x|^2 - 2 x.p + |p|^2 (one matmul instead of a 4-D broadcast).
    palette_sq = (img**2).sum(axis=2, keepdims=True) - 2 * img @ _PALETTE.T + (_PALETTE**2).sum(axis=1)
    nearest = palette_sq.argmin(axis=2)
    votes = foreground & (palette_sq.min(axis=2) < _PALETTE_DIST**2)

    found = []
    for row in range(3):
        for col in range(3):
            cy, cx = (row + 0.5) * _CELL, (col + 0.5) * _CELL
            core = (_span(cy, _CORE), _span(cx, _CORE))
            counts = np.bincount(nearest[core][votes[core]], minlength=len(_PALETTE))
            winner = int(counts.argmax())
            if counts[winner] < _MIN_VOTES or counts[winner] < _MIN_MAJORITY * counts.sum():
                continue
            window = (_span(cy, _WINDOW), _span(cx, _WINDOW))
            patch = img[window]
            seed = np.zeros(patch.shape[:2], dtype=bool)
            core_in_window = tuple(
                slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, window, strict=True)
            )
            seed[core_in_window] = votes[core] & (nearest[core] == winner)
            seed_pixels = img[core][seed[core_in_window]]
            colour = np.median(seed_pixels, axis=0)
            if np.median(np.abs(seed_pixels - colour)) > _MAX_SPREAD:
                continue  # not a flat-colour shape: scattered noise pixels that happen to agree on a colour
            direction = colour - bg
            offset = patch - bg
            alpha = offset @ direction / max(float(direction @ direction), 1e-6)
            residual_sq = ((offset - alpha[..., None] * direction) ** 2).sum(axis=2)
            mask = _object_mask(seed, (alpha > 0.5) & (residual_sq < _RESIDUAL**2), window, (cy, cx))
            if mask.sum() < _MIN_VOTES:
                continue
            box = _crop(mask)
            if box.mean() < _MIN_SOLIDITY:
                continue  # scattered pixels, not a filled shape
            shape, size = _classify(box)
            found.append(ObjectGuess(shape=shape, colour=_PALETTE_NAMES[winner], size=size, cell=(row, col)))
    return found


def dominant_colour(image: Image.Image | np.ndarray) -> str | None:
    """The palette colour covering the most foreground pixels, or None (no plain background, or too few).

    A softer reading than `detect_objects`: it needs no flat, well-formed shape, only the prompted colour on a
    plain background, so it shows conditioning before a model draws crisp shapes.
    """
    img = _as_array(image)
    bg, plain = _background(img)
    if plain < _MIN_PLAIN_BORDER:
        return None
    flat = img.reshape(-1, 3)
    foreground = ((flat - bg) ** 2).sum(axis=1) > _FG_DIST**2
    distances = ((flat[:, None, :] - _PALETTE[None]) ** 2).sum(axis=2)
    votes = foreground & (distances.min(axis=1) < _PALETTE_DIST**2)
    counts = np.bincount(distances.argmin(axis=1)[votes], minlength=len(_PALETTE))
    return _PALETTE_NAMES[int(counts.argmax())] if counts.max() >= _MIN_VOTES else None


# ------------------------------------------------------------------------------------ generation scoring

GENERATION_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colours",
    "position",
    "colour_attribution",
)


def _contains(have: Counter, want: Counter) -> bool:
    return all(have[k] >= n for k, n in want.items())


def score_generation(
    image: Image.Image | np.ndarray, scene_or_objects: Scene | Sequence[ShapeObject]
) -> dict[str, float | None]:
    """GenEval-like grading of a generated image against its prompt (a Scene or its objects).

    Each category is 1.0 / 0.0 for this image, or None when the prompt does not test it, so averaging over a
    test set must skip None. Presence checks are multiset checks: a prompt with two red circles needs two
    detected red circles. `colour_shape` is the share of prompted (colour, shape) pairs found (partial
    credit); `overall` is the mean of the applicable categories in GENERATION_CATEGORIES.
    """
    prompt = list(scene_or_objects.objects if isinstance(scene_or_objects, Scene) else scene_or_objects)
    if not prompt:
        raise ValueError("the prompt has no objects")
    detected = detect_objects(image)
    n = len(prompt)
    det_pairs = Counter((d.colour, d.shape) for d in detected)
    want_pairs = Counter((o.colour, o.shape) for o in prompt)
    det_shapes = Counter(d.shape for d in detected)
    want_shapes = Counter(o.shape for o in prompt)
    det_by_cell = {d.cell: (d.colour, d.shape) for d in detected}

    scores: dict[str, float | None] = {
        "colour_shape": sum(min(c, det_pairs[k]) for k, c in want_pairs.items()) / n,
        "single_object": float(_contains(det_shapes, want_shapes)) if n == 1 else None,
        "two_objects": float(_contains(det_shapes, want_shapes)) if n == 2 else None,
        "counting": float(len(detected) == n),
        "colours": float({o.colour for o in prompt} <= {d.colour for d in detected}),
        "position": float(all(det_by_cell.get(o.cell) == (o.colour, o.shape) for o in prompt)),
        "colour_attribution": float(_contains(det_pairs, want_pairs)) if n >= 2 else None,
    }
    applicable = [v for k in GENERATION_CATEGORIES if (v := scores[k]) is not None]
    scores["overall"] = sum(applicable) / len(applicable)
    return scores


CLASS_CATEGORIES: tuple[str, ...] = ("single_object", "colours")


def score_class_generation(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, float | None]:
    """Grading for a class-name prompt ("An image of red circle"): only what the class names. `overall` is the
    mean of the dominant object's shape (`single_object`) and its colour (`colours`); counts and positions are
    not prompted, so not scored. Reported beside it: `colour_shape` (the pair drawn together) and
    `dominant_colour` (the image's most-covered colour is the prompted one)."""
    dominant = next(o for o in scene.objects if o.class_name == scene.class_name)
    scores = score_generation(image, [dominant])
    kept: dict[str, float | None] = {k: scores[k] for k in ("colour_shape", *CLASS_CATEGORIES)}
    kept["dominant_colour"] = float(dominant_colour(image) == dominant.colour)
    kept["overall"] = sum(scores[k] for k in CLASS_CATEGORIES) / len(CLASS_CATEGORIES)
    return kept


def chance_levels(n: int = 2000, seed: int = 0, class_prompts: bool = False) -> dict[str, float]:
    """Scores of a generator that ignores its prompt: the floor to read `score_generation` results against.

    Prompt i is the "val" scene i, the "image" is the rendered, unrelated "test" scene i (same seed); each
    category is averaged over the prompts where it applies (0.0 if it never does). A model is only learning
    the prompt where it beats these numbers; e.g. "counting" is already ~1/3 here by luck. With
    `class_prompts`, the prompts are class names and graded by `score_class_generation`.
    """
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i in range(n):
        prompt = scene(i, seed, "val")
        image = render(scene(i, seed, "test"))
        result = score_class_generation(image, prompt) if class_prompts else score_generation(image, prompt)
        for key, value in result.items():
            if value is not None:
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    categories = (*CLASS_CATEGORIES, "dominant_colour") if class_prompts else GENERATION_CATEGORIES
    keys = ("colour_shape", *categories, "overall")
    return {k: totals.get(k, 0.0) / counts[k] if counts.get(k) else 0.0 for k in keys}
