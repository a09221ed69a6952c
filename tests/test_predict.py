"""`medtl predict` on files written here: real readers, a real (untrained) ResNet-18, the real command line."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from medtl import cli
from medtl.evaluate.operating_point import data_profile, operating_point_record
from medtl.ingest.store import PixelStore, PixelStoreWriter, quantize
from medtl.intake import demo, phi
from medtl.intake.readers import read
from medtl.intake.readers.base import colour_of
from medtl.model.classifier import load_classifier, model_preprocessing
from medtl.prepare.imaging import model_input
from medtl.prepare.prepared import load_split
from tests.project import preprocessing_record
from tests.test_evaluation import write_model, write_prepared


@pytest.mark.parametrize("shape, channels, mode", [((45, 70), 1, "pad"), ((50, 40, 3), 1, "crop"),
                                                    ((37, 61), 3, "stretch")])
def test_model_input_of_decoded_pixels_is_bit_for_bit_the_store_path(tmp_path, shape, channels, mode):
    pixels = np.random.default_rng(1).random(shape, dtype=np.float32)
    # The pipeline: ingest quantises into the store, preprocess reads it back and applies the same function.
    writer = PixelStoreWriter(tmp_path / "pixels.u16")
    offset, h, w, c = writer.append(quantize(pixels))
    writer.close()
    stored = PixelStore(tmp_path / "pixels.u16").get(offset, h, w, c)
    pre = preprocessing_record(32, channels, resize=mode)
    got = model_input(pixels, pre)
    assert got.dtype == np.float16 and got.shape == (channels, 32, 32)
    assert np.array_equal(got, model_input(stored, pre))


def test_colour_is_decided_by_the_pixels_not_the_format():
    rng = np.random.default_rng(3)
    gray = rng.random((20, 20), dtype=np.float32)
    assert colour_of(gray) == "gray"
    assert colour_of(np.repeat(gray[:, :, None], 3, axis=2)) == "gray"  # RGB of gray content
    jpeg_like = np.repeat(gray[:, :, None], 3, axis=2)
    jpeg_like[:, :, 2] += 1 / 255  # a JPEG's rounding between channels is still gray
    assert colour_of(np.clip(jpeg_like, 0, 1)) == "gray"
    tinted = np.repeat(gray[:, :, None], 3, axis=2)
    tinted[5, 5] = [1.0, 0.0, 0.0]
    assert colour_of(tinted) == "colour"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = write_model(root / "model.pt")
    _, ckpt = load_classifier(model)
    prepared = write_prepared(root / "prepared", {"train": 2, "val": 8, "test": 2})
    op = {"rule": "youden", "target": None, "threshold": 0.4, "fitted_on": "validation"}
    profile = data_profile([load_split(prepared, s) for s in ("train", "val", "test")])
    (root / "op.json").write_text(json.dumps(operating_point_record(model, ckpt["classes"], op, 1.5, profile)))
    images = root / "images"
    patient = demo.fake_patients(1, 0.5, 3)[0]
    dcm = demo.write_patient_images(patient, 2, (40, 60), 3, images)
    mr = pydicom.dcmread(dcm[1])
    mr.Modality = "MR"
    mr.save_as(dcm[1])
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((50, 44)) * 255).astype(np.uint8)).save(images / "gray.png")
    gray_rgb = np.repeat((rng.random((30, 30, 1)) * 255).astype(np.uint8), 3, axis=2)
    Image.fromarray(gray_rgb).save(images / "gray_as_rgb.png")
    Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(images / "photo.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "model": model, "op": root / "op.json", "images": images, "dcm": dcm}


def run_cli(*args) -> int:
    return cli.main(["predict", *map(str, args)])


def rows_of(path, folder=None) -> dict[str, dict]:
    """Rows by file name: a file passed by name has it in `path`; one found in `folder`, as its ref in `file`."""
    rows = list(csv.DictReader(open(path, newline="")))
    refs = {phi.source_ref(f.relative_to(folder).as_posix()): f.name for f in folder.rglob("*")} if folder else {}
    return {refs[r["file"]] if r["file"] else r["path"].rsplit("/", 1)[-1]: r for r in rows}


def test_predict_folder_rows_probabilities_and_refusals(files, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    code = run_cli(files["model"], files["images"], "--out", out, "--operating-point", files["op"],
                   "--batch-size", 2, "--device", "cpu", "--precision", "fp32")
    assert code == 0
    rows = rows_of(out, files["images"])
    assert {r["path"] for r in rows.values()} == {str(files["images"])}  # the folder as typed, not the files in it
    for name, r in rows.items():
        found = next(files["images"].rglob(name))
        assert r["sha256"] == hashlib.sha256(found.read_bytes()).hexdigest()
    assert set(rows) == {"image0.dcm", "image1.dcm", "gray.png", "gray_as_rgb.png", "photo.jpg", "broken.png", "notes.txt"}
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {"image0.dcm": "ok", "image1.dcm": "refused", "gray.png": "ok", "gray_as_rgb.png": "ok",
                      "photo.jpg": "refused", "broken.png": "error", "notes.txt": "error"}
    assert "modality MR" in rows["image1.dcm"]["error"] and "CT" in rows["image1.dcm"]["error"]
    assert "colour image" in rows["photo.jpg"]["error"]
    assert rows["broken.png"]["error"] and rows["notes.txt"]["error"].startswith("not_an_image")

    # Each probability is the model on the pipeline's preprocessing, with the recorded temperature 1.5.
    model, ckpt = load_classifier(files["model"])
    for name, path in (("image0.dcm", files["dcm"][0]), ("gray.png", files["images"] / "gray.png")):
        x = torch.from_numpy(model_input(read(path)[0].pixels, model_preprocessing(ckpt, "m")).astype(np.float32))[None]
        with torch.no_grad():
            p = torch.softmax(model(x) / 1.5, dim=1)[0].numpy()
        r = rows[name]
        assert [float(r["prob_normal"]), float(r["prob_lesion"])] == pytest.approx(p.tolist(), abs=1e-6)
        assert r["above_threshold"] == str(bool(p[1] >= 0.4)).lower() and float(r["threshold"]) == 0.4
        assert r["predicted"] == ("lesion" if p[1] >= 0.4 else "normal")
    assert "3 image(s) predicted, 2 unreadable, 2 refused" in capsys.readouterr().out

    # --allow-mismatch predicts what was refused; --threshold overrides the operating point.
    code = run_cli(files["model"], files["dcm"][1], files["images"] / "photo.jpg", "--out", out, "--operating-point",
                   files["op"], "--allow-mismatch", "--threshold", "0.0", "--device", "cpu", "--precision", "fp32")
    assert code == 0
    assert all(r["status"] == "ok" and r["above_threshold"] == "true" for r in rows_of(out).values())


def test_decoding_ahead_in_a_thread_or_in_processes_writes_the_same_rows(files, tmp_path):
    """--workers 0 decodes in a read-ahead thread, --workers 2 in processes: the same CSV, row for row, and a
    batch smaller than the files so that decoding really runs ahead of inference."""
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.csv"
        assert run_cli(files["model"], files["images"], "--out", out, "--operating-point", files["op"], "--batch-size", 1,
                       "--workers", workers, "--device", "cpu", "--precision", "fp32") == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0].count("\n") == 8


def test_files_inside_a_folder_are_named_by_ref_and_sha256_never_by_their_identifying_paths(files, tmp_path, capsys):
    export = tmp_path / "export"
    patient = export / "DOE^JOHN_MRN12345"
    patient.mkdir(parents=True)
    (patient / "IM0001_MRN12345.dcm").write_bytes(files["dcm"][0].read_bytes())
    (patient / "IM0002_MRN12345.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # unreadable: its error too
    out = tmp_path / "p.csv"
    assert run_cli(files["model"], export, "--out", out, "--operating-point", files["op"], "--device", "cpu",
                   "--precision", "fp32") == 0
    text = out.read_text()
    assert "DOE" not in text and "MRN12345" not in text and "IM000" not in text, text
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["status"] for r in rows] == ["ok", "error"] and all(r["path"] == str(export) for r in rows)
    assert "public demo key" in capsys.readouterr().err  # the refs of this run could be recomputed by guessing

    # Where the data lives, `medtl locate --folder` turns each ref back into its file.
    assert cli.main(["locate", "--folder", str(export), *(r["file"] for r in rows), "f-0000000000000000"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{rows[0]['file']}\t{patient / 'IM0001_MRN12345.dcm'}"
    assert printed[1] == f"{rows[1]['file']}\t{patient / 'IM0002_MRN12345.png'}"
    assert "f-0000000000000000: no file under" in printed[2]

    # --name-files: the user asks for the paths inside the folder.
    assert run_cli(files["model"], export, "--out", out, "--operating-point", files["op"], "--name-files",
                   "--device", "cpu", "--precision", "fp32") == 0
    assert [r["file"] for r in csv.DictReader(open(out, newline=""))] == [
        "DOE^JOHN_MRN12345/IM0001_MRN12345.dcm", "DOE^JOHN_MRN12345/IM0002_MRN12345.png"]


def test_predict_refuses_an_operating_point_of_another_model(files, tmp_path, capsys):
    other = write_model(tmp_path / "other.pt", seed=1)
    code = run_cli(other, files["dcm"][0], "--out", tmp_path / "p.csv", "--operating-point", files["op"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different model" in err and str(files["op"]) in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_nothing_readable_or_a_missing_input_fails_clearly(files, tmp_path, capsys):
    assert run_cli(files["model"], files["images"] / "notes.txt", "--out", tmp_path / "p.csv") == 2
    assert "no image could be predicted" in capsys.readouterr().err
    assert run_cli(files["model"], tmp_path / "missing.dcm", "--out", tmp_path / "q.csv") == 2
    assert "missing.dcm does not exist" in capsys.readouterr().err


def test_a_model_or_operating_point_of_another_format_is_refused_naming_the_file(files, tmp_path, capsys):
    from medtl.io import load_torch, save_torch

    old = tmp_path / "old.pt"
    save_torch({**load_torch(files["model"]), "format": "medtl-model/1"}, old)
    assert run_cli(old, files["dcm"][0], "--out", tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert str(old) in err and "medtl-model/1" in err and "medtl-model/2" in err
    op = tmp_path / "op.json"
    op.write_text(json.dumps({**json.loads(files["op"].read_text()), "format": "medtl-operating-point/1"}))
    assert run_cli(files["model"], files["dcm"][0], "--out", tmp_path / "p.csv", "--operating-point", op) == 2
    err = capsys.readouterr().err
    assert str(op) in err and "medtl-operating-point/1" in err
