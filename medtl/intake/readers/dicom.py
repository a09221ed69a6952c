"""DICOM via pydicom: one frame, modality LUT (rescale), VOI window or LUT, MONOCHROME1 inversion, colour.

Compressed transfer syntaxes (JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, RLE) are decoded by the pylibjpeg plugins, deflate and big endian
by pydicom itself.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, as_pixel_options, get_decoder
from pydicom.uid import JPEGExtended12Bit as JPEG_EXTENDED, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.uid import UID_dictionary

from medtl.errors import UnreadableImage
from medtl.intake.phi import PHOTOMETRIC_VALUES, LibraryWarning, age_in_years, error_kind, warning_kind
from medtl.intake.readers.base import Decoded, ReadOptions, apply_window, check_finite, check_size, frame_index, rescale_to_unit

__all__ = ["is_dicom", "read", "apply_window", "IDENTITY_KEYWORDS"]

IDENTITY_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
BURNED_IN = "BurnedInAnnotation"  # (0028,0301), returned in Decoded.identity
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Objects that are valid DICOM but hold no picture: structures, plans, reports, waveforms, states.
_NON_IMAGE_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "REG", "ECG", "HD", "AU", "DOC", "PLAN", "FID"}
# Elements beyond this size are read only when the pixels are decoded, after the size checks.
_DEFER_SIZE = 1 << 20


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom") or path.name.upper() == "DICOMDIR":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read(path: Path, options: ReadOptions) -> Decoded:
    """Decode one frame. pydicom's warnings quote header values (names typed into the wrong field), so they are
    re-issued as LibraryWarning naming only their kind ("invalid_value:UI")."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return _read(path, options)
    finally:
        for kind in sorted({warning_kind(w) for w in caught}):
            warnings.warn(kind, LibraryWarning, stacklevel=2)


def _read(path: Path, options: ReadOptions) -> Decoded:
    ds, ended_early = _open(path)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        described = any(k in ds for k in ("SOPClassUID", "Modality", "Rows")) or "MediaStorageSOPClassUID" in ds.file_meta
        if ended_early and described:
            raise UnreadableImage("truncated", f"{path} ends before its pixel data")
        if ended_early:
            raise UnreadableImage("corrupt_dicom", f"{path} has a DICOM preamble but no readable elements")
        _raise_without_pixels(path, ds)
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as e:
        raise UnreadableImage("corrupt_dicom", f"{path}: invalid Rows/Columns ({error_kind(e)})") from None
    if rows <= 0 or cols <= 0:
        raise UnreadableImage("corrupt_dicom", f"{path}: Rows/Columns missing or zero")
    check_size(path, rows, cols, options)
    stated = _text(ds, "PhotometricInterpretation").upper()
    if stated and stated not in PHOTOMETRIC_VALUES:  # the value itself is never repeated: it may be free text
        raise UnreadableImage("invalid_photometric", f"{path}: PhotometricInterpretation is not a defined DICOM term")
    frames = _number_of_frames(ds)
    index = frame_index(path, frames, options.frame)

    try:
        arr, photometric = _decode(path, ds, index)
    except UnreadableImage as e:
        if ended_early and e.reason == "undecodable_pixels":
            raise UnreadableImage("truncated", f"{e.detail} (the file ends early)") from None
        raise
    if photometric == "PALETTE COLOR":
        pixels = _palette_to_rgb(path, ds, arr)
    elif arr.ndim == 3:
        pixels = _colour(ds, arr)
    else:
        pixels = _grayscale(path, ds, arr, index, options)
        if photometric == "MONOCHROME1":  # stored so that high values are dark
            pixels = 1.0 - pixels
    check_finite(path, pixels)

    metadata = _metadata(ds, index, "RGB" if pixels.ndim == 3 else photometric)
    if frames > 1:
        metadata["frame"] = str(index)
    identity = {k: str(ds.get(k, "") or "").strip() for k in IDENTITY_KEYWORDS}
    # Not an identity but, like one, a header fact for ingest that is never stored: YES means text
    # (often a name or an id) is drawn into the pixels.
    identity[BURNED_IN] = _text(ds, BURNED_IN).upper()
    return Decoded(np.ascontiguousarray(pixels, dtype=np.float32), metadata, identity)


def _open(path: Path) -> tuple[pydicom.Dataset, bool]:
    """The dataset, and whether the file ended before the parser expected it to."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
            except InvalidDicomError:
                # No preamble or file meta: older files and some exports; parse them anyway.
                ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True)
                if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "PatientID") + _PIXEL_KEYWORDS):
                    raise InvalidDicomError("no DICOM preamble and no recognisable elements")
        except (EOFError, OSError) as e:
            raise UnreadableImage("truncated", f"{path}: DICOM header ends early ({error_kind(e)})") from None
        except Exception as e:
            raise UnreadableImage("corrupt_dicom", f"{path}: the DICOM header cannot be parsed ({error_kind(e)})") from None
    # pydicom keeps what it parsed before an unexpected end of file and only warns.
    ended_early = any("end of file" in str(w.message).lower() for w in caught)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not ts:
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds, ended_early


def _raise_without_pixels(path: Path, ds: pydicom.Dataset) -> None:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if "DirectoryRecordSequence" in ds or sop_class == _DICOMDIR_SOP_CLASS:
        raise UnreadableImage("not_an_image", f"{path} is a DICOMDIR (a directory of other files), not an image")
    if modality in _NON_IMAGE_MODALITIES:
        raise UnreadableImage("not_an_image", f"{path} is a DICOM {modality} object, not an image")
    raise UnreadableImage("no_pixel_data", f"{path} is DICOM but has no pixel data")


def _number_of_frames(ds: pydicom.Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1



def _decode(path: Path, ds: pydicom.Dataset, index: int) -> tuple[np.ndarray, str]:
    """One frame as an array, and the photometric interpretation of the decoded values."""
    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnreadableImage("unsupported_codec", f"{path}: transfer syntax {syntax_name(ts)} cannot be decoded") from None
    try:
        pixel_options = as_pixel_options(ds)
    except Exception as e:
        raise UnreadableImage("corrupt_dicom", f"{path}: invalid image pixel description ({error_kind(e)})") from None
    try:
        # raw=False converts YBR_FULL / YBR_FULL_422 to RGB.
        arr, meta = decoder.as_array(ds, index=index, validate=True, raw=False, **pixel_options)
    except Exception as e:
        hint = ""
        if ts == JPEG_EXTENDED and int(getattr(ds, "BitsAllocated", 8) or 8) > 8:
            # No permissive decoder handles 12-bit JPEG Extended; the GPL-3.0 plugin is an opt-in extra.
            hint = "; 12-bit JPEG Extended needs the optional jpeg12 extra (GPL-3.0, see README)"
        raise UnreadableImage(_decode_failure_reason(e),
                              f"{path} ({syntax_name(ts)}): the pixel data cannot be decoded ({error_kind(e)}){hint}") from None
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")) or "")
    return arr, photometric.strip().upper()


def syntax_name(ts) -> str:
    """pydicom's name of a transfer syntax it knows, else "unknown": the UID of an unknown one is a header value."""
    return UID_dictionary[ts][0] if ts in UID_dictionary else "unknown"


def _decode_failure_reason(e: Exception) -> str:
    text = str(e).lower()
    # Plugins that could decode this syntax are not installed (not: installed plugins failed on the data).
    if isinstance(e, (NotImplementedError, ImportError)) or "missing dependencies" in text or "not supported by" in text:
        return "unsupported_codec"
    if isinstance(e, EOFError) or any(
        s in text for s in ("less than expected", "too short", "truncat", "insufficient", "end of file", "not enough", "is missing")
    ):
        return "truncated"
    return "undecodable_pixels"


def _frame_attribute(ds: pydicom.Dataset, index: int, macro: str, keyword: str):
    """A value from the frame's functional groups (enhanced multi-frame objects), else the top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    items = ([per_frame[index]] if index < len(per_frame) else []) + ([shared[0]] if shared else [])
    for item in items:
        seq = item.get(macro)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return ds.get(keyword)


def _first_number(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        if not len(value):
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _grayscale(path: Path, ds: pydicom.Dataset, arr: np.ndarray, index: int, options: ReadOptions) -> np.ndarray:
    # Modality LUT: stored values -> physical units (Hounsfield units for CT).
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(arr, ds).astype(np.float32)
    else:
        slope = _first_number(_frame_attribute(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _first_number(_frame_attribute(ds, index, "PixelValueTransformationSequence", "RescaleIntercept"))
        values = arr.astype(np.float32) * (1.0 if slope is None or slope == 0 else slope) + (intercept or 0.0)
    check_finite(path, values)

    # VOI: which range of physical values is shown from black to white.
    requested = options.window_values()
    if requested is not None:
        return apply_window(values, *requested)
    centre = _first_number(_frame_attribute(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_number(_frame_attribute(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    function = str(_frame_attribute(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").strip().upper()
    if "VOILUTSequence" in ds and (centre is None or width is None):
        return _voi_lut(values, ds)
    if centre is not None and width is not None and width > 0:
        if function == "LINEAR" and arr.dtype.kind == "f":
            function = "LINEAR_EXACT"  # LINEAR's half-value offsets assume integer stored values
        return apply_window(values, centre, width, function)
    # No window in the header: show the full range of this image.
    return rescale_to_unit(values, float(values.min()), float(values.max()))


def _voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData if isinstance(item.LUTData, (list, pydicom.multival.MultiValue)) else [item.LUTData])
    out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float32)
    return rescale_to_unit(out, float(lut.min()), float(lut.max()))


def _colour(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if arr.dtype.kind == "f":
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    return np.clip(arr.astype(np.float64) / (2**bits - 1), 0.0, 1.0).astype(np.float32)


def _palette_to_rgb(path: Path, ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    try:
        rgb = apply_color_lut(arr, ds)
        entries, first = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor[:2])
        every_index = np.arange(first, first + (entries or 65536)).astype(arr.dtype)
        table_max = int(apply_color_lut(every_index, ds).max())
    except Exception as e:
        raise UnreadableImage("undecodable_pixels", f"{path}: palette colour lookup failed ({error_kind(e)})") from None
    # Descriptors often claim 16 bits for 8-bit tables; scale by what the table holds.
    return np.clip(rgb.astype(np.float64) / (255.0 if table_max <= 255 else 65535.0), 0.0, 1.0).astype(np.float32)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _metadata(ds: pydicom.Dataset, index: int, photometric: str) -> dict[str, str]:
    spacing = _frame_attribute(ds, index, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing_text = " ".join(f"{float(v):g}" for v in spacing) if spacing else ""
    except (TypeError, ValueError):
        spacing_text = ""
    sex = _text(ds, "PatientSex").upper()
    study_date = _text(ds, "StudyDate") or _text(ds, "SeriesDate") or _text(ds, "AcquisitionDate") or _text(ds, "ContentDate")
    return {
        "modality": _text(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "photometric": photometric,
        "pixel_spacing": spacing_text,  # "row column" in mm
        "sex": sex if sex in ("M", "F", "O") else "",
        "age": age_in_years(_text(ds, "PatientAge"), _text(ds, "PatientBirthDate"), study_date),
    }
