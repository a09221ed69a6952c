"""A folder of images, one subfolder per class (nested folders allowed inside a class).

    root/<class>/**/<image>               layout: classes
    root/<split>/<class>/**/<image>       layout: splits (Training/, Testing/, val/ ...)

`layout: auto` takes the second form when every top-level folder is a split
name. Each image is its own group unless the images carry a patient id in
their header (DICOM PatientID); use a csv source to give groups explicitly.
"""
from __future__ import annotations

from pathlib import Path

from medtl.errors import MedtlError
from medtl.sources import SPLIT_NAMES, Source, SourceItem, existing_dir, iter_files, split_name


def open_source(params, workdir: Path) -> Source:
    p = params.folder
    root = existing_dir(p.root, "ingest.folder.root")
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise MedtlError(f"ingest.folder.root {root} has no subfolders; expected one subfolder per class "
                         "(or per split, each holding one subfolder per class)")
    items: list[SourceItem] = []
    classes: set[str] = set()
    layout = p.layout
    if layout == "auto":
        layout = "splits" if all(split_name(d.name) for d in top) else "classes"
    if layout == "splits":
        bad = [d.name for d in top if not split_name(d.name)]
        if bad:
            raise MedtlError(f"ingest.folder.layout is 'splits' but {root} has top-level folder(s) "
                             f"{', '.join(bad)} that are not split names (expected one of {', '.join(sorted(SPLIT_NAMES))})")
        pairs = [(split_name(d.name), d) for d in top]
        for f in sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")):
            items.append(SourceItem(f.name, path=f, problem="no_label", detail="file is not inside a split/class folder"))
    else:
        pairs = [(None, root)]

    for split, base in pairs:
        class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = sorted(f for f in base.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in loose:  # an image beside the class folders has no label
            items.append(SourceItem(f.relative_to(root).as_posix(), path=f, split=split, problem="no_label",
                                    detail="file is not inside a class folder"))
        for d in class_dirs:
            classes.add(d.name)
            files = list(iter_files(d))
            if not files:
                items.append(SourceItem(d.relative_to(root).as_posix() + "/", split=split, problem="empty_class_folder",
                                        detail=f"class folder {d.name} holds no files"))
            for f in files:
                items.append(SourceItem(f.relative_to(root).as_posix(), path=f, label=d.name, split=split))
    return Source(
        items=items,
        classes=sorted(classes),
        description={"source": "folder", "layout": layout, "files": sum(i.path is not None for i in items)},
    )
