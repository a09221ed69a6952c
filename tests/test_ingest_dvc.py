"""Each source through the real `dvc repro ingest` on a temporary git + dvc project, with data written here."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_images(root: Path, n: int = 8) -> None:
    """Two classes in PNG (8 and 16 bit), JPEG, TIFF and NIfTI, with a nested folder."""
    for c, name in enumerate(("normal", "abnormal")):
        d = root / name / "nested"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(100 * c + i)
            kind = i % 5
            if kind == 0:
                Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(d / f"{i}.png")
            elif kind == 1:
                Image.fromarray(rng.integers(0, 65535, (24, 20), dtype=np.uint16)).save(d / f"{i}.png")
            elif kind == 2:
                Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=95)
            elif kind == 3:
                Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(d / f"{i}.tif")
            else:
                nib.save(nib.Nifti1Image(rng.normal(size=(20, 24, 3)).astype(np.float32), np.eye(4)), d / f"{i}.nii.gz")


def manifest(project) -> list[dict]:
    with open(project.path / "data/ingested/manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def report(project) -> dict:
    return json.loads((project.path / "data/ingested/report.json").read_text())


def rehash_sources(project, rows: list[dict]) -> dict[str, str]:
    """`medtl locate` maps every image back to a file that still has its sha256; returns image id -> path."""
    out = project.run(sys.executable, "-m", "medtl.cli", "locate", *[r["image_id"] for r in rows]).stdout
    found = {}
    for line in out.splitlines():
        image_id, ref, where, check = line.split("\t")
        path = Path(where.split(" [")[0])
        assert check == "sha256 matches" and hashlib.sha256((project.path / path).read_bytes()).hexdigest() == \
            next(r["sha256"] for r in rows if r["image_id"] == image_id), line
        found[image_id] = path.as_posix()
    assert sorted(found) == sorted(r["image_id"] for r in rows)
    return found


def ingest_params(project, extra: dict) -> None:
    p = project.params
    base = {k: v for k, v in p["ingest"].items() if k not in ("folder", "csv", "dicom", "medmnist")}
    p["ingest"] = {**base, **extra}
    project.set_params(p)


def test_folder_and_csv_sources_through_dvc(project):
    root = project.path / "srcdata" / "images"
    write_images(root)
    ingest_params(project, {"source": "folder", "data": "srcdata", "folder": {"root": "srcdata/images"}})
    project.dvc("repro", "ingest")
    rows = manifest(project)
    assert len(rows) == 16 and {r["label"] for r in rows} == {"normal", "abnormal"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    paths = rehash_sources(project, rows)
    assert {Path(p).suffix for p in paths.values()} == {".png", ".jpg", ".tif", ".gz"}
    assert all(p.startswith("srcdata/images/") for p in paths.values())

    # New data in the folder reruns ingest: the folder is a dependency through ${ingest.data}.
    shutil.copy(root / "normal/nested/0.png", root / "normal/extra.png")
    assert "changed" in project.dvc("status", "ingest").stdout
    project.dvc("repro", "ingest")
    assert report(project)["duplicates"][0]["kind"] == "file"  # the copy is found, and listed

    # A csv manifest with groups: a path escaping the root stops the stage with a clear message.
    lines = ["path,label,patient"] + [f"{paths[r['image_id']].removeprefix('srcdata/images/')},{r['label']},P{i // 2}"
                                      for i, r in enumerate(rows)]
    (root / "labels.csv").write_text("\n".join(lines + ["../../params.yaml,normal,P99"]) + "\n")
    ingest_params(project, {"source": "csv", "data": "srcdata", "csv": {"manifest": "srcdata/images/labels.csv",
                                                                        "group_column": "patient"}})
    res = project.dvc("repro", "ingest", check=False)
    assert res.returncode != 0
    assert "labels.csv line 18" in res.stderr + res.stdout and "outside the data root" in res.stderr + res.stdout
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    project.dvc("repro", "ingest")
    rows = manifest(project)
    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["split"])
    assert len(rows) == 16 and len(groups) == 8 and all(len(s) == 1 for s in groups.values())
    rehash_sources(project, rows)


def test_medmnist_and_dicom_sources_through_dvc(project):
    src = project.path / "srcdata"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez_compressed(src / "tinymnist.npz", **arrays)
    ingest_params(project, {"source": "medmnist", "data": "srcdata/tinymnist.npz", "classes": ["benign", "malignant"],
                            "medmnist": {"path": "srcdata/tinymnist.npz"}})
    project.dvc("repro", "ingest")
    rows = manifest(project)
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [16, 6, 6]
    assert {r["label"] for r in rows} == {"benign", "malignant"} and rows[0]["npz_index"] == "train/0"
    rehash_sources(project, rows)

    tree = src / "dicom"
    labels = ["path,label"]
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                              "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm", "MR_truncated.dcm"]):
        ds = pydicom.dcmread(get_testdata_file(name))
        d = tree / f"patient{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), d / name)
        labels.append(f"patient{i % 3}/{name},{'yes' if name.startswith('MR_small') else 'no'}")  # MR_small: same pixels
    (src / "dicom_labels.csv").write_text("\n".join(labels) + "\n")
    ingest_params(project, {"source": "dicom", "data": "srcdata", "max_quarantine_fraction": 0.2, "classes": [],
                            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
                            "dicom": {"root": "srcdata/dicom", "labels": "srcdata/dicom_labels.csv"}})
    res = project.dvc("repro", "ingest", check=False)  # real patient ids need a pseudonym key of the hospital's own
    assert res.returncode != 0 and "MEDTL_PSEUDONYM_KEY" in res.stderr + res.stdout
    project.env["MEDTL_PSEUDONYM_KEY"] = "hospital secret, long enough"
    ingest_params(project, {"source": "dicom", "data": "srcdata", "max_quarantine_fraction": 0.2, "classes": [],
                            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
                            "dicom": {"root": "srcdata/dicom", "labels": "srcdata/dicom_labels.csv"}})
    project.dvc("repro", "ingest")
    rep = report(project)
    assert rep["files_seen"] == 7 and rep["images"] == 6
    assert {r: n for r, n in rep["quarantine_reasons"].items() if n} == {"truncated": 1}
    assert rep["pseudonym_key"] == "user" and rep["grouping"]["kind"] == "patient_id"
    rows = manifest(project)
    assert str(ds.PatientID) not in (project.path / "data/ingested/manifest.csv").read_text()
    rehash_sources(project, rows)
