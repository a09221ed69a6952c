"""Preprocess: fixed-size arrays per split, labels, and normalisation statistics.

Resizing lives here, not in ingest, so changing the image size never
re-decodes the sources. Arrays are written through memory-mapped .npy files,
so memory stays flat as the dataset grows.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm import tqdm

from medtl.errors import MedtlError
from medtl.manifest import read_manifest
from medtl.io import open_npy
from medtl.params import require
from medtl.splits import SPLITS
from medtl.store import PixelStore

META_EXCLUDED = {"source_path", "sha256", "height", "width", "channels", "offset", "split"}


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 64
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "stretch", "crop"] = "pad"

    def check(self, key: str) -> None:
        require(16 <= self.size <= 1024, f"{key}.size", self.size, "an image side in pixels between 16 and 1024")


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) -> (H, W, channels): RGB to luminance, or gray repeated when three are asked for."""
    c = img.shape[2]
    if c == channels:
        return img
    if channels == 1:
        if c >= 3:
            return (img[:, :, :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
        return img[:, :, :1]
    return np.repeat(img[:, :, :1], 3, axis=2)


def resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W, C) float -> (size, size, C). `pad` keeps the aspect ratio and pads with zeros."""
    h, w = img.shape[:2]
    if mode == "stretch":
        th, tw = size, size
    else:
        scale = size / max(h, w) if mode == "pad" else size / min(h, w)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR
    out = cv2.resize(img, (tw, th), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    if mode == "crop":
        y, x = (th - size) // 2, (tw - size) // 2
        return out[y : y + size, x : x + size]
    if mode == "pad":
        canvas = np.zeros((size, size, img.shape[2]), dtype=out.dtype)
        y, x = (size - th) // 2, (size - tw) // 2
        canvas[y : y + th, x : x + tw] = out
        return canvas
    return out


def run_preprocess(params: PreprocessParams, ingested: Path, out_dir: Path) -> dict:
    rows = read_manifest(ingested / "manifest.csv")
    classes = json.loads((ingested / "report.json").read_text())["classes"]
    index = {c: i for i, c in enumerate(classes)}
    store = PixelStore(ingested / "pixels.u16")
    meta_cols = [c for c in rows[0] if c not in META_EXCLUDED] if rows else []
    total = np.zeros(params.channels)
    total_sq = np.zeros(params.channels)
    n_px = 0
    counts = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        counts[split] = len(part)
        arr = open_npy(out_dir / f"{split}.npy", np.float16, (len(part), params.channels, params.size, params.size))
        for i, r in enumerate(tqdm(part, desc=f"preprocess {split}", unit="img", leave=False)):
            img = store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"]))
            img = resize(to_channels(img, params.channels), params.size, params.resize)
            arr[i] = img.transpose(2, 0, 1)
            if split == "train":  # statistics from training images only
                x = img.reshape(-1, params.channels).astype(np.float64)
                total += x.sum(0)
                total_sq += (x**2).sum(0)
                n_px += x.shape[0]
        arr.flush()
        del arr
        with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=meta_cols + ["label_index"], extrasaction="ignore")
            w.writeheader()
            for r in part:
                w.writerow({**r, "label_index": index[r["label"]]})
    if n_px == 0:
        raise MedtlError(f"{ingested / 'manifest.csv'} has no training images; ingest must put images in the train split")
    mean = total / n_px
    std = np.sqrt(np.maximum(total_sq / n_px - mean**2, 1e-12))
    stats = {
        "classes": classes,
        "size": params.size,
        "channels": params.channels,
        "resize": params.resize,
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "counts": counts,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


@dataclass
class PreparedSplit:
    images: np.ndarray  # (N, C, S, S) float16, memory-mapped
    labels: np.ndarray  # (N,) int64
    rows: list[dict]  # image_id, group, metadata


def load_split(prepared: Path, split: str) -> PreparedSplit:
    images = np.load(prepared / f"{split}.npy", mmap_mode="r")
    with open(prepared / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
    return PreparedSplit(images, labels, rows)


def load_stats(prepared: Path) -> dict:
    return json.loads((prepared / "stats.json").read_text())
