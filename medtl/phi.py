"""Protected health information: pseudonymous ids and the metadata whitelist.

Header ids (PatientID, study and series UIDs) are only ever stored as keyed
hashes, so a group id in a manifest cannot be reversed or recomputed without
the key. Metadata reaches an artifact only through `filter_metadata`.

Source files are named in artifacts by `source_ref`, a keyed hash of their
path relative to the source root, never by the path itself: folder and file
names of hospital exports often hold names and record numbers.

Key: the environment variable MEDTL_PSEUDONYM_KEY (any string, used as UTF-8
bytes), or MEDTL_PSEUDONYM_KEY_FILE naming a file that holds it. Without
either, DEFAULT_PSEUDONYM_KEY is used; that key is public and is meant for the
synthetic demo only: anyone who can list candidate ids or paths can recompute
its pseudonyms. With a key of your own, pseudonyms of a real dataset are only
recomputable by someone holding the key. Changing the key changes every group
id and source ref, and therefore the ingest stage's output.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from medtl.errors import MedtlError, ParamsError

KEY_ENV = "MEDTL_PSEUDONYM_KEY"
KEY_FILE_ENV = "MEDTL_PSEUDONYM_KEY_FILE"
DEFAULT_PSEUDONYM_KEY = b"medtl-public-demo-key-not-secret"
PSEUDONYM_PREFIX = "p-"
SOURCE_REF_PREFIX = "f-"
HOW_TO_SET_KEY = (
    f"set a secret of your own in the environment variable {KEY_ENV} (e.g. `export {KEY_ENV}=$(openssl rand -hex 32)`), "
    f"or put it in a file readable only by you and set {KEY_FILE_ENV} to that file's path; keep the same key for "
    "every run on this data (`medtl locate` needs it too)"
)
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
# Words that make a column name look identifying wherever they appear in it.
_PHI_TOKENS = {
    "name", "names", "surname", "forename", "initials", "id", "ids", "uid", "mrn", "ssn", "nhs", "birth", "birthdate",
    "dob", "address", "street", "postcode", "zip", "phone", "telephone", "tel", "mobile", "email", "mail",
    "accession", "physician", "physicians", "referrer", "referring", "doctor", "clinician", "operator", "operators",
    "note", "notes", "comment", "comments", "freetext", "remark", "remarks", "report", "narrative",
}
_PHI_TOKEN_PAIRS = {("free", "text"), ("record", "number"), ("date", "of")}
_PHI_PREFIXES = ("mrn", "dob", "ssn", "accession", "physician", "referr", "birth", "address", "phone", "surname", "name")


def pseudonym_key() -> bytes:
    """The key from MEDTL_PSEUDONYM_KEY, else from the file MEDTL_PSEUDONYM_KEY_FILE, else the public demo key."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if not value.strip():
            raise MedtlError(f"{KEY_ENV} is set but empty; set it to a secret string, or unset it to use the public demo key")
        return value.encode("utf-8")
    key_file = os.environ.get(KEY_FILE_ENV)
    if key_file is None:
        return DEFAULT_PSEUDONYM_KEY
    try:
        text = Path(key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MedtlError(f"{KEY_FILE_ENV} is {key_file!r}, which cannot be read ({getattr(e, 'strerror', None) or e}); "
                         "expected a UTF-8 text file holding the pseudonym key") from None
    if not text:
        raise MedtlError(f"{KEY_FILE_ENV} names {key_file!r}, which is empty; put a secret string in it")
    return text.encode("utf-8")


def uses_default_key() -> bool:
    """True when pseudonyms are made with the public demo key (worth a warning on real data)."""
    return os.environ.get(KEY_ENV) is None and os.environ.get(KEY_FILE_ENV) is None


def key_kind() -> str:
    """"default" (the public demo key) or "user" (a key from the environment or a key file), for the evidence."""
    return "default" if uses_default_key() else "user"


def pseudonymise(value: str, key: bytes | None = None) -> str:
    """Keyed hash (HMAC-SHA256) of an identifier, e.g. "p-3f2a...": stable for a key, not reversible.

    Surrounding whitespace is ignored, since DICOM pads values with spaces.
    """
    if key is None:
        key = pseudonym_key()
    digest = hmac.new(key, str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX_CHARS]


def source_ref(relative: str, key: bytes | None = None) -> str:
    """Keyed hash of a source file's path relative to its root, e.g. "f-9c1d...": names a file without its path.

    Domain-separated from `pseudonymise`, so a path and a patient id never share a pseudonym.
    """
    if key is None:
        key = pseudonym_key()
    digest = hmac.new(key, b"source-path\0" + relative.encode("utf-8"), hashlib.sha256).hexdigest()
    return SOURCE_REF_PREFIX + digest[:PSEUDONYM_HEX_CHARS]


def _tokens(name: str) -> list[str]:
    """'PatientID' -> ['patient', 'id']; 'mrn_number' -> ['mrn', 'number']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name))
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def identifying_token(name: str) -> str | None:
    """The word that makes a column name look identifying ('name' in 'pt_name'), or None.

    Matched by tokens, so `pt_name`, `mrn_number`, `ReferringPhysician` and
    `free text` are caught, and `site` or `scanner_model` are not.
    """
    tokens = _tokens(name)
    compact = "".join(tokens)
    if compact in _PHI_NAMES:
        return compact
    for t in tokens:
        if t in _PHI_TOKENS:
            return t
    for a, b in zip(tokens, tokens[1:]):
        if (a, b) in _PHI_TOKEN_PAIRS:
            return f"{a} {b}"
    for t in tokens:  # run-together spellings: mrnnumber, patientname, referringdoctor
        for word in _PHI_PREFIXES:
            if t.startswith(word) or t.endswith(word):
                return word
    return None


def is_phi_name(name: str) -> bool:
    """Whether a column or attribute name looks like it denotes an identifier."""
    return identifying_token(name) is not None


def check_metadata_columns(columns: Iterable[str], allowed: Iterable[str] = (), key: str = "ingest.csv.metadata") -> list[str]:
    """The extra metadata columns, refusing any whose name looks identifying unless it is in `allowed`.

    Returns the columns that were kept only because they were allowed.
    """
    allowed = set(allowed)
    kept_by_allowance = []
    for name in columns:
        token = identifying_token(name)
        if token is None:
            continue
        if name not in allowed:
            raise ParamsError(
                f"metadata column {name!r} (params key '{key}') looks identifying (the word {token!r}) and is not "
                f"copied into artifacts; remove it, or if you have checked that it holds no identifier, list it under "
                f"ingest.csv.allow_columns"
            )
        kept_by_allowance.append(name)
    return kept_by_allowance


def filter_metadata(metadata: Mapping[str, object], extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> dict[str, str]:
    """Keep only whitelisted keys and the explicitly named `extra` columns, as strings.

    An extra column whose name looks identifying (patient_name, PatientID,
    StudyDate, ...) is refused rather than silently copied into an artifact,
    unless it is also in `allowed`.
    """
    extra = tuple(extra)
    check_metadata_columns(extra, allowed)
    keep = set(WHITELIST) | set(extra)
    return {k: "" if v is None else str(v) for k, v in metadata.items() if k in keep}


class LibraryWarning(UserWarning):
    """A warning from a decoding library, reduced to its kind (`warning_kind`): the original quotes header values."""


def warning_kind(w: warnings.WarningMessage) -> str:
    """A library warning as a fixed kind, e.g. "invalid_value:UI": the VR or class named, never the quoted value."""
    text = str(w.message)
    if issubclass(w.category, LibraryWarning):
        return text
    vr = re.match(r"Invalid value for VR ([A-Z]{2})\b", text)
    if vr:
        return f"invalid_value:{vr.group(1)}"
    if "end of file" in text.lower():
        return "truncated_header"
    return f"library_warning:{w.category.__name__}"


def scrub_path(text: str, path: Path | None, relative: str, keep: tuple[str, ...] = ()) -> str:
    """`text` without a file's path or any longer segment of it (a folder named after a patient, say).

    Segments in `keep` (a class folder's name, say) stay; short ones (<= 3 characters) too, as they would
    blank common words.
    """
    if path is not None:
        text = text.replace(str(path), "file")
    for part in Path(relative).parts:
        if len(part) >= 4 and part not in keep:
            text = text.replace(part, "…")
    return text


def error_kind(e: BaseException) -> str:
    """An exception as its type name only: library messages may quote header values (names, ids)."""
    return type(e).__name__


_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM CS: upper-case letters, digits, space, underscore
PHOTOMETRIC_VALUES = {
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV",
}
# Modality (0008,0060) defined terms (PS3.3 C.7.3.1.1.1), retired ones included: a value outside them is free
# text (a name typed into the field fits the code-string form as well), so it is never copied or repeated.
MODALITY_TERMS = {
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CD", "CF", "CP", "CR", "CS", "CT", "CTPROTOCOL", "DD", "DF", "DG",
    "DM", "DOC", "DS", "DX", "EC", "ECG", "EPS", "ES", "FA", "FID", "FS", "GM", "HC", "HD", "IO", "IOL", "IVOCT",
    "IVUS", "KER", "KO", "LEN", "LP", "LS", "MA", "MG", "MR", "MS", "NM", "OAM", "OCT", "OP", "OPM", "OPR", "OPT",
    "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PLAN", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR",
    "SRF", "ST", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "VF", "XA", "XAPROTOCOL", "XC",
}
_CHECKS = {
    "modality": lambda v: v.upper() in MODALITY_TERMS,
    "body_part": lambda v: bool(_CODE_STRING.fullmatch(v)),
    "view_position": lambda v: bool(_CODE_STRING.fullmatch(v)),
    "photometric": lambda v: v in PHOTOMETRIC_VALUES,
    "sex": lambda v: v in ("M", "F", "O"),
    "age": lambda v: bool(re.fullmatch(r"\d{1,3}(\.\d+)?", v)),
    "pixel_spacing": lambda v: bool(re.fullmatch(r"[0-9eE.+\- ]{1,64}", v)),
    "frame": lambda v: v.isdigit(),
    "slice": lambda v: v.isdigit(),
}


def check_header_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Whitelisted header metadata whose values have the form the standard gives them; others are blanked.

    A coded field holding free text (a name typed into Modality, a bad
    PhotometricInterpretation) is not copied. Returns the checked metadata
    and the keys that were blanked.
    """
    out, blanked = {}, []
    for k, v in metadata.items():
        v = "" if v is None else str(v)
        check = _CHECKS.get(k)
        if v and check is not None and not check(v):
            out[k] = ""
            blanked.append(k)
        else:
            out[k] = v
    return out, blanked


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
