"""NIfTI reader on volumes and images written by nibabel in the test."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medtl.errors import UnreadableImage
from medtl.intake.phi import WHITELIST
from medtl.intake.readers import read
from medtl.intake.readers.base import ReadOptions


def save(tmp_path, data, name="volume.nii.gz", affine=None, zooms=None) -> str:
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    path = tmp_path / name
    nib.save(img, str(path))
    return str(path)


def reason(path, options: ReadOptions = ReadOptions()) -> str:
    with pytest.raises(UnreadableImage) as info:
        read(path, options)
    assert str(path).split("/")[-1] in str(info.value)
    return info.value.reason


def ramp_volume(shape=(20, 30, 40)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_middle_axial_slice(tmp_path):
    affine = np.diag([0.5, 0.75, 3.0, 1.0])
    out = read(save(tmp_path, ramp_volume(), affine=affine))
    assert len(out) == 1
    d = out[0]
    assert d.pixels.shape == (30, 20)  # rows run along y (anterior-posterior), columns along x
    assert d.pixels.dtype == np.float32 and 0 <= d.pixels.min() and d.pixels.max() <= 1
    assert d.metadata["slice"] == "20"
    assert d.metadata["pixel_spacing"] == "0.75 0.5"
    assert d.metadata["photometric"] == "MONOCHROME2"
    assert set(d.metadata) <= set(WHITELIST)


def test_all_slices_share_the_volume_identity_and_intensity_scale(tmp_path):
    path = save(tmp_path, ramp_volume())
    out = read(path, ReadOptions(slice="all"))
    assert len(out) == 40
    assert [d.metadata["slice"] for d in out] == [str(k) for k in range(40)]
    assert all(d.identity == out[0].identity for d in out) and out[0].identity
    # One scale for the volume: later slices of a ramp are brighter.
    means = [d.pixels.mean() for d in out]
    assert means == sorted(means) and means[0] < means[-1]


def test_axis_and_index(tmp_path):
    path = save(tmp_path, ramp_volume())
    assert read(path, ReadOptions(axis=0))[0].pixels.shape == (40, 30)  # sagittal: z by y
    assert read(path, ReadOptions(axis=1))[0].pixels.shape == (40, 20)  # coronal: z by x
    assert read(path, ReadOptions(slice=3))[0].metadata["slice"] == "3"
    assert reason(path, ReadOptions(slice=40)) == "slice_out_of_range"


def test_orientation_follows_the_affine(tmp_path):
    # A marker at the patient's right-anterior corner shows top-left (radiological view)
    # whether the file stores RAS or LPS voxel order.
    ras = np.zeros((16, 16, 9), np.float32)
    ras[15, 15, :] = 100
    lps = np.zeros((16, 16, 9), np.float32)
    lps[0, 0, :] = 100
    a = read(save(tmp_path, ras, "ras.nii"))[0].pixels
    b = read(save(tmp_path, lps, "lps.nii", affine=np.diag([-1.0, -1.0, 1.0, 1.0])))[0].pixels
    assert a[0, 0] == 1.0 and a.sum() == 1.0
    np.testing.assert_array_equal(a, b)


def test_robust_normalisation_ignores_a_few_extreme_voxels(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 100, (32, 32, 8)).astype(np.float32)
    vol[0, 0, 4] = 1e6  # one hot voxel must not squash the rest of the volume into black
    d = read(save(tmp_path, vol))[0]
    assert 0.4 < d.pixels.mean() < 0.6
    assert d.pixels.max() == 1.0


def test_ct_window_applies_to_hounsfield_volumes(tmp_path):
    hu = np.broadcast_to(np.linspace(-1000, 1000, 64, dtype=np.float32)[:, None, None], (64, 16, 4))
    path = save(tmp_path, hu)
    for window, (centre, width) in (("lung", (-600, 1500)), ((400, 1800), (400, 1800))):
        pixels = read(path, ReadOptions(window=window))[0].pixels
        expected = np.clip((hu[:, :, 2].T - (centre - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1)
        np.testing.assert_allclose(np.sort(pixels.ravel()), np.sort(expected.ravel()), atol=1e-6)
    bone = read(path, ReadOptions(window="bone"))[0].pixels
    lung = read(path, ReadOptions(window="lung"))[0].pixels
    assert bone.min() == 0.0 and lung.min() > 0.0  # -1000 HU is black in a bone window, grey in a lung window


def test_2d_images(tmp_path):
    img = np.random.default_rng(1).random((32, 24)).astype(np.float32)
    d = read(save(tmp_path, img, "plain.nii"))
    assert len(d) == 1 and d[0].pixels.shape == (24, 32)
    assert "slice" not in d[0].metadata
    d = read(save(tmp_path, img[:, :, None, None], "singleton.nii.gz"))  # X x Y x 1 x 1
    assert d[0].pixels.shape == (24, 32)


def test_non_finite_values(tmp_path):
    vol = ramp_volume()
    vol[3, 4, 5] = np.nan
    assert reason(save(tmp_path, vol, "nan.nii")) == "non_finite"
    vol[3, 4, 5] = np.inf
    assert reason(save(tmp_path, vol, "inf.nii.gz")) == "non_finite"


def test_damaged_files(tmp_path):
    gz = save(tmp_path, ramp_volume())
    data = open(gz, "rb").read()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.nii.gz") == "truncated"
    raw = save(tmp_path, ramp_volume(), "raw.nii")
    data = open(raw, "rb").read()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.nii") == "truncated"
    (tmp_path / "junk.nii").write_bytes(b"this is not a NIfTI header" * 20)
    assert reason(tmp_path / "junk.nii") == "corrupt_nifti"
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert reason(tmp_path / "empty.nii.gz") == "empty_file"


def test_limits_and_unsupported_shapes(tmp_path):
    path = save(tmp_path, ramp_volume())
    assert reason(path, ReadOptions(max_voxels=1000)) == "too_large"
    assert reason(path, ReadOptions(max_pixels=100)) == "too_large"
    assert reason(save(tmp_path, np.zeros((4, 4, 4), np.float32), "tiny.nii")) == "too_small"
    assert reason(save(tmp_path, np.zeros((16, 16, 4, 3), np.float32), "fmri.nii")) == "unsupported_format"
