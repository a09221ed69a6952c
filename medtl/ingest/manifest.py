"""The ingest manifest: one row per image, the contract between ingest and every later reader.

    manifest.csv    image_id, source_ref, sha256, label, group, split, modality,
                    height, width, channels, offset, then whitelisted metadata columns
    manifest.json   {"format": "medtl.ingest.manifest", "version": 2, "columns": [...], "rows": N}

A source file is named by `source_ref`, a keyed hash of its path relative to
the source root (`medtl.intake.phi.source_ref`), plus the sha256 of its bytes; never
by its path, which in hospital exports often holds names and record numbers.
`medtl locate` maps a ref back to the file where the data lives. `group` is a
pseudonym; `offset`, `height`, `width`, `channels` locate the pixels in the
store (`medtl.ingest.store`).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from medtl.errors import MedtlError
from medtl.io import atomic_path, write_json

MANIFEST = "manifest.csv"  # in ingest's output folder, with its format record manifest.json beside it
PROJECT_MANIFEST = Path("data/ingested") / MANIFEST  # where the pipeline (dvc.yaml) puts it
FORMAT = "medtl.ingest.manifest"
VERSION = 2
CORE_COLUMNS = [
    "image_id", "source_ref", "sha256", "label", "group", "split", "modality",
    "height", "width", "channels", "offset",
]
# Columns that describe where an image is, not what it shows (not carried as metadata downstream).
LOCATION_COLUMNS = {"source_ref", "sha256", "height", "width", "channels", "offset", "split"}


@dataclass
class ManifestRow:
    image_id: str
    source_ref: str  # keyed hash of the source file's relative path
    sha256: str  # of the source file's bytes
    label: str
    group: str  # pseudonymous patient (or other) group
    split: str
    height: int
    width: int
    channels: int
    offset: int  # in the pixel store, in elements
    modality: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # whitelisted or explicitly allowed columns

    def to_csv(self) -> dict[str, str | int]:
        core = {c: getattr(self, c) for c in CORE_COLUMNS}
        return {**self.metadata, **core}


def manifest_path(ingested: Path) -> Path:
    return Path(ingested) / MANIFEST


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def write_manifest(rows: Iterable[ManifestRow], path: Path, metadata_columns: Iterable[str] | None = None) -> None:
    """manifest.csv and its format record manifest.json, each written atomically.

    With `metadata_columns` (every metadata key any row has), `rows` may be a
    stream: rows are written as they come, not gathered first.
    """
    if metadata_columns is None:
        rows = list(rows)
        metadata_columns = {k for r in rows for k in r.metadata}
    columns = CORE_COLUMNS + sorted(set(metadata_columns) - set(CORE_COLUMNS))
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="raise", restval="", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv())
            n += 1
    write_json(sidecar(path), {"format": FORMAT, "version": VERSION, "columns": columns, "rows": n})


def check_format(path: Path) -> dict:
    """The manifest's format record, refusing a manifest this code cannot read."""
    meta_path = sidecar(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedtlError(f"{path} has no format record {meta_path.name}: it was written by an older medtl; "
                         "rerun ingest (dvc repro ingest)") from None
    except (OSError, ValueError) as e:
        raise MedtlError(f"{meta_path} cannot be read ({e}); rerun ingest (dvc repro ingest)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MedtlError(f"{meta_path} is not a medtl manifest record (expected format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise MedtlError(f"{path} is manifest version {meta.get('version')!r}; this medtl reads version {VERSION}; "
                         "rerun ingest (dvc repro ingest) with this version of medtl")
    return meta


def iter_manifest(path: Path) -> Iterator[dict[str, str]]:
    """The rows as dicts of strings, one at a time, so a reader holds one row rather than the whole manifest.

    The format version and columns are checked before the first row; the row
    count when the last has been read (a short manifest fails at its end).
    """
    meta = check_format(Path(path))
    n = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if list(columns) != list(meta.get("columns", [])) or columns[: len(CORE_COLUMNS)] != CORE_COLUMNS:
                raise MedtlError(f"manifest {path} has columns {', '.join(columns)}, not those its format record "
                                 "lists; the files do not belong together: rerun ingest (dvc repro ingest)")
            for row in reader:
                n += 1
                yield row
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MedtlError(f"manifest {path} cannot be read: {e}") from None
    if n != meta.get("rows"):
        raise MedtlError(f"manifest {path} has {n} rows, its format record says {meta.get('rows')}; "
                         "rerun ingest (dvc repro ingest)")


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows as dicts of strings, after checking the format version and columns."""
    return list(iter_manifest(path))


def read_rows(path: Path) -> list[ManifestRow]:
    """The rows as ManifestRow objects."""
    out = []
    for r in read_manifest(path):
        metadata = {k: v for k, v in r.items() if k not in CORE_COLUMNS}
        out.append(ManifestRow(
            image_id=r["image_id"], source_ref=r["source_ref"], sha256=r["sha256"], label=r["label"], group=r["group"],
            split=r["split"], height=int(r["height"]), width=int(r["width"]), channels=int(r["channels"]),
            offset=int(r["offset"]), modality=r["modality"], metadata=metadata,
        ))
    return out
