"""What every reader shares: read options, the decoded image, the gray-or-colour rule and value helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.errors import ParamsError, UnreadableImage

# CT windows in Hounsfield units as (centre, width).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

METADATA_FIELDS = ("modality", "manufacturer", "body_part", "view_position", "photometric", "pixel_spacing", "sex", "age")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _bad(name: str, value: object, expected: str) -> None:
    raise ParamsError(f"read option '{name}' has value {value!r}; expected {expected}")


@dataclass(frozen=True)
class ReadOptions:
    """How to pick a 2D image from a file and turn stored values into intensities in [0, 1]."""

    window: str | tuple[float, float] | None = None  # None: header window, else preset name or (centre, width)
    frame: str | int = "middle"  # multi-frame DICOM or multi-page TIFF: "first", "middle" or a 0-based index
    axis: int = 2  # NIfTI: slicing axis after reorientation to RAS (0 sagittal, 1 coronal, 2 axial)
    slice: str | int = "middle"  # NIfTI volume: "middle", a 0-based index, or "all" (one Decoded per slice)
    max_pixels: int = 50_000_000  # larger images are refused before their pixels are allocated
    max_voxels: int = 300_000_000  # larger NIfTI volumes are refused before loading
    min_side: int = 8  # images with a side shorter than this are refused

    def __post_init__(self) -> None:
        window = self.window
        if isinstance(window, list):
            window = tuple(window)
            object.__setattr__(self, "window", window)
        if isinstance(window, str):
            if window not in WINDOW_PRESETS:
                _bad("window", window, f"null, [centre, width] or one of {', '.join(WINDOW_PRESETS)}")
        elif isinstance(window, tuple):
            if len(window) != 2 or not all(_is_number(v) for v in window) or not np.isfinite(window).all():
                _bad("window", window, "[centre, width] with two finite numbers")
            if window[1] <= 0:
                _bad("window", window, "a positive width")
            object.__setattr__(self, "window", (float(window[0]), float(window[1])))
        elif window is not None:
            _bad("window", window, f"null, [centre, width] or one of {', '.join(WINDOW_PRESETS)}")
        if not (self.frame in ("first", "middle") or (_is_int(self.frame) and self.frame >= 0)):
            _bad("frame", self.frame, "'first', 'middle' or a non-negative integer")
        if not (_is_int(self.axis) and self.axis in (0, 1, 2)):
            _bad("axis", self.axis, "0, 1 or 2")
        if not (self.slice in ("middle", "all") or (_is_int(self.slice) and self.slice >= 0)):
            _bad("slice", self.slice, "'middle', 'all' or a non-negative integer")
        for name in ("max_pixels", "max_voxels", "min_side"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                _bad(name, value, "a positive integer")

    def window_values(self) -> tuple[float, float] | None:
        """The requested (centre, width), or None to use the file's own window."""
        if isinstance(self.window, str):
            return WINDOW_PRESETS[self.window]
        return self.window


@dataclass
class Decoded:
    pixels: np.ndarray  # float32 in [0, 1]; (H, W) grayscale or (H, W, 3) RGB
    metadata: dict[str, str] = field(default_factory=dict)  # whitelisted, safe to store
    identity: dict[str, str] = field(default_factory=dict)  # ids for grouping and label keys; never stored


# Channels that differ by less than this are gray saved as RGB (a common PNG/JPEG export), not colour.
GRAY_TOLERANCE = 2.0 / 255.0


def colour_of(pixels: np.ndarray) -> str:
    """"gray" or "colour", decided by the pixels, not the file format: RGB with equal channels is gray.

    The one definition used wherever colour matters: what the model was
    evaluated on (preprocess records it per image) and what `medtl predict` accepts.
    """
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        return "gray"
    rgb = np.asarray(pixels[:, :, :3], dtype=np.float32)
    # max - min over three channels is the largest pairwise difference; whole planes, not a reduction over
    # the last axis of length 3 (measured 20-50x faster at 224 px), and a colour image stops at the first
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    return "colour" if any(float(np.abs(u - v).max(initial=0.0)) > GRAY_TOLERANCE for u, v in ((r, g), (g, b), (r, b))) \
        else "gray"


# Intensity steps shared by the readers.

def apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window (DICOM PS3.3 C.11.2.1.2) mapped to [0, 1]; function LINEAR, LINEAR_EXACT or SIGMOID."""
    width = float(width)
    if function == "SIGMOID":
        width = max(width, 1e-6)
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    elif function == "LINEAR_EXACT":
        width = max(width, 1e-6)
        out = (values - (centre - width / 2)) / width
    elif width <= 1.0:  # a one-value window is a threshold
        out = (values > centre - 0.5).astype(np.float32)
    else:
        out = (values - (centre - 0.5 - (width - 1) / 2)) / (width - 1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def rescale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to [0, 1] and clip; a constant image maps to 0."""
    if not hi > lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def robust_range(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """Percentile range, so a few extreme voxels do not squash the contrast of the rest."""
    lo, hi = np.percentile(values, [low_pct, high_pct])
    if not hi > lo:  # mostly constant image: fall back to the full range
        lo, hi = float(values.min()), float(values.max())
    return float(lo), float(hi)



def frame_index(path: Path, frames: int, frame: str | int, unit: str = "frame") -> int:
    """The 0-based frame (or TIFF page, `unit`) that `ReadOptions.frame` picks among `frames`."""
    if frame == "first" or frames == 1:
        return 0
    if frame == "middle":
        return frames // 2
    if frame >= frames:
        raise UnreadableImage("frame_out_of_range", f"{path}: {unit} {frame} requested but the file has {frames} {unit}s")
    return int(frame)

def check_size(path: Path, height: int, width: int, options: ReadOptions) -> None:
    """Refuse images that are too large to allocate safely or too small to be a real image."""
    if height * width > options.max_pixels:
        raise UnreadableImage(
            "too_large",
            f"{path}: {width}x{height} = {height * width} pixels exceeds max_pixels {options.max_pixels}",
        )
    if min(height, width) < options.min_side:
        raise UnreadableImage("too_small", f"{path}: {width}x{height} has a side shorter than min_side {options.min_side}")


def check_finite(path: Path, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise UnreadableImage("non_finite", f"{path} contains NaN or infinite values")
