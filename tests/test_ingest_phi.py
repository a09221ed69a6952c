"""Ingest's evidence can leave the hospital: refs instead of paths, safe reasons, refused columns and keys,
burned-in text, links, label conflicts, group rules and `medtl locate`, through run_ingest on data written here."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medtl.deploy.locate import locate
from medtl.errors import MedtlError, ParamsError
from medtl.ingest.ingest import available_cores, run_ingest
from medtl.ingest.manifest import read_manifest
from medtl.intake import demo
from medtl.intake.phi import KEY_ENV, KEY_FILE_ENV, source_ref

from tests.project import distinct_seed
from tests.test_ingest import ingest, params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test key, sixteen bytes or more")
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def png(path: Path, seed: int, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def accounted(report: dict) -> None:
    assert report["files_seen"] == report["files_decoded"] + report["quarantined"] == \
        report["files_decoded"] + sum(report["quarantine_reasons"].values())


def dicoms(root: Path, patients: int = 8, **headers) -> list[Path]:
    """Demo DICOM files, one class folder per label, with `headers` set on the first file."""
    out = []
    for p in demo.fake_patients(patients, 0.5, 3):
        out += demo.write_patient_images(p, 2, (32, 40), 3, root / demo.CLASSES[int(p.diseased)] / f"p{p.index}")
    ds = pydicom.dcmread(out[0])
    for k, v in headers.items():
        setattr(ds, k, v)
    ds.save_as(out[0])
    return out


# Issue 14: groups from file names

def kermany_like(root: Path) -> dict[str, str]:
    """Patients named only in file names (person12_bacteria_3.jpeg), several images each; ref -> patient."""
    patient_of = {}
    for person in range(30):
        label = "PNEUMONIA" if person % 2 else "NORMAL"
        for k in range(4):
            rel = f"{label}/person{person}_{'bacteria' if person % 2 else 'normal'}_{k}.png"
            png(root / rel, seed=1000 * person + k)
            patient_of[source_ref(rel)] = str(person)
    return patient_of


def test_a_group_rule_keeps_each_patient_in_one_split(tmp_path):
    root = tmp_path / "chest"
    patient_of = kermany_like(root)
    rule = r"person(?P<group>\d+)_"

    def splits_per_patient(rows):
        seen: dict[str, set] = {}
        for r in rows:
            seen.setdefault(patient_of[r["source_ref"]], set()).add(r["split"])
        return seen

    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root), "group_rule": rule})
    assert report["grouping"] == {"kind": "rule", "rule": rule, "images_by_kind": {"rule": 120}}
    assert all(len(s) == 1 for s in splits_per_patient(rows).values())
    assert len({r["group"] for r in rows}) == 30 and not any(re.search(r"person|\b\d+\b", r["group"]) for r in rows)

    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)})
    assert report["grouping"]["kind"] == "image"  # patient independence not established
    assert any(len(s) > 1 for s in splits_per_patient(rows).values())  # and indeed, patients cross splits


def test_a_group_rule_must_name_a_group_and_cover_every_file(tmp_path):
    with pytest.raises(ParamsError, match="named group"):
        params(source="folder", folder={"root": "x", "group_rule": r"person\d+"})
    with pytest.raises(ParamsError, match="not a regular expression"):
        params(source="folder", folder={"root": "x", "group_rule": "person(?P<group>"})
    with pytest.raises(ParamsError, match="group_column"):
        params(source="csv", csv={"manifest": "m.csv", "group_rule": "(?P<group>.)", "group_column": "patient"})
    root = tmp_path / "chest"
    kermany_like(root)
    png(root / "NORMAL" / "IM0001.png", seed=5)
    report, _ = ingest(tmp_path, source="folder", folder={"root": str(root), "group_rule": r"person(?P<group>\d+)_"})
    assert report["quarantine_reasons"]["no_group"] == 1


# Links

def test_symlink_loops_and_dangling_links_are_quarantined_and_counted(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(10):
            png(root / c / f"{c}{i}.png", seed=distinct_seed(c, i))
    os.symlink(root / "a" / "loop2.png", root / "a" / "loop1.png")
    os.symlink(root / "a" / "loop1.png", root / "a" / "loop2.png")
    os.symlink(root / "a" / "gone.png", root / "b" / "dangling.png")
    os.symlink(root / "b", root / "b" / "self")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.25)
    accounted(report)
    assert {r: n for r, n in report["quarantine_reasons"].items() if n} == {"symlink_loop": 3, "dangling_symlink": 1}
    assert report["files_seen"] == 24 and len(rows) == 20


# Pseudonym key

def test_dicom_needs_a_key_of_its_own_other_sources_are_warned(tmp_path, monkeypatch, capfd):
    root = tmp_path / "dicom"
    files = dicoms(root)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{f.relative_to(root).as_posix()},{f.relative_to(root).parts[0]}\n" for f in files))
    dicom = {"root": str(root), "labels": str(labels)}
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MedtlError, match=f"{KEY_ENV}.*{KEY_FILE_ENV}"):
        ingest(tmp_path, source="dicom", dicom=dicom)
    assert not (tmp_path / "out" / "manifest.csv").exists()

    key_file = tmp_path / "key.txt"
    key_file.write_text("a secret from a file\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    report, rows = ingest(tmp_path, source="dicom", dicom=dicom)
    assert report["pseudonym_key"] == "user" and report["grouping"]["kind"] == "patient_id"
    assert {r["source_ref"] for r in rows} == {source_ref(f.relative_to(root).as_posix(), b"a secret from a file")
                                               for f in files}

    monkeypatch.delenv(KEY_FILE_ENV)
    capfd.readouterr()
    report, _ = ingest(tmp_path, source="folder", folder={"root": str(root)})
    assert report["pseudonym_key"] == "default"
    warning = [line for line in capfd.readouterr().err.splitlines() if "public demo key" in line]
    # one line, on every ingest of such data: it names the fix without burying the stage's output
    assert len(warning) == 1 and "MEDTL_PSEUDONYM_KEY" in warning[0] and len(warning[0]) < 200, warning


# Burned-in annotation and header values in reasons and warnings

def test_burned_in_annotation_is_quarantined_unless_kept(tmp_path):
    root = tmp_path / "dicom"
    dicoms(root, patients=12, BurnedInAnnotation="YES")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.1)
    assert report["quarantine_reasons"]["burned_in_annotation"] == 1 and len(rows) == 23
    assert report["burned_in_annotation"] == {"policy": "quarantine", "quarantined": 1, "kept": 0}
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, burned_in="keep")
    assert report["burned_in_annotation"] == {"policy": "keep", "quarantined": 0, "kept": 1} and len(rows) == 24


@pytest.mark.parametrize("workers", [1, 2])
def test_header_values_never_reach_reasons_warnings_or_the_log(tmp_path, capfd, workers):
    root = tmp_path / "dicom"
    files = dicoms(root, patients=12)
    bad = [("PatientAge", "DOE JOHN"), ("PhotometricInterpretation", "DOE^JOHN"), ("Modality", "Doe John MRN123"),
           ("StudyInstanceUID", "DOE^JOHN.MRN123")]  # pydicom warns about the UID on reading, quoting it
    for f, (keyword, value) in zip(files, bad):
        ds = pydicom.dcmread(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
        ds.save_as(f)
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.1,
                          workers=workers)
    log = capfd.readouterr()
    text = (tmp_path / "out" / "report.json").read_text() + (tmp_path / "out" / "manifest.csv").read_text()
    for value in ("DOE", "JOHN", "Doe", "MRN123"):
        assert value not in text and value not in log.err + log.out
    assert report["quarantine_reasons"]["invalid_photometric"] == 1
    assert report["decode_warnings"]["invalid_value:UI"] == 1 and report["decode_warnings"]["invalid_value:modality"] == 1
    assert "" in {r["modality"] for r in rows}  # the free text typed into Modality is blanked, the image kept


# CSV metadata columns

@pytest.mark.parametrize("column", ["pt_name", "mrn_number", "referrer", "notes", "PatientBirthDate", "home_address",
                                    "phone_no", "AccessionNo", "free_text", "ReferringPhysician", "comment"])
def test_identifying_csv_columns_are_refused_by_name(column):
    with pytest.raises(ParamsError, match=re.escape(repr(column)) + ".*allow_columns"):
        params(source="csv", csv={"manifest": "m.csv", "metadata": ["site", column]})


def test_allowed_columns_are_kept_and_recorded(tmp_path):
    root = tmp_path / "data"
    lines = ["path,label,site,study_arm_id"]
    for i in range(20):
        png(root / f"{i}.png", seed=i)
        lines.append(f"{i}.png,{'a' if i % 2 else 'b'},s{i % 2},ARM{i % 3}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    csv = {"manifest": str(root / "m.csv"), "metadata": ["site", "study_arm_id"], "allow_columns": ["study_arm_id"]}
    report, rows = ingest(tmp_path, source="csv", csv=csv)
    assert {r["study_arm_id"] for r in rows} == {"ARM0", "ARM1", "ARM2"}
    assert report["allowed_identifier_columns"] == ["study_arm_id"]
    assert {"site", "study_arm_id"} <= set(report["metadata_columns"])
    with pytest.raises(ParamsError, match="also listed in ingest.csv.metadata"):
        params(source="csv", csv={**csv, "allow_columns": ["mrn"]})


MULTILINGUAL = ["patient_identifier", "identifier", "hospital_number", "pid", "patient_no", "case_no", "nom_patient",
                "geburtsdatum", "姓名", "fecha_nacimiento", "telefono", "insurance", "passport", "postal_code", "exam_date"]


@pytest.mark.parametrize("column", MULTILINGUAL)
def test_identifying_csv_columns_are_refused_by_name_in_several_languages(column):
    with pytest.raises(ParamsError, match=re.escape(repr(column)) + ".*allow_columns"):
        params(source="csv", csv={"manifest": "m.csv", "metadata": ["site", column]})


def content_csv(root: Path, column: str, value) -> Path:
    lines = [f"path,label,site,{column}"]
    for i in range(20):
        png(root / f"{i}.png", seed=distinct_seed("content", i))
        lines.append(f"{i}.png,{'a' if i % 2 else 'b'},s{i % 2},{value(i)}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


@pytest.mark.parametrize("value, finding", [
    (lambda i: f"K{i * 7919 % 1000:03d}", "distinct"),  # a code per person, harmless-looking name
    (lambda i: f"2021-0{i % 9 + 1}-1{i % 10}" if i % 4 else "", "dates"),
    (lambda i: "+49 30 1234567" if i == 3 else "x", "phone numbers"),
    (lambda i: f"pat{i % 3}@clinic.example" if i == 5 else "y", "e-mail addresses"),
    (lambda i: "AB1234567" if i == 7 else "z", "long digit runs"),
])
def test_csv_columns_whose_values_look_identifying_are_refused_unless_allowed(tmp_path, value, finding):
    manifest = content_csv(tmp_path / "data", "cohort", value)
    csv = {"manifest": str(manifest), "metadata": ["site", "cohort"]}
    with pytest.raises(ParamsError, match=f"'cohort'.*looks identifying: .*{finding}.*allow_columns") as e:
        ingest(tmp_path, source="csv", csv=csv)
    assert "clinic.example" not in str(e.value) and "1234567" not in str(e.value)  # the value is never repeated
    assert not (tmp_path / "out" / "manifest.csv").exists()
    report, rows = ingest(tmp_path, source="csv", csv={**csv, "allow_columns": ["cohort"]})
    assert finding in report["allowed_columns"]["cohort"] and report["allowed_columns"]["cohort"].startswith("values:")
    assert report["allowed_columns"] == report["source"]["allowed_columns"] and "site" not in report["allowed_columns"]


def test_ages_over_89_are_capped_at_ingest(tmp_path):
    manifest = content_csv(tmp_path / "data", "age", lambda i: ["34", "93", "101", "90+", "95-99"][i % 5])
    report, rows = ingest(tmp_path, source="csv", csv={"manifest": str(manifest), "metadata": ["site", "age"]})
    assert {r["age"] for r in rows} == {"34", "90"}
    root = tmp_path / "dicom"
    files = dicoms(root, PatientAge="097Y")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)})
    assert max(float(r["age"]) for r in rows if r["age"]) <= 90 and "97" not in {r["age"] for r in rows}


def docs_rule(dataset: str) -> str:
    """The group rule docs/data.md gives for `dataset` (the first `group_rule:` after its name)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    return re.search(r"group_rule: '([^']+)'", text[text.index(dataset):]).group(1)


def kermany(root: Path) -> None:
    """Both naming schemes of Kermany's chest X-rays: NORMAL/IM-0115-0001.jpeg, NORMAL2-IM-0588-0001.jpeg and
    PNEUMONIA/person1_bacteria_1.jpeg; patient person1 is in the published train and test splits."""
    names = {"train/NORMAL": [f"IM-01{i:02d}-000{k}.jpeg" for i in range(6) for k in (1, 2)] +
                             [f"NORMAL2-IM-05{i:02d}-0001.jpeg" for i in range(4)],
             "train/PNEUMONIA": [f"person{i}_{kind}_{i * 10 + k}.jpeg" for i in range(1, 9) for k, kind in
                                 ((1, "bacteria"), (2, "virus"))],
             "test/NORMAL": [f"IM-00{i:02d}-0001.jpeg" for i in range(3)] + ["NORMAL2-IM-0007-0001.jpeg"],
             "test/PNEUMONIA": ["person1_virus_99.jpeg"] + [f"person{i}_bacteria_{i}.jpeg" for i in range(20, 23)]}
    for folder, files in names.items():
        for name in files:
            png(root / folder / name, seed=distinct_seed("kermany", folder, name))


def test_docs_group_rule_covers_both_kermany_naming_schemes_and_split_conflicts(tmp_path, capfd):
    root = tmp_path / "chest_xray"
    kermany(root)
    folder = {"root": str(root), "layout": "auto"}
    # A rule for one naming scheme only: the error says in which class folders the ungrouped files are.
    with pytest.raises(MedtlError, match=r"matches no file name of 20 file\(s\) in class folder\(s\) NORMAL \(20\)"):
        ingest(tmp_path, source="folder", folder={**folder, "group_rule": r"person(?P<group>\d+)_"})
    rule = docs_rule("## folder")
    assert re.search(rule, "NORMAL/IM-0115-0001.jpeg") and re.search(rule, "PNEUMONIA/person1_bacteria_1.jpeg")
    # The published split puts person1 in train and test: advice that fits a folder source.
    with pytest.raises(MedtlError, match=r"1 group\(s\).*split/class folders.*split_conflicts to regroup.*keep_published"):
        ingest(tmp_path, source="folder", folder={**folder, "group_rule": rule})
    report, rows = ingest(tmp_path, source="folder", folder={**folder, "group_rule": rule}, split_conflicts="regroup")
    assert report["quarantined"] == 0 and report["grouping"]["kind"] == "rule"
    assert report["split_conflicts"] == {"policy": "regroup", "groups": 1, "images": 3, "images_moved": 1}
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # no patient in two splits
    assert len({r["group"] for r in rows if "IM" in r["group"]}) == 0  # groups are pseudonyms
    report, rows = ingest(tmp_path, source="folder", folder={**folder, "group_rule": rule},
                          split_conflicts="keep_published")
    assert report["split_conflicts"] == {"policy": "keep_published", "groups": 1, "images": 3}
    spans = [g for g in {r["group"] for r in rows} if len({r["split"] for r in rows if r["group"] == g}) > 1]
    assert len(spans) == 1 and "keep_published" in capfd.readouterr().err
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_workers_above_the_cores_are_refused():
    with pytest.raises(ParamsError, match=rf"ingest.workers.*{available_cores()} CPU core"):
        params(workers=available_cores() + 1)


# Label conflicts and duplicates of array sources

def test_identical_images_with_different_labels_are_a_conflict(tmp_path, capfd):
    root = tmp_path / "data"
    for c in ("benign", "malignant"):
        for i in range(12):
            png(root / c / f"{c} ({i}).png", seed=distinct_seed(c, i))
    shutil.copy(root / "benign" / "benign (3).png", root / "malignant" / "malignant (145).png")
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.1)
    accounted(report)
    (conflict,) = report["label_conflicts"]
    assert conflict["labels"] == ["benign", "malignant"] and conflict["action"] == "quarantined"
    assert {e["source_ref"] for e in conflict["images"]} == \
        {source_ref("benign/benign (3).png"), source_ref("malignant/malignant (145).png")}
    assert report["quarantine_reasons"]["label_conflict"] == 2 and len(rows) == 23  # 25 files, both copies out
    assert "label conflict" in capfd.readouterr().err
    report, rows = ingest(tmp_path, source="folder", folder={"root": str(root)}, label_conflicts="keep")
    assert report["label_conflicts"][0]["action"] == "kept" and len(rows) in (24, 25)  # a copy in another split is dropped
    with pytest.raises(MedtlError, match="label_conflicts=fail.*" + source_ref("benign/benign (3).png")):
        ingest(tmp_path, source="folder", folder={"root": str(root)}, label_conflicts="fail")


def test_duplicates_of_an_array_source_name_split_and_index(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays["test_images"][2] = arrays["train_images"][4]  # a leak across published splits, same label
    np.savez(tmp_path / "mini.npz", **arrays)
    report, rows = ingest(tmp_path, source="medmnist", medmnist={"path": str(tmp_path / "mini.npz")})
    (dup,) = report["duplicates"]
    assert dup["image"]["index"] == "test/2" and dup["duplicate_of"]["index"] == "train/4"
    assert (dup["image"]["split"], dup["duplicate_of"]["split"], dup["action"]) == ("test", "train", "removed")
    assert report["grouping"]["kind"] == "image"


# The manifest format and `medtl locate`

def test_the_manifest_reader_checks_its_format_version(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(10):
            png(root / c / f"{i}.png", seed=distinct_seed(c, i))
    ingest(tmp_path, source="folder", folder={"root": str(root)})
    meta_path = tmp_path / "out" / "manifest.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(MedtlError, match="manifest version 1.*dvc repro ingest"):
        read_manifest(tmp_path / "out" / "manifest.csv")
    meta_path.unlink()
    with pytest.raises(MedtlError, match="older medtl"):
        read_manifest(tmp_path / "out" / "manifest.csv")


def test_locate_maps_image_ids_and_quarantined_refs_back_to_files(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(10):
            png(root / c / "DOE^JOHN_MRN1" / f"IM{i}_MRN1.png", seed=distinct_seed(c, i))
    (root / "a" / "DOE^JOHN_MRN1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    p = params(source="folder", folder={"root": str(root)}, max_quarantine_fraction=0.1)
    (tmp_path / "out").mkdir()
    report = run_ingest(p, tmp_path / "out")
    assert "DOE" not in json.dumps(report)
    (bad,) = report["quarantine"]
    manifest = tmp_path / "out" / "manifest.csv"
    row = read_manifest(manifest)[3]
    found = {loc.query: loc for loc in locate(p, [row["image_id"], bad["source_ref"], "f-0000000000000000"], manifest)}
    assert (root / found[row["image_id"]].item.relative).is_file()
    assert source_ref(found[row["image_id"]].item.relative) == row["source_ref"]
    assert found[bad["source_ref"]].item.relative == "a/DOE^JOHN_MRN1/broken.png"
    assert found["f-0000000000000000"].item is None
    with pytest.raises(MedtlError, match="neither an image id"):
        locate(p, ["img999999"], manifest)
