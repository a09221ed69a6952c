"""One reader interface for every image format, chosen by what the file is.

`read(path, options)` returns a list of decoded images (a 3D volume may yield
several slices) or raises UnreadableImage with a short reason tag, which the
ingest stage records in its quarantine report.

Formats: DICOM (`medtl.intake.readers.dicom`), NIfTI (`medtl.intake.readers.nifti`) and
PNG / JPEG / BMP / TIFF (`medtl.intake.readers.raster`).

Every Decoded carries the same metadata keys (`METADATA_FIELDS`, "" when
unknown), plus `frame` for a frame picked from a multi-frame file and `slice`
for a slice of a volume. All of them are in `medtl.intake.phi.WHITELIST`.

Reason tags: empty_file, not_an_image, unsupported_format, corrupt_dicom,
corrupt_nifti, corrupt_image, truncated, no_pixel_data, unsupported_codec,
undecodable_pixels, frame_out_of_range, too_large, too_small, non_finite.
"""
from __future__ import annotations

from pathlib import Path

from medtl.errors import UnreadableImage
from medtl.intake.readers import dicom, nifti, raster
from medtl.intake.readers.base import Decoded, ReadOptions

# Suffixes of image formats we recognise but do not read, so they are not called "not an image".
_UNSUPPORTED_IMAGE_SUFFIXES = {
    ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".img", ".mgz", ".mgh", ".svs", ".ndpi", ".czi",
    ".scn", ".mrxs", ".vsi", ".heic", ".heif", ".webp", ".jxl", ".jp2", ".j2k", ".gif", ".pgm", ".ppm",
    ".npy", ".npz",
}


def read(path: str | Path, options: ReadOptions = ReadOptions()) -> list[Decoded]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnreadableImage("not_an_image", f"{path}: {e.strerror or e}") from None
    if not path.is_file():
        raise UnreadableImage("not_an_image", f"{path} is not a regular file")
    if size == 0:
        raise UnreadableImage("empty_file", f"{path} is empty (0 bytes)")
    if dicom.is_dicom(path):
        return [dicom.read(path, options)]
    if nifti.is_nifti(path):
        return nifti.read(path, options)
    if raster.is_raster(path):
        return [raster.read(path, options)]
    if _suffix(path) in _UNSUPPORTED_IMAGE_SUFFIXES:
        raise UnreadableImage("unsupported_format", f"{path}: {_suffix(path)} images are not supported (use DICOM, NIfTI, PNG, JPEG, BMP or TIFF)")
    raise UnreadableImage("not_an_image", f"{path} is not a DICOM, NIfTI, PNG, JPEG, BMP or TIFF image")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
