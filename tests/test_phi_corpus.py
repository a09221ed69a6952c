"""A PACS-like export full of identifiers, through the whole pipeline, `medtl audit` and `medtl predict`:
not one planted value may appear in any byte the pipeline writes.

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

from medtl import demo
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
        "ingest": {"source": "dicom", "data": str(pacs), "max_quarantine_fraction": 0.2,
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
