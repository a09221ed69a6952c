"""A folder of images, one subfolder per class (nested folders allowed inside a class).

    root/<class>/**/<image>               layout: classes
    root/<split>/<class>/**/<image>       layout: splits (Training/, Testing/, val/ ...)

`layout: auto` takes the second form when every top-level folder is a split
name. Each image is its own group unless the images carry a patient id in
their header (DICOM PatientID) or `group_rule` finds one in the file's path,
e.g. `person(?P<group>\\d+)_` for Kermany's `person123_bacteria_456.jpeg`.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

from medtl.errors import MedtlError
from medtl.intake.sources import (
    SPLIT_NAMES, Source, SourceItem, apply_group_rule, compile_group_rule, entry_item, existing_dir, split_name,
    walk_files,
)


@dataclass(frozen=True)
class FolderParams:
    # Files and folders it reads (each a dvc-tracked input), required and optional.
    PATHS: ClassVar[tuple[str, ...]] = ("root",)

    root: str = ""  # one subfolder per class, or per split (Training/, Testing/) each with one per class
    layout: Literal["auto", "classes", "splits"] = "auto"
    group_rule: str | None = None  # regex with a named group `group` over the relative path; null: no rule

    def check(self, key: str) -> None:
        compile_group_rule(self.group_rule, f"{key}.group_rule")


def open_source(params, workdir: Path) -> Source:
    p: FolderParams = params.folder
    root = existing_dir(p.root, "ingest.folder.root")
    rule = compile_group_rule(p.group_rule, "ingest.folder.group_rule")
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise MedtlError(f"ingest.folder.root {root} has no subfolders; expected one subfolder per class "
                         "(or per split, each holding one subfolder per class)")
    layout = p.layout
    if layout == "auto":
        layout = "splits" if all(split_name(d.name) for d in top) else "classes"
    if layout == "splits":
        bad = [d.name for d in top if not split_name(d.name)]
        if bad:  # folder names are not repeated: they may be patient folders of a wrongly chosen root
            raise MedtlError(f"ingest.folder.layout is 'splits' but {len(bad)} top-level folder(s) of ingest.folder.root "
                             f"are not split names (expected one of {', '.join(sorted(SPLIT_NAMES))})")
        pairs = [(split_name(d.name), d) for d in top]
    else:
        pairs = [(None, root)]
    class_dirs = {base: sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
                  for _, base in pairs}
    description = {"source": "folder", "layout": layout, "files": 0, "group_rule": p.group_rule, "hidden_files": 0}
    hidden = Counter()  # hidden files and folders are not read, but counted

    def items() -> Iterator[SourceItem]:  # streamed: one file at a time, however many there are
        for item in _items(root, layout, pairs, class_dirs, rule, hidden):
            description["files"] += item.path is not None
            description["hidden_files"] = hidden["hidden_file"]
            yield item
        description["hidden_files"] = hidden["hidden_file"]

    return Source(
        items=items(),
        classes=sorted({d.name for dirs in class_dirs.values() for d in dirs}),
        description=description,
    )


def _items(root: Path, layout: str, pairs: list, class_dirs: dict, rule, hidden: Counter) -> Iterator[SourceItem]:
    hidden["hidden_file"] += sum(n.startswith(".") for n in os.listdir(root))
    if layout == "splits":
        for f in sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")):
            yield SourceItem(f.name, path=f, problem="no_label", detail="file is not inside a split/class folder")
    for split, base in pairs:
        if base != root:
            hidden["hidden_file"] += sum(n.startswith(".") for n in os.listdir(base))
        loose = sorted(f for f in base.iterdir() if not f.is_dir() and not f.name.startswith("."))
        for f in loose:  # an image beside the class folders has no label
            yield SourceItem(f.relative_to(root).as_posix(), path=f, split=split, problem="no_label",
                             detail="file is not inside a class folder")
        for d in class_dirs[base]:
            empty = True
            for entry in walk_files(d, within=root, hidden=hidden):
                item = entry_item(entry, root, label=d.name, split=split)
                apply_group_rule(rule, item)
                empty = False
                yield item
            if empty:
                yield SourceItem(d.relative_to(root).as_posix() + "/", split=split, problem="empty_class_folder",
                                 detail="class folder holds no files")
