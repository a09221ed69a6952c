"""PNG, JPEG, BMP and TIFF via Pillow.

Integer pixels are scaled by their type's range (8-bit by 255, 16-bit by
65535), so stored contrast is kept; float TIFFs already in [0, 1] are kept,
other float data is scaled robustly (0.5 / 99.5 percentiles). There are no
physical units here, so `ReadOptions.window` does not apply. Alpha is dropped.
The image size is checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medtl.errors import UnreadableImage
from medtl.intake.phi import error_kind
from medtl.intake.readers.base import (
    METADATA_FIELDS, Decoded, ReadOptions, check_finite, check_size, frame_index, rescale_to_unit, robust_range,
)

SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff"}
FORMATS = {"PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF"}  # MPO: JPEG from cameras with a preview frame
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_raster(path: Path) -> bool:
    if path.suffix.lower() in SUFFIXES:
        return True
    return _has_image_magic(path)


def _has_image_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(m) for m in _MAGIC)


def read(path: Path, options: ReadOptions) -> Decoded:
    with warnings.catch_warnings():
        # Sizes are checked against options.max_pixels below; Pillow's own warning adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise UnreadableImage("too_large", f"{path}: more pixels than Pillow's safety limit ({error_kind(e)})") from None
        except UnidentifiedImageError:
            if _has_image_magic(path):
                raise UnreadableImage("corrupt_image", f"{path} starts like an image but Pillow cannot parse it") from None
            raise UnreadableImage("not_an_image", f"{path} has an image file name but its content is not an image") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UnreadableImage(_failure_reason(e), f"{path}: Pillow cannot decode it ({error_kind(e)})") from None
        with im:
            if im.format not in FORMATS:
                raise UnreadableImage("unsupported_format", f"{path} is a {im.format} image; PNG, JPEG, BMP and TIFF are read")
            width, height = im.size
            check_size(path, height, width, options)
            frames = int(getattr(im, "n_frames", 1) or 1)
            index = frame_index(path, frames, options.frame, "page")
            try:
                if index:
                    im.seek(index)
                    check_size(path, im.size[1], im.size[0], options)
                im.load()
                im = ImageOps.exif_transpose(im)  # phone and dermoscopy JPEGs store rotation in EXIF
                pixels = _to_unit(path, im)
            except UnreadableImage:
                raise
            except Image.DecompressionBombError as e:
                raise UnreadableImage("too_large", f"{path}: more pixels than Pillow's safety limit ({error_kind(e)})") from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise UnreadableImage(_failure_reason(e), f"{path}: Pillow cannot decode it ({error_kind(e)})") from None
    metadata = dict.fromkeys(METADATA_FIELDS, "")
    metadata["photometric"] = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if frames > 1:
        metadata["frame"] = str(index)
    return Decoded(np.ascontiguousarray(pixels, dtype=np.float32), metadata, {})


def _failure_reason(e: Exception) -> str:
    text = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in text or "premature end" in text or "not enough data" in text:
        return "truncated"
    if "unsupported" in text or "cannot identify" in text and "mode" in text:
        return "unsupported_format"
    return "corrupt_image"



def _to_unit(path: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "LA"):
        return np.asarray(im.getchannel(0), dtype=np.float32) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode in ("I", "F"):
        values = np.asarray(im).astype(np.float64)
        check_finite(path, values)
        if mode == "I" and values.min() >= 0 and values.max() <= 65535:  # 16-bit data in a 32-bit container
            return (values / (255.0 if values.max() <= 255 else 65535.0)).astype(np.float32)
        if mode == "F" and values.min() >= 0 and values.max() <= 1:
            return values.astype(np.float32)
        return rescale_to_unit(values, *robust_range(values))
    if mode != "RGB":
        im = im.convert("RGBA" if mode in ("P", "PA") else "RGB")
    rgb = np.asarray(im)[..., :3]
    return rgb.astype(np.float32) / 255.0
