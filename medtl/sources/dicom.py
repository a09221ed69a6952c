"""A DICOM tree plus a labels CSV keyed by file path or by a DICOM identifier.

    ingest.dicom.key: path | SOPInstanceUID | SeriesInstanceUID | StudyInstanceUID | PatientID

With `path`, labels are matched to files before decoding. With an identifier,
they are matched to the value read from each file's header after decoding, so
every file is opened once. The group (default PatientID) is read from the
header and pseudonymised by ingest; identifiers never reach the manifest or
the report (an unmatched label row is reported by its line number).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

from medtl.errors import MedtlError
from medtl.sources import Source, SourceItem, existing_dir, existing_file, inside_root, iter_files
from medtl.sources.csv import column, read_table


def open_source(params, workdir: Path) -> Source:
    p = params.dicom
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
            shown = value if p.key == "path" else "the same identifier"  # UIDs are not repeated in messages
            raise MedtlError(f"{labels_path.name} lines {labels[value][1]} and {n} give {shown} two labels "
                             f"({labels[value][0]!r} and {row[label_col]!r})")
        labels.setdefault(value, (row[label_col], n))

    files = [f for f in iter_files(root, skip=[labels_path]) if fnmatch.fnmatch(f.name, p.include)]
    items = []
    used: set[str] = set()
    for f in files:
        rel = f.relative_to(root).as_posix()
        item = SourceItem(rel, path=f)
        if p.key == "path":
            if rel in labels:
                item.label = labels[rel][0]
                used.add(rel)
            else:
                item.problem, item.detail = "no_label", f"no row of {labels_path.name} names this file"
        items.append(item)
    if p.key == "path":
        items += _missing(labels, used, labels_path)

    def resolve(item: SourceItem, identity: dict) -> tuple[str | None, str | None, str | None, str]:
        group = identity.get(p.group) or None
        if p.key == "path":
            return item.label, group, None, ""
        value = identity.get(p.key, "")
        if not value:
            return None, group, "no_label", f"the file has no {p.key} to look its label up by"
        if value not in labels:
            return None, group, "no_label", f"no row of {labels_path.name} has this file's {p.key}"
        used.add(value)
        return labels[value][0], group, None, ""

    def unmatched() -> list[SourceItem]:
        return [] if p.key == "path" else _missing(labels, used, labels_path)

    return Source(
        items=items,
        classes=[],
        description={"source": "dicom", "key": p.key, "group": p.group, "label_rows": len(rows), "files": len(files)},
        resolve=resolve,
        unmatched=unmatched,
    )


def _missing(labels: dict[str, tuple[str, int]], used: set[str], labels_path: Path) -> list[SourceItem]:
    """A quarantine item for every label row that matched no file, named by its line (not its key)."""
    return [
        SourceItem(f"{labels_path.name} line {line}", label=label, problem="missing_file",
                   detail="no file under ingest.dicom.root matches this label row")
        for value, (label, line) in sorted(labels.items(), key=lambda kv: kv[1][1]) if value not in used
    ]
