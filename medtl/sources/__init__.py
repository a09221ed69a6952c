"""Sources enumerate what ingest should decode, as `SourceItem`s.

A source names files (or, for array datasets, holds pixels) with whatever it
knows of label, group and split; decoding, pseudonymisation and splitting
happen in ingest, the same for every source.

Every thing a source sees becomes an item: a file to decode, or a problem
found while enumerating (a label row whose file is missing, an empty class
folder), which ingest quarantines with its reason.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from medtl.errors import MedtlError


@dataclass
class SourceItem:
    source_path: str  # as recorded in the manifest (relative to the source root)
    path: Path | None = None  # file to decode; None when `pixels` is given
    label: str | None = None
    group: str | None = None  # raw group id (patient, lesion); pseudonymised in ingest
    split: str | None = None  # a split fixed by the source, respected by ingest
    extra: dict[str, str] = field(default_factory=dict)  # explicitly requested metadata
    pixels: np.ndarray | None = None  # already-decoded image in [0, 1] (array datasets)
    sha256: str | None = None  # of the source file, when the source already knows it (array containers)
    problem: str | None = None  # quarantine reason found while enumerating (missing file, no label)
    detail: str = ""  # what the problem is, for the report


@dataclass
class Source:
    items: Iterable[SourceItem]  # a list, or a generator (streamed: memory stays flat)
    classes: list[str]  # in label-index order
    description: dict  # safe, for the report and the audit trail
    cleanup: Callable[[], None] | None = None  # removes temporary files when ingest is done
    count: int | None = None  # number of items, for the progress bar, when `items` is a generator
    # Labels and groups known only from the decoded header (DICOM keyed by UID):
    # resolve(item, identity) -> (label, group, problem, detail); called in ingest's main process.
    resolve: Callable[[SourceItem, dict], tuple[str | None, str | None, str | None, str]] | None = None
    # Problems known only once every file is decoded (label rows that matched no file).
    unmatched: Callable[[], list[SourceItem]] | None = None


# name -> module exposing `open_source(params: IngestParams, workdir: Path) -> Source`
SOURCES = {
    "demo": "medtl.sources.demo",
    "folder": "medtl.sources.folder",
    "csv": "medtl.sources.csv",
    "dicom": "medtl.sources.dicom",
    "medmnist": "medtl.sources.medmnist",
}

# Folder names that mean a published split, as in Training/ and Testing/.
SPLIT_NAMES = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "tst": "test",
}


def open_source(params, workdir: Path) -> Source:
    module = importlib.import_module(SOURCES[params.source])
    return module.open_source(params, workdir)


def iter_files(root: Path, skip: Iterable[Path] = ()) -> Iterator[Path]:
    """Every regular file under root, in a stable order, hidden files skipped.

    A symlink that leads outside root is an error, so a source never reads
    files it was not pointed at.
    """
    skip = {Path(p).resolve() for p in skip}
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            real = p.resolve()
            if real in skip:
                continue
            if not real.is_relative_to(real_root):
                raise MedtlError(f"{p} is a link to {real}, outside the data root {root}; "
                                 "copy the file into the root or point the source at a folder that holds it")
            if real.is_file():
                yield p


def inside_root(root: Path, relative: str, what: str) -> Path:
    """root / relative, refusing absolute paths, '..' and symlinks that leave root."""
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise MedtlError(f"{what}: path {relative!r} is absolute; expected a path relative to the data root {root}")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise MedtlError(f"{what}: path {relative!r} leads outside the data root {root} "
                         "(through '..' or a symbolic link); every image must lie inside the root")
    return full


def existing_dir(value: str, key: str) -> Path:
    if not value:
        raise MedtlError(f"params key '{key}' is empty; expected the folder that holds your images")
    p = Path(value)
    if not p.is_dir():
        raise MedtlError(f"params key '{key}' is {value!r}, which is not a folder; expected the folder that holds your images")
    return p


def existing_file(value: str, key: str, what: str) -> Path:
    if not value:
        raise MedtlError(f"params key '{key}' is empty; expected {what}")
    p = Path(value)
    if not p.is_file():
        raise MedtlError(f"params key '{key}' is {value!r}, which is not a file; expected {what}")
    return p


def split_name(name: str) -> str | None:
    """'Training' -> 'train', 'Testing' -> 'test'; None for anything else."""
    return SPLIT_NAMES.get(name.strip().lower())


def class_order(found: Iterable[str], declared: list[str]) -> list[str]:
    """The declared classes (ingest.classes), or the labels found, sorted."""
    return list(declared) if declared else sorted(set(found))
