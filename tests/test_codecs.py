"""Compressed DICOM decodes with the permissive codecs of the default install (GDCM, CharLS, OpenJPEG, RLE).

Lossless JPEG files are made here from pydicom's bundled 16-bit MR image with
GDCM's encoder, so the test needs no downloaded data.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, RLELossless

from medtl.errors import UnreadableImage
from medtl.intake.readers import read

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MR_SMALL = TEST_FILES / "MR_small.dcm"


def _gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEGLSLossless", "RLELossless"])
def test_lossless_16_bit_decodes_to_the_same_pixels_without_gpl_codecs(tmp_path, syntax):
    dst = tmp_path / f"{syntax}.dcm"
    if syntax.startswith("JPEGLossless"):
        _gdcm_transcode(MR_SMALL, dst, syntax)
    else:  # pydicom's own encoders: CharLS through pyjpegls, and RLE
        ds = pydicom.dcmread(MR_SMALL)
        ds.compress(JPEGLSLossless if syntax == "JPEGLSLossless" else RLELossless)
        ds.save_as(dst)
    assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    reference = read(MR_SMALL)[0].pixels
    np.testing.assert_array_equal(read(dst)[0].pixels, reference)
    assert reference.std() > 0.01


def test_12_bit_lossy_jpeg_needs_the_opt_in_extra():
    """JPEG Extended with 12-bit samples: only the GPL-3.0 libjpeg plugin (extra `jpeg12`) decodes it."""
    path = TEST_FILES / "JPGExtended.dcm"
    if importlib.util.find_spec("libjpeg") is not None:
        d = read(path)[0]
        assert d.pixels.shape == (1024, 256) and d.pixels.std() > 0.01
        return
    with pytest.raises(UnreadableImage) as e:
        read(path)
    assert e.value.reason == "undecodable_pixels" and "12-bit" in str(e.value)
