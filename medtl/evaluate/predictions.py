"""Evaluate's prediction tables, one row per image: predictions.csv (the evaluated split),
val_predictions.csv (validation, pooled out of fold by `medtl cv report`) and
external_predictions.csv (the sets of evaluate.external, each row with its file's
source_ref and sha256 for `medtl locate`). Columns: image_id, group, label,
predicted, above_threshold, prob_<class>... (external: set first, then source_ref,
sha256, index). Read and written only here."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from medtl.evaluate.reports import PROJECT_REPORTS

PREDICTIONS, VAL_PREDICTIONS, EXTERNAL_PREDICTIONS = "predictions.csv", "val_predictions.csv", "external_predictions.csv"


def project_path(name: str) -> str:
    """A table's path in the project, as git and dvc name it (reports/predictions.csv)."""
    return (PROJECT_REPORTS / name).as_posix()


def split_header(classes: list[str]) -> list[str]:
    return ["image_id", "group", "label", "predicted", "above_threshold"] + [f"prob_{c}" for c in classes]


def external_header(classes: list[str]) -> list[str]:
    # source_ref: keyed ref of the file's path relative to the set's root (`medtl locate --folder ROOT REF`).
    return ["set", *split_header(classes), "source_ref", "sha256", "index"]


def write_table(path: Path, header: list[str], rows: Iterable[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def parse_predictions(text: str) -> tuple[list[str], list[dict]]:
    """(classes, rows) of a predictions table's text (as read from a commit by `git show` / `dvc exp show`)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return [], []
    return [c[len("prob_"):] for c in rows[0] if c.startswith("prob_")], rows


def load_predictions(path: Path) -> tuple[list[str], list[dict]]:
    """(classes, rows) of a predictions table in the workspace; raises OSError or csv.Error when unreadable."""
    return parse_predictions(Path(path).read_text(encoding="utf-8"))
