"""A CSV manifest: one row per image with its path and label, optionally group, split and metadata.

Paths are relative to a data root (default: the manifest's folder) and must
stay inside it. Instead of a path column, `path_template` builds the path from
other columns, e.g. "{dx}/{image_id}.jpg" for HAM10000's metadata file.

Groups come from `group_column` (a patient or lesion id, pseudonymised by
ingest) or from `group_rule`, a regex with a named group `group` over the
path. Metadata columns whose names look identifying are refused unless listed
in `allow_columns` as well; paths and cells are never repeated in messages,
which name the manifest line instead.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medtl.errors import MedtlError
from medtl.params import require
from medtl.phi import check_metadata_columns
from medtl.sources import (
    Source, SourceItem, apply_group_rule, compile_group_rule, existing_file, inside_root, split_name,
)


@dataclass(frozen=True)
class CsvParams:
    manifest: str = ""  # CSV file, one row per image
    root: str = ""  # folder the paths are relative to; default: the manifest's folder
    path_column: str = "path"
    path_template: str | None = None  # instead of path_column, e.g. "{dx}/{image_id}.jpg"
    label_column: str = "label"
    group_column: str | None = None  # default: a column named "group" if there is one
    group_rule: str | None = None  # instead of a group column: regex with a named group `group` over the path
    split_column: str | None = None  # default: a column named "split" if there is one
    metadata: list[str] = field(default_factory=list)  # extra columns copied into the manifest
    allow_columns: list[str] = field(default_factory=list)  # metadata columns kept although their names look identifying

    def check(self, key: str) -> None:
        compile_group_rule(self.group_rule, f"{key}.group_rule")
        require(not (self.group_rule and self.group_column), f"{key}.group_rule", self.group_rule,
                f"null when group_column is set ({self.group_column!r}): groups come from one or the other")
        stray = [c for c in self.allow_columns if c not in self.metadata]
        require(not stray, f"{key}.allow_columns", self.allow_columns,
                "columns that are also listed in ingest.csv.metadata")
        check_metadata_columns(self.metadata, self.allow_columns, f"{key}.metadata")


def read_table(path: Path, what: str) -> tuple[list[str], list[dict]]:
    header, rows = iter_table(path, what)
    return header, list(rows)


def iter_table(path: Path, what: str) -> tuple[list[str], Iterator[dict]]:
    """The header, and the rows one at a time (cells stripped), for tables too long to hold as dicts."""
    def rows(f, reader) -> Iterator[dict]:
        with f:
            try:
                for r in reader:
                    yield {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise MedtlError(f"{what} {path} cannot be read as a UTF-8 CSV file: {e}") from None

    f = None
    try:
        f = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        if f is not None:
            f.close()
        raise MedtlError(f"{what} {path} cannot be read as a UTF-8 CSV file: {e}") from None
    return header, rows(f, reader)


def column(header: list[str], name: str | None, default: str | None, key: str, path: Path) -> str | None:
    """The column to use: `name` (which must exist), else `default` when present, else None."""
    if name:
        if name not in header:
            raise MedtlError(f"params key '{key}' names column {name!r}, which {path} does not have; "
                             f"its columns are {', '.join(header)}")
        return name
    return default if default in header else None


def open_source(params, workdir: Path) -> Source:
    p = params.csv
    manifest = existing_file(p.manifest, "ingest.csv.manifest", "a CSV file with a path and a label column")
    root = Path(p.root) if p.root else manifest.parent
    if not root.is_dir():
        raise MedtlError(f"params key 'ingest.csv.root' is {p.root!r}, which is not a folder; expected the folder the manifest's paths are relative to")
    header, rows = read_table(manifest, "ingest.csv.manifest")
    key = "ingest.csv"
    path_col = None if p.path_template else column(header, p.path_column, None, f"{key}.path_column", manifest)
    label_col = column(header, p.label_column, None, f"{key}.label_column", manifest)
    group_col = None if p.group_rule else column(header, p.group_column, "group", f"{key}.group_column", manifest)
    split_col = column(header, p.split_column, "split", f"{key}.split_column", manifest)
    for name in p.metadata:
        column(header, name, None, f"{key}.metadata", manifest)
    check_metadata_columns(p.metadata, p.allow_columns)  # refuses identifying column names before any work
    rule = compile_group_rule(p.group_rule, f"{key}.group_rule")

    items = []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest.name} line {n}"
        if p.path_template:
            try:
                rel = p.path_template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                missing = f"column {e} is missing" if isinstance(e, KeyError) else type(e).__name__
                raise MedtlError(f"ingest.csv.path_template {p.path_template!r} cannot be filled from {where} ({missing}); "
                                 f"the manifest's columns are {', '.join(header)}") from None
        else:
            rel = row[path_col]
        split = None
        if split_col and row[split_col]:
            split = split_name(row[split_col])
            if split is None:
                raise MedtlError(f"{where}: the value in column {split_col!r} is not a split name; "
                                 "expected train, val or test (or training, validation, testing), or an empty cell")
        extra = {c: row[c] for c in p.metadata}
        group = (row[group_col] or None) if group_col else None
        item = SourceItem(rel, label=row[label_col], group=group, group_kind="column" if group else None,
                          split=split, extra=extra, line=n)
        if not rel:
            item.relative, item.problem, item.detail = where, "missing_file", "empty path"
        else:
            full = inside_root(root, rel, where)
            item.relative = full.relative_to(root).as_posix()
            if full.is_file():
                item.path = full
            elif full.is_symlink():
                try:
                    full.resolve(strict=True)
                    item.problem, item.detail = "missing_file", "the manifest names something that is not a file"
                except FileNotFoundError:
                    item.problem, item.detail = "dangling_symlink", "symbolic link to nothing"
                except (RuntimeError, OSError):
                    item.problem, item.detail = "symlink_loop", "symbolic link that leads back to itself"
            else:
                item.problem, item.detail = "missing_file", "the manifest names a file that does not exist"
            apply_group_rule(rule, item)
        items.append(item)
    if not items:
        raise MedtlError(f"ingest.csv.manifest {manifest} has no rows; expected one row per image")
    return Source(items=items, classes=[], description={"source": "csv", "manifest": manifest.name, "rows": len(items),
                                                       "group_rule": p.group_rule})
