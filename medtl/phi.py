"""Protected health information: pseudonymous ids and the metadata whitelist.

Header ids (PatientID, study and series UIDs) are only ever stored as keyed
hashes, so a group id in a manifest cannot be reversed or recomputed without
the key. Metadata reaches an artifact only through `filter_metadata`.

Key: the environment variable MEDTL_PSEUDONYM_KEY (any string, used as UTF-8
bytes). Without it, DEFAULT_PSEUDONYM_KEY is used; that key is public and is
meant for the synthetic demo only. With it, pseudonyms of a real dataset are
only recomputable by someone holding the key. Changing the key changes every
group id, and therefore the ingest stage's output.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping

from medtl.errors import MedtlError, ParamsError

KEY_ENV = "MEDTL_PSEUDONYM_KEY"
DEFAULT_PSEUDONYM_KEY = b"medtl-public-demo-key-not-secret"
PSEUDONYM_PREFIX = "p-"
PSEUDONYM_HEX_CHARS = 16  # 64 bits: collisions are negligible below billions of patients

# Metadata safe to store: acquisition facts, coarse demographics, where a 2D image came from.
WHITELIST = (
    "modality", "manufacturer", "body_part", "view_position", "photometric", "pixel_spacing",
    "sex", "age", "frame", "slice",
)

# Column names that identify a person or a visit; never accepted as extra metadata.
_PHI_NAMES = {
    "name", "patientname", "patientsname", "firstname", "lastname", "surname", "givenname",
    "patientid", "otherpatientids", "otherpatientnames", "mrn", "medicalrecordnumber",
    "birthdate", "patientbirthdate", "dateofbirth", "dob", "patientbirthtime", "birthname",
    "patientmothersbirthname", "ssn", "socialsecuritynumber", "nationalid", "insurancenumber",
    "address", "patientaddress", "phone", "telephone", "patienttelephonenumbers", "email",
    "accessionnumber", "studyid", "studyinstanceuid", "seriesinstanceuid", "sopinstanceuid",
    "studydate", "seriesdate", "acquisitiondate", "contentdate", "studytime", "acquisitiondatetime",
    "referringphysicianname", "performingphysicianname", "operatorsname", "institutionname",
    "institutionaddress", "stationname", "deviceserialnumber",
}


def pseudonym_key() -> bytes:
    """The key from MEDTL_PSEUDONYM_KEY, or the public demo key when it is unset."""
    value = os.environ.get(KEY_ENV)
    if value is None:
        return DEFAULT_PSEUDONYM_KEY
    if not value.strip():
        raise MedtlError(f"{KEY_ENV} is set but empty; set it to a secret string, or unset it to use the public demo key")
    return value.encode("utf-8")


def uses_default_key() -> bool:
    """True when pseudonyms are made with the public demo key (worth a warning on real data)."""
    return os.environ.get(KEY_ENV) is None


def pseudonymise(value: str, key: bytes | None = None) -> str:
    """Keyed hash (HMAC-SHA256) of an identifier, e.g. "p-3f2a...": stable for a key, not reversible.

    Surrounding whitespace is ignored, since DICOM pads values with spaces.
    """
    if key is None:
        key = pseudonym_key()
    digest = hmac.new(key, str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX_CHARS]


def is_phi_name(name: str) -> bool:
    """Whether a column or attribute name denotes an identifier (case, spaces, _ and - ignored)."""
    return re.sub(r"[^a-z0-9]", "", name.lower()) in _PHI_NAMES


def filter_metadata(metadata: Mapping[str, object], extra: Iterable[str] = ()) -> dict[str, str]:
    """Keep only whitelisted keys and the explicitly named `extra` columns, as strings.

    An extra column whose name denotes an identifier (patient_name, PatientID,
    StudyDate, ...) is refused rather than silently copied into an artifact.
    """
    extra = tuple(extra)
    for name in extra:
        if is_phi_name(name):
            raise ParamsError(f"metadata column {name!r} identifies a patient or visit and cannot be kept; remove it from the extra columns")
    allowed = set(WHITELIST) | set(extra)
    return {k: "" if v is None else str(v) for k, v in metadata.items() if k in allowed}


def age_in_years(patient_age: str = "", birth_date: str = "", on_date: str = "") -> str:
    """Age as a number string, from a DICOM age ("045Y", "006M") or birth date and study date.

    The birth date is used only for the arithmetic and never returned. Ages of
    90 and over are reported as "90" (HIPAA safe harbour: such ages identify).
    Returns "" when unknown.
    """
    years = _parse_age(patient_age)
    if years is None:
        years = _years_between(birth_date, on_date)
    if years is None:
        return ""
    if years >= 90:
        return "90"
    if years >= 1 or years == 0:
        return str(int(years))
    return f"{years:.2f}".rstrip("0").rstrip(".")


def _parse_age(value: str) -> float | None:
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(value or "").upper())
    if not match:
        return None
    n, unit = int(match.group(1)), match.group(2) or "Y"
    return n / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[unit]


def _years_between(birth_date: str, on_date: str) -> float | None:
    try:
        born = dt.datetime.strptime(str(birth_date).strip()[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(str(on_date).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    if seen < born:
        return None
    whole = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    if whole >= 1:
        return float(whole)
    return (seen - born).days / 365.25
