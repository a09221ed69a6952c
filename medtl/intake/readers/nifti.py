"""NIfTI (.nii, .nii.gz) via nibabel: 2D images and slices of 3D volumes.

Volumes are reoriented to the closest RAS orientation first, so `axis` 2 is
axial, 1 coronal and 0 sagittal whatever the storage order, and each slice is
shown in the radiological convention (patient's right on the image's left,
anterior or superior at the top), like a DICOM image of the same plane.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medtl.errors import UnreadableImage
from medtl.intake.phi import error_kind
from medtl.intake.readers.base import (
    METADATA_FIELDS,
    Decoded,
    ReadOptions,
    apply_window,
    check_finite,
    check_size,
    rescale_to_unit,
    robust_range,
)

_MAGIC_OFFSETS = ((344, (b"n+1\0", b"ni1\0")), (4, (b"n+2\0", b"ni2\0")))


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return True
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(348)
    except (OSError, EOFError, zlib.error):
        return False
    return any(head[o:o + 4] in magics for o, magics in _MAGIC_OFFSETS)


def read(path: Path, options: ReadOptions) -> list[Decoded]:
    try:
        img = nib.load(str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UnreadableImage("truncated", f"{path}: NIfTI header ends early ({error_kind(e)})") from None
    except (ImageFileError, ValueError, OSError) as e:
        raise UnreadableImage("corrupt_nifti", f"{path}: the NIfTI header cannot be parsed ({error_kind(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableImage("unsupported_format", f"{path} is a {type(img).__name__}, not NIfTI")

    shape = tuple(int(s) for s in img.shape)
    # Trailing singleton axes (a 2D image saved as X x Y x 1 x 1) carry nothing.
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise UnreadableImage("corrupt_nifti", f"{path}: image shape {img.shape} has fewer than two dimensions")
    if len(shape) > 3:
        raise UnreadableImage(
            "unsupported_format", f"{path}: {len(shape)}D image {img.shape}; only 2D images and 3D volumes are read"
        )
    if int(np.prod(shape, dtype=np.int64)) > options.max_voxels:
        raise UnreadableImage("too_large", f"{path}: {shape} = {np.prod(shape)} voxels exceeds max_voxels {options.max_voxels}")
    if img.get_data_dtype().fields is not None:
        raise UnreadableImage("unsupported_format", f"{path}: RGB/structured NIfTI data ({img.get_data_dtype()}) is not supported")

    try:
        if len(shape) == 3:
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(img.shape[: len(shape)])
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UnreadableImage("truncated", f"{path}: voxel data ends early ({error_kind(e)})") from None
    except (ValueError, OSError) as e:
        kind = "truncated" if "buffer" in str(e) or "size" in str(e) or "bytes" in str(e) else "corrupt_nifti"
        raise UnreadableImage(kind, f"{path}: the voxel data cannot be read ({error_kind(e)})") from None
    check_finite(path, data)
    zooms = [float(z) for z in img.header.get_zooms()[: len(shape)]]

    # One intensity mapping for the whole volume, so its slices stay comparable.
    requested = options.window_values()
    lo, hi = robust_range(data) if requested is None else (0.0, 0.0)

    def to_unit(plane: np.ndarray) -> np.ndarray:
        if requested is not None:
            return apply_window(plane, *requested)
        return rescale_to_unit(plane, lo, hi)

    identity = {"volume": str(path)}
    if len(shape) == 2:
        plane = _display(data)
        check_size(path, *plane.shape, options)
        return [Decoded(to_unit(plane), _metadata(zooms[1], zooms[0]), dict(identity))]

    axis = options.axis
    count = shape[axis]
    in_plane = [a for a in range(3) if a != axis]
    rows, cols = shape[in_plane[1]], shape[in_plane[0]]
    check_size(path, rows, cols, options)
    if options.slice == "all":
        indices = list(range(count))
    elif options.slice == "middle":
        indices = [count // 2]
    elif options.slice < count:
        indices = [int(options.slice)]
    else:
        raise UnreadableImage("slice_out_of_range", f"{path}: slice {options.slice} requested on axis {axis}, which has {count}")
    out = []
    for k in indices:
        plane = _display(np.take(data, k, axis=axis))
        metadata = _metadata(zooms[in_plane[1]], zooms[in_plane[0]])
        metadata["slice"] = str(k)
        out.append(Decoded(to_unit(plane), metadata, dict(identity)))
    return out


def _display(plane: np.ndarray) -> np.ndarray:
    """RAS-ordered (first, second) voxel plane -> image rows and columns in radiological view."""
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def _metadata(row_spacing: float, col_spacing: float) -> dict[str, str]:
    metadata = dict.fromkeys(METADATA_FIELDS, "")
    metadata["photometric"] = "MONOCHROME2"
    metadata["pixel_spacing"] = f"{row_spacing:g} {col_spacing:g}"  # "row column" in mm
    return metadata
