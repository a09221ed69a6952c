"""reports/operating_point.json: the one writer and reader of what `medtl predict` needs besides the model.

The record holds the threshold fitted on validation (rule, target, values
reached), the temperature, the sha256 of the model it belongs to, and what
data the model was evaluated on (modalities, and colour as
`medtl.intake.readers.base.colour_of` defines it), so predict can refuse images unlike them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medtl.errors import MedtlError
from medtl.evaluate.reports import PROJECT_REPORTS
from medtl.io import sha256_file, write_json

if TYPE_CHECKING:  # numpy and the prepared arrays are not needed to read or write the record
    from medtl.prepare.prepared import PreparedSplit

OPERATING_POINT_FORMAT = "medtl-operating-point/2"
OPERATING_POINT = "operating_point.json"


def data_profile(splits: list[PreparedSplit]) -> dict:
    """Modalities and colours of the prepared images, for predict's mismatch check."""
    modalities = {r["modality"].upper() for s in splits for r in s.rows if r.get("modality")}
    colour = {r["colour"] for s in splits for r in s.rows if r.get("colour")}
    return {"modalities": sorted(modalities), "colour": sorted(colour)}


def operating_point_record(model_path: Path, classes: list[str], op: dict | None, temperature: float | None,
                           data: dict) -> dict:
    return {
        "format": OPERATING_POINT_FORMAT,
        "model_sha256": sha256_file(model_path),
        "classes": list(classes),
        "positive_class": classes[1] if len(classes) == 2 else None,
        "rule": op["rule"] if op else "argmax",
        "target": op["target"] if op else None,
        "threshold": op["threshold"] if op else None,
        "fitted_on": op["fitted_on"] if op else None,
        "n_val": op.get("n_val") if op else None,
        "val_sensitivity": op.get("val_sensitivity") if op else None,
        "val_specificity": op.get("val_specificity") if op else None,
        "temperature": temperature,
        "data": data,
    }


def write_operating_point(path: Path, record: dict) -> None:
    if record.get("format") != OPERATING_POINT_FORMAT:
        raise MedtlError(f"refusing to write {path}: not a {OPERATING_POINT_FORMAT} record")
    write_json(path, record)


def read_operating_point(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MedtlError(f"operating point {path} cannot be read as JSON ({e}); expected the "
                         "reports/operating_point.json written by the evaluate stage") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != OPERATING_POINT_FORMAT:
        raise MedtlError(f"operating point {path} has format {found!r}, this medtl reads {OPERATING_POINT_FORMAT!r}; "
                         "rerun the evaluate stage (dvc repro)")
    return record


DEFAULT_PATH = PROJECT_REPORTS / OPERATING_POINT  # where the pipeline (dvc.yaml) puts it


def operating_point_for(path: Path | None, model_path: Path, classes: list[str], command: str, advice: str,
                        fallback: str) -> dict | None:
    """The evaluate stage's record for `model_path`, or None when there is none to use.

    An explicit `path` must exist and belong to the model; the default file is
    skipped with a note (`fallback` says what happens instead) when it is absent
    or was fitted for another model, e.g. after a fine-tune not yet evaluated.
    """
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PATH
    if not path.is_file():
        if explicit:
            raise MedtlError(f"--operating-point {path} does not exist; expected {DEFAULT_PATH} from the evaluate stage")
        return None
    record = read_operating_point(path)
    if record.get("model_sha256") != sha256_file(model_path):
        msg = f"operating point {path} was fitted for a different model than {model_path} (sha256 differs); {advice}"
        if explicit:
            raise MedtlError(msg)
        print(f"medtl {command}: note: {msg}; {fallback}", file=sys.stderr)
        return None
    if record.get("classes") != classes:
        raise MedtlError(f"operating point {path} is for classes {record.get('classes')}, the model has {classes}")
    return record
