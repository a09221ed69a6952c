"""DICOM via pydicom: modality LUT (rescale), VOI window, MONOCHROME1 inversion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from medtl.errors import UnreadableImage
from medtl.readers import Decoded, ReadOptions


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _first(value) -> float:
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0]
    return float(value)


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear VOI window (DICOM PS3.3 C.11.2.1.2) mapped to [0, 1]."""
    width = max(float(width), 1.0)
    lo = centre - 0.5 - (width - 1) / 2
    return np.clip((values - lo) / (width - 1), 0.0, 1.0).astype(np.float32)


def read(path: Path, options: ReadOptions) -> Decoded:
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise UnreadableImage("corrupt_dicom", f"{path.name}: {e}") from e
    if "PixelData" not in ds:
        raise UnreadableImage("no_pixel_data", f"{path.name} has no pixel data")
    try:
        values = ds.pixel_array.astype(np.float32)
    except Exception as e:
        raise UnreadableImage("undecodable_pixels", f"{path.name}: {e}") from e
    values = values * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if isinstance(options.window, tuple):
        centre, width = options.window
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    else:
        lo, hi = float(values.min()), float(values.max())
        centre, width = (lo + hi) / 2, max(hi - lo, 1.0)
    pixels = apply_window(values, centre, width)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = 1.0 - pixels
    meta = {"modality": str(ds.get("Modality", "")), "photometric": str(ds.get("PhotometricInterpretation", ""))}
    identity = {k: str(ds.get(k, "")) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return Decoded(pixels, meta, identity)
