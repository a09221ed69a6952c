"""A CSV manifest: one row per image with its path and label, optionally group, split and metadata.

Paths are relative to a data root (default: the manifest's folder) and must
stay inside it. Instead of a path column, `path_template` builds the path from
other columns, e.g. "{dx}/{image_id}.jpg" for HAM10000's metadata file.
"""
from __future__ import annotations

import csv
from pathlib import Path

from medtl.errors import MedtlError
from medtl.phi import filter_metadata
from medtl.sources import Source, SourceItem, existing_file, inside_root, split_name


def read_table(path: Path, what: str) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MedtlError(f"{what} {path} cannot be read as a UTF-8 CSV file: {e}") from None
    rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in rows]
    return header, rows


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
    group_col = column(header, p.group_column, "group", f"{key}.group_column", manifest)
    split_col = column(header, p.split_column, "split", f"{key}.split_column", manifest)
    for name in p.metadata:
        column(header, name, None, f"{key}.metadata", manifest)
    filter_metadata({}, p.metadata)  # refuses identifying column names before any work

    items = []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest.name} line {n}"
        if p.path_template:
            try:
                rel = p.path_template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise MedtlError(f"ingest.csv.path_template {p.path_template!r} cannot be filled from {where}: {e}; "
                                 f"the manifest's columns are {', '.join(header)}") from None
        else:
            rel = row[path_col]
        split = None
        if split_col and row[split_col]:
            split = split_name(row[split_col])
            if split is None:
                raise MedtlError(f"{where}: split {row[split_col]!r} in column {split_col!r} is not a split name; "
                                 "expected train, val or test (or training, validation, testing), or an empty cell")
        extra = {c: row[c] for c in p.metadata}
        item = SourceItem(rel, label=row[label_col], group=(row[group_col] or None) if group_col else None,
                          split=split, extra=extra)
        if not rel:
            item.source_path, item.problem, item.detail = where, "missing_file", "empty path"
        else:
            full = inside_root(root, rel, where)
            item.source_path = full.relative_to(root).as_posix()
            if full.is_file():
                item.path = full
            else:
                item.problem, item.detail = "missing_file", f"{where} names a file that does not exist"
        items.append(item)
    if not items:
        raise MedtlError(f"ingest.csv.manifest {manifest} has no rows; expected one row per image")
    return Source(items=items, classes=[], description={"source": "csv", "manifest": manifest.name, "rows": len(items)})
