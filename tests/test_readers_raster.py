"""PNG / JPEG / BMP / TIFF reader on images written by Pillow in the test, and format dispatch."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medtl.errors import UnreadableImage
from medtl.intake.phi import WHITELIST
from medtl.intake.readers import read
from medtl.intake.readers.base import ReadOptions

rng = np.random.default_rng(0)


def one(path, options: ReadOptions = ReadOptions()):
    out = read(path, options)
    assert len(out) == 1
    d = out[0]
    assert d.pixels.dtype == np.float32
    assert 0.0 <= d.pixels.min() and d.pixels.max() <= 1.0
    assert set(d.metadata) <= set(WHITELIST)
    return d


def reason(path, options: ReadOptions = ReadOptions()) -> str:
    with pytest.raises(UnreadableImage) as info:
        read(path, options)
    assert str(path).split("/")[-1] in str(info.value)
    return info.value.reason


def test_png_8bit_gray(tmp_path):
    values = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "a.png")
    d = one(tmp_path / "a.png")
    np.testing.assert_allclose(d.pixels, values / 255.0, atol=1e-6)
    assert d.metadata["photometric"] == "MONOCHROME2"
    assert d.identity == {}


def test_png_16bit_keeps_full_depth(tmp_path):
    values = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a16.png")
    np.testing.assert_allclose(one(tmp_path / "a16.png").pixels, values / 65535.0, atol=1e-6)


def test_rgb_and_rgba_drop_alpha(tmp_path):
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    d = one(tmp_path / "rgba.png")
    assert d.pixels.shape == (20, 24, 3)
    np.testing.assert_allclose(d.pixels, rgba[..., :3] / 255.0, atol=1e-6)
    assert d.metadata["photometric"] == "RGB"
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
    assert one(tmp_path / "palette.png").pixels.shape == (20, 24, 3)
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    assert one(tmp_path / "la.png").pixels.shape == (20, 24)


def test_jpeg_and_bmp(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    rgb = np.stack([smooth, smooth[:, ::-1], np.full_like(smooth, 128)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    d = one(tmp_path / "photo.jpg")
    assert d.pixels.shape == (48, 64, 3)
    assert np.abs(d.pixels - rgb / 255.0).mean() < 0.02
    Image.fromarray(rgb).save(tmp_path / "photo.bmp")
    np.testing.assert_allclose(one(tmp_path / "photo.bmp").pixels, rgb / 255.0, atol=1e-6)
    Image.fromarray(smooth).save(tmp_path / "gray.jpeg")
    assert one(tmp_path / "gray.jpeg").pixels.shape == (48, 64)


def test_jpeg_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert one(tmp_path / "phone.jpg").pixels.shape == (40, 20, 3)


def test_tiff_integer_and_float(tmp_path):
    values = rng.integers(0, 65536, (16, 12), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a16.tif")
    np.testing.assert_allclose(one(tmp_path / "a16.tif").pixels, values / 65535.0, atol=1e-6)
    unit = rng.random((16, 12)).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    np.testing.assert_allclose(one(tmp_path / "unit.tiff").pixels, unit, atol=1e-6)
    physical = (rng.random((16, 12)) * 3000 - 1000).astype(np.float32)  # e.g. Hounsfield units
    Image.fromarray(physical).save(tmp_path / "hu.tif")
    d = one(tmp_path / "hu.tif")
    assert d.pixels.min() == 0.0 and d.pixels.max() == 1.0
    assert np.corrcoef(d.pixels.ravel(), physical.ravel())[0, 1] > 0.99
    physical[2, 3] = np.nan
    Image.fromarray(physical).save(tmp_path / "nan.tif")
    assert reason(tmp_path / "nan.tif") == "non_finite"


def test_multi_page_tiff(tmp_path):
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 100, 200)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert one(tmp_path / "stack.tif").pixels.mean() == pytest.approx(100 / 255)
    first = one(tmp_path / "stack.tif", ReadOptions(frame="first"))
    assert first.pixels.mean() == 0 and first.metadata["frame"] == "0"
    assert reason(tmp_path / "stack.tif", ReadOptions(frame=3)) == "frame_out_of_range"


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
    assert reason(tmp_path / "bomb.png") == "too_large"
    (tmp_path / "big.png").write_bytes(png_header_only(8000, 8000))  # 64 MP: above max_pixels, below Pillow's guard
    assert reason(tmp_path / "big.png") == "too_large"


def test_too_small(tmp_path):
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    assert reason(tmp_path / "dot.png") == "too_small"
    assert one(tmp_path / "dot.png", ReadOptions(min_side=1)).pixels.shape == (1, 1)


def test_damaged_and_non_image_files(tmp_path):
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.png") == "truncated"
    (tmp_path / "fake.png").write_text("a text file with an image extension")
    assert reason(tmp_path / "fake.png") == "not_an_image"
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert reason(tmp_path / "zero.jpg") == "empty_file"
    (tmp_path / "notes.txt").write_text("labels: normal, pneumonia")
    assert reason(tmp_path / "notes.txt") == "not_an_image"
    (tmp_path / "labels.csv").write_text("file,label\na.png,1\n")
    assert reason(tmp_path / "labels.csv") == "not_an_image"
    (tmp_path / "scan.nrrd").write_bytes(b"NRRD0004\n")
    assert reason(tmp_path / "scan.nrrd") == "unsupported_format"
    Image.new("L", (16, 16)).save(tmp_path / "anim.gif")
    assert reason(tmp_path / "anim.gif") == "unsupported_format"
    assert reason(tmp_path) == "not_an_image"  # a directory
    assert reason(tmp_path / "missing.png") == "not_an_image"


def test_png_without_suffix_is_recognised(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "image", format="PNG")
    assert one(tmp_path / "image").pixels.shape == (10, 10)
