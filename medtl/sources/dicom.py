"""A DICOM tree plus a labels CSV keyed by file path or by a DICOM identifier.

    ingest.dicom.key: path | SOPInstanceUID | SeriesInstanceUID | StudyInstanceUID | PatientID

With `path`, labels are matched to files before decoding. With an identifier,
they are matched to the value read from each file's header after decoding, so
every file is opened once. The group (default PatientID) is read from the
header and pseudonymised by ingest; identifiers and paths never reach the
manifest, the report or a message (a label row is named by its line number).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medtl.errors import MedtlError
from medtl.sources import Resolved, Source, SourceItem, entry_item, existing_dir, existing_file, inside_root, walk_files
from medtl.sources.csv import column, read_table


@dataclass(frozen=True)
class DicomParams:
    root: str = ""  # a tree of DICOM files
    labels: str = ""  # CSV with a key column and a label column
    key: Literal["path", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"] = "path"
    key_column: str | None = None  # default: the key's own name (path, SOPInstanceUID, ...)
    label_column: str = "label"
    group: Literal["PatientID", "StudyInstanceUID", "SeriesInstanceUID"] = "PatientID"
    include: str = "*"  # file-name pattern, e.g. "*.dcm" to leave sidecar files out


def open_source(params, workdir: Path) -> Source:
    p: DicomParams = params.dicom
    root = existing_dir(p.root, "ingest.dicom.root")
    labels_path = existing_file(p.labels, "ingest.dicom.labels", f"a CSV file with a {p.key_column or p.key} column and a label column")
    header, rows = read_table(labels_path, "ingest.dicom.labels")
    key_col = column(header, p.key_column or p.key, None, "ingest.dicom.key_column", labels_path)
    label_col = column(header, p.label_column, None, "ingest.dicom.label_column", labels_path)

    labels: dict[str, tuple[str, int]] = {}  # key value -> (label, line)
    for n, row in enumerate(rows, start=2):
        value = row[key_col]
        if not value:
            raise MedtlError(f"{labels_path.name} line {n} has an empty {key_col!r} cell; every label row needs a key")
        if p.key == "path":
            value = inside_root(root, value, f"{labels_path.name} line {n}").relative_to(root).as_posix()
        if value in labels and labels[value][0] != row[label_col]:
            # neither paths nor UIDs are repeated in messages: they may identify a patient
            raise MedtlError(f"{labels_path.name} lines {labels[value][1]} and {n} give the same "
                             f"{'file' if p.key == 'path' else p.key} two labels ({labels[value][0]!r} and {row[label_col]!r})")
        labels.setdefault(value, (row[label_col], n))

    skip = labels_path.resolve()
    items = []
    used: set[str] = set()
    n_files = 0
    for entry in walk_files(root):
        if not fnmatch.fnmatch(entry.path.name, p.include) or (not entry.problem and entry.path.resolve() == skip):
            continue
        item = entry_item(entry, root)
        n_files += 1
        rel = item.relative
        if p.key == "path" and not item.problem:
            if rel in labels:
                item.label, item.line = labels[rel][0], labels[rel][1]
                used.add(rel)
            else:
                item.problem, item.detail = "no_label", f"no row of {labels_path.name} names this file"
        elif p.key == "path" and rel in labels:
            used.add(rel)  # a broken link that a label row names: quarantined once, as the link
        items.append(item)
    if p.key == "path":
        items += _missing(labels, used, labels_path)

    def resolve(item: SourceItem, identity: dict) -> Resolved:
        group = identity.get(p.group) or None
        if p.key == "path":
            return Resolved(item.label, group)
        value = identity.get(p.key, "")
        if not value:
            return Resolved(None, group, "no_label", f"the file has no {p.key} to look its label up by")
        if value not in labels:
            return Resolved(None, group, "no_label", f"no row of {labels_path.name} has this file's {p.key}")
        used.add(value)
        return Resolved(labels[value][0], group)

    def unmatched() -> list[SourceItem]:
        return [] if p.key == "path" else _missing(labels, used, labels_path)

    return Source(
        items=items,
        classes=[],
        description={"source": "dicom", "key": p.key, "group": p.group, "label_rows": len(rows), "files": n_files},
        resolve=resolve,
        unmatched=unmatched,
        header_group=p.group,
    )


def _missing(labels: dict[str, tuple[str, int]], used: set[str], labels_path: Path) -> list[SourceItem]:
    """A quarantine item for every label row that matched no file, named by its line (not its key)."""
    return [
        SourceItem(f"{labels_path.name} line {line}", label=label, line=line, problem="missing_file",
                   detail="no file under ingest.dicom.root matches this label row")
        for value, (label, line) in sorted(labels.items(), key=lambda kv: kv[1][1]) if value not in used
    ]
