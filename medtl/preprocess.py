"""Preprocess: fixed-size arrays per split, labels, and the preprocessing record.

Resizing lives here, not in ingest, so changing the image size never
re-decodes the sources. Arrays are written through memory-mapped .npy files,
so memory stays flat as the dataset grows. Every image goes through
`medtl.imaging.model_input`, the function `medtl predict` uses on new files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medtl.errors import MedtlError
from medtl.folds import CvParams, assign_fold
from medtl.imaging import Preprocessing, model_input, read_record
from medtl.io import write_json
from medtl.manifest import read_manifest
from medtl.params import require
from medtl.prepared import open_images, write_rows, write_stats
from medtl.readers import ReadOptions, colour_of
from medtl.splits import SPLITS
from medtl.store import PixelStore

# Manifest columns that stay in data/ingested: file identity and storage layout.
META_EXCLUDED = {"source_path", "source_ref", "sha256", "height", "width", "channels", "offset", "split"}


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = 64
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "stretch", "crop"] = "pad"
    cv: CvParams = field(default_factory=CvParams)  # cross-validation fold (see medtl.folds)

    def check(self, key: str) -> None:
        require(16 <= self.image_size <= 1024, f"{key}.image_size", self.image_size,
                "an image side in pixels between 16 and 1024")


def run_preprocess(params: PreprocessParams, read: ReadOptions, ingested: Path, out_dir: Path) -> dict:
    """Write {split}.npy, {split}.csv and stats.json into out_dir; return the stats record.

    `read` is how ingest decoded the files (ingest.read); it goes into the
    record so that a model decodes new files the same way.
    """
    rows = read_manifest(ingested / "manifest.csv")
    if params.cv.folds:  # this fold's train/val over the development data; test untouched
        rows, cv = assign_fold(rows, params.cv, ingested)
        write_json(out_dir / "cv.json", cv)
    classes = json.loads((ingested / "report.json").read_text())["classes"]
    index = {c: i for i, c in enumerate(classes)}
    store = PixelStore(ingested / "pixels.u16")
    meta_cols = [c for c in rows[0] if c not in META_EXCLUDED] if rows else []
    pre = Preprocessing(read=read_record(read), image_size=params.image_size, channels=params.channels,
                        resize=params.resize, classes=list(classes))
    total = np.zeros(params.channels)
    total_sq = np.zeros(params.channels)
    n_px = 0
    counts = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        counts[split] = len(part)
        arr = open_images(out_dir, split, len(part), pre)
        out_rows = []
        for i, r in enumerate(tqdm(part, desc=f"preprocess {split}", unit="img", leave=False)):
            pixels = store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"]))
            arr[i] = model_input(pixels, pre)
            out_rows.append({**r, "colour": colour_of(pixels), "label_index": index[r["label"]]})
            if split == "train":  # statistics from training images only, as the model will see them
                x = arr[i].astype(np.float64).reshape(params.channels, -1)
                total += x.sum(1)
                total_sq += (x**2).sum(1)
                n_px += x.shape[1]
        arr.flush()
        del arr
        write_rows(out_dir, split, out_rows, meta_cols + ["colour", "label_index"])
    if n_px == 0:
        raise MedtlError(f"{ingested / 'manifest.csv'} has no training images; ingest must put images in the train split")
    mean = total / n_px
    std = np.sqrt(np.maximum(total_sq / n_px - mean**2, 1e-12))
    pre = Preprocessing(**{**pre.to_dict(), "mean": [round(float(m), 6) for m in mean],
                           "std": [round(float(s), 6) for s in std]})
    return write_stats(out_dir, pre, counts)
