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
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import numpy as np

from medtl.errors import MedtlError
from medtl.intake.sources import Resolved, Source, SourceItem, entry_item, existing_dir, existing_file, inside_root, walk_files
from medtl.intake.sources.csv import column, iter_table


@dataclass(frozen=True)
class DicomParams:
    # Files and folders it reads (each a dvc-tracked input), required and optional.
    PATHS: ClassVar[tuple[str, ...]] = ("root", "labels")

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
    labels = LabelRows.read(labels_path, root, p)
    description = {"source": "dicom", "key": p.key, "group": p.group, "label_rows": labels.rows, "files": 0,
                   "hidden_files": 0}
    hidden = Counter()  # hidden files and folders are not read, but counted

    def items() -> Iterator[SourceItem]:  # streamed: one file at a time, however large the tree
        skip = labels_path.resolve()
        for entry in walk_files(root, hidden=hidden):
            description["hidden_files"] = hidden["hidden_file"]
            if not fnmatch.fnmatch(entry.path.name, p.include) or (not entry.problem and entry.path.resolve() == skip):
                continue
            item = entry_item(entry, root)
            description["files"] += 1
            found = labels.find(item.relative) if p.key == "path" else None
            if p.key == "path" and not item.problem:
                if found is not None:
                    item.label, item.line = labels.take(found)
                else:
                    item.problem, item.detail = "no_label", f"no row of {labels_path.name} names this file"
            elif found is not None:
                labels.take(found)  # a broken link that a label row names: quarantined once, as the link
            yield item
        description["hidden_files"] = hidden["hidden_file"]
        if p.key == "path":  # every row has met its file or not: the table is no longer needed
            missing = labels.unmatched()
            labels.clear()
            yield from missing

    def resolve(item: SourceItem, identity: dict) -> Resolved:
        group = identity.get(p.group) or None
        if p.key == "path":
            return Resolved(item.label, group)
        value = identity.get(p.key, "")
        if not value:
            return Resolved(None, group, "no_label", f"the file has no {p.key} to look its label up by")
        found = labels.find(value)
        if found is None:
            return Resolved(None, group, "no_label", f"no row of {labels_path.name} has this file's {p.key}")
        return Resolved(labels.take(found)[0], group)

    def unmatched() -> list[SourceItem]:
        return [] if p.key == "path" else labels.unmatched()

    return Source(
        items=items(),
        classes=[],
        description=description,
        resolve=resolve,
        unmatched=unmatched,
        header_group=p.group,
    )


class LabelRows:
    """The labels CSV as sorted arrays (key value -> label, line): tens of bytes a row, not a dict entry's hundreds."""

    def __init__(self, keys: np.ndarray, labels: np.ndarray, lines: np.ndarray, names: list[str], path: Path):
        self.keys, self.labels, self.lines, self.names, self.path = keys, labels, lines, names, path
        self.used = np.zeros(len(keys), dtype=bool)
        self.rows = 0  # rows of the file, repeated keys included

    @classmethod
    def read(cls, path: Path, root: Path, p: DicomParams) -> LabelRows:
        header, rows = iter_table(path, "ingest.dicom.labels")
        key_col = column(header, p.key_column or p.key, None, "ingest.dicom.key_column", path)
        label_col = column(header, p.label_column, None, "ingest.dicom.label_column", path)
        names: dict[str, int] = {}  # label -> code, in the order first seen
        keys, labels, lines = [], array("i"), array("i")
        problem = None  # a bad row ends the reading; a repeated key with another label on an earlier line wins
        n = 1
        for n, row in enumerate(rows, start=2):
            value = row[key_col]
            if not value:
                problem = MedtlError(f"{path.name} line {n} has an empty {key_col!r} cell; every label row needs a key")
                break
            if p.key == "path":
                try:
                    value = inside_root(root, value, f"{path.name} line {n}").relative_to(root).as_posix()
                except MedtlError as e:
                    problem = e
                    break
            keys.append(value.encode("utf-8"))
            labels.append(names.setdefault(row[label_col], len(names)))
            lines.append(n)
        table = cls._unique(np.array(keys, dtype=bytes), np.frombuffer(labels, np.int32), np.frombuffer(lines, np.int32),
                            list(names), path, p)
        if problem:
            raise problem
        table.rows = n - 1
        return table

    @classmethod
    def _unique(cls, keys: np.ndarray, labels: np.ndarray, lines: np.ndarray, names: list[str], path: Path,
                p: DicomParams) -> LabelRows:
        """The first row of each key; a key given two labels is refused, naming the first line that does."""
        order = np.lexsort((lines, keys))
        keys, labels, lines = keys[order], labels[order], lines[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))
        clash = np.flatnonzero(labels != labels[run_start])
        if len(clash):
            # neither paths nor UIDs are repeated in messages: they may identify a patient
            i = clash[np.argmin(lines[clash])]
            j = run_start[i]
            raise MedtlError(f"{path.name} lines {lines[j]} and {lines[i]} give the same "
                             f"{'file' if p.key == 'path' else p.key} two labels ({names[labels[j]]!r} and "
                             f"{names[labels[i]]!r})")
        return cls(keys[first], labels[first], lines[first], names, path)

    def find(self, value: str) -> int | None:
        """The row holding key `value`, or None."""
        key = value.encode("utf-8")
        if not len(self.keys) or len(key) > self.keys.dtype.itemsize:
            return None
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and self.keys[i] == key else None

    def take(self, i: int) -> tuple[str, int]:
        """Row i's label and line, the row now matched to a file."""
        self.used[i] = True
        return self.names[self.labels[i]], int(self.lines[i])

    def clear(self) -> None:
        self.keys, self.labels, self.lines, self.used = (a[:0].copy() for a in (self.keys, self.labels, self.lines, self.used))

    def unmatched(self) -> list[SourceItem]:
        """A quarantine item for every label row that matched no file, named by its line (not its key)."""
        rows = np.flatnonzero(~self.used)
        return [
            SourceItem(f"{self.path.name} line {self.lines[i]}", label=self.names[self.labels[i]], line=int(self.lines[i]),
                       problem="missing_file", detail="no file under ingest.dicom.root matches this label row")
            for i in rows[np.argsort(self.lines[rows], kind="stable")]
        ]
