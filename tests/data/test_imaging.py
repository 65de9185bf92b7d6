"""Tests for t2i.data.imaging: every bad file is rejected with the right reason, every good one survives intact."""

from __future__ import annotations

import io
import pickle
import random
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from t2i.data import imaging
from t2i.data.imaging import (
    REJECT_REASONS,
    RejectedImage,
    center_crop_resize,
    decode_image,
    encode_image,
    prepare_image_bytes,
    to_tensor_range,
)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height 1-bit pixels: a bomb that costs nothing to build."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_header_end(jpeg: bytes) -> int:
    """Offset just past the SOS segment, where entropy-coded data starts."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    good_jpeg = _encode(_noise(64, 48), "JPEG", quality=90)
    good_png = _encode(_noise(40, 30, seed=1), "PNG")
    big_png = _encode(_noise(64, 64, seed=2), "PNG")

    header_end = _jpeg_header_end(good_jpeg)
    junk = random.Random(0).randbytes(len(good_jpeg) - header_end - 2)

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # right half pure black

    gray = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)))

    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (10, 0, 20, 10))  # fully transparent black on the right
    rgba.paste((0, 0, 255, 128), (0, 5, 10, 10))  # half-transparent blue bottom-left

    gray16 = Image.fromarray(np.array([[0, 32768, 65535, 1000]] * 4, dtype=np.uint16))
    assert gray16.mode == "I;16"

    palette = Image.new("P", (8, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 4, 4))  # index 0 (black) is the transparent one

    oriented = Image.new("RGB", (40, 20), (0, 0, 255))
    oriented.paste((255, 0, 0), (0, 0, 10, 10))  # red block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise

    frames = [Image.new("RGB", (12, 12), (255, 0, 0)), Image.new("RGB", (12, 12), (0, 0, 255))]

    contents = {
        "good.jpg": good_jpeg,
        "good.png": good_png,
        "corrupt.jpg": good_jpeg[:header_end] + junk + b"\xff\xd9",
        "truncated.png": big_png[: len(big_png) // 2],
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just a text file with a .jpg name\n" * 4,
        "cmyk.jpg": _encode(cmyk, "JPEG", quality=95),
        "gray.png": _encode(gray, "PNG"),
        "gray.jpg": _encode(gray, "JPEG", quality=95),
        "rgba.png": _encode(rgba, "PNG"),
        "gray16.png": _encode(gray16, "PNG"),
        "palette_trns.png": _encode(palette, "PNG", transparency=0),
        "palette.png": _encode(palette, "PNG"),
        "exif6.jpg": _encode(oriented, "JPEG", quality=95, exif=exif.tobytes()),
        "bomb.png": _png_claiming(20_000, 20_000),
        "bomb_warn.png": _png_claiming(10_000, 10_000),  # between PIL's warning and error thresholds
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    return paths


def _read(files: dict[str, Path], name: str) -> bytes:
    return files[name].read_bytes()


# --- RejectedImage ---------------------------------------------------------------------------------------


def test_rejected_image_str_reason_and_pickle() -> None:
    err = RejectedImage("truncated", "cut at byte 10")
    assert str(err) == "truncated: cut at byte 10"
    assert (err.reason, err.detail) == ("truncated", "cut at byte 10")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.detail, str(clone)) == (err.reason, err.detail, str(err))
    assert {
        "empty file",
        "not an image",
        "truncated",
        "decompression bomb",
        "unsupported mode",
        "too small",
        "decode error",
    } == REJECT_REASONS
    with pytest.raises(ValueError):
        RejectedImage("bad vibes", "")


# --- rejections ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("corrupt.jpg", "decode error"),
        ("truncated.png", "truncated"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "decompression bomb"),
        ("bomb_warn.png", "decompression bomb"),
    ],
)
def test_bad_files_are_rejected_with_reason(files: dict[str, Path], name: str, reason: str) -> None:
    with pytest.raises(RejectedImage) as info:
        decode_image(_read(files, name))
    assert info.value.reason == reason
    assert str(info.value).startswith(reason + ": ")


def test_jpeg_header_cut_short_is_truncated_not_foreign(files: dict[str, Path]) -> None:
    data = _read(files, "good.jpg")
    with pytest.raises(RejectedImage) as info:
        decode_image(data[: _jpeg_header_end(data) - 30])
    assert info.value.reason == "truncated"


def test_truncated_detected_even_when_pil_is_lenient(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another library in the process may flip this global; PIL then pads missing rows with grey.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("truncated.png", "truncated.jpg"):
        with pytest.raises(RejectedImage) as info:
            decode_image(_read(files, name))
        assert info.value.reason == "truncated", name
    for name in ("good.jpg", "good.png", "gray16.png", "animated.gif", "animated.png"):
        assert decode_image(_read(files, name)).mode == "RGB"


def test_truncated_webp_is_truncated() -> None:
    data = _encode(_noise(32, 32), "WEBP", quality=80)
    assert decode_image(data).size == (32, 32)
    with pytest.raises(RejectedImage) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"


def test_bomb_checked_from_header_not_pil_global(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With PIL's own guard disabled, decoding the claimed 20000x20000 pixels would be attempted (and then
    # fail as "truncated"): the rejection must come from our header check, before any pixel work.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(RejectedImage) as info:
        decode_image(_read(files, "bomb.png"))
    assert info.value.reason == "decompression bomb"
    assert "20000x20000" in info.value.detail


def test_max_pixels_is_honoured_on_ordinary_images(files: dict[str, Path]) -> None:
    data = _read(files, "good.jpg")  # 64 x 48 = 3072 pixels
    assert decode_image(data, max_pixels=3072).size == (64, 48)
    with pytest.raises(RejectedImage) as info:
        decode_image(data, max_pixels=3071)
    assert info.value.reason == "decompression bomb"


def test_pil_bomb_warning_becomes_rejection_without_leaking(files: dict[str, Path]) -> None:
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RejectedImage) as info:
            # Our own limit is generous; PIL's warning threshold (~89.5M) is what trips on 100M pixels.
            decode_image(_read(files, "bomb_warn.png"), max_pixels=150_000_000)
        assert info.value.reason == "decompression bomb"
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before


def test_too_small(files: dict[str, Path]) -> None:
    data = _read(files, "good.png")  # 40 x 30
    assert decode_image(data, min_side=30).size == (40, 30)
    with pytest.raises(RejectedImage) as info:
        decode_image(data, min_side=31)
    assert info.value.reason == "too small"


def test_unconvertible_mode_is_rejected_not_raised(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(image: Image.Image) -> Image.Image:
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr(imaging, "_to_rgb", refuse)
    with pytest.raises(RejectedImage) as info:
        decode_image(_read(files, "gray.png"))
    assert info.value.reason == "unsupported mode"
    assert "mode L" in info.value.detail


def test_eps_is_never_handed_to_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(RejectedImage) as info:
        decode_image(eps)
    assert info.value.reason == "not an image"


# --- good files and mode conversion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("good.jpg", (64, 48)),
        ("good.png", (40, 30)),
        ("cmyk.jpg", (16, 16)),
        ("gray.png", (32, 8)),
        ("gray.jpg", (32, 8)),
        ("rgba.png", (20, 10)),
        ("gray16.png", (4, 4)),
        ("palette_trns.png", (8, 4)),
        ("palette.png", (8, 4)),
        ("exif6.jpg", (20, 40)),
        ("animated.gif", (12, 12)),
        ("animated.png", (12, 12)),
    ],
)
def test_good_files_decode_to_loaded_rgb(files: dict[str, Path], name: str, size: tuple[int, int]) -> None:
    image = decode_image(_read(files, name))
    assert image.mode == "RGB"
    assert image.size == size
    assert np.asarray(image).shape == (size[1], size[0], 3)  # pixels really loaded


def test_good_png_pixels_are_exact(files: dict[str, Path]) -> None:
    np.testing.assert_array_equal(
        np.asarray(decode_image(_read(files, "good.png"))), np.asarray(_noise(40, 30, 1))
    )


def test_cmyk_jpeg_colours(files: dict[str, Path]) -> None:
    pixels = np.asarray(decode_image(_read(files, "cmyk.jpg"))).astype(int)
    assert np.abs(pixels[8, 3] - [255, 0, 0]).max() <= 8  # red, not cyan (inverted) or garbage
    assert np.abs(pixels[8, 12] - [0, 0, 0]).max() <= 8


def test_grayscale_becomes_equal_channels(files: dict[str, Path]) -> None:
    pixels = np.asarray(decode_image(_read(files, "gray.png")))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[0, :, 0], np.arange(0, 256, 8))


def test_rgba_composited_over_white(files: dict[str, Path]) -> None:
    pixels = np.asarray(decode_image(_read(files, "rgba.png"))).astype(int)
    assert tuple(pixels[2, 2]) == (255, 0, 0)  # opaque stays as is
    assert tuple(pixels[2, 15]) == (255, 255, 255)  # transparent black -> white, not black
    assert np.abs(pixels[7, 2] - [127, 127, 255]).max() <= 1  # 50% blue over white


def test_16bit_gray_is_scaled_not_clipped(files: dict[str, Path]) -> None:
    pixels = np.asarray(decode_image(_read(files, "gray16.png")))
    assert list(pixels[0, :, 0]) == [0, 128, 255, 4]  # PIL's plain convert would give [0, 255, 255, 255]


def test_high_bit_depth_modes_in_memory() -> None:
    as_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert as_i.mode == "I"
    assert list(np.asarray(imaging._to_rgb(as_i))[0, :, 0]) == [0, 128, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert as_f.mode == "F"
    assert list(np.asarray(imaging._to_rgb(as_f))[0, :, 0]) == [0, 128, 255]


def test_palette_transparency_becomes_white(files: dict[str, Path]) -> None:
    with_trns = np.asarray(decode_image(_read(files, "palette_trns.png")))
    assert tuple(with_trns[1, 1]) == (255, 255, 255)
    assert tuple(with_trns[1, 6]) == (255, 0, 0)
    without = np.asarray(decode_image(_read(files, "palette.png")))
    assert tuple(without[1, 1]) == (0, 0, 0)


def test_exif_orientation_applied(files: dict[str, Path]) -> None:
    image = decode_image(_read(files, "exif6.jpg"))
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    # Rotating 90 degrees clockwise moves the stored top-left block to the top-right corner.
    assert np.abs(pixels[4, 15] - [255, 0, 0]).max() <= 30
    assert np.abs(pixels[4, 4] - [0, 0, 255]).max() <= 30
    assert 0x0112 not in image.getexif()


def test_animated_takes_first_frame(files: dict[str, Path]) -> None:
    for name in ("animated.gif", "animated.png"):
        assert decode_image(_read(files, name)).getpixel((6, 6)) == (255, 0, 0), name


# --- prepare_image_bytes --------------------------------------------------------------------------------


def test_passthrough_keeps_original_bytes(files: dict[str, Path]) -> None:
    for name, size in (("good.jpg", (64, 48)), ("good.png", (40, 30))):
        data = _read(files, name)
        for max_side in (64, 1000, None):
            out, width, height = prepare_image_bytes(data, max_side=max_side, max_pixels=10**6, min_side=1)
            assert out == data, (name, max_side)
            assert (width, height) == size


def test_oversized_jpeg_is_resized_and_reencoded(files: dict[str, Path]) -> None:
    data = _read(files, "good.jpg")
    out, width, height = prepare_image_bytes(data, max_side=32, max_pixels=10**6, min_side=1)
    assert out != data
    assert (width, height) == (32, 24)
    with Image.open(io.BytesIO(out)) as stored:
        assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", (32, 24))


def test_non_rgb_or_rotated_sources_are_reencoded(files: dict[str, Path]) -> None:
    cases = {
        "rgba.png": ("PNG", (20, 10)),
        "palette_trns.png": ("PNG", (8, 4)),
        "gray16.png": ("PNG", (4, 4)),
        "cmyk.jpg": ("JPEG", (16, 16)),
        "gray.jpg": ("JPEG", (32, 8)),
        "exif6.jpg": ("JPEG", (20, 40)),
        "animated.png": ("PNG", (12, 12)),
    }
    for name, (fmt, size) in cases.items():
        data = _read(files, name)
        out, width, height = prepare_image_bytes(data, max_side=512, max_pixels=10**6, min_side=1)
        assert out != data, name
        assert (width, height) == size, name
        with Image.open(io.BytesIO(out)) as stored:
            assert (stored.format, stored.mode, stored.size) == (fmt, "RGB", size), name
            assert stored.getexif().get(0x0112, 1) == 1, name  # no second rotation downstream
            assert getattr(stored, "n_frames", 1) == 1, name
        # What is stored decodes to what decode_image produced (exactly for PNG).
        if fmt == "PNG":
            np.testing.assert_array_equal(np.asarray(decode_image(out)), np.asarray(decode_image(data)))


def test_prepare_rejects_bad_input(files: dict[str, Path]) -> None:
    with pytest.raises(RejectedImage) as info:
        prepare_image_bytes(_read(files, "truncated.png"), max_side=256, max_pixels=10**6, min_side=1)
    assert info.value.reason == "truncated"


def test_prepare_rejects_when_resize_leaves_a_sliver() -> None:
    data = _encode(_noise(400, 10), "PNG")
    with pytest.raises(RejectedImage) as info:
        prepare_image_bytes(data, max_side=40, max_pixels=10**6, min_side=2)
    assert info.value.reason == "too small"


def test_encode_image_roundtrip() -> None:
    image = _noise(10, 6)
    png = encode_image(image)
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(image))
    jpeg = encode_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "JPEG", quality=90)
    with Image.open(io.BytesIO(jpeg)) as decoded:
        assert decoded.format == "JPEG" and decoded.getpixel((4, 4)) == (255, 255, 255)


# --- center_crop_resize / to_tensor_range ---------------------------------------------------------------


def _adm_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Reference: guided-diffusion / DiT ``center_crop_arr``."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize(
    ("width", "height", "size"), [(300, 200, 64), (97, 211, 32), (20, 30, 64), (64, 64, 64)]
)
def test_center_crop_resize_matches_adm(width: int, height: int, size: int) -> None:
    source = _noise(width, height, seed=width)
    out = center_crop_resize(source, size)
    assert (out.mode, out.size) == ("RGB", (size, size))
    np.testing.assert_array_equal(np.asarray(out), _adm_center_crop_arr(source, size))


def test_center_crop_keeps_centered_square_centered() -> None:
    source = Image.new("RGB", (300, 200), (255, 255, 255))
    source.paste((0, 0, 0), (100, 50, 200, 150))  # 100x100 black square centred at (150, 100)
    dark = np.asarray(center_crop_resize(source, 64))[..., 0] < 128
    ys, xs = np.nonzero(dark)
    assert abs(xs.mean() - 31.5) < 0.75 and abs(ys.mean() - 31.5) < 0.75
    assert 28 <= xs.max() - xs.min() + 1 <= 36  # 100 px of 200 short side -> ~32 px of 64


def test_to_tensor_range() -> None:
    image = Image.new("RGB", (5, 3), (255, 0, 0))
    image.putpixel((4, 2), (0, 255, 128))
    tensor = to_tensor_range(image)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 3, 5)
    assert tensor.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(tensor[:, 0, 0], [1.0, -1.0, -1.0])
    np.testing.assert_allclose(tensor[:, 2, 4], [-1.0, 1.0, 128 / 127.5 - 1.0], atol=1e-6)
    assert to_tensor_range(Image.new("L", (2, 2), 0)).shape == (3, 2, 2)


# --- PIL globals ----------------------------------------------------------------------------------------


def _pil_state() -> tuple:
    return Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)


def test_no_pil_global_changes(files: dict[str, Path]) -> None:
    before = _pil_state()
    for path in files.values():
        data = path.read_bytes()
        try:
            decode_image(data)
            prepare_image_bytes(data, max_side=16, max_pixels=10**6, min_side=1)
        except RejectedImage:
            pass
        assert _pil_state() == before, path.name
    with pytest.raises(RejectedImage):
        decode_image(_read(files, "bomb_warn.png"), max_pixels=150_000_000)
    assert _pil_state() == before


def test_concurrent_decodes_leave_filters_alone(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Overlapping catch_warnings blocks in two threads restore each other's filter lists and leak one;
    # a slow open widens that window so an unserialised implementation fails here reliably.
    real_open = Image.open

    def slow_open(*args, **kwargs):
        time.sleep(0.002)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    before = _pil_state()
    payloads = [_read(files, name) for name in ("bomb_warn.png", "good.jpg", "bomb.png", "truncated.png")]
    reasons: list[str] = []

    def work() -> None:
        for _ in range(5):
            for data in payloads:
                try:
                    decode_image(data, max_pixels=150_000_000)
                    reasons.append("ok")
                except RejectedImage as err:
                    reasons.append(err.reason)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _pil_state() == before
    assert sorted(set(reasons)) == ["decompression bomb", "ok", "truncated"]
    assert reasons.count("decompression bomb") == 40
