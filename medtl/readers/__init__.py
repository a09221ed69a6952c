"""One reader interface for every image format, chosen by what the file is.

`read(path, options)` returns a list of decoded images (a 3D volume may yield
several slices) or raises UnreadableImage with a short reason tag, which the
ingest stage records in its quarantine report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.errors import UnreadableImage


@dataclass(frozen=True)
class ReadOptions:
    """How to turn stored values into display intensities in [0, 1]."""

    window: str | tuple[float, float] | None = None  # None: header window, else preset name or (centre, width)
    frame: str | int = "middle"  # multi-frame DICOM: "first", "middle" or an index


@dataclass
class Decoded:
    pixels: np.ndarray  # float32 in [0, 1]; (H, W) grayscale or (H, W, 3) RGB
    metadata: dict[str, str] = field(default_factory=dict)  # whitelisted, safe to store
    identity: dict[str, str] = field(default_factory=dict)  # ids for grouping and label keys; never stored


def read(path: str | Path, options: ReadOptions = ReadOptions()) -> list[Decoded]:
    path = Path(path)
    from medtl.readers import dicom

    if dicom.is_dicom(path):
        return [dicom.read(path, options)]
    raise UnreadableImage("unsupported_format", f"{path.name} is not a supported image file")
