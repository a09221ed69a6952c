"""Sources enumerate what ingest should decode, as `SourceItem`s.

A source names files (or, for array datasets, holds pixels) with whatever it
knows of label, group and split; decoding, pseudonymisation and splitting
happen in ingest, the same for every source.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


@dataclass
class SourceItem:
    source_path: str  # as recorded in the manifest (relative to the source root)
    path: Path | None = None  # file to decode; None when `pixels` is given
    label: str | None = None
    group: str | None = None  # raw group id (patient, lesion); pseudonymised in ingest
    split: str | None = None  # a split fixed by the source, respected by ingest
    extra: dict[str, str] = field(default_factory=dict)  # explicitly requested metadata
    pixels: np.ndarray | None = None  # already-decoded images (array datasets)
    problem: str | None = None  # quarantine reason found while enumerating (missing file, no label)


@dataclass
class Source:
    items: list[SourceItem]
    classes: list[str]  # in label-index order
    description: dict  # safe, for the report and the audit trail
    cleanup: Callable[[], None] | None = None  # removes temporary files when ingest is done


# name -> module exposing `open_source(params: IngestParams, workdir: Path) -> Source`
SOURCES = {
    "demo": "medtl.sources.demo",
}


def open_source(params, workdir: Path) -> Source:
    module = importlib.import_module(SOURCES[params.source])
    return module.open_source(params, workdir)


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under root, in a stable order, hidden files skipped."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p
