"""DICOM reader on pydicom's bundled test files and on small files written here."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medtl.errors import ParamsError, UnreadableImage
from medtl.intake.phi import WHITELIST
from medtl.intake.readers import read
from medtl.intake.readers.base import WINDOW_PRESETS, ReadOptions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bundled(name: str) -> str:
    return get_testdata_file(name)


def reason(path, options: ReadOptions = ReadOptions()) -> str:
    with pytest.raises(UnreadableImage) as info:
        read(path, options)
    assert str(path).split("/")[-1] in str(info.value)  # the message names the file
    return info.value.reason


def one(path, options: ReadOptions = ReadOptions()):
    out = read(path, options)
    assert len(out) == 1
    d = out[0]
    assert d.pixels.dtype == np.float32
    assert 0.0 <= d.pixels.min() and d.pixels.max() <= 1.0
    return d


def expected_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.clip((values - (centre - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1)


def copy_with(tmp_path, name: str, **changes) -> str:
    ds = pydicom.dcmread(bundled(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = tmp_path / name
    ds.save_as(out)
    return str(out)


def synthetic_12bit(tmp_path, photometric: str = "MONOCHROME2") -> tuple[str, np.ndarray]:
    """Like the demo: 12-bit stored values, rescale slope/intercept and a header window."""
    stored = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7) % 4096
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-0042", "19800115"
    ds.StudyDate, ds.PatientSex, ds.Modality = "20200114", "F", "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 3000, 4000
    ds.PixelData = stored.tobytes()
    path = tmp_path / f"synthetic_{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(path), stored


def test_synthetic_12bit_rescale_and_header_window(tmp_path):
    path, stored = synthetic_12bit(tmp_path)
    d = one(path)
    assert d.pixels.shape == (64, 48)
    np.testing.assert_allclose(d.pixels, expected_window(stored * 2.0 - 1000, 3000, 4000), atol=1e-6)
    assert d.metadata["modality"] == "CR" and d.metadata["sex"] == "F"
    assert d.metadata["age"] == "39"  # from birth and study dates; the dates themselves are not kept
    assert d.identity["PatientID"] == "MRN-0042"
    stored_values = " ".join(d.metadata.values())
    for phi in ("Doe", "MRN-0042", "19800115", "20200114"):
        assert phi not in stored_values


def test_monochrome1_is_inverted(tmp_path):
    m2 = one(synthetic_12bit(tmp_path, "MONOCHROME2")[0]).pixels
    m1 = one(synthetic_12bit(tmp_path, "MONOCHROME1")[0]).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    ct2 = one(bundled("CT_small.dcm")).pixels
    ct1 = one(copy_with(tmp_path, "CT_small.dcm", PhotometricInterpretation="MONOCHROME1")).pixels
    np.testing.assert_allclose(ct1, 1.0 - ct2, atol=1e-6)


def test_ct_rescale_to_hounsfield_and_window_presets():
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for name, (centre, width) in WINDOW_PRESETS.items():
        d = one(bundled("CT_small.dcm"), ReadOptions(window=name))
        np.testing.assert_allclose(d.pixels, expected_window(hu, centre, width), atol=1e-5, err_msg=name)
    custom = one(bundled("CT_small.dcm"), ReadOptions(window=(100.0, 200.0))).pixels
    np.testing.assert_allclose(custom, expected_window(hu, 100, 200), atol=1e-5)
    # A narrow window saturates more pixels than a wide one.
    brain = one(bundled("CT_small.dcm"), ReadOptions(window="brain")).pixels
    lung = one(bundled("CT_small.dcm"), ReadOptions(window="lung")).pixels
    saturated = lambda p: np.mean((p == 0) | (p == 1))  # noqa: E731
    assert saturated(brain) > saturated(lung)


def test_window_presets_are_the_named_ct_windows():
    assert WINDOW_PRESETS == {
        "lung": (-600.0, 1500.0),
        "mediastinum": (50.0, 350.0),
        "soft_tissue": (40.0, 400.0),
        "brain": (40.0, 80.0),
        "bone": (400.0, 1800.0),
    }
    assert ReadOptions(window="lung").window_values() == (-600.0, 1500.0)
    assert ReadOptions(window=[40, 400]).window == (40.0, 400.0)  # a YAML list becomes a tuple


@pytest.mark.parametrize(
    "options",
    [{"window": "lungs"}, {"window": (40, 0)}, {"window": (40,)}, {"frame": -1}, {"frame": "last"},
     {"axis": 3}, {"slice": "some"}, {"max_pixels": 0}, {"min_side": True}],
)
def test_read_options_are_validated(options):
    with pytest.raises(ParamsError, match=next(iter(options))):
        ReadOptions(**options)


def test_header_window_is_used_when_no_window_is_requested():
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    expected = expected_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(one(bundled("MR_small.dcm")).pixels, expected, atol=1e-6)


def test_no_header_window_uses_full_range():
    d = one(bundled("CT_small.dcm"))  # CT_small has no WindowCenter/Width
    assert d.pixels.min() == 0.0 and d.pixels.max() == 1.0


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
     "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"],
)
def test_lossless_syntaxes_match_the_uncompressed_image(name):
    reference = one(bundled("MR_small.dcm")).pixels
    np.testing.assert_array_equal(one(bundled(name)).pixels, reference)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("JPEG2000.dcm", (1024, 256)),  # JPEG 2000
        ("693_J2KI.dcm", (512, 512)),  # JPEG 2000 irreversible
        # JPGExtended.dcm (12-bit JPEG Extended) needs the opt-in GPL extra: tests/test_codecs.py
        ("JPEGLSNearLossless_16.dcm", (50, 10)),  # JPEG-LS near-lossless
        ("image_dfl.dcm", (512, 512)),  # deflated explicit VR little endian
        ("J2K_pixelrep_mismatch.dcm", (512, 512)),
        ("ExplVR_BigEnd.dcm", (60, 80, 3)),
        ("examples_jpeg2k.dcm", (480, 640, 3)),
        ("examples_palette.dcm", (350, 800, 3)),  # palette colour -> RGB
        ("examples_overlay.dcm", (300, 484)),
    ],
)
def test_compressed_and_unusual_files_decode(name, shape):
    d = one(bundled(name))
    assert d.pixels.shape == shape
    assert d.pixels.std() > 0.01  # a picture, not a constant


def colour_bars(pixels: np.ndarray) -> np.ndarray:
    return np.array([pixels[r, 50] for r in range(5, 100, 10)])


def test_rgb_colour_bars():
    bars = colour_bars(one(bundled("SC_rgb_rle.dcm")).pixels)
    np.testing.assert_allclose(bars[0], [1, 0, 0], atol=0.01)  # red
    np.testing.assert_allclose(bars[2], [0, 1, 0], atol=0.01)  # green
    np.testing.assert_allclose(bars[4], [0, 0, 1], atol=0.01)  # blue
    np.testing.assert_allclose(bars[9], [1, 1, 1], atol=0.01)  # white


@pytest.mark.parametrize(
    "name, tolerance",
    [
        ("SC_ybr_full_422_uncompressed.dcm", 0.02),  # YBR_FULL_422 -> RGB
        ("SC_rgb_jpeg_dcmtk.dcm", 0.03),  # JPEG baseline, YBR
        ("SC_rgb_jpeg_gdcm.dcm", 0.03),
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 0.03),
        ("SC_rgb_jls_lossy_line.dcm", 0.03),  # JPEG-LS colour
        ("SC_rgb_rle_16bit.dcm", 0.01),
        ("SC_rgb_rle_32bit.dcm", 0.01),
    ],
)
def test_colour_encodings_give_the_same_rgb(name, tolerance):
    reference = colour_bars(one(bundled("SC_rgb_rle.dcm")).pixels)
    d = one(bundled(name))
    assert d.pixels.shape == (100, 100, 3)
    assert d.metadata["photometric"] == "RGB"
    np.testing.assert_allclose(colour_bars(d.pixels), reference, atol=tolerance)


def test_multi_frame_selection():
    path = bundled("SC_rgb_rle_2frame.dcm")  # the second frame is the first one inverted
    first = one(path, ReadOptions(frame="first"))
    second = one(path, ReadOptions(frame=1))
    assert first.metadata["frame"] == "0" and second.metadata["frame"] == "1"
    np.testing.assert_allclose(second.pixels, 1.0 - first.pixels, atol=0.01)
    assert one(path, ReadOptions(frame="middle")).metadata["frame"] == "1"
    dose = bundled("rtdose.dcm")  # 15 grayscale frames
    assert one(dose).metadata["frame"] == "7"
    assert reason(path, ReadOptions(frame=5)) == "frame_out_of_range"
    # A single-frame image ignores the frame choice.
    assert "frame" not in one(bundled("CT_small.dcm"), ReadOptions(frame=3)).metadata


def test_truncated_file():
    assert reason(bundled("MR_truncated.dcm")) == "truncated"


@pytest.mark.parametrize("name", ["rtstruct.dcm", "rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_non_image_objects(name):
    assert reason(bundled(name)) == "not_an_image"


def test_dicomdir_is_not_an_image():
    assert reason(bundled("DICOMDIR")) == "not_an_image"


def test_image_without_pixel_data(tmp_path):
    assert reason(copy_with(tmp_path, "CT_small.dcm", PixelData=None)) == "no_pixel_data"


def test_garbage_with_dicom_suffix(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    assert reason(path) == "corrupt_dicom"


def test_size_limits(tmp_path):
    # The header claims 20000 x 20000: refused from the header, before any pixel is read.
    huge = copy_with(tmp_path, "CT_small.dcm", Rows=20000, Columns=20000)
    assert reason(huge) == "too_large"
    assert reason(bundled("SC_rgb_small_odd.dcm")) == "too_small"  # 3 x 3
    assert one(bundled("SC_rgb_small_odd.dcm"), ReadOptions(min_side=1)).pixels.shape == (3, 3, 3)
    assert reason(bundled("CT_small.dcm"), ReadOptions(max_pixels=100 * 100)) == "too_large"


def test_metadata_is_whitelisted_and_identity_has_the_uids(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    d = one(bundled("CT_small.dcm"))
    assert set(d.metadata) <= set(WHITELIST)
    assert d.metadata["modality"] == "CT"
    assert d.metadata["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert d.metadata["pixel_spacing"] == "0.661468 0.661468"
    assert d.metadata["sex"] == "O" and d.metadata["age"] == "0"  # PatientAge 000Y
    assert d.identity == {
        "PatientID": ds.PatientID,
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
        "BurnedInAnnotation": "",
    }
    assert "CompressedSamples" not in " ".join(d.metadata.values())
    old = one(copy_with(tmp_path, "CT_small.dcm", PatientAge="093Y")).metadata["age"]
    assert old == "90"  # ages over 89 are grouped


def test_dicom_without_suffix_or_preamble_is_found(tmp_path):
    target = tmp_path / "IM0001"
    shutil.copy(bundled("CT_small.dcm"), target)
    assert one(target).pixels.shape == (128, 128)
