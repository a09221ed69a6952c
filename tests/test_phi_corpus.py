"""A PACS-like export full of identifiers, through the whole pipeline, `medtl audit` and `medtl predict`, and
through each of the five entry points of images (ingest, external sets, predict, SSL's extra images, unlabelled
target images): not one planted value may appear in any byte they write or print, and each applies the same
intake policy (burned-in text, unknown transfer syntax, free-text Modality, links, hidden files).

Identifiers are planted where real exports have them: patient names and
record numbers in folder and file names, every Patient / Study / Institution /
Physician field, OtherPatientIDs, a private tag, values that break their VR
(pydicom warns and quotes them), a PhotometricInterpretation holding a name,
and identifying columns of the labels CSV.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pydicom
import pytest

from medtl.intake import demo
from tests.project import TINY_PARAMS, deep_update, make_project

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PATIENTS = 16
SHARED = {
    "InstitutionName": "Saint Plantedia Hospital",
    "InstitutionAddress": "12 Plantation Road, Leakville",
    "ReferringPhysicianName": "Refplanter^Rita^Dr",
    "PerformingPhysicianName": "Perfplanter^Paul",
    "OperatorsName": "Opplanter^Olga",
    "StationName": "PLANTSTATION7",
    "StudyDescription": "PLANT STUDY DESCRIPTION",
    "SeriesDescription": "PLANT SERIES DESCRIPTION",
    "InstitutionalDepartmentName": "Plantology Department",
    "PatientAddress": "99 Leaky Lane, Plantford",
    "PatientTelephoneNumbers": "+44 7700 900461",
    "PatientComments": "PLANTCOMMENT allergic to nothing",
}
BAD_AGE = "AGEPLANTBAD"  # not a valid AS value: pydicom warns and quotes it
PRIVATE = "PRIVATEPLANTVALUE"
BAD_PHOTOMETRIC = "PLANTPHOTO^NAME"
CSV_VALUES = ("CsvPlantName", "CSVMRN4242", "CsvReferrerPlant", "CSVNOTEPLANT free text")


def patient_values(i: int) -> dict[str, str]:
    return {
        "PatientName": f"Plantsurname{i:02d}^Gisela",
        "PatientID": f"MRN70{i:04d}",
        "OtherPatientIDs": f"OTHERPLANT{i:04d}",
        "PatientBirthDate": f"1947{(i % 12) + 1:02d}{(i % 27) + 1:02d}",
        "AccessionNumber": f"ACCPLANT{i:04d}",
        "StudyID": f"STPLANT{i:03d}",
        "StudyInstanceUID": f"2.25.31415926{i:04d}777",
        # letters break the UI VR: pydicom warns on reading and quotes the value
        "SeriesInstanceUID": f"2.25.27182818{i:04d}777" if i % 2 else f"BADUIDPLANT{i:02d}.1",
    }


def write_corpus(root: Path) -> tuple[Path, list[Path], list[str]]:
    """The export, its labels CSV, the files, and every planted value."""
    planted = set(SHARED.values()) | {BAD_AGE, PRIVATE, BAD_PHOTOMETRIC, *CSV_VALUES}
    tmp = root.parent / "generated"
    files, rows = [], ["path,label,pt_name,mrn_number,referrer,notes"]
    for p in demo.fake_patients(PATIENTS, 0.5, 5):
        values = patient_values(p.index)
        planted |= set(values.values())
        folder = f"{values['PatientName'].replace('^', '_')}_{values['PatientID']}"  # DOE_JOHN_MRN12345
        planted |= {folder}
        extra = 1 if p.index in (0, 1) else 0  # one more image: burned-in text, or a name as photometric
        for k, generated in enumerate(demo.write_patient_images(p, 2 + extra, (40, 48), 5, tmp)):
            ds = pydicom.dcmread(generated)
            for keyword, value in {**SHARED, **values}.items():
                setattr(ds, keyword, value)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{values['StudyInstanceUID']}.{k}"
            ds.StudyDate = "20240101"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.PatientAge = BAD_AGE
            block = ds.private_block(0x0011, "PLANT PRIVATE CREATOR", create=True)
            block.add_new(0x10, "LO", PRIVATE)
            if extra and k == 2:
                if p.index == 0:
                    ds.BurnedInAnnotation = "YES"
                else:
                    ds.PhotometricInterpretation = BAD_PHOTOMETRIC
            rel = f"{folder}/ACC_{values['AccessionNumber']}/IM{k:04d}_{values['PatientID']}.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(root / rel)
            files.append(root / rel)
            rows.append(f"{rel},{demo.CLASSES[int(p.diseased)]},{CSV_VALUES[0]},{CSV_VALUES[1]},{CSV_VALUES[2]},"
                        f"{CSV_VALUES[3]}")
    labels = root.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels, files, sorted(planted)


def scan(paths: list[Path], texts: dict[str, str], planted: list[str]) -> tuple[int, list[str]]:
    """(files read, 'value in where' for every planted value found)."""
    needles = [(v, v.encode()) for v in planted]
    found, read = [], 0
    for p in paths:
        data = p.read_bytes()
        read += 1
        found += [f"{v!r} in {p}" for v, b in needles if b in data]
    for where, text in texts.items():
        found += [f"{v!r} in {where}" for v, _ in needles if v in text]
    return read, found


def test_no_planted_identifier_reaches_any_output(tmp_path):
    pacs = tmp_path / "hospital" / "pacs_export"  # outside the project, as a mounted share would be
    labels, files, planted = write_corpus(pacs)
    assert len(planted) >= 20
    params = deep_update(TINY_PARAMS, {
        "ingest": {"source": "dicom", "data": str(pacs.parent), "max_quarantine_fraction": 0.2,
                   "dicom": {"root": str(pacs), "labels": str(labels)}},
        "evaluate": {"bootstrap": {"n_resamples": 50}, "saliency": {"per_case": 1, "image_size": 64}},
    })
    project = make_project(tmp_path / "project", params)
    key = "the hospital's own secret"
    planted.append(key)  # the key itself must not be recorded either
    project.env["MEDTL_PSEUDONYM_KEY"] = key
    repro = project.dvc("repro")
    project.commit("run")
    audit = project.run(sys.executable, "-m", "medtl.cli", "audit", "--allow-dirty")
    chosen = [files[0], files[3], files[-1]]
    predicted = tmp_path / "predictions.csv"
    predict = project.run(sys.executable, "-m", "medtl.cli", "predict", "models/model.pt", *map(str, chosen),
                          "--out", str(predicted), "--precision", "fp32", check=False)
    assert predict.returncode in (0, 1), predict.stderr  # 1: some refused (burned in, bad photometric)
    # The whole export folder: the files inside it are named by ref and sha256, not by their identifying paths.
    in_folder = tmp_path / "folder_predictions.csv"
    folder_predict = project.run(sys.executable, "-m", "medtl.cli", "predict", "models/model.pt", str(pacs),
                                 "--out", str(in_folder), "--precision", "fp32", check=False)
    assert folder_predict.returncode == 0 and in_folder.read_text().count(",ok,") >= len(files) // 2, folder_predict.stderr

    report = (project.path / "data/ingested/report.json").read_text()
    assert '"burned_in_annotation": 1' in report and '"invalid_photometric": 1' in report
    assert '"pseudonym_key": "user"' in report and '"kind": "patient_id"' in report

    outputs = [p for pattern in ("data/ingested/**/*", "data/prepared/**/*", "models/**/*", "reports/**/*",
                                 "dvclive*/**/*", "**/*.provenance.json", "dvc.lock")
               for p in project.path.glob(pattern) if p.is_file()]
    outputs = sorted(set(outputs))
    prediction_text = predicted.read_text() if predicted.exists() else ""
    for f in chosen:  # predict may name the paths the user passed it, and nothing else
        prediction_text = prediction_text.replace(str(f), "<passed path>")
    texts = {"dvc repro output": repro.stdout + repro.stderr, "medtl audit output": audit.stdout + audit.stderr,
             "medtl predict output": predict.stdout + predict.stderr.replace(str(chosen[-1]), "<passed path>"),
             "predictions.csv": prediction_text,
             "medtl predict FOLDER output": (folder_predict.stdout + folder_predict.stderr).replace(str(pacs), "<passed path>"),
             "folder predictions.csv": in_folder.read_text().replace(str(pacs), "<passed path>")}
    for f in chosen:
        texts["medtl predict output"] = texts["medtl predict output"].replace(str(f), "<passed path>")
    read, found = scan(outputs, texts, planted)
    assert read >= 20 and any(p.name == "manifest.csv" for p in outputs) and any("audit" in str(p) for p in outputs)
    assert found == [], "\n".join(found)

    # The scan is able to fail: the source itself is full of the planted values.
    _, in_source = scan([labels, files[0]], {"paths": "\n".join(map(str, files))}, planted[:-1])
    assert len(in_source) >= 20


# ---------------------------------------------------------------- the five entry points, one intake

ENTRY_POINTS = ("ingest", "external", "predict", "ssl", "target")
UNKNOWN_TS = "1.2.826.0.1.3680043.9.7777.424242"  # an unknown transfer syntax: a header value, never repeated
FREE_MODALITY = "PLANTMODNAME"  # free text in Modality, in code-string form


def write_entry_corpus(root: Path, outside: Path) -> list[str]:
    """Class folders of patient folders named after the patient; every case the intake handles; the planted values."""
    planted = {UNKNOWN_TS, FREE_MODALITY, PRIVATE, *SHARED.values()}
    tmp = root.parent / "generated-entry"
    for p in demo.fake_patients(PATIENTS, 0.5, 7):
        values = patient_values(p.index)
        planted |= set(values.values())
        folder = root / demo.CLASSES[int(p.diseased)] / f"{values['PatientName'].replace('^', '_')}_{values['PatientID']}"
        planted.add(folder.name)
        for k, generated in enumerate(demo.write_patient_images(p, 2, (40, 48), 7, tmp)):
            ds = pydicom.dcmread(generated)
            for keyword, value in {**SHARED, **values}.items():
                setattr(ds, keyword, value)
            ds.private_block(0x0011, "PLANT PRIVATE CREATOR", create=True).add_new(0x10, "LO", PRIVATE)
            name = folder / f"IM{k:04d}_{values['PatientID']}.dcm"
            name.parent.mkdir(parents=True, exist_ok=True)
            save = {}
            if p.index == 0 and k == 0:
                ds.BurnedInAnnotation = "YES"
            elif p.index == 1 and k == 0:
                ds.file_meta.TransferSyntaxUID = UNKNOWN_TS
                save = {"enforce_file_format": False, "implicit_vr": False, "little_endian": True}
            elif p.index == 2 and k == 0:
                ds.Modality = FREE_MODALITY
            ds.save_as(name, **save)
    normal = root / demo.CLASSES[0]
    (normal / ".Plantsurname_hidden_MRN999.png").write_bytes(b"hidden")
    (normal / "Plantdangling_MRN881.png").symlink_to(normal / "absent.png")
    (normal / "Plantloop_MRN882").symlink_to(normal / "Plantloop_MRN882")
    outside.write_bytes((normal.parent / "x").read_bytes() if (normal.parent / "x").exists() else b"outside")
    (normal / "Plantoutside_MRN883.png").symlink_to(outside)
    return sorted(planted | {"Plantsurname_hidden_MRN999", "Plantdangling_MRN881", "Plantloop_MRN882",
                             "Plantoutside_MRN883", outside.name})


@pytest.fixture(scope="module")
def entry_corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("entry")
    root = base / "export"
    planted = write_entry_corpus(root, base / "Outsidepatient_MRN884.png")
    from tests.test_evaluation import write_model

    return root, planted, write_model(base / "model.pt")


def _ingest(root: Path, out: Path, model: Path) -> tuple[list[Path], dict, dict]:
    from medtl.ingest.ingest import IngestParams, run_ingest
    from medtl.params import build

    params = build(IngestParams, {"source": "folder", "data": str(root), "folder": {"root": str(root)}, "workers": 1,
                                  "max_quarantine_fraction": 0.5}, "ingest")
    report = run_ingest(params, out)
    manifest = (out / "manifest.csv").read_text()
    assert manifest.count(",f-") >= 20  # every image named by keyed ref + sha256
    return sorted(out.iterdir()), report["quarantine_reasons"], {**report["source"], "warnings": report["decode_warnings"]}


def _external(root: Path, out: Path, model: Path) -> tuple[list[Path], dict, dict]:
    import json

    from medtl.evaluate.external import ExternalSet, load_external
    from medtl.params import build
    from tests.project import preprocessing_record

    spec = build(ExternalSet, {"name": "site2", "source": "folder", "folder": {"root": str(root)}}, "external")
    data = load_external(spec, "evaluate.external[0]", ["normal", "lesion"], preprocessing_record(24))
    assert all(r["source_ref"].startswith("f-") and len(r["sha256"]) == 64 for r in data.rows)  # traceable
    (out / "rows.json").write_text(json.dumps({"rows": data.rows, "skipped": data.skipped, "warnings": data.warnings}))
    return [out / "rows.json"], data.skipped, {"hidden_files": data.skipped.get("hidden_file"),
                                               "warnings": data.warnings}


def _predict(root: Path, out: Path, model: Path) -> tuple[list[Path], dict, dict]:
    import csv
    from collections import Counter

    from medtl import cli

    code = cli.main(["predict", str(model), str(root), "--out", str(out / "p.csv"), "--device", "cpu",
                     "--precision", "fp32"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "p.csv", newline="")))
    assert all(r["file"].startswith("f-") for r in rows)
    reasons = Counter(r["error"].split(":")[0] for r in rows if r["status"] == "error")
    return [out / "p.csv"], dict(reasons), {}


def _ssl(root: Path, out: Path, model: Path) -> tuple[list[Path], dict, dict]:
    import json

    from medtl.train.ssl import read_image_folder
    from tests.project import preprocessing_record

    _, info = read_image_folder(root, preprocessing_record(24), out / "extra.npy")
    (out / "info.json").write_text(json.dumps(info))
    return [out / "extra.npy", out / "info.json"], info["skipped"], info


def _target(root: Path, out: Path, model: Path) -> tuple[list[Path], dict, dict]:
    import json

    import numpy as np

    from medtl.train.target import TargetParams, read_target
    from tests.project import preprocessing_record

    # what the fine-tune stage reads for finetune.target
    got = read_target(TargetParams(source="images", images=str(root)), "finetune.target", preprocessing_record(24), set())
    assert len(got.digests) == len(got.images)
    np.save(out / "target.npy", got.images)
    (out / "counts.json").write_text(json.dumps(got.record))
    return [out / "target.npy", out / "counts.json"], got.record["skipped"], got.record


RUNNERS = {"ingest": _ingest, "external": _external, "predict": _predict, "ssl": _ssl, "target": _target}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_reads_through_one_intake_and_leaks_nothing(entry_corpus, entry, tmp_path, capfd,
                                                                      monkeypatch):
    root, planted, model = entry_corpus
    monkeypatch.setenv("MEDTL_PSEUDONYM_KEY", "the entry points' own secret")
    out = tmp_path / "out"
    out.mkdir()
    written, reasons, info = RUNNERS[entry](root, out, model)
    log = capfd.readouterr()
    texts = {f"{entry} output": (log.out + log.err).replace(str(root), "<passed folder>")}
    read, found = scan(written, texts, planted)
    assert read >= 1 and found == [], "\n".join(found)
    # One policy: the same files refused for the same reasons, whatever the entry point.
    for reason in ("burned_in_annotation", "unsupported_codec", "dangling_symlink", "symlink_loop", "link_outside_root"):
        assert reasons.get(reason) == 1, (entry, reason, reasons)
    if entry != "predict":
        assert info.get("hidden_files") == 1, info
    else:
        assert "1 hidden file(s) not read" in log.out
    if "warnings" in info:
        assert info["warnings"].get("invalid_value:modality", 0) >= 1, info  # the free text was blanked, counted

    # The scan is able to fail: the corpus itself holds the planted values.
    _, in_source = scan([next(root.rglob("*.dcm"))], {"paths": "\n".join(map(str, root.rglob("*")))}, planted)
    assert len(in_source) >= 10
