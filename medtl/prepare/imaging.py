"""From a decoded image to the model's input: the preprocessing record and the one function that applies it.

The record says everything between the source file and the network: how the
file is read (`ingest.read`: window, frame, NIfTI axis and slice), the 16-bit
quantisation of the pixel store, the channels, the image side and resize
rule, the normalisation statistics and the class order. Preprocess writes it
into data/prepared/stats.json, fine-tune copies it into models/model.pt, and
preprocess, `medtl predict` and self-supervised pretraining's extra images
all turn pixels into arrays through `model_input`, so the deployed model sees
exactly what the evaluated one saw.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medtl.errors import MedtlError, ParamsError
from medtl.ingest.store import SCALE, quantize
from medtl.intake.readers.base import Decoded, ReadOptions

RESIZE_RULES = ("pad", "stretch", "crop")
# The read options that change pixels; the size limits only refuse files.
READ_KEYS = ("window", "frame", "axis", "slice")


def read_options(raw: dict | None, key: str = "ingest.read") -> ReadOptions:
    """ReadOptions from a mapping such as params.yaml's `ingest.read`; errors name `key`."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(READ_KEYS))
    if unknown:
        raise ParamsError(f"params section '{key}' has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed keys are {', '.join(READ_KEYS)}")
    try:
        return ReadOptions(**raw)
    except ParamsError as e:
        raise ParamsError(str(e).replace("read option '", f"params key '{key}.")) from None


def read_record(options: ReadOptions) -> dict[str, Any]:
    """The read options as plain JSON values, as the record stores them."""
    window = options.window
    return {"window": list(window) if isinstance(window, tuple) else window, "frame": options.frame,
            "axis": options.axis, "slice": options.slice}


@dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded image into the model's input, and how the model normalises it."""

    read: dict[str, Any]  # ingest.read: window, frame, axis, slice
    image_size: int
    channels: int
    resize: str
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    quantisation: str = "uint16"  # the pixel store's: intensities in [0, 1] rounded to 1/65535

    def read_options(self) -> ReadOptions:
        return read_options(self.read, "preprocessing.read")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Preprocessing:
        """The record stored in `where` (a file name), checked; a missing or odd key is a clear error."""
        if not isinstance(raw, dict):
            raise MedtlError(f"{where} has no preprocessing record (got {type(raw).__name__})")
        names = [f for f in cls.__dataclass_fields__]
        missing = [k for k in names if k not in raw]
        if missing:
            raise MedtlError(f"{where}: the preprocessing record lacks {', '.join(missing)}; "
                             "it was written by an older medtl, rerun the pipeline (dvc repro)")
        rec = cls(**{k: raw[k] for k in names})
        if rec.resize not in RESIZE_RULES or rec.channels not in (1, 3) or not isinstance(rec.image_size, int) \
                or rec.quantisation != "uint16":
            raise MedtlError(f"{where}: preprocessing record {rec.to_dict()} is not valid "
                             f"(resize one of {RESIZE_RULES}, channels 1 or 3, an integer image_size, uint16)")
        rec.read_options()
        return rec

    def same_input(self, other: Preprocessing) -> list[str]:
        """The keys in which two records would give a different model input for the same file."""
        return [k for k in ("read", "image_size", "channels", "resize", "quantisation")
                if getattr(self, k) != getattr(other, k)]


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) -> (H, W, channels): RGB to luminance, or gray repeated when three are asked for."""
    c = img.shape[2]
    if c == channels:
        return img
    if channels == 1:
        if c >= 3:
            return (img[:, :, :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
        return img[:, :, :1]
    return np.repeat(img[:, :, :1], 3, axis=2)


def resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W, C) float -> (size, size, C). `pad` keeps the aspect ratio and pads with zeros."""
    h, w = img.shape[:2]
    if mode == "stretch":
        th, tw = size, size
    else:
        scale = size / max(h, w) if mode == "pad" else size / min(h, w)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
    out = cv2.resize(img, (tw, th), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    if mode == "crop":
        y, x = (th - size) // 2, (tw - size) // 2
        return out[y : y + size, x : x + size]
    if mode == "pad":
        canvas = np.zeros((size, size, img.shape[2]), dtype=out.dtype)
        y, x = (size - th) // 2, (size - tw) // 2
        canvas[y : y + th, x : x + tw] = out
        return canvas
    return out


def model_input(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Decoded [0, 1] pixels, (H, W) or (H, W, C) -> the (C, S, S) float16 array the model takes.

    Quantised to the store's 16 bits first (a no-op for pixels read back from
    the store), so a file decoded at prediction time gives the same bits as
    the same file through ingest and preprocess.
    """
    img = quantize(pixels).astype(np.float32) / SCALE
    img = resize(to_channels(img, pre.channels), pre.image_size, pre.resize)
    return img.transpose(2, 0, 1).astype(np.float16)
