"""Evaluate's JSON reports, read and written only here: metrics.json (flat headline metrics with their
intervals, what `dvc exp show` and `dvc metrics diff` list), evaluation.json (the full report: per
class, confusion, calibration, subgroups, sites, external sets, hardware, inference), robustness.json
(evaluate.robustness) and failures/failures.json (evaluate.failures)."""
from __future__ import annotations

import json
from pathlib import Path

from medtl.errors import MedtlError
from medtl.io import write_json

METRICS, EVALUATION, ROBUSTNESS = "metrics.json", "evaluation.json", "robustness.json"
FAILURES_DIR, FAILURES = "failures", "failures.json"
PROJECT_REPORTS = Path("reports")  # where the pipeline (dvc.yaml) puts evaluate's outputs
PROJECT_METRICS = (PROJECT_REPORTS / METRICS).as_posix()  # as git and dvc name it


def write_reports(out_dir: Path, metrics: dict, details: dict, robustness: dict) -> None:
    """evaluation.json and robustness.json first, metrics.json last: its presence means evaluate finished."""
    write_json(Path(out_dir) / EVALUATION, details)
    write_json(Path(out_dir) / ROBUSTNESS, robustness)
    write_json(Path(out_dir) / METRICS, metrics)


def write_failures(failures_dir: Path, summary: dict) -> None:
    write_json(Path(failures_dir) / FAILURES, summary)


def _load(path: Path, required: bool):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise MedtlError(f"{path} does not exist; run the evaluate stage (dvc repro)") from None
        return None
    except (OSError, ValueError) as e:
        raise MedtlError(f"{path} cannot be read as JSON ({e}); rerun the evaluate stage") from None


def load_metrics(reports: Path, required: bool = True) -> dict | None:
    return _load(Path(reports) / METRICS, required)


def load_evaluation(reports: Path, required: bool = True) -> dict | None:
    return _load(Path(reports) / EVALUATION, required)


def load_robustness(reports: Path) -> dict | None:
    """None for an evaluate that wrote none."""
    return _load(Path(reports) / ROBUSTNESS, False)


def load_failures(reports: Path) -> dict | None:
    return _load(Path(reports) / FAILURES_DIR / FAILURES, False)


def parse_metrics(text: str) -> dict:
    """metrics.json's text as read from a commit (`git show`, `dvc exp show`)."""
    return json.loads(text)
