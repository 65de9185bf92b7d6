"""Safe image decoding and the pixel transforms used by the training data path.

ImageNet-style folders hold a long tail of odd files: CMYK and grayscale JPEGs, PNGs mislabelled as
JPEG, truncated downloads, palette images with transparency, 16-bit scans. A crawl of millions of files
must neither crash on one of them nor silently store garbage, so every failure here becomes a
:class:`RejectedImage` with a stable machine-readable ``reason`` the caller can count and log.

PIL's process-wide knobs (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``, the warnings
filters) are only ever read, never set: other code in the same process may depend on them, and a data
loader running threads must not race on them.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "REJECT_REASONS",
    "RejectedImage",
    "center_crop_resize",
    "decode_image",
    "encode_image",
    "prepare_image_bytes",
    "to_tensor_range",
]

# Stable rejection reasons; callers aggregate on these, so the strings are part of the API.
EMPTY_FILE = "empty file"  # zero bytes
NOT_AN_IMAGE = "not an image"  # no enabled image format recognises the data
TRUNCATED = "truncated"  # the decoder needed bytes past the end of the data
DECOMPRESSION_BOMB = "decompression bomb"  # the header claims more pixels than allowed
UNSUPPORTED_MODE = "unsupported mode"  # decodes, but the pixel mode has no sound RGB conversion
TOO_SMALL = "too small"  # a side is shorter than min_side
DECODE_ERROR = "decode error"  # a recognised format whose header or pixel data is corrupt
REJECT_REASONS = frozenset(
    {EMPTY_FILE, NOT_AN_IMAGE, TRUNCATED, DECOMPRESSION_BOMB, UNSUPPORTED_MODE, TOO_SMALL, DECODE_ERROR}
)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default warning threshold (~ 9459 x 9459)

# EPS is rendered by shelling out to Ghostscript: a security risk for untrusted files, and never a photo.
_DISABLED_FORMATS = frozenset({"EPS"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# `warnings.catch_warnings` swaps the process-global filter list; two threads interleaving it can leave
# a filter behind. Serialising the (cheap, header-only) open keeps the save/restore pairs nested.
_OPEN_LOCK = threading.Lock()


class RejectedImage(Exception):
    """An input that cannot become a training image.

    ``reason`` is one of :data:`REJECT_REASONS` (for counters and filters); ``detail`` is for humans.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(reason, detail)  # args round-trip through pickle (process pools)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class _TrackedBytes(io.BytesIO):
    """A byte stream that remembers whether a reader ran off its end, to tell truncation from corruption."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.head = bytes(data[:16])
        self.size = len(data)
        self.short_read = False  # some read returned fewer bytes than asked for
        self.read_past_end = False  # some read found no bytes left at all

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and len(chunk) < size:
            self.short_read = True
            if not chunk:
                self.read_past_end = True
        return chunk


@dataclass
class _Decoded:
    image: Image.Image  # RGB, loaded, orientation applied
    format: str | None  # PIL's format name of the source
    passthrough_ok: bool  # the source bytes can be stored as they are (RGB JPEG/PNG, upright, opaque)


def _enabled_formats() -> list[str]:
    # Recomputed per call (cheap) so formats registered later by plugins (e.g. pillow-heif) are honoured.
    Image.init()
    return [fmt for fmt in Image.ID if fmt not in _DISABLED_FORMATS]


def _recognised(prefix: bytes, formats: list[str]) -> bool:
    """Whether some format's magic number matches, i.e. the data claims to be an image."""
    for fmt in formats:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is None:
            continue
        try:
            result = accept(prefix)
        except Exception:
            continue
        if result and not isinstance(result, str):
            return True
    return False


def _riff_cut_short(stream: _TrackedBytes) -> bool:
    """WebP's reader slurps the whole RIFF at once, so only the container's own length can tell."""
    head = stream.head
    return head[:4] == b"RIFF" and len(head) >= 8 and int.from_bytes(head[4:8], "little") + 8 > stream.size


def _failure_reason(exc: BaseException, stream: _TrackedBytes, *, opening: bool) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return DECOMPRESSION_BOMB
    if "truncated" in str(exc).lower() or stream.read_past_end or _riff_cut_short(stream):
        return TRUNCATED
    # While parsing a header a short read can only mean the file stops inside that header.
    if opening and stream.short_read:
        return TRUNCATED
    return DECODE_ERROR


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _open(stream: _TrackedBytes) -> ImageFile.ImageFile:
    formats = _enabled_formats()
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # PIL warns (instead of raising) between MAX_IMAGE_PIXELS and twice that; make it an error
            # for the duration of the header parse only.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream, formats=formats)
    except UnidentifiedImageError as exc:
        if not _recognised(stream.head, formats):
            raise RejectedImage(NOT_AN_IMAGE, "no supported image format recognises the data") from exc
        raise RejectedImage(_failure_reason(exc, stream, opening=True), "unreadable header") from exc
    except Exception as exc:  # broken headers raise anything: SyntaxError, ValueError, OSError, struct.error
        raise RejectedImage(_failure_reason(exc, stream, opening=True), _describe(exc)) from exc


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise RejectedImage(DECOMPRESSION_BOMB, f"{width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < max(min_side, 1):
        raise RejectedImage(TOO_SMALL, f"{width}x{height} has a side under {min_side}")


def _orientation(image: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable: broken metadata must not cost a good image."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE_FOR_ORIENTATION else 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # exif_transpose also rewrites the EXIF block, which can fail on odd tags
        return image.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])


def _high_bit_depth_to_l(image: Image.Image) -> np.ndarray:
    """8-bit gray from I;16 / I / F data, rescaled rather than clipped (PIL's convert clips at 255)."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:  # normalised float data
            out = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:  # float data on an 8-bit scale
            out = values
        else:  # arbitrary range: stretch
            out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo >= 0 and hi <= 0xFFFF:  # 16-bit samples (I;16*, or 16-bit data held in mode I)
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if hi == lo:
        return np.zeros(values.shape, np.uint8)
    stretched = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))  # genuinely 32-bit data
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decodable mode to RGB; transparency is composited over white, as a viewer shows it."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        gray = _high_bit_depth_to_l(image)
        key = image.info.get("transparency")
        if isinstance(key, int) and not isinstance(key, bool):
            gray[np.asarray(image) == key] = 255
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "La":
        image = image.convert("LA")  # PIL converts premultiplied La only to LA
    if image.has_transparency_data:
        rgba = image.convert("RGBA")  # also un-premultiplies RGBa and applies palette/tRNS alpha
        out = Image.new("RGB", image.size, _WHITE)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    # CMYK: PIL's JPEG reader already undoes Adobe's inverted storage, so this maps C/M/Y/K correctly.
    return image.convert("RGB")


def _rgb_icc_profile(info: dict) -> bytes | None:
    """The source's ICC profile if it describes RGB data, so it stays valid on the RGB output."""
    profile = info.get("icc_profile")
    if isinstance(profile, bytes) and len(profile) >= 20 and profile[16:20] == b"RGB ":
        return profile
    return None


def _decode(data: bytes, *, max_pixels: int, min_side: int) -> _Decoded:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise RejectedImage(EMPTY_FILE, "0 bytes")

    stream = _TrackedBytes(data)
    image = _open(stream)
    source_format, source_mode = image.format, image.mode
    # Checked from the header, before any pixel memory is allocated.
    _check_size(image.size, max_pixels, min_side)
    animated = source_format == "PNG" and getattr(image, "n_frames", 1) > 1

    stream.short_read = stream.read_past_end = False
    try:
        image.load()  # the first frame only, for animations
    except Exception as exc:  # OSError ("truncated", "broken data stream"), SyntaxError, ValueError, ...
        raise RejectedImage(_failure_reason(exc, stream, opening=False), _describe(exc)) from exc
    if ImageFile.LOAD_TRUNCATED_IMAGES and stream.read_past_end:
        # Someone enabled PIL's lenient mode process-wide; it pads missing data with grey instead of
        # raising. Running out of bytes mid-decode still means the file is cut off.
        raise RejectedImage(TRUNCATED, "decoder ran past the end of the data")
    _check_size(image.size, max_pixels, min_side)  # a few containers (ICO, ICNS) only know it now

    orientation = _orientation(image)
    icc_profile = _rgb_icc_profile(image.info)
    try:
        had_transparency = image.has_transparency_data
        rgb = _to_rgb(_apply_orientation(image, orientation))
    except Exception as exc:
        raise RejectedImage(UNSUPPORTED_MODE, f"mode {source_mode}: {_describe(exc)}") from exc
    # Drop stale metadata (EXIF orientation already applied, CMYK profiles, transparency keys) so that
    # re-encoding cannot double-rotate or mis-tag the pixels.
    rgb.info = {"icc_profile": icc_profile} if icc_profile else {}
    passthrough_ok = (
        source_mode == "RGB" and orientation == 1 and not had_transparency and not animated
    ) and source_format in ("JPEG", "PNG")
    return _Decoded(image=rgb, format=source_format, passthrough_ok=passthrough_ok)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image with EXIF orientation applied.

    Raises :class:`RejectedImage` (never anything else for bad data) when the bytes are empty, not an
    image, truncated or corrupt, claim more than ``max_pixels`` pixels, have a side under ``min_side``,
    or use a pixel mode with no sound RGB conversion. Animated images yield their first frame.
    """
    return _decode(data, max_pixels=max_pixels, min_side=min_side).image


def encode_image(image: Image.Image, format: str = "PNG", quality: int = 95) -> bytes:
    """Serialise an image; ``quality`` applies to lossy formats. An RGB ICC profile in ``info`` is kept."""
    fmt = format.upper()
    fmt = "JPEG" if fmt == "JPG" else fmt
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = _to_rgb(image)  # JPEG has no alpha; composite rather than let PIL refuse
    params: dict = {"icc_profile": _rgb_icc_profile(image.info) if image.mode == "RGB" else None}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        params["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _fit_longer_side(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def prepare_image_bytes(
    data: bytes, *, max_side: int | None, max_pixels: int, min_side: int
) -> tuple[bytes, int, int]:
    """Validate an image and return the bytes to store, with their width and height.

    An RGB JPEG/PNG that needs no rotation and fits ``max_side`` is returned byte-for-byte: re-encoding
    would only add JPEG generation loss. Anything else is decoded, shrunk so its longer side is at most
    ``max_side`` (LANCZOS, aspect kept) and re-encoded: JPEG q95 for JPEG sources, PNG otherwise.
    Raises :class:`RejectedImage` as :func:`decode_image` does, and ``too small`` if the resize would
    leave a side under ``min_side``.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    decoded = _decode(data, max_pixels=max_pixels, min_side=min_side)
    image = decoded.image
    fits = max_side is None or max(image.size) <= max_side
    if fits and decoded.passthrough_ok:
        return data, image.width, image.height
    if not fits:
        image = _fit_longer_side(image, max_side)
        if min(image.size) < max(min_side, 1):
            raise RejectedImage(
                TOO_SMALL, f"{decoded.image.width}x{decoded.image.height} -> {image.width}x{image.height}"
            )
    fmt = "JPEG" if decoded.format in _JPEG_FORMATS else "PNG"
    return encode_image(image, fmt, quality=95), image.width, image.height


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT ``center_crop_arr``: BOX-halve while the short side is >= 2*size, BICUBIC the short side
    to ``size``, then take the centred ``size`` x ``size`` square. Kept identical so FID references match.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    image = _to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor_range(image: Image.Image) -> np.ndarray:
    """RGB pixels as a float32 CHW array in [-1, 1], the range diffusion models are trained on."""
    pixels = np.asarray(_to_rgb(image), dtype=np.float32)
    return np.ascontiguousarray((pixels / 127.5 - 1.0).transpose(2, 0, 1))
