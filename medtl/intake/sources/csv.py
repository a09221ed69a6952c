"""A CSV manifest: one row per image with its path and label, optionally group, split and metadata.

Paths are relative to a data root (default: the manifest's folder) and must
stay inside it. Instead of a path column, `path_template` builds the path from
other columns, e.g. "{dx}/{image_id}.jpg" for HAM10000's metadata file.

Groups come from `group_column` (a patient or lesion id, pseudonymised by
ingest) or from `group_rule`, a regex with a named group `group` over the
path. Metadata columns whose names look identifying (`medtl/intake/identifier_words.txt`)
or whose values do (mostly distinct, dates, phone numbers, e-mail addresses,
long digit runs) are refused unless listed in `allow_columns` as well, and
each allowed column is recorded with what flagged it; paths and cells are
never repeated in messages, which name the manifest line instead.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

from medtl.errors import MedtlError, ParamsError
from medtl.intake.phi import ColumnProfile, check_metadata_columns, identifying_token
from medtl.intake.sources import (
    Source, SourceItem, apply_group_rule, compile_group_rule, existing_file, inside_root, split_name,
)
from medtl.params import require


@dataclass(frozen=True)
class CsvParams:
    # Files and folders it reads (each a dvc-tracked input), required and optional.
    PATHS: ClassVar[tuple[str, ...]] = ("manifest",)
    OPTIONAL_PATHS: ClassVar[tuple[str, ...]] = ("root",)

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


def check_column_values(profiles: dict[str, ColumnProfile], allowed: list[str], where: str) -> dict[str, str]:
    """Refuse a metadata column whose values look identifying unless allowed; say why each allowed column was flagged."""
    out = {}
    for name, profile in profiles.items():
        token = identifying_token(name)
        finding = profile.finding(where)
        if finding and name not in allowed:
            raise ParamsError(
                f"metadata column {name!r} (params key 'ingest.csv.metadata') looks identifying: "
                f"{finding}; it is not copied into artifacts. Remove it, or if you have checked that it holds no "
                "identifier, list it under ingest.csv.allow_columns as well (report.json then records it under "
                "allowed_columns with this finding)")
        if name in allowed:
            found = [f"name: the word {token!r}"] if token else []
            found += [f"values: {finding}"] if finding else []
            out[name] = "; ".join(found) or "nothing looked identifying"
    return out


def open_source(params, workdir: Path) -> Source:
    p = params.csv
    manifest = existing_file(p.manifest, "ingest.csv.manifest", "a CSV file with a path and a label column")
    root = Path(p.root) if p.root else manifest.parent
    if not root.is_dir():
        raise MedtlError(f"params key 'ingest.csv.root' is {p.root!r}, which is not a folder; expected the folder the manifest's paths are relative to")
    rows = ManifestRows.check(manifest, root, p)
    description = {"source": "csv", "manifest": manifest.name, "rows": rows.count, "group_rule": p.group_rule,
                   "allowed_columns": rows.allowed}
    return Source(items=rows.items(), classes=[], description=description, count=rows.count)


@dataclass
class ManifestRows:
    """The manifest's columns and rules, checked on every row before any work; items made from it one row at a time.

    The file is read twice, once to check every row and once to yield the
    items, so that a bad row still stops ingest before any decoding and no row
    is held in memory (a list of items costs about 1 KB a row).
    """

    manifest: Path
    root: Path
    p: CsvParams
    header: list[str]
    path_col: str | None
    label_col: str
    group_col: str | None
    split_col: str | None
    rule: re.Pattern | None
    count: int = 0  # rows, the header not counted
    allowed: dict = field(default_factory=dict)  # metadata column kept by allow_columns -> why it was flagged

    @classmethod
    def check(cls, manifest: Path, root: Path, p: CsvParams) -> ManifestRows:
        """Refuse a bad column, an identifying metadata column or a bad row; count the rows.

        The whole file is read even after a problem, so that a file which is
        not UTF-8 is reported as such first, whatever else is wrong with it.
        """
        header, rows = iter_table(manifest, "ingest.csv.manifest")
        problem, table = None, None
        try:
            table = cls.of(manifest, root, p, header)
        except MedtlError as e:
            problem = e
        n = 1
        profiles = {c: ColumnProfile() for c in p.metadata if c in header}
        for n, row in enumerate(rows, start=2):  # line 1 is the header
            if problem is None:
                try:
                    table.fields(row, n)
                except MedtlError as e:
                    problem = e
                for c, profile in profiles.items():
                    profile.add(row[c], n)
        if problem is not None:
            raise problem
        if n == 1:
            raise MedtlError(f"ingest.csv.manifest {manifest} has no rows; expected one row per image")
        table.count = n - 1
        table.allowed = check_column_values(profiles, p.allow_columns, manifest.name)
        return table

    @classmethod
    def of(cls, manifest: Path, root: Path, p: CsvParams, header: list[str]) -> ManifestRows:
        key = "ingest.csv"
        path_col = None if p.path_template else column(header, p.path_column, None, f"{key}.path_column", manifest)
        label_col = column(header, p.label_column, None, f"{key}.label_column", manifest)
        group_col = None if p.group_rule else column(header, p.group_column, "group", f"{key}.group_column", manifest)
        split_col = column(header, p.split_column, "split", f"{key}.split_column", manifest)
        for name in p.metadata:
            column(header, name, None, f"{key}.metadata", manifest)
        check_metadata_columns(p.metadata, p.allow_columns)  # refuses identifying column names before any work
        rule = compile_group_rule(p.group_rule, f"{key}.group_rule")
        return cls(manifest, root, p, header, path_col, label_col, group_col, split_col, rule)

    def items(self) -> Iterator[SourceItem]:
        """One item per row, in the manifest's order."""
        _, rows = iter_table(self.manifest, "ingest.csv.manifest")
        for n, row in enumerate(rows, start=2):
            yield self.item(row, n)

    def where(self, n: int) -> str:
        return f"{self.manifest.name} line {n}"

    def relative(self, row: dict, n: int) -> str:
        """The row's path as written (or filled into path_template)."""
        template = self.p.path_template
        if not template:
            return row[self.path_col]
        try:
            return template.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            missing = f"column {e} is missing" if isinstance(e, KeyError) else type(e).__name__
            raise MedtlError(f"ingest.csv.path_template {template!r} cannot be filled from {self.where(n)} ({missing}); "
                             f"the manifest's columns are {', '.join(self.header)}") from None

    def fields(self, row: dict, n: int) -> tuple[str, str | None, Path | None]:
        """The row's path as written, its split, and the file inside the root it names (None for an empty cell)."""
        rel = self.relative(row, n)
        split = None
        if self.split_col and row[self.split_col]:
            split = split_name(row[self.split_col])
            if split is None:
                raise MedtlError(f"{self.where(n)}: the value in column {self.split_col!r} is not a split name; "
                                 "expected train, val or test (or training, validation, testing), or an empty cell")
        return rel, split, inside_root(self.root, rel, self.where(n)) if rel else None

    def item(self, row: dict, n: int) -> SourceItem:
        rel, split, full = self.fields(row, n)
        extra = {c: row[c] for c in self.p.metadata}
        group = (row[self.group_col] or None) if self.group_col else None
        item = SourceItem(rel, label=row[self.label_col], group=group, group_kind="column" if group else None,
                          split=split, extra=extra, line=n)
        if full is None:
            item.relative, item.problem, item.detail = self.where(n), "missing_file", "empty path"
            return item
        item.relative = full.relative_to(self.root).as_posix()
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
        apply_group_rule(self.rule, item)
        return item
