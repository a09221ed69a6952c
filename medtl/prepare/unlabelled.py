"""Unlabelled images through the intake, prepared as the model's own: SSL's extra images and target images."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from medtl.errors import ParamsError
from medtl.intake.decode import BurnedIn, decode_item, describe_source, folder_items
from medtl.intake.sources import SourceItem
from medtl.io import open_npy
from medtl.prepare.imaging import Preprocessing, model_input


@dataclass
class Unlabelled:
    """Unlabelled images prepared as the model's own, each named by its file's ref and sha256."""

    images: np.ndarray  # (N, C, S, S) float16, `model_input` of each image (memory-mapped when `out` was given)
    refs: list[str]  # per image: keyed ref of its file (with "#slice"/"#frame" for several images of one file)
    sha256: list[str]  # per image: sha256 of its file's bytes
    counts: dict  # files, images, skipped {reason: n}, hidden_files, burned_in_kept, decode_warnings {kind: n}


def read_unlabelled(source, pre: Preprocessing, key: str, out: Path | None = None,
                    burned_in: BurnedIn = "quarantine") -> Unlabelled:
    """Decode every readable image of `source` as the model's data were: the fifth entry point's reader.

    `source` is a folder (str or Path: every file under it, walked by
    `medtl.intake.decode.folder_items`) or a source params section with `.source` and that source's fields (an
    `evaluate.external` entry, say): its items are read and their labels
    ignored. `pre` is the preprocessing record (read options, channels, size,
    resize). `key` names the params key in messages. Images are returned as
    `model_input` arrays; with `out`, in a memory-mapped .npy file there.
    Unreadable files are skipped and counted by reason; with no readable
    image at all a ParamsError names `key`. A caller whose folder is a params
    path checks it first with `medtl.intake.decode.check_data_paths` (inside what
    DVC tracks, not relative out of the project).
    """
    options = pre.read_options()
    skipped, hidden, warned = Counter(), Counter(), Counter()
    images, refs, digests, seen, kept_burned = [], [], [], 0, 0
    for item in _unlabelled_items(source, key, pre, hidden):
        seen += 1
        res = decode_item(item, options, burned_in)
        warned.update(res.warnings)
        if res.problem:
            skipped[res.problem] += 1
            continue
        kept_burned += res.burned_in
        for k, image in enumerate(res.images):
            images.append(model_input(image.pixels, pre))
            where = image.metadata.get("slice") or image.metadata.get("frame")
            refs.append(res.ref + (f"#{where}" if where and len(res.images) > 1 else ""))
            digests.append(res.sha256)
    counts = {**describe_source(seen, skipped, hidden), "images": len(images), "burned_in_kept": kept_burned,
              "decode_warnings": dict(sorted(warned.items()))}
    if not images:
        raise ParamsError(f"{key}: no readable image ({seen} file(s), skipped: "
                          f"{ {k: v for k, v in counts['skipped'].items() if v} or 'none'}); expected DICOM, NIfTI, "
                          "PNG, JPEG, BMP or TIFF files")
    shape = (len(images), pre.channels, pre.image_size, pre.image_size)
    if out is None:
        arr = np.stack(images)
    else:
        arr = open_npy(out, np.float16, shape)
        for i, img in enumerate(images):
            arr[i] = img
        arr.flush()
    return Unlabelled(arr, refs, digests, counts)


def _unlabelled_items(source, key: str, pre: Preprocessing, hidden: Counter) -> Iterator[SourceItem]:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise ParamsError(f"{key}: {source} is not a folder; expected a folder of unlabelled images")
        yield from folder_items(folder, hidden)
        return
    import shutil
    import tempfile

    from medtl.intake.sources import open_source_as  # imported here: it imports every source module

    workdir = Path(tempfile.mkdtemp(prefix="medtl-intake-"))
    try:
        opened = open_source_as(source, workdir, key)
        try:
            for item in opened.items:
                item.label = None
                yield item
            hidden["hidden_file"] += opened.description.get("hidden_files", 0)
        finally:
            if opened.cleanup:
                opened.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
