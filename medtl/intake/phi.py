"""Protected health information: pseudonymous ids and the metadata whitelist.

Header ids (PatientID, study and series UIDs) are only ever stored as keyed
hashes, so a group id in a manifest cannot be reversed or recomputed without
the key. Metadata reaches an artifact only through `filter_metadata`.

Source files are named in artifacts by `source_ref`, a keyed hash of their
path relative to the source root, never by the path itself: folder and file
names of hospital exports often hold names and record numbers.

Key: the environment variable MEDTL_PSEUDONYM_KEY (a string of at least 16
bytes, used as UTF-8), or MEDTL_PSEUDONYM_KEY_FILE naming a file that holds it
(`medtl key new --pseudonym --out FILE` writes one). Without
either, DEFAULT_PSEUDONYM_KEY is used; that key is public and is meant for the
synthetic demo only: anyone who can list candidate ids or paths can recompute
its pseudonyms. With a key of your own, pseudonyms of a real dataset are only
recomputable by someone holding the key. Changing the key changes every group
id and source ref, and therefore the ingest stage's output.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from medtl.errors import MedtlError, ParamsError

KEY_ENV = "MEDTL_PSEUDONYM_KEY"
KEY_FILE_ENV = "MEDTL_PSEUDONYM_KEY_FILE"
DEFAULT_PSEUDONYM_KEY = b"medtl-public-demo-key-not-secret"
PSEUDONYM_PREFIX = "p-"
SOURCE_REF_PREFIX = "f-"
MIN_KEY_BYTES = 16
HOW_TO_SET_KEY = (
    f"make a key with `medtl key new --pseudonym --out FILE` and set {KEY_FILE_ENV} to that file's path, or set a "
    f"secret of your own (at least {MIN_KEY_BYTES} bytes) in the environment variable {KEY_ENV} (e.g. "
    f"`export {KEY_ENV}=$(openssl rand -hex 32)`), "
    f"or put it in a file readable only by you and set {KEY_FILE_ENV} to that file's path; keep the same key for "
    "every run on this data (`medtl locate` needs it too)"
)
PSEUDONYM_HEX_CHARS = 16  # 64 bits: collisions are negligible below billions of patients

# Metadata safe to store: acquisition facts, coarse demographics, where a 2D image came from.
WHITELIST = (
    "modality", "manufacturer", "body_part", "view_position", "photometric", "pixel_spacing",
    "sex", "age", "frame", "slice",
)

WORDS_FILE = Path(__file__).with_name("identifier_words.txt")  # the identifying words, as data


def _fold(text: str) -> str:
    """Lower case without accents: 'Téléphone' -> 'telephone'."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


@functools.cache
def identifier_words() -> tuple[frozenset, frozenset, tuple, frozenset, tuple]:
    """(tokens, pairs, prefixes, whole names, words of scripts without spaces) from WORDS_FILE."""
    tokens, pairs, prefixes, whole, unspaced = set(), set(), [], set(), []
    for line in WORDS_FILE.read_text(encoding="utf-8").splitlines():
        word = _fold(line.strip())
        if not word or word.startswith("#"):
            continue
        if not word.isascii():
            unspaced.append(word)
        elif word.startswith("="):
            whole.add(word[1:])
        elif word.endswith("*"):
            prefixes.append(word[:-1])
        elif " " in word:
            pairs.add(tuple(word.split()[:2]))
        else:
            tokens.add(word)
    return frozenset(tokens), frozenset(pairs), tuple(prefixes), frozenset(whole), tuple(unspaced)


def _given_key() -> bytes | None:
    """The key from MEDTL_PSEUDONYM_KEY, else from the file MEDTL_PSEUDONYM_KEY_FILE; None when neither is set."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if not value.strip():
            raise MedtlError(f"{KEY_ENV} is set but empty; set it to a secret string, or unset it to use the public demo key")
        return value.encode("utf-8")
    key_file = os.environ.get(KEY_FILE_ENV)
    if key_file is None:
        return None
    try:
        text = Path(key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MedtlError(f"{KEY_FILE_ENV} is {key_file!r}, which cannot be read ({getattr(e, 'strerror', None) or e}); "
                         "expected a UTF-8 text file holding the pseudonym key") from None
    if not text:
        raise MedtlError(f"{KEY_FILE_ENV} names {key_file!r}, which is empty; put a secret string in it")
    return text.encode("utf-8")


def _where_key() -> str:
    return KEY_ENV if os.environ.get(KEY_ENV) is not None else KEY_FILE_ENV


def pseudonym_key() -> bytes:
    """The key from MEDTL_PSEUDONYM_KEY, else from the file MEDTL_PSEUDONYM_KEY_FILE, else the public demo key.

    A given key shorter than MIN_KEY_BYTES is refused: a short key can be found by trying them all.
    """
    key = _given_key()
    if key is None:
        return DEFAULT_PSEUDONYM_KEY
    if len(key) < MIN_KEY_BYTES:
        raise MedtlError(f"the pseudonym key in {_where_key()} is {len(key)} byte(s) long; a key of at least "
                         f"{MIN_KEY_BYTES} bytes is needed, as a short key can be found by trying every one. "
                         f"Make one with `medtl key new --pseudonym` (or `openssl rand -hex 32`)")
    return key


def uses_default_key() -> bool:
    """True when pseudonyms are made with the public demo key, unset or given by its value (worth a warning on real data)."""
    key = _given_key()
    return key is None or key == DEFAULT_PSEUDONYM_KEY


def key_kind() -> str:
    """"default" (the public demo key) or "user" (a key from the environment or a key file), for the evidence."""
    return "default" if uses_default_key() else "user"


def refuse_demo_key(source: str, what: str) -> None:
    """The public demo key's value, given as if it were a secret, is refused for any source but the demo."""
    if source != "demo" and _given_key() == DEFAULT_PSEUDONYM_KEY:
        raise MedtlError(f"{what}: the pseudonym key in {_where_key()} is the public demo key, which anyone can use to "
                         f"recompute pseudonyms; it is only for the demo source. {HOW_TO_SET_KEY}")


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
    """'PatientID' -> ['patient', 'id']; 'mrn_number' -> ['mrn', 'number']; 'Téléphone' -> ['telephone']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name))
    return [t for t in re.split(r"[\W_]+", _fold(spaced)) if t]


def identifying_token(name: str) -> str | None:
    """The word that makes a column name look identifying ('name' in 'pt_name'), or None.

    Matched by tokens, so `pt_name`, `mrn_number`, `ReferringPhysician` and
    `free text` are caught, and `site` or `scanner_model` are not.
    """
    words, pairs, prefixes, whole, unspaced = identifier_words()
    tokens = _tokens(name)
    compact = "".join(tokens)
    if compact in whole:
        return compact
    for t in tokens:
        if t in words:
            return t
    for a, b in zip(tokens, tokens[1:]):
        if (a, b) in pairs:
            return f"{a} {b}"
    for t in tokens:  # run-together spellings: mrnnumber, patientname, referringdoctor
        for word in prefixes:
            if t.startswith(word) or t.endswith(word):
                return word
    folded = _fold(name)
    for word in unspaced:  # 姓名 inside 患者姓名
        if word in folded:
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


# What identifying values look like, whatever their column is called.
_VALUE_LOOKS = (
    ("e-mail addresses", re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]{2,}")),
    ("dates", re.compile(r"(?<!\d)(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|"
                         r"(19|20)\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01]))(?!\d)")),
    ("long digit runs", re.compile(r"\d{6,}")),
)
_PHONE = re.compile(r"\+?\(?\d[\d \-()]{6,}\d")  # no '.': decimals such as pixel spacings are not phone numbers
DISTINCT_FRACTION = 0.5  # more distinct values than this, among rows, is a per-person value
DISTINCT_MIN_ROWS = 10  # below this, distinctness says nothing


class ColumnProfile:
    """What a column's values look like, gathered one row at a time (distinct values kept as 8-byte digests)."""

    def __init__(self) -> None:
        self.n = 0
        self.distinct: set[bytes] = set()
        self.first: dict[str, int] = {}  # kind of identifying-looking value -> first line with one

    def add(self, value: str, line: int) -> None:
        value = (value or "").strip()
        if not value:
            return
        self.n += 1
        self.distinct.add(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest())
        looks = [kind for kind, pattern in _VALUE_LOOKS if pattern.search(value)]
        if "dates" not in looks and any(sum(c.isdigit() for c in m) >= 8 for m in _PHONE.findall(value)):
            looks = ["phone numbers"] + [k for k in looks if k != "long digit runs"]  # its digits are not a run too
        for kind in looks:
            self.first.setdefault(kind, line)

    def finding(self, where: str = "the table") -> str | None:
        """Why the values look identifying ("its values look like dates (first on m.csv line 4)"), or None.

        Never a value."""
        if self.first:
            kind, line = min(self.first.items(), key=lambda kv: kv[1])
            return f"its values look like {kind} (first on {where} line {line})"
        if self.n >= DISTINCT_MIN_ROWS and len(self.distinct) > DISTINCT_FRACTION * self.n:
            return (f"{len(self.distinct) / self.n:.0%} of its {self.n} values are distinct (more than "
                    f"{DISTINCT_FRACTION:.0%}: a value per person or per image)")
        return None


def filter_metadata(metadata: Mapping[str, object], extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> dict[str, str]:
    """Keep only whitelisted keys and the explicitly named `extra` columns, as strings.

    An extra column whose name looks identifying (patient_name, PatientID,
    StudyDate, ...) is refused rather than silently copied into an artifact,
    unless it is also in `allowed`.
    """
    extra = tuple(extra)
    check_metadata_columns(extra, allowed)
    keep = set(WHITELIST) | set(extra)
    out = {k: "" if v is None else str(v) for k, v in metadata.items() if k in keep}
    if "age" in out:
        out["age"] = cap_age(out["age"])
    return out


def cap_age(value: str) -> str:
    """An age as given, but "90" when it says 90 or more ("93", "091Y", "95-99", "90+"): such ages identify
    (HIPAA safe harbour), wherever the age came from (a header or a CSV column)."""
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", str(value))]
    unit = re.fullmatch(r"\s*\d{1,3}\s*([DWM])\s*", str(value).upper())
    if unit:  # a DICOM age in days, weeks or months
        return age_in_years(str(value))
    return "90" if any(n >= 90 for n in numbers) else str(value)


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


def new_key() -> str:
    """A random pseudonym key: 32 bytes as 64 hex digits."""
    import secrets

    return secrets.token_hex(32)


def register(subparsers) -> None:
    p = subparsers.add_parser("key", help="make a pseudonym key",
                              description="Make keys medtl uses. `medtl key new --pseudonym --out FILE` writes a random "
                                          f"pseudonym key readable only by you; set {KEY_FILE_ENV} to FILE.")
    sub = p.add_subparsers(dest="key_command", required=True)
    new = sub.add_parser("new", help="a new random key")
    new.add_argument("--pseudonym", action="store_true", required=True,
                     help="a pseudonym key (keyed hashes of patient ids and file paths)")
    new.add_argument("--out", default=None, help="file to write it to (mode 600; refused if it exists); default: print it")
    new.set_defaults(func=_key_new)


def _key_new(args) -> int:
    key = new_key()
    if args.out is None:
        print(key)
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MedtlError(f"--out {args.out} exists; a key file is never overwritten (its pseudonyms would change)") from None
    except OSError as e:
        raise MedtlError(f"--out {args.out} cannot be created ({e.strerror or type(e).__name__})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    print(f"medtl key: wrote a new pseudonym key to {args.out}; set {KEY_FILE_ENV}={args.out} and keep the file "
          "for every run on this data (`medtl locate` needs it too)")
    return 0
