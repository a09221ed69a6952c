"""Sources enumerate what ingest should decode, as `SourceItem`s.

A source names files (or, for array datasets, holds pixels) with whatever it
knows of label, group and split; decoding, pseudonymisation and splitting
happen in ingest, the same for every source.

Every thing a source sees becomes an item: a file to decode, or a problem
found while enumerating (a label row whose file is missing, an empty class
folder), which ingest quarantines with its reason.
"""
from __future__ import annotations

import errno
import importlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np

from medtl.errors import MedtlError, ParamsError


@dataclass
class SourceItem:
    relative: str  # path relative to the source root; only ever stored as its keyed hash (source_ref)
    path: Path | None = None  # file to decode; None when `pixels` is given
    label: str | None = None
    group: str | None = None  # raw group id (patient, lesion); pseudonymised in ingest
    group_kind: str | None = None  # where the group came from: column, rule, source (see Grouping in ingest)
    split: str | None = None  # a split fixed by the source, respected by ingest
    extra: dict[str, str] = field(default_factory=dict)  # explicitly requested metadata
    pixels: np.ndarray | None = None  # already-decoded image in [0, 1] (array datasets)
    sha256: str | None = None  # of the source file, when the source already knows it (array containers)
    index: str | None = None  # which image of an array container ("train/17"); not identifying
    line: int | None = None  # line of the source's CSV that names this item; not identifying
    problem: str | None = None  # quarantine reason found while enumerating (missing file, no label)
    detail: str = ""  # what the problem is, for the report: fixed words and numbers, never a path or header value
    site: str | None = None  # the named source of ingest.sources this item comes from (medtl.intake.sites)

    @property
    def ref_key(self) -> str:
        """What `source_ref` hashes: the relative path, plus the index inside an array container (and the site)."""
        key = f"{self.relative}#{self.index}" if self.index is not None else self.relative
        return key if self.site is None else f"{self.site}:{key}"


@dataclass(frozen=True)
class Resolved:
    """An item's label and group, read from its decoded header (DICOM keyed by UID), or why they cannot be."""

    label: str | None
    group: str | None
    problem: str | None = None
    detail: str = ""


@dataclass
class Source:
    items: Iterable[SourceItem]  # a list, or a generator (streamed: memory stays flat)
    classes: list[str]  # in label-index order
    description: dict  # safe, for the report and the audit trail
    cleanup: Callable[[], None] | None = None  # removes temporary files when ingest is done
    count: int | None = None  # number of items, for the progress bar, when `items` is a generator
    # Labels and groups known only from the decoded header (DICOM keyed by UID):
    # resolve(item, identity) -> Resolved; called in ingest's main process.
    resolve: Callable[[SourceItem, dict], "Resolved"] | None = None
    # Problems known only once every file is decoded (label rows that matched no file).
    unmatched: Callable[[], list[SourceItem]] | None = None
    header_group: str = "PatientID"  # the header keyword a group read from the file comes from


@dataclass(frozen=True)
class FileEntry:
    """A file found under a source root, or a link that cannot be followed (problem set)."""

    path: Path
    problem: str | None = None  # symlink_loop, dangling_symlink, link_outside_root
    detail: str = ""


# The source kinds: name -> module exposing `open_source(params, workdir) -> Source`. Each kind's params
# section is a dataclass in its module that declares the paths it reads (PATHS, OPTIONAL_PATHS), and a field
# of medtl.intake.sources.sections.SourceSections, which every params object naming a source inherits.
SOURCES = {
    "demo": "medtl.intake.sources.demo",
    "folder": "medtl.intake.sources.folder",
    "csv": "medtl.intake.sources.csv",
    "dicom": "medtl.intake.sources.dicom",
    "medmnist": "medtl.intake.sources.medmnist",
}
SourceName = Literal[tuple(SOURCES)]


def section_paths(params) -> list[tuple[str, str, bool]]:
    """(key below the params, path, required) of each path the chosen source's section declares."""
    section = getattr(params, params.source)
    kind = type(section)
    return ([(f"{params.source}.{n}", getattr(section, n), True) for n in getattr(kind, "PATHS", ())]
            + [(f"{params.source}.{n}", getattr(section, n), False) for n in getattr(kind, "OPTIONAL_PATHS", ())])


def check_source_paths(params, key: str) -> None:
    """The paths the chosen source needs are set; `params` has `source` and one section per source."""
    from medtl.params import require

    for name, value, required in section_paths(params):
        if required:
            require(bool(value), f"{key}.{name}", value, f"a path (required by source {params.source})")


def source_inputs(params) -> list[str]:
    """Files or folders the chosen source reads; the demo reads none."""
    return [value for _, value, required in section_paths(params) if required or value]


# Folder names that mean a published split, as in Training/ and Testing/.
SPLIT_NAMES = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "tst": "test",
}


def open_source(params, workdir: Path) -> Source:
    module = importlib.import_module(SOURCES[params.source])
    return module.open_source(params, workdir)


def open_source_as(params, workdir: Path, key: str, label: str | None = None) -> Source:
    """open_source for a source given under another params key than ingest's (external sets, target and extra
    images): its errors name `key` instead of `ingest`, after `label` (default: the key)."""
    try:
        return open_source(params, workdir)
    except MedtlError as e:
        error = ParamsError if isinstance(e, ParamsError) else MedtlError
        raise error(f"{label or key}: " + str(e).replace("ingest.", f"{key}.")) from None


def walk_files(root: Path, skip: Iterable[Path] = (), within: Path | None = None,
               hidden: Counter | None = None) -> Iterator[FileEntry]:
    """Every regular file under root, in a stable order, hidden files skipped, links followed inside root.

    A link that loops, dangles or leads outside root is yielded with a problem
    instead of being read, so it is quarantined and counted, never silently
    skipped or fatal. `within` (default: root) is the data root links may not leave.
    Hidden files and folders (".DS_Store", ".git") are not read; each is counted in `hidden["hidden_file"]`.
    """
    skip = {Path(p).resolve() for p in skip}
    real_root = (within or root).resolve()

    def visit(folder: Path, seen: frozenset) -> Iterator[FileEntry]:
        try:
            names = _sorted_names(folder, hidden)
        except OSError as e:
            yield FileEntry(folder, "unreadable_folder", f"the folder cannot be listed ({e.strerror or type(e).__name__})")
            return
        for name in names:
            p = folder / name
            if p.is_symlink():
                try:
                    real = p.resolve(strict=True)
                except FileNotFoundError:
                    yield FileEntry(p, "dangling_symlink", "symbolic link to nothing")
                    continue
                except (RuntimeError, OSError) as e:  # RuntimeError: Python's "Symlink loop"
                    if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
                        yield FileEntry(p, "symlink_loop", "symbolic link that leads back to itself")
                    else:
                        yield FileEntry(p, "dangling_symlink", f"symbolic link that cannot be followed ({e.strerror or type(e).__name__})")
                    continue
                if not real.is_relative_to(real_root):
                    yield FileEntry(p, "link_outside_root", "symbolic link to a file outside the data root")
                    continue
            else:
                real = p.resolve()
            if real in skip:
                continue
            if real.is_dir():
                if real in seen:
                    yield FileEntry(p, "symlink_loop", "symbolic link to a folder that contains it")
                    continue
                yield from visit(p, seen | {real})
            elif real.is_file():
                yield FileEntry(p)

    yield from visit(root, frozenset({root.resolve()}))


def _sorted_names(folder: Path, hidden: Counter | None = None) -> Iterator[str]:
    """The visible names in a folder, sorted; held as one string while the walk is inside the folder.

    A folder may hold tens of thousands of files or patients: one string costs
    a few bytes a name where a list of strings costs some seventy.
    """
    names = os.listdir(folder)
    if hidden is not None:
        hidden["hidden_file"] += sum(n.startswith(".") for n in names)
    joined = "\0".join(sorted(n for n in names if not n.startswith(".")))  # no name holds NUL
    start = 0
    while start < len(joined):
        end = joined.find("\0", start)
        end = len(joined) if end < 0 else end
        yield joined[start:end]
        start = end + 1


def iter_files(root: Path, skip: Iterable[Path] = ()) -> Iterator[Path]:
    """The readable files of `walk_files`; a link outside root is an error, loops and dangling links are skipped."""
    for entry in walk_files(root, skip):
        if entry.problem == "link_outside_root":
            raise MedtlError(f"{entry.path} is a link to a file outside {root}; copy the file into the folder instead")
        if entry.problem is None:
            yield entry.path


def entry_item(entry: FileEntry, root: Path, **fields) -> "SourceItem":
    """A SourceItem for a walked file, carrying the entry's problem if it has one."""
    item = SourceItem(entry.path.relative_to(root).as_posix(), path=None if entry.problem else entry.path, **fields)
    if entry.problem:
        item.problem, item.detail = entry.problem, entry.detail
    return item


def inside_root(root: Path, relative: str, what: str) -> Path:
    """root / relative, refusing absolute paths, '..' and symlinks that leave root."""
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise MedtlError(f"{what}: the path is absolute; expected a path relative to the data root {root}")
    full = root / rel
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except (RuntimeError, OSError):  # a symlink loop: left to the reader, which quarantines it
        inside = True
    if not inside:
        raise MedtlError(f"{what}: the path leads outside the data root {root} "
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


def compile_group_rule(rule: str | None, key: str):
    """A group rule: a regex with a named group `group`, searched in each file's relative path."""
    from medtl.errors import ParamsError

    if rule is None:
        return None
    try:
        pattern = re.compile(rule)
    except re.error as e:
        raise ParamsError(f"params key '{key}' has value {rule!r}, which is not a regular expression ({e}); "
                          r"expected e.g. 'person(?P<group>\d+)_'") from None
    if "group" not in pattern.groupindex:
        raise ParamsError(f"params key '{key}' has value {rule!r}; expected a regular expression with a named group "
                          r"`group`, e.g. 'person(?P<group>\d+)_'")
    return pattern


def apply_group_rule(pattern, item: SourceItem) -> None:
    """Set the item's group from its relative path; no match is a quarantine reason (the rule is meant to cover every file)."""
    if pattern is None or item.problem:
        return
    match = pattern.search(item.relative)
    if match is None or not match.group("group"):
        item.problem, item.detail = "no_group", "the group rule does not match this file's path"
        return
    item.group, item.group_kind = match.group("group"), "rule"
