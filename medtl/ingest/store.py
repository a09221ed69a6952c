"""The consolidated pixel store: every decoded image in one flat uint16 file.

Thousands of small files slow DVC down; one file with offsets recorded in the
manifest keeps an artifact to a handful of files and lets readers memory-map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE = 65535.0  # uint16 value of intensity 1.0
PIXELS = "pixels.u16"  # the store's file in ingest's output folder


def pixels_path(ingested: Path) -> Path:
    return Path(ingested) / PIXELS


def quantize(pixels: np.ndarray) -> np.ndarray:
    """A float image in [0, 1], (H, W) or (H, W, C), as the store's (H, W, C) uint16."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(np.round(np.clip(pixels, 0.0, 1.0) * SCALE).astype("<u2"))


class PixelStoreWriter:
    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.offset = 0  # in elements

    def append(self, data: np.ndarray) -> tuple[int, int, int, int]:
        """Store a quantized (H, W, C) image; return (offset, h, w, c)."""
        self._f.write(data.tobytes())
        h, w, c = data.shape
        start, self.offset = self.offset, self.offset + data.size
        return start, h, w, c

    def close(self) -> None:
        self._f.close()


class PixelStore:
    def __init__(self, path: Path):
        self._data = np.memmap(path, dtype="<u2", mode="r") if Path(path).stat().st_size else np.zeros(0, "<u2")

    def get(self, offset: int, h: int, w: int, c: int) -> np.ndarray:
        """The image as float32 (H, W, C) in [0, 1]."""
        return self._data[offset : offset + h * w * c].reshape(h, w, c).astype(np.float32) / SCALE
