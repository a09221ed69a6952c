"""sha256 of files and folders, and the md5 DVC records in dvc.lock.

A folder is described by a manifest of its files' sha256 plus one combined
digest over that manifest, so a changed byte can be traced to one file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medtl.errors import MedtlError

_CHUNK = 1 << 20
# An empty file that keeps an otherwise empty output folder in git; .dvcignore hides it from DVC, so it is
# left out here too (a folder's md5 must be the one dvc.lock records).
PLACEHOLDER = ".medtl-empty"


def file_digests(path: str | Path) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file in one read; md5 is what DVC stores in dvc.lock."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise MedtlError(f"cannot read {path}: {e.strerror or e}") from e
    return sha.hexdigest(), md5.hexdigest(), size


def tree_files(root: str | Path) -> list[str]:
    """Relative posix paths of every regular file under root, sorted (the order DVC uses)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # DVC never descends into these; matching it keeps the folder md5 comparable
        dirnames[:] = [d for d in dirnames if d not in (".git", ".dvc")]
        for name in filenames:
            if name == PLACEHOLDER:
                continue
            p = Path(dirpath, name)
            if p.is_file():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 over a folder manifest: `<sha256>  <relpath>` lines in path order."""
    text = "".join(f"{files[rel]}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dvc_dir_md5(md5s: dict[str, str]) -> str:
    """The `.dir` md5 DVC 3 writes for a folder output, from each file's md5."""
    listing = sorted(({"md5": m, "relpath": rel} for rel, m in md5s.items()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest() + ".dir"


def describe(path: str | Path, name: str | None = None, with_md5: bool = False, list_files: bool = True) -> dict:
    """Hash a file or folder into a JSON-ready description.

    file:   {path, type: file, sha256, size[, md5]}
    folder: {path, type: dir, sha256 (combined), size, nfiles, files: {relpath: sha256}[, md5]}

    list_files=False leaves out `files`: for source data, whose file and folder
    names may carry patient names or record numbers.
    """
    p = Path(path)
    name = name if name is not None else Path(path).as_posix()
    if p.is_file():
        sha, md5, size = file_digests(p)
        d = {"path": name, "type": "file", "sha256": sha, "size": size}
        if with_md5:
            d["md5"] = md5
        return d
    if p.is_dir():
        files, md5s, total = {}, {}, 0
        for rel in tree_files(p):
            sha, md5, size = file_digests(p / rel)
            files[rel], md5s[rel] = sha, md5
            total += size
        d = {"path": name, "type": "dir", "sha256": combined_digest(files), "size": total, "nfiles": len(files)}
        if with_md5:
            d["md5"] = dvc_dir_md5(md5s)
        if list_files:
            d["files"] = files
        return d
    raise MedtlError(f"cannot hash {path}: no such file or folder")
