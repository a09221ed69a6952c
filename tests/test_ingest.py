"""run_ingest end to end without dvc: accounting, quarantine, duplicates, PHI, formats and pydicom's test files."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtl.errors import MedtlError
import medtl.ingest.ingest
from medtl.ingest.ingest import IngestParams, run_ingest
from medtl.ingest.manifest import CORE_COLUMNS as MANIFEST_COLUMNS
from medtl.ingest.manifest import read_manifest
from medtl.ingest.store import PixelStore
from medtl.intake import demo
import medtl.intake.decode
from medtl.intake.phi import KEY_ENV, WHITELIST, source_ref
from medtl.params import build

from tests.project import distinct_seed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test key, sixteen bytes or more")


def paths_by_ref(root: Path) -> dict[str, str]:
    """What `medtl locate` does: every relative path under root (folders with a trailing /) by its source_ref."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")
        out[source_ref(rel)] = rel
    return out


def reasons(report: dict) -> dict:
    return {r: n for r, n in report["quarantine_reasons"].items() if n}


def params(**raw) -> IngestParams:
    raw.setdefault("data", "/")  # everything lies inside
    raw.setdefault("workers", 1)
    return build(IngestParams, raw, "ingest")


def ingest(tmp_path, **raw) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    report = run_ingest(params(**raw), out)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    return report, read_manifest(out / "manifest.csv")


def image(path: Path, seed: int, size: int = 20, mode: str = "L", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(path, format=fmt)
    else:
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path, format=fmt)
    return path


def class_folders(root: Path, per_class: int = 12) -> Path:
    """Two classes, mixed formats, one image per patient."""
    fmts = [("png", "L"), ("jpg", "RGB"), ("tif", "L"), ("png", "RGBA"), ("bmp", "RGB"), ("png", "I;16")]
    for c, name in enumerate(("benign", "malignant")):
        for i in range(per_class):
            ext, mode = fmts[i % len(fmts)]
            image(root / name / f"sub{i % 2}" / f"{name}_{i}.{ext}", seed=100 * c + i, mode=mode)
    return root


def accounted(report: dict) -> None:
    assert report["files_seen"] == report["files_decoded"] + report["quarantined"] == \
        report["files_decoded"] + sum(report["quarantine_reasons"].values())
    assert report["images_decoded"] == report["images"] + report["duplicates_removed"]
    assert report["images"] == sum(c["images"] for c in report["counts"].values())


def test_folder_formats_quarantine_and_accounting(tmp_path):
    root = class_folders(tmp_path / "data", per_class=18)
    (root / "benign" / "notes.txt").write_text("reader notes")
    (root / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "empty_class").mkdir()
    image(root / "other" / "x.png", seed=7)
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.2,
                          classes=["benign", "malignant"])
    accounted(report)
    assert reasons(report) == {"corrupt_image": 1, "empty_class_folder": 1, "not_an_image": 1, "unknown_label": 1}
    names = paths_by_ref(root)
    where = {q["reason"]: names[q["source_ref"]] for q in report["quarantine"]}
    assert (where["unknown_label"], where["empty_class_folder"]) == ("other/x.png", "empty_class/")
    assert report["images"] == 36 and len(rows) == 36
    assert list(rows[0])[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS
    assert {r["channels"] for r in rows} == {"1", "3"}
    assert all((root / names[r["source_ref"]]).is_file() for r in rows)
    text = (tmp_path / "out" / "manifest.csv").read_text() + (tmp_path / "out" / "report.json").read_text()
    assert str(tmp_path) not in text and "benign_1" not in text and "sub0" not in text  # no path segments
    store = PixelStore(tmp_path / "out" / "pixels.u16")
    r = next(r for r in rows if names[r["source_ref"]].endswith(".tif"))
    original = np.asarray(Image.open(root / names[r["source_ref"]]), np.float32) / 255
    got = store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"]))[..., 0]
    assert np.abs(got - original).max() < 1e-4


def test_quarantine_limit_and_nothing_usable(tmp_path):
    root = class_folders(tmp_path / "data", per_class=6)
    for i in range(3):
        (root / "benign" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"junk")
    with pytest.raises(MedtlError, match=r"quarantined 3 of 15 files .*max_quarantine_fraction=0.05.*f-[0-9a-f]{16} "
                                         r"\(corrupt_image.*medtl locate"):
        ingest(tmp_path, source="folder", folder={"root": str(root)})
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.txt").write_text("x")
    with pytest.raises(MedtlError, match="no usable image among 1 file"):
        ingest(tmp_path, source="folder", folder={"root": str(empty)})


def test_unexpected_reader_error_is_quarantined(tmp_path, monkeypatch):
    root = class_folders(tmp_path / "data", per_class=8)
    real = medtl.intake.decode.read

    def flaky(path, options):  # a reader bug on one file
        if path.name == "benign_3.png":
            raise RuntimeError("reader bug")
        return real(path, options)

    monkeypatch.setattr(medtl.intake.decode, "read", flaky)
    report, _ = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.1)
    assert reasons(report) == {"decode_error": 1}
    assert report["quarantine"][0]["detail"] == "unexpected RuntimeError while decoding"  # the message may quote values


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_csv_patients_with_several_images_never_span_splits(tmp_path):
    root = tmp_path / "data"
    rows = []
    for p in range(30):
        for k in range(1 + p % 4):
            rel = f"img/p{p}_{k}.png"
            image(root / rel, seed=1000 + 10 * p + k)
            rows.append({"path": rel, "label": "pos" if p % 2 else "neg", "group": f"MRN{p:04d}", "sex": "F",
                         "site": f"s{p % 3}"})
    rows.append({"path": "img/none.png", "label": "pos", "group": "MRN9999", "sex": "", "site": ""})
    rows.append({"path": "img/p0_0.png", "label": "", "group": "MRN0000", "sex": "", "site": ""})
    m = write_manifest(root / "labels.csv", rows)
    report, manifest = ingest(tmp_path, source="csv", csv={"manifest": str(m), "metadata": ["site"]},
                              max_quarantine_fraction=0.1)
    accounted(report)
    assert reasons(report) == {"missing_file": 1, "no_label": 1}
    assert {q.get("line") for q in report["quarantine"]} == {len(rows), len(rows) + 1}  # CSV lines, header = 1
    assert report["grouping"] == {"kind": "column", "rule": None, "images_by_kind": {"column": len(manifest)}}
    spans: dict[str, set] = {}
    for r in manifest:
        spans.setdefault(r["group"], set()).add(r["split"])
    assert len(spans) == 30 and all(len(s) == 1 for s in spans.values())
    assert {r["site"] for r in manifest} == {"s0", "s1", "s2"}
    text = (tmp_path / "out" / "manifest.csv").read_text() + (tmp_path / "out" / "report.json").read_text()
    assert "MRN" not in text  # groups are pseudonyms


def test_cross_split_duplicates_are_dropped_or_fail(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(8):
                image(root / split / c / f"{split}{i}.png", seed=distinct_seed(split, c, i))
    # Published splits that leak: a byte copy and a re-encoded (pixel-identical) copy of training images.
    shutil.copy(root / "train" / "a" / "train0.png", root / "test" / "a" / "copy.png")
    Image.open(root / "train" / "b" / "train1.png").save(root / "test" / "b" / "copy.tif")
    # Same-split copies stay (they cannot leak) but are listed.
    shutil.copy(root / "train" / "a" / "train2.png", root / "train" / "a" / "again.png")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)})
    accounted(report)
    names = paths_by_ref(root)
    removed = {(names[d["image"]["source_ref"]], d["kind"]) for d in report["duplicates"] if d["action"] == "removed"}
    assert removed == {("test/a/copy.png", "file"), ("test/b/copy.tif", "pixels")}
    assert report["duplicates_removed"] == 2
    kept = [d for d in report["duplicates"] if d["action"] != "removed"]
    assert [(d["kind"], d["image"]["split"] == d["duplicate_of"]["split"]) for d in kept] == [("file", True)]
    assert "test/a/copy.png" not in {names[r["source_ref"]] for r in rows}
    assert {r["split"] for r in rows if names[r["source_ref"]].startswith("test/")} == {"test"}
    with pytest.raises(MedtlError, match=r"2 image\(s\) are duplicated across splits.*'source_ref': '" + source_ref("test/a/copy.png")):
        ingest(tmp_path, source="folder", folder={"root": str(root)}, duplicates="fail")


def test_nifti_volume_slices_share_a_group(tmp_path):
    root = tmp_path / "data"
    for c in ("ct", "mr"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            vol = np.random.default_rng(i + (10 if c == "mr" else 0)).normal(size=(16, 16, 5)).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), root / c / f"v{i}.nii.gz")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, read={"slice": "all"},
                          split={"train": 0.5, "val": 0.25, "test": 0.25})
    accounted(report)
    assert report["files_seen"] == 8 and report["images"] == 40
    by_file: dict[str, set] = {}
    for r in rows:
        by_file.setdefault(r["source_ref"], set()).add((r["group"], r["split"]))
    assert all(len(v) == 1 for v in by_file.values()) and len(by_file) == 8
    assert sorted(int(r["slice"]) for r in rows if r["source_ref"] == source_ref("ct/v0.nii.gz")) == [0, 1, 2, 3, 4]


def test_demo_phi_never_reaches_the_artifacts(tmp_path):
    report, rows = ingest(tmp_path, source="demo", data="medtl/intake/demo.py",
                          demo={"patients": 12, "min_size": 32, "max_size": 40, "max_images_per_patient": 2})
    accounted(report)
    assert set(rows[0]) <= set(MANIFEST_COLUMNS) | set(WHITELIST)
    assert report["grouping"]["kind"] == "source" and report["pseudonym_key"] == "user"
    text = (tmp_path / "out" / "manifest.csv").read_text() + (tmp_path / "out" / "report.json").read_text()
    for p in demo.fake_patients(12, 0.4, 7):
        for value in vars(p).values():
            if isinstance(value, str) and len(value) > 3:
                assert value not in text
    again, _ = ingest(tmp_path, source="demo", data="medtl/intake/demo.py", workers=2,
                      demo={"patients": 12, "min_size": 32, "max_size": 40, "max_images_per_patient": 2})
    assert again == report  # deterministic, whatever the number of workers


# pydicom's bundled files through a dicom source: decoded, or quarantined for the right reason
DECODED = {
    "CT_small.dcm": (128, 128, 1), "MR_small.dcm": (64, 64, 1), "MR_small_RLE.dcm": (64, 64, 1),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64, 1), "MR_small_jp2klossless.dcm": (64, 64, 1),
    "MR_small_bigendian.dcm": (64, 64, 1), "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
    "SC_rgb_rle_2frame.dcm": (100, 100, 3), "image_dfl.dcm": (512, 512, 1), "examples_palette.dcm": (350, 800, 3),
}
QUARANTINED = {"MR_truncated.dcm": "truncated", "rtplan.dcm": "not_an_image", "rtstruct.dcm": "not_an_image",
               "test-SR.dcm": "not_an_image", "waveform_ecg.dcm": "not_an_image", "no_meta.dcm": "corrupt_dicom",
               # 12-bit JPEG Extended: only the opt-in GPL-3.0 extra decodes it (tests/test_codecs.py)
               "JPEG-lossy.dcm": "undecodable_pixels", "JPGExtended.dcm": "undecodable_pixels"}


def test_pydicom_test_files_through_a_dicom_source(tmp_path):
    root = tmp_path / "dicom"
    names = list(DECODED) + list(QUARANTINED)
    rows = []
    for i, name in enumerate(names):
        (root / f"study{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), root / f"study{i % 3}" / name)
        rows.append({"path": f"study{i % 3}/{name}", "label": "x" if i % 2 else "y"})
    labels = write_manifest(tmp_path / "labels.csv", rows)
    report, manifest = ingest(tmp_path, source="dicom", dicom={"root": str(root), "labels": str(labels)},
                              max_quarantine_fraction=0.5, split={"train": 1.0, "val": 0.0, "test": 0.0},
                              label_conflicts="keep")
    accounted(report)
    import logging
    assert logging.getLogger("pydicom").propagate is False, logging.getLogger("pydicom").handlers
    # MR_small in five transfer syntaxes decodes to identical pixels, labelled x and y by turns here
    (conflict,) = report["label_conflicts"]
    assert conflict["labels"] == ["x", "y"] and conflict["action"] == "kept" and len(conflict["images"]) == 5
    names = paths_by_ref(root)
    got = {Path(names[r["source_ref"]]).name: (int(r["height"]), int(r["width"]), int(r["channels"])) for r in manifest}
    assert got == DECODED
    why = {Path(names[q["source_ref"]]).name: q["reason"] for q in report["quarantine"]}
    assert why == QUARANTINED
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert str(ct.PatientID) not in text and str(ct.SOPInstanceUID) not in text
