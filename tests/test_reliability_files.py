"""Bad and untrusted files: broken images are quarantined with their reason while the rest is ingested;
checkpoints that carry pickled code and manifest paths that leave the data root are refused."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medtl.errors import MedtlError
from medtl.ingest.ingest import IngestParams, run_ingest
from medtl.ingest.manifest import read_manifest
from medtl.intake.phi import source_ref
from medtl.io import load_torch
from medtl.params import build
from tests.project import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _encoded(fmt: str, size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _dicom_without_pixels(path: Path) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "ANON"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 64, 64, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.save_as(path, enforce_file_format=True)


def _nan_tiff(path: Path) -> None:
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    a[5, 7] = np.nan
    Image.fromarray(a, mode="F").save(path, format="TIFF")


def _nan_nifti(path: Path) -> None:
    a = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    a[4, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(a, np.eye(4)), path)


# file name (under the "lesion" class) -> how to make it, and the reason it must be quarantined with
CORPUS = {
    "truncated.png": (lambda p: p.write_bytes(_encoded("PNG")[:300]), "truncated"),
    "truncated.jpg": (lambda p: p.write_bytes(_encoded("JPEG")[:400]), "truncated"),
    "zero.png": (lambda p: p.write_bytes(b""), "empty_file"),
    "zero.dcm": (lambda p: p.write_bytes(b""), "empty_file"),
    "no_pixels.dcm": (_dicom_without_pixels, "no_pixel_data"),
    "MR_truncated.dcm": (lambda p: shutil.copy(get_testdata_file("MR_truncated.dcm"), p), "truncated"),
    "badVR.dcm": (lambda p: shutil.copy(get_testdata_file("badVR.dcm"), p), "corrupt_dicom"),
    "one_pixel.png": (lambda p: Image.new("L", (1, 1), 128).save(p), "too_small"),
    "huge_header.png": (lambda p: p.write_bytes(_png_header_only(20000, 20000)), "too_large"),
    "nan.tif": (_nan_tiff, "non_finite"),
    "nan.nii.gz": (_nan_nifti, "non_finite"),
    "report.jpg": (lambda p: p.write_text("Radiology report: no acute findings.\n" * 20), "not_an_image"),
    "archive.png": (lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(200)), "not_an_image"),
}


def _dataset(root: Path, per_class: int = 12) -> Path:
    for c, name in enumerate(("normal", "lesion")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{name}_{i:02d}.png").write_bytes(_encoded("PNG", size=24, seed=100 * c + i))
    for name, (make, _) in CORPUS.items():
        make(root / "lesion" / name)
    return root


def _ingest_stage(cwd: Path, ingest: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump({"ingest": ingest}))
    return subprocess.run([sys.executable, str(ROOT / "stages" / "ingest.py")], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)


def test_each_broken_file_is_quarantined_with_its_reason_and_the_rest_is_ingested(tmp_path):
    root = _dataset(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    res = _ingest_stage(work, {"source": "folder", "data": str(root), "folder": {"root": str(root)},
                               "max_quarantine_fraction": 0.4, "workers": 2})
    assert res.returncode == 0, res.stderr
    report = json.loads((work / "data/ingested/report.json").read_text())
    reasons = {q["source_ref"]: q["reason"] for q in report["quarantine"]}
    assert reasons == {source_ref(f"lesion/{name}"): reason for name, (_, reason) in CORPUS.items()}
    assert all(q["detail"] for q in report["quarantine"])
    rows = read_manifest(work / "data/ingested/manifest.csv")
    assert sorted(r["source_ref"] for r in rows) == sorted(
        source_ref(f"{c}/{c}_{i:02d}.png") for c in ("normal", "lesion") for i in range(12))
    assert report["files_seen"] == 24 + len(CORPUS) and report["images"] == 24
    # Every decoded pixel is finite and in range: nothing broken slipped into the store.
    store = np.fromfile(work / "data/ingested/pixels.u16", dtype=np.uint16)
    assert store.size == sum(int(r["height"]) * int(r["width"]) * int(r["channels"]) for r in rows)


def test_too_many_broken_files_stop_ingest_with_the_reasons_and_no_output(tmp_path):
    root = _dataset(tmp_path / "images", per_class=6)
    work = tmp_path / "work"
    work.mkdir()
    res = _ingest_stage(work, {"source": "folder", "data": str(root), "folder": {"root": str(root)},
                               "max_quarantine_fraction": 0.05, "workers": 1})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "max_quarantine_fraction" in res.stderr and "truncated" in res.stderr
    assert not (work / "data" / "ingested").exists()
    assert not [p for p in work.rglob("*") if p.is_file() and p.name != "params.yaml"]


# ---- untrusted files -------------------------------------------------------------------------

MARKER_ENV = "MEDTL_TEST_PWNED"


class _Payload:
    """Unpickling this runs code: it writes a marker file. A safe loader never unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _malicious(path: Path, marker: Path, inner: dict | None = None) -> Path:
    """A checkpoint shaped like a real one, with one object whose unpickling runs code."""
    obj = dict(inner or {})
    obj["extra"] = _Payload(marker)
    torch.save(obj, path)
    return path


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned.txt"
    from medtl.model.backbones import backbone_state
    from medtl.model.start import build_backbone

    state = backbone_state(build_backbone("resnet18", in_channels=1))
    return _malicious(tmp_path / "evil.pt", marker, state), marker


def test_plain_torch_load_would_run_the_payload(tmp_path):
    # The fixture really carries code: loading it without weights_only executes it.
    marker = tmp_path / "pwned.txt"
    path = _malicious(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_medtl_io_refuses_a_checkpoint_with_pickled_code(evil):
    path, marker = evil
    with pytest.raises(MedtlError, match="cannot be loaded safely"):
        load_torch(path)
    assert not marker.exists()


def test_model_loaders_refuse_a_checkpoint_with_pickled_code(evil):
    from medtl.model.backbone_file import load_backbone
    from medtl.model.classifier import load_classifier

    path, marker = evil
    for loader in (load_backbone, load_classifier):
        with pytest.raises(MedtlError, match="cannot be loaded safely"):
            loader(path)
    assert not marker.exists()


def test_pinned_weights_file_with_pickled_code_is_refused(evil):
    from medtl.io import sha256_file
    from medtl.model import weights

    path, marker = evil
    with pytest.raises(MedtlError):
        weights.load_pinned(path, sha256_file(path))
    with pytest.raises(MedtlError):
        weights.load_model("resnet18", str(path), sha256_file(path))
    assert not marker.exists()


def test_medtl_predict_refuses_a_model_with_pickled_code(evil, tmp_path, capsys):
    from medtl.cli import main

    path, marker = evil
    img = tmp_path / "x.png"
    img.write_bytes(_encoded("PNG", size=32))
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(path), str(img), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_a_csv_manifest_path_that_leaves_the_data_root_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(_encoded("PNG", size=24, seed=1))
    rows = ["path,label"] + [f"img{i}.png,{'a' if i % 2 else 'b'}" for i in range(20)]
    for i in range(20):
        (root / f"img{i}.png").write_bytes(_encoded("PNG", size=24, seed=10 + i))
    rows += ["../secret.png,a", f"{outside},b"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    params = build(IngestParams, {"source": "csv", "data": str(root), "workers": 1, "max_quarantine_fraction": 0.2,
                                  "csv": {"manifest": str(root / "labels.csv")}}, "ingest")
    out = tmp_path / "out"
    out.mkdir()
    try:
        report = run_ingest(params, out)
    except MedtlError as e:  # refusing the whole manifest is as good as refusing the row
        assert "labels.csv line 22" in str(e) and "secret" not in str(e)  # named by line: paths may identify
        return
    refused = {q["line"]: q["reason"] for q in report["quarantine"]}
    assert sorted(refused) == [22, 23], refused
    refs = {r["source_ref"] for r in read_manifest(out / "manifest.csv")}
    assert refs == {source_ref(f"img{i}.png") for i in range(20)}
