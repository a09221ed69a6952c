"""Pseudonyms, the metadata whitelist and PHI-safe ages."""
from __future__ import annotations

import re

import pytest

from medtl.errors import MedtlError, ParamsError
from medtl.intake.phi import (
    DEFAULT_PSEUDONYM_KEY,
    KEY_ENV,
    KEY_FILE_ENV,
    WHITELIST,
    age_in_years,
    check_header_metadata,
    check_metadata_columns,
    filter_metadata,
    identifying_token,
    is_phi_name,
    key_kind,
    pseudonymise,
    source_ref,
    uses_default_key,
)


def test_pseudonym_shape_and_stability():
    p = pseudonymise("MRN-0042", b"k")
    assert re.fullmatch(r"p-[0-9a-f]{16}", p)
    assert p == pseudonymise("MRN-0042", b"k")
    assert p == pseudonymise("  MRN-0042 ", b"k")  # DICOM pads values with spaces
    assert p != pseudonymise("MRN-0043", b"k")
    assert p != pseudonymise("MRN-0042", b"other key")
    assert "0042" not in p


def test_key_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert uses_default_key()
    assert pseudonymise("x") == pseudonymise("x", DEFAULT_PSEUDONYM_KEY)
    monkeypatch.setenv(KEY_ENV, "hospital secret, long enough")
    assert not uses_default_key()
    assert pseudonymise("x") == pseudonymise("x", b"hospital secret, long enough")
    assert pseudonymise("x") != pseudonymise("x", DEFAULT_PSEUDONYM_KEY)
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(MedtlError, match=KEY_ENV):
        pseudonymise("x")


def test_filter_metadata_keeps_the_whitelist_and_named_extras():
    raw = {"modality": "CT", "age": 45, "PatientName": "Doe^Jane", "site": "A", "scanner_room": "3"}
    assert filter_metadata(raw) == {"modality": "CT", "age": "45"}
    assert filter_metadata(raw, extra=["site"]) == {"modality": "CT", "age": "45", "site": "A"}
    assert set(WHITELIST) >= {"modality", "manufacturer", "body_part", "view_position", "photometric",
                              "pixel_spacing", "sex", "age"}


@pytest.mark.parametrize("column", ["PatientName", "patient_name", "Patient ID", "DOB", "birth_date", "StudyDate", "mrn"])
def test_identifying_extra_columns_are_refused(column):
    assert is_phi_name(column)
    with pytest.raises(ParamsError, match=column):
        filter_metadata({column: "x"}, extra=[column])


def test_harmless_names_are_not_phi():
    for name in ("site", "view", "label", "scanner_model", "modality"):
        assert not is_phi_name(name)


@pytest.mark.parametrize(
    "age, birth, seen, expected",
    [
        ("045Y", "", "", "45"),
        ("45", "", "", "45"),
        ("006M", "", "", "0.5"),
        ("003W", "", "", "0.06"),
        ("000Y", "", "", "0"),
        ("093Y", "", "", "90"),  # ages over 89 identify; they are grouped as 90
        ("", "19800115", "20200114", "39"),
        ("", "19800115", "20200115", "40"),
        ("", "19200101", "20200101", "90"),
        ("", "20200101", "20200701", "0.5"),
        ("", "20200101", "", ""),
        ("", "", "", ""),
        ("abc", "", "", ""),
        ("", "20210101", "20200101", ""),  # seen before born: unknown, not negative
    ],
)
def test_age_in_years(age, birth, seen, expected):
    assert age_in_years(age, birth, seen) == expected


def test_key_file_and_key_kind(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert key_kind() == "default"
    key = tmp_path / "medtl.key"
    key.write_text("  file secret, long enough\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key))
    assert key_kind() == "user" and pseudonymise("x") == pseudonymise("x", b"file secret, long enough")
    monkeypatch.setenv(KEY_ENV, "env secret, long enough")  # the variable wins over the file
    assert pseudonymise("x") == pseudonymise("x", b"env secret, long enough")
    monkeypatch.delenv(KEY_ENV)
    key.write_text("\n")
    with pytest.raises(MedtlError, match="empty"):
        pseudonymise("x")
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(MedtlError, match=f"{KEY_FILE_ENV}.*absent.key"):
        pseudonymise("x")


def test_source_refs_hide_the_path_and_differ_from_patient_pseudonyms():
    ref = source_ref("DOE^JOHN_MRN12345/IM0001.dcm", b"k")
    assert re.fullmatch(r"f-[0-9a-f]{16}", ref) and "MRN" not in ref
    assert ref == source_ref("DOE^JOHN_MRN12345/IM0001.dcm", b"k") != source_ref("DOE^JOHN_MRN12345/IM0002.dcm", b"k")
    assert ref[2:] != pseudonymise("DOE^JOHN_MRN12345/IM0001.dcm", b"k")[2:]


@pytest.mark.parametrize("column, token", [("pt_name", "name"), ("mrn_number", "mrn"), ("referrer", "referrer"),
                                           ("notes", "notes"), ("free text", "free text"), ("MRNNumber", "mrn"),
                                           ("PatientBirthDate", "patientbirthdate"), ("home_phone", "phone")])
def test_identifying_names_are_matched_by_tokens(column, token):
    assert identifying_token(column) == token
    with pytest.raises(ParamsError, match="allow_columns"):
        check_metadata_columns([column])
    assert check_metadata_columns([column, "site"], allowed=[column]) == [column]


def test_header_metadata_values_must_have_their_standard_form():
    checked, blanked = check_header_metadata({"modality": "DOE^JOHN", "photometric": "JOHN", "sex": "F", "age": "45",
                                              "body_part": "CHEST", "manufacturer": "Acme Imaging"})
    assert checked == {"modality": "", "photometric": "", "sex": "F", "age": "45", "body_part": "CHEST",
                       "manufacturer": "Acme Imaging"}
    assert sorted(blanked) == ["modality", "photometric"]


def test_short_keys_and_the_demo_key_given_as_a_secret_are_refused(monkeypatch, tmp_path, capsys):
    from medtl import cli
    from medtl.intake.phi import MIN_KEY_BYTES, refuse_demo_key

    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(KEY_ENV, "x")
    with pytest.raises(MedtlError, match=f"1 byte.*at least {MIN_KEY_BYTES} bytes.*medtl key new --pseudonym"):
        pseudonymise("x")
    for how in ("env", "file"):  # whatever way it is given
        if how == "env":
            monkeypatch.setenv(KEY_ENV, DEFAULT_PSEUDONYM_KEY.decode())
        else:
            monkeypatch.delenv(KEY_ENV)
            (tmp_path / "demo.key").write_bytes(DEFAULT_PSEUDONYM_KEY + b"\n")
            monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "demo.key"))
        assert key_kind() == "default"
        refuse_demo_key("demo", "ingest")  # the demo may use it
        with pytest.raises(MedtlError, match="public demo key.*medtl key new --pseudonym"):
            refuse_demo_key("folder", "ingest.source folder")
    # `medtl key new --pseudonym` writes a key that is accepted, readable only by its owner, never overwritten
    out = tmp_path / "new.key"
    assert cli.main(["key", "new", "--pseudonym", "--out", str(out)]) == 0
    assert (out.stat().st_mode & 0o777) == 0o600 and len(out.read_text().strip()) == 64
    monkeypatch.setenv(KEY_FILE_ENV, str(out))
    assert key_kind() == "user" and pseudonymise("x") == pseudonymise("x", out.read_text().strip().encode())
    assert cli.main(["key", "new", "--pseudonym", "--out", str(out)]) == 2
