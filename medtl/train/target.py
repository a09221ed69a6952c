"""Unlabelled images of the deployment site (the target), read as the training images were, never with labels.

`finetune.target` names them: `source: images` with `images: <folder>` for a
plain folder of unlabelled files (any nesting, any format medtl reads), or any
ingest source kind (demo, folder, csv, dicom, medmnist) whose labels, if it
has them, are never read. Each file is decoded and prepared by the prepared
data's preprocessing record, the one the model carries. Each prepared image
is identified by the sha256 of its pixels: the model keeps these digests, so
evaluate can tell when an external set it scores shares images with the
target the model was adapted on (a transductive result, which is disclosed).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medtl.errors import MedtlError, ParamsError
from medtl.intake import phi
from medtl.intake.decode import decode_item, folder_items
from medtl.intake.sources import SOURCES, check_source_paths, open_source_as, source_inputs
from medtl.intake.sources.sections import SourceRequest, SourceSections
from medtl.params import require
from medtl.prepare.imaging import Preprocessing, model_input

TARGET_SOURCES = ("none", "images", *SOURCES)
TargetSource = Literal[TARGET_SOURCES]
IMAGE_SUFFIXES_HINT = "DICOM, NIfTI, PNG, JPEG, BMP or TIFF files"


@dataclass(frozen=True)
class TargetParams(SourceSections):
    source: TargetSource = "none"
    images: str | None = None  # source images: a folder of unlabelled image files
    split: Literal["train", "val", "test"] | None = None  # only what the source puts in this split; null: all

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    def check(self, key: str) -> None:
        if self.source == "images":
            require(bool(self.images), f"{key}.images", self.images, "the path of a folder of unlabelled images")
        elif self.source != "none":
            check_source_paths(self, key)

    def source_inputs(self) -> list[str]:
        """Files or folders the target reads; none for the demo or when there is no target."""
        if self.source == "none":
            return []
        if self.source == "images":
            return [str(self.images)]
        return source_inputs(self)


def check_target(target: TargetParams, data: str, key: str) -> None:
    """The target's files lie inside `data`, the one path dvc tracks for them (so a change reruns fine-tune)."""
    root = Path(data).resolve()
    for path in target.source_inputs():
        require(Path(path).resolve().is_relative_to(root), f"{key}.target", path,
                f"a path inside {key}.target_data ({data!r}), which dvc tracks so that fine-tune reruns when the "
                "target images change; set target_data to the folder holding them")


def require_present(target: TargetParams, key: str) -> None:
    """Every file or folder the target names exists (checked before the stage starts its record)."""
    for path in target.source_inputs():
        if not Path(path).exists():
            raise ParamsError(f"params key '{key}.target' names {path!r}, which does not exist; expected the "
                              f"deployment site's unlabelled images ({IMAGE_SUFFIXES_HINT}, or a source of any "
                              "ingest kind), or source: none")


def pixel_digest(image: np.ndarray) -> str:
    """sha256 of one prepared image's pixels (dtype and shape included), the same for the same file read alike."""
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def set_digest(digests: list[str]) -> str:
    """One sha256 for a set of images, independent of their order."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


@dataclass
class TargetImages:
    images: np.ndarray  # (N, C, S, S) float16, prepared as the training images
    digests: list[str]  # pixel sha256 per image
    record: dict  # source, counts, skipped files by reason, set digest: what the stage record and model keep


def _items(target: TargetParams, key: str, classes: list[str], workdir: Path, hidden: Counter):
    """The target source's items, labels cleared: a source's labels are never looked at."""
    if target.source == "images":
        folder = Path(str(target.images))
        if not folder.is_dir():
            raise ParamsError(f"params key '{key}.images' is {target.images!r}, which is not a folder; expected a "
                              f"folder of unlabelled {IMAGE_SUFFIXES_HINT}")
        yield from folder_items(folder, hidden)
        return
    if target.source == "dicom" and phi.uses_default_key():
        raise MedtlError(f"{key} is a dicom source and no pseudonym key is set; {phi.HOW_TO_SET_KEY}")
    source = open_source_as(SourceRequest.of(target, classes), workdir, key)
    try:
        for item in source.items:
            if target.split is not None and item.split != target.split:
                continue
            if item.problem == "no_label":  # a file without a label is as good as any: labels are not read
                item.problem, item.detail = None, ""
            item.label = None
            yield item
    finally:
        if source.cleanup:
            source.cleanup()


def read_target(target: TargetParams, key: str, pre: Preprocessing, modalities: set[str]) -> TargetImages:
    """Decode and prepare every target image by `pre` through the intake (its reasons and header checks);
    refuse an empty target or one of another modality.

    `modalities` are the training images' (upper case; empty: unknown, not checked)."""
    workdir = Path(tempfile.mkdtemp(prefix="medtl-target-"))
    options = pre.read_options()
    images, skipped, found, hidden = [], Counter(), Counter(), Counter()
    files = 0
    try:
        for item in _items(target, key, pre.classes, workdir, hidden):
            files += 1
            res = decode_item(item, options)
            if res.problem:
                skipped[res.problem] += 1
                continue
            for image in res.images:
                modality = str(image.metadata.get("modality") or "").upper()
                if modality:
                    found[modality] += 1
                images.append(model_input(image.pixels, pre))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not images:
        where = f"{key}.images ({target.images!r})" if target.source == "images" else f"{key} (source {target.source})"
        raise ParamsError(f"{where} has no readable image ({files} file(s), skipped: {dict(skipped) or 'none'}); "
                          f"expected unlabelled {IMAGE_SUFFIXES_HINT} from the deployment site")
    other = sorted(set(found) - modalities) if modalities else []
    if other:
        raise ParamsError(f"{key} holds {', '.join(other)} images but the model is trained on "
                          f"{', '.join(sorted(modalities))} images; expected target images of the same modality")
    arr = np.stack(images)
    digests = [pixel_digest(img) for img in arr]
    record = {"source": target.source, "files": files, "images": len(arr), "distinct_images": len(set(digests)),
              "skipped": dict(sorted(skipped.items())), "hidden_files": hidden["hidden_file"],
              "modalities": dict(sorted(found.items())),
              "pixels_sha256": set_digest(digests)}
    return TargetImages(arr, digests, record)


def shared_images(images: np.ndarray, target_digests) -> int:
    """How many of `images` (prepared alike) are target images by pixel digest."""
    if not target_digests:
        return 0
    known = set(target_digests)
    return sum(pixel_digest(img) in known for img in images)
