"""Sources on small data written here: folder layouts, CSV manifests (and their path checks), DICOM trees, MedMNIST."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtl.errors import MedtlError, ParamsError
from medtl.ingest.ingest import IngestParams
from medtl.intake.sources import Resolved, open_source
from medtl.params import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def params(**raw) -> IngestParams:
    raw.setdefault("data", "/")  # everything lies inside
    return build(IngestParams, raw, "ingest")


def png(path: Path, value: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def items(source) -> dict:
    return {i.relative: i for i in source.items}


# folder

def test_folder_nested_classes_and_problems(tmp_path):
    png(tmp_path / "benign" / "a.png", 1)
    png(tmp_path / "benign" / "sub" / "deeper" / "b.png", 2)
    png(tmp_path / "malignant" / "c.png", 3)
    (tmp_path / "empty").mkdir()
    png(tmp_path / "loose.png", 4)
    (tmp_path / ".hidden").mkdir()
    png(tmp_path / ".hidden" / "x.png")
    src = open_source(params(source="folder", folder={"root": str(tmp_path)}), tmp_path)
    got = items(src)
    assert src.classes == ["benign", "empty", "malignant"]
    assert got["benign/sub/deeper/b.png"].label == "benign"
    assert got["malignant/c.png"].label == "malignant" and got["malignant/c.png"].split is None
    assert got["empty/"].problem == "empty_class_folder"
    assert got["loose.png"].problem == "no_label"
    assert not any(".hidden" in k for k in got)


def test_folder_split_layout_is_detected(tmp_path):
    png(tmp_path / "Training" / "glioma" / "a.jpg", 1)
    png(tmp_path / "Training" / "notumor" / "b.jpg", 2)
    png(tmp_path / "Testing" / "glioma" / "c.jpg", 3)
    src = open_source(params(source="folder", folder={"root": str(tmp_path)}), tmp_path)
    got = items(src)
    assert src.description["layout"] == "splits"
    assert (got["Training/glioma/a.jpg"].split, got["Training/glioma/a.jpg"].label) == ("train", "glioma")
    assert (got["Testing/glioma/c.jpg"].split, got["Testing/glioma/c.jpg"].label) == ("test", "glioma")
    with pytest.raises(MedtlError, match="not split names"):
        png(tmp_path / "extra" / "x" / "d.png")
        open_source(params(source="folder", folder={"root": str(tmp_path), "layout": "splits"}), tmp_path)


def test_folder_quarantines_links_that_leave_the_root_loop_or_dangle(tmp_path):
    outside = png(tmp_path / "outside.png")
    root = tmp_path / "root"
    png(root / "a" / "ok.png")
    png(root / "b" / "real.png", 2)
    os.symlink(outside, root / "a" / "escape.png")
    os.symlink(root / "a" / "loop1.png", root / "a" / "loop2.png")
    os.symlink(root / "a" / "loop2.png", root / "a" / "loop1.png")
    os.symlink(root / "a" / "gone.png", root / "a" / "dangling.png")
    os.symlink(root / "a", root / "a" / "again")  # a folder link back to its parent
    os.symlink(root / "b", root / "a" / "inside")  # a folder link inside the root is followed
    got = items(open_source(params(source="folder", folder={"root": str(root)}), tmp_path))
    assert {k: i.problem for k, i in got.items()} == {
        "a/ok.png": None, "a/escape.png": "link_outside_root", "a/loop1.png": "symlink_loop",
        "a/loop2.png": "symlink_loop", "a/dangling.png": "dangling_symlink", "a/again": "symlink_loop",
        "a/inside/real.png": None, "b/real.png": None,
    }
    assert all(i.path is None for i in got.values() if i.problem)  # never read


def test_missing_root_and_required_params_are_clear(tmp_path):
    with pytest.raises(MedtlError, match="ingest.folder.root"):
        open_source(params(source="folder", folder={"root": str(tmp_path / "nope")}), tmp_path)
    with pytest.raises(ParamsError, match="ingest.csv.manifest"):
        params(source="csv")
    with pytest.raises(ParamsError, match="ingest.data"):
        build(IngestParams, {"source": "folder", "folder": {"root": "x"}}, "ingest")
    with pytest.raises(ParamsError, match="ingest.read.window"):
        params(read={"window": "liver"})


# csv

def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_csv_columns_groups_splits_and_metadata(tmp_path):
    png(tmp_path / "img" / "a.png", 1)
    png(tmp_path / "img" / "b.png", 2)
    m = write_csv(tmp_path / "m.csv", """
path,label,group,split,site,age
img/a.png,pos,P1,train,north,44
img/b.png, neg ,P2,,south,51
img/gone.png,neg,P3,,south,60
""")
    src = open_source(params(source="csv", csv={"manifest": str(m), "metadata": ["site", "age"]}), tmp_path)
    got = items(src)
    assert (got["img/a.png"].group, got["img/a.png"].split, got["img/a.png"].extra) == ("P1", "train", {"site": "north", "age": "44"})
    assert got["img/b.png"].split is None
    assert got["img/gone.png"].problem == "missing_file"


def test_csv_path_template_and_explicit_columns(tmp_path):
    png(tmp_path / "data" / "mel" / "ISIC_1.jpg", 1)
    m = write_csv(tmp_path / "meta.csv", "lesion_id,image_id,dx\nL1,ISIC_1,mel\n")
    src = open_source(params(source="csv", csv={"manifest": str(m), "root": str(tmp_path / "data"),
                                                "path_template": "{dx}/{image_id}.jpg", "label_column": "dx",
                                                "group_column": "lesion_id"}), tmp_path)
    (item,) = src.items
    assert (item.relative, item.label, item.group, item.group_kind) == ("mel/ISIC_1.jpg", "mel", "L1", "column")
    with pytest.raises(MedtlError, match="group_column' names column 'patient'"):
        open_source(params(source="csv", csv={"manifest": str(m), "group_column": "patient", "path_template": "{dx}",
                                              "label_column": "dx"}), tmp_path)


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "/etc/passwd", "img/link.png"])
def test_csv_path_traversal_is_refused(tmp_path, bad):
    root = tmp_path / "root"
    png(root / "img" / "a.png")
    png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "img" / "link.png")
    m = write_csv(root / "m.csv", f"path,label\nimg/a.png,x\n{bad},y\n")
    with pytest.raises(MedtlError, match="m.csv line 3") as info:
        open_source(params(source="csv", csv={"manifest": str(m)}), tmp_path)
    assert "absolute" in str(info.value) or "outside the data root" in str(info.value)


def test_csv_refuses_identifying_metadata_and_bad_splits(tmp_path):
    png(tmp_path / "a.png")
    m = write_csv(tmp_path / "m.csv", "path,label,PatientName,split\na.png,x,DOE^JOHN,holdout\n")
    with pytest.raises(ParamsError, match="PatientName"):
        open_source(params(source="csv", csv={"manifest": str(m), "metadata": ["PatientName"]}), tmp_path)
    with pytest.raises(MedtlError, match="line 2: the value in column 'split' is not a split name"):
        open_source(params(source="csv", csv={"manifest": str(m)}), tmp_path)


def test_csv_rows_are_checked_first_then_streamed(tmp_path):
    png(tmp_path / "a.png")
    m = write_csv(tmp_path / "m.csv", "path,label\na.png,x\ngone.png,y\na.png,x\n")
    src = open_source(params(source="csv", csv={"manifest": str(m)}), tmp_path)
    assert not isinstance(src.items, list) and src.count == 3 and src.description["rows"] == 3
    assert [(i.relative, i.line, i.problem) for i in src.items] == [
        ("a.png", 2, None), ("gone.png", 3, "missing_file"), ("a.png", 4, None)]
    # bytes that are not UTF-8 far down the file are reported before a bad row above them
    m.write_bytes(b"path,label,split\na.png,x,holdout\n" + b"a.png,x,train\n" * 1000 + b"\xff.png,x,\n")
    with pytest.raises(MedtlError, match="cannot be read as a UTF-8 CSV file"):
        open_source(params(source="csv", csv={"manifest": str(m)}), tmp_path)


# dicom

def dicom_tree(tmp_path) -> Path:
    root = tmp_path / "dicom"
    for sub, name in (("s1", "CT_small.dcm"), ("s1", "MR_small.dcm"), ("s2", "rtplan.dcm")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), root / sub / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_dicom_labels_by_path(tmp_path):
    root = dicom_tree(tmp_path)
    labels = write_csv(tmp_path / "labels.csv", "path,label\ns1/CT_small.dcm,a\ns1/MR_small.dcm,b\ns9/gone.dcm,a\n")
    src = open_source(params(source="dicom", dicom={"root": str(root), "labels": str(labels)}), tmp_path)
    got = items(src)
    assert got["s1/CT_small.dcm"].label == "a"
    assert got["s2/rtplan.dcm"].problem == "no_label"
    assert got["labels.csv line 4"].problem == "missing_file"
    only = open_source(params(source="dicom", dicom={"root": str(root), "labels": str(labels), "include": "*.dcm"}), tmp_path)
    assert "notes.txt" not in items(only)


def test_dicom_label_rows_repeated_or_contradicting(tmp_path):
    root = dicom_tree(tmp_path)
    labels = write_csv(tmp_path / "labels.csv", "path,label\ns1/MR_small.dcm,b\ns1/CT_small.dcm,a\ns1/CT_small.dcm,a\n")
    src = open_source(params(source="dicom", dicom={"root": str(root), "labels": str(labels)}), tmp_path)
    got = items(src)  # a repeated row is one row
    assert (got["s1/CT_small.dcm"].label, got["s1/CT_small.dcm"].line) == ("a", 3)
    assert got["s2/rtplan.dcm"].problem == "no_label" and src.description["files"] == 4
    write_csv(labels, "path,label\ns1/CT_small.dcm,a\ns1/MR_small.dcm,b\ns1/MR_small.dcm,c\ns1/CT_small.dcm,b\n")
    with pytest.raises(MedtlError, match=r"lines 3 and 4 give the same file two labels \('b' and 'c'\)"):
        open_source(params(source="dicom", dicom={"root": str(root), "labels": str(labels)}), tmp_path)


def test_dicom_labels_by_uid_are_resolved_from_headers(tmp_path):
    root = dicom_tree(tmp_path)
    ct = pydicom.dcmread(root / "s1" / "CT_small.dcm")
    labels = write_csv(tmp_path / "labels.csv", f"uid,label\n{ct.SOPInstanceUID},a\n1.2.3.4,b\n")
    src = open_source(params(source="dicom", dicom={"root": str(root), "labels": str(labels), "key": "SOPInstanceUID",
                                                    "key_column": "uid"}), tmp_path)
    item = items(src)["s1/CT_small.dcm"]
    assert src.resolve(item, {"SOPInstanceUID": ct.SOPInstanceUID, "PatientID": "X1"}) == Resolved("a", "X1")
    assert src.resolve(item, {"SOPInstanceUID": "9.9", "PatientID": "X1"}).problem == "no_label"
    (missing,) = src.unmatched()
    assert missing.relative == "labels.csv line 3" and missing.line == 3 and "1.2.3.4" not in missing.detail


# medmnist

def npz(path: Path, flat: bool = False, rgb: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 2
        arrays[f"{split}_labels"] = labels if flat else labels[:, None]
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize("flat", [False, True])
def test_medmnist_official_splits(tmp_path, flat):
    path = npz(tmp_path / "mini.npz", flat=flat)
    src = open_source(params(source="medmnist", medmnist={"path": str(path)}, classes=["normal", "pneumonia"]), tmp_path)
    got = list(src.items)
    assert src.count == 20 and len(got) == 20
    assert [i.split for i in got].count("val") == 4
    assert got[1].label == "pneumonia" and got[0].pixels.dtype == np.float32 and got[0].pixels.max() <= 1.0
    assert got[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_medmnist_refuses_multilabel(tmp_path):
    path = tmp_path / "chest.npz"
    z = np.zeros((3, 28, 28), np.uint8)
    np.savez(path, **{f"{s}_images": z for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((3, 14), np.uint8) for s in ("train", "val", "test")})
    with pytest.raises(MedtlError, match="multi-label"):
        open_source(params(source="medmnist", medmnist={"path": str(path)}), tmp_path)


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_medmnist_downloads_when_missing_and_checks_md5(tmp_path, served):
    www, base = served
    md5 = hashlib.md5(npz(www / "mini.npz").read_bytes()).hexdigest()
    dest = tmp_path / "raw" / "mini.npz"
    with pytest.raises(MedtlError, match="md5"):
        open_source(params(source="medmnist", medmnist={"path": str(dest), "url": f"{base}/mini.npz", "md5": "0" * 32}), tmp_path)
    assert not dest.exists() and not list(dest.parent.iterdir())  # nothing half-written is left
    with pytest.raises(MedtlError, match="cannot download"):
        open_source(params(source="medmnist", medmnist={"path": str(dest), "url": f"{base}/absent.npz", "md5": md5}), tmp_path)
    src = open_source(params(source="medmnist", medmnist={"path": str(dest), "url": f"{base}/mini.npz", "md5": md5}), tmp_path)
    assert dest.read_bytes() == (www / "mini.npz").read_bytes() and src.count == 20
    with pytest.raises(MedtlError, match="ingest.medmnist.path"):
        open_source(params(source="medmnist", medmnist={"path": str(tmp_path / "none.npz")}), tmp_path)
