"""Preprocess: fixed-size arrays per split, labels, and the preprocessing record.

Resizing lives here, not in ingest, so changing the image size never
re-decodes the sources. The manifest is read as a stream and arrays are
written through memory-mapped .npy files, so memory stays flat as the dataset
grows. Every image goes through
`medtl.prepare.imaging.model_input`, the function `medtl predict` uses on new files.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medtl.errors import MedtlError
from medtl.ingest.manifest import iter_manifest, manifest_path
from medtl.ingest.report import load_report
from medtl.ingest.splits import SPLITS
from medtl.ingest.store import PixelStore, pixels_path
from medtl.intake.readers.base import ReadOptions, colour_of
from medtl.io import write_json
from medtl.params import require
from medtl.prepare.folds import CvParams, fold_splits
from medtl.prepare.imaging import Preprocessing, model_input, read_record
from medtl.prepare.loso import site_splits
from medtl.prepare.prepared import open_images, row_writer, write_cv, write_stats, write_subset
from medtl.prepare.subsets import SubsetParams, apply_subset

# Manifest columns that stay in data/ingested: file identity and storage layout.
META_EXCLUDED = {"source_path", "source_ref", "sha256", "height", "width", "channels", "offset", "split"}


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = 64
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "stretch", "crop"] = "pad"
    cv: CvParams = field(default_factory=CvParams)  # cross-validation fold (see medtl.prepare.folds)
    train_subset: SubsetParams = field(default_factory=SubsetParams)  # label-efficiency curve (medtl.prepare.subsets)

    def check(self, key: str) -> None:
        require(16 <= self.image_size <= 1024, f"{key}.image_size", self.image_size,
                "an image side in pixels between 16 and 1024")


def run_preprocess(params: PreprocessParams, read: ReadOptions, ingested: Path, out_dir: Path) -> dict:
    """Write {split}.npy, {split}.csv and stats.json into out_dir; return the stats record.

    `read` is how ingest decoded the files (ingest.read); it goes into the
    record so that a model decodes new files the same way.
    """
    manifest = manifest_path(ingested)
    # The manifest is streamed, never held: a first pass counts each split (its array's length), the second
    # writes the arrays and {split}.csv rows as it goes. Memory stays flat in the number of images.
    resplit = None
    if params.cv.folds:  # this fold's train/val over the development data; test untouched
        resplit, cv = fold_splits(iter_manifest(manifest), params.cv, ingested)
        write_cv(out_dir, cv)
    elif params.cv.held_out_site:  # one site is test, the others train and validate
        resplit, cv = site_splits(iter_manifest(manifest), params.cv.held_out_site, str(manifest), params.cv.seed)
        write_cv(out_dir, cv)
    if params.train_subset.images:  # a nested subset of the training images; val and test untouched
        resplit, subset = _training_subset(manifest, resplit, params.train_subset)
        write_subset(out_dir, subset)

    def split_of(i: int, row: dict) -> str:
        if resplit is None or resplit[i] == -1:
            return row["split"]
        return SPLITS[resplit[i]] if resplit[i] >= 0 else "left out"

    counts = dict.fromkeys(SPLITS, 0)
    meta_cols: list[str] = []
    for i, r in enumerate(iter_manifest(manifest)):
        if i == 0:
            meta_cols = [c for c in r if c not in META_EXCLUDED]
        split = split_of(i, r)
        if split in counts:
            counts[split] += 1
    classes = load_report(ingested)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    store = PixelStore(pixels_path(ingested))
    pre = Preprocessing(read=read_record(read), image_size=params.image_size, channels=params.channels,
                        resize=params.resize, classes=list(classes))
    total = np.zeros(params.channels)
    total_sq = np.zeros(params.channels)
    n_px = 0
    with contextlib.ExitStack() as stack:
        arrays = {s: open_images(out_dir, s, counts[s], pre) for s in SPLITS}
        writers = {s: stack.enter_context(row_writer(out_dir, s, meta_cols + ["colour", "label_index"]))
                   for s in SPLITS}
        at = dict.fromkeys(SPLITS, 0)
        progress = tqdm(total=sum(counts.values()), desc="preprocess", unit="img", leave=False)
        for i, r in enumerate(iter_manifest(manifest)):
            split = split_of(i, r)
            if split not in arrays:
                continue
            arr, k = arrays[split], at[split]
            if k == counts[split]:
                raise MedtlError(f"{manifest} changed while it was being read: more {split} images than at first; "
                                 "rerun the preprocess stage")
            pixels = store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"]))
            arr[k] = model_input(pixels, pre)
            r["colour"], r["label_index"] = colour_of(pixels), index[r["label"]]
            writers[split].writerow(r)
            if split == "train":  # statistics from training images only, as the model will see them
                x = arr[k].astype(np.float64).reshape(params.channels, -1)
                total += x.sum(1)
                total_sq += (x**2).sum(1)
                n_px += x.shape[1]
            at[split] = k + 1
            progress.update()
        progress.close()
        if at != counts:
            raise MedtlError(f"{manifest} changed while it was being read: {at} images, {counts} at first; "
                             "rerun the preprocess stage")
        for arr in arrays.values():
            arr.flush()
        del arrays, arr
    if n_px == 0:
        raise MedtlError(f"{manifest} has no training images; ingest must put images in the train split")
    mean = total / n_px
    std = np.sqrt(np.maximum(total_sq / n_px - mean**2, 1e-12))
    pre = Preprocessing(**{**pre.to_dict(), "mean": [round(float(m), 6) for m in mean],
                           "std": [round(float(s), 6) for s in std]})
    return write_stats(out_dir, pre, counts)


def _training_subset(manifest: Path, resplit: np.ndarray | None, params: SubsetParams) -> tuple[np.ndarray, dict]:
    """Every row's split code after keeping `params.images` training images (see medtl.prepare.subsets)."""
    codes, groups, labels = [], [], []
    for i, r in enumerate(iter_manifest(manifest)):
        own = SPLITS.index(r["split"]) if r["split"] in SPLITS else -2
        codes.append(own if resplit is None or resplit[i] == -1 else int(resplit[i]))
        groups.append(r["group"])
        labels.append(r["label"])
    return apply_subset(np.array(codes, dtype=np.int8), groups, labels, SPLITS.index("train"), params)
