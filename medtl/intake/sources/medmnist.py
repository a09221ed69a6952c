"""A MedMNIST .npz file (train/val/test images and labels) with its official splits.

With `url` and `md5`, a missing file is downloaded first (`fetch`, run by the
stage before its provenance record opens, so the record hashes the file that
was read). Images are streamed one split at a time, so only one split's array
is in memory. Every row's sha256 is the .npz file's (so `medtl verify` can
re-hash it) and `npz_index` says which image (`train/17`). MedMNIST carries no
patient ids, so each image is its own group.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np

from medtl.errors import MedtlError
from medtl.intake.sources import Source, SourceItem
from medtl.io import sha256_file
from medtl.params import require

SPLIT_KEYS = ("train", "val", "test")


@dataclass(frozen=True)
class MedmnistParams:
    # Files and folders it reads (each a dvc-tracked input), required and optional.
    PATHS: ClassVar[tuple[str, ...]] = ("path",)

    path: str = ""  # e.g. data/raw/pneumoniamnist.npz
    url: str = ""  # downloaded to `path` when it is missing
    md5: str = ""  # checked after a download

    def check(self, key: str) -> None:
        require(not self.md5 or re.fullmatch(r"[0-9a-fA-F]{32}", self.md5) is not None, f"{key}.md5", self.md5,
                "32 hexadecimal digits")
        require(not self.url or bool(self.md5), f"{key}.md5", self.md5, "the file's md5 whenever url is set")
_CHUNK = 1 << 20


def fetch(path: Path, url: str, md5: str, timeout: float = 60.0) -> None:
    """Download `url` to `path` unless it exists; check its md5; write atomically."""
    if path.is_file():
        return
    if not url:
        raise MedtlError(f"params key 'ingest.medmnist.path' is {str(path)!r}, which does not exist; "
                         "expected a MedMNIST .npz file, or set ingest.medmnist.url (and md5) to download it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if md5 and digest.hexdigest() != md5.lower():
            raise MedtlError(f"the file downloaded from ingest.medmnist.url {url} has md5 {digest.hexdigest()}, "
                             f"not ingest.medmnist.md5 {md5}; it was not kept (wrong URL, or a changed file)")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MedtlError(f"cannot download ingest.medmnist.url {url} to {path}: {getattr(e, 'reason', e)}; "
                         "on a machine without internet, copy the .npz file to ingest.medmnist.path instead") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(npz, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise MedtlError(f"{path}: array {key!r} cannot be read ({e}); the file is damaged, download it again") from None


def open_source(params, workdir: Path) -> Source:
    p = params.medmnist
    path = Path(p.path)
    fetch(path, p.url, p.md5)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MedtlError(f"ingest.medmnist.path {path} is not a readable .npz file: {e}") from None
    missing = [f"{s}_{kind}" for s in SPLIT_KEYS for kind in ("images", "labels") if f"{s}_{kind}" not in npz.files]
    if missing:
        raise MedtlError(f"ingest.medmnist.path {path} lacks array(s) {', '.join(missing)}; expected MedMNIST's "
                         "train_images, train_labels, val_images, val_labels, test_images, test_labels")
    counts, values = {}, set()
    for s in SPLIT_KEYS:
        labels = _labels(_load(npz, f"{s}_labels", path), s, path)
        counts[s] = len(labels)
        values.update(int(v) for v in np.unique(labels))
    file_sha = sha256_file(path)
    # Class names from ingest.classes (index order), else the indices themselves.
    names = list(params.classes) or [str(v) for v in range(max(values) + 1)] if values else list(params.classes)

    def name(index: int) -> str:
        return names[index] if index < len(names) else str(index)

    def items():
        for s in SPLIT_KEYS:
            images = _load(npz, f"{s}_images", path)
            labels = _labels(_load(npz, f"{s}_labels", path), s, path)
            if len(images) != len(labels) or images.ndim not in (3, 4):
                raise MedtlError(f"{path}: {s}_images has shape {images.shape} and {s}_labels {len(labels)} rows; "
                                 "expected (N, H, W) or (N, H, W, C) images with one label each")
            # uint8 as published; wider integers by their range; floats are taken as already in [0, 1]
            scale = float(np.iinfo(images.dtype).max) if np.issubdtype(images.dtype, np.integer) else 1.0
            for i in range(len(images)):
                yield SourceItem(
                    path.name, label=name(int(labels[i])), split=s, index=f"{s}/{i}",
                    extra={"npz_index": f"{s}/{i}"}, sha256=file_sha,
                    pixels=np.asarray(images[i], dtype=np.float32) / scale,
                )
            del images

    return Source(items=items(), classes=names, count=sum(counts.values()),
                  description={"source": "medmnist", "file": path.name, "sha256": file_sha, "counts": counts})


def _labels(labels: np.ndarray, split: str, path: Path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise MedtlError(f"{path}: {split}_labels has shape {labels.shape}; expected (N,) or (N, 1) single labels "
                         "(multi-label MedMNIST sets such as ChestMNIST are not supported)")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise MedtlError(f"{path}: {split}_labels must hold non-negative integer class indices, got {labels.dtype}")
    return labels
