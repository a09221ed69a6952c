"""Ingest's report (report.json beside the manifest): counts per split and class, quarantined files with
their reasons, duplicates, label and split conflicts, decode warnings and the source's description.
Every entry is fixed words, numbers, keyed refs and hashes: never a path or a header value."""
from __future__ import annotations

import json
from pathlib import Path

from medtl.errors import MedtlError
from medtl.io import write_json

REPORT = "report.json"


def report_path(ingested: Path) -> Path:
    return Path(ingested) / REPORT


def write_report(out_dir: Path, report: dict) -> None:
    write_json(report_path(out_dir), report)


def load_report(ingested: Path, required: bool = True) -> dict | None:
    """The report ingest wrote; None when it is missing and not `required`."""
    path = report_path(ingested)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return None
        raise MedtlError(f"{path} does not exist; run the ingest stage (dvc repro)") from None
    except (OSError, ValueError) as e:
        raise MedtlError(f"{path} cannot be read as JSON ({e}); rerun the ingest stage") from None
    if not isinstance(report, dict):
        raise MedtlError(f"{path} is not ingest's report (a JSON object); rerun the ingest stage")
    return report
