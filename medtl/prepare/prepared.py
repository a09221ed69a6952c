"""data/prepared/: the one reader and writer of the prepared arrays and their record.

Layout: `{split}.npy` (N, C, S, S) float16, `{split}.csv` (image_id, group,
metadata, colour, label_index per row, in array order), and `stats.json`: the
format version, the preprocessing record (medtl.prepare.imaging.Preprocessing) and
the image count per split; with cross-validation `cv.json` (the partition), with
a training subset `subset.json`. Every reader checks the version and that the
arrays have the shape the record says, so a stage never trains or evaluates
on arrays of another size than its inputs claim.
"""
from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from medtl.errors import MedtlError
from medtl.io import atomic_path, open_npy, write_json
from medtl.prepare.imaging import Preprocessing

PREPARED_FORMAT = "medtl-prepared/2"
PROJECT_PREPARED = Path("data/prepared")  # where the pipeline (dvc.yaml) puts them
STATS, CV, SUBSET = "stats.json", "cv.json", "subset.json"


@dataclass(frozen=True)
class PreparedStats:
    preprocessing: Preprocessing
    counts: dict[str, int]

    @property
    def classes(self) -> list[str]:
        return list(self.preprocessing.classes)


@dataclass
class PreparedSplit:
    images: np.ndarray  # (N, C, S, S) float16, memory-mapped
    labels: np.ndarray  # (N,) int64
    rows: list[dict]  # image_id, group, colour, metadata


def write_stats(out_dir: Path, pre: Preprocessing, counts: dict[str, int]) -> dict:
    """stats.json into `out_dir`, the stage's temporary folder (atomic_dir makes the whole folder appear at once)."""
    record = {"format": PREPARED_FORMAT, "preprocessing": pre.to_dict(), "counts": dict(counts)}
    stats_path(out_dir).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return record


def open_images(out_dir: Path, split: str, n: int, pre: Preprocessing) -> np.ndarray:
    """A new {split}.npy of `n` images in the record's shape, memory-mapped for writing."""
    return open_npy(images_path(out_dir, split), np.float16, (n, pre.channels, pre.image_size, pre.image_size))


def write_rows(out_dir: Path, split: str, rows: Iterable[dict], columns: list[str]) -> None:
    """{split}.csv: one row per image, in array order."""
    with row_writer(out_dir, split, columns) as w:
        w.writerows(rows)


@contextlib.contextmanager
def row_writer(out_dir: Path, split: str, columns: list[str]) -> Iterator[csv.DictWriter]:
    """A writer of {split}.csv row by row, in array order; the file appears (atomically) only if the block succeeds."""
    with atomic_path(rows_path(out_dir, split)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        yield w


def write_cv(out_dir: Path, summary: dict) -> None:
    """cv.json: the fold (or held-out site) partition this run's train/val/test come from."""
    write_json(Path(out_dir) / CV, summary)


def write_subset(out_dir: Path, summary: dict) -> None:
    """subset.json: which nested training subset this run used (preprocess.train_subset)."""
    write_json(Path(out_dir) / SUBSET, summary)


def stats_path(prepared: Path) -> Path:
    return Path(prepared) / STATS


def images_path(prepared: Path, split: str) -> Path:
    return Path(prepared) / f"{split}.npy"


def rows_path(prepared: Path, split: str) -> Path:
    return Path(prepared) / f"{split}.csv"


def load_stats(prepared: Path) -> PreparedStats:
    path = stats_path(prepared)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedtlError(f"{path} does not exist; run the preprocess stage (dvc repro)") from None
    except (OSError, ValueError) as e:
        raise MedtlError(f"{path} cannot be read as JSON ({e}); rerun the preprocess stage") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != PREPARED_FORMAT:
        raise MedtlError(f"{path} has format {found!r}, this medtl reads {PREPARED_FORMAT!r}; "
                         "rerun the preprocess stage (dvc repro) to rewrite data/prepared")
    return PreparedStats(Preprocessing.from_dict(raw.get("preprocessing"), str(path)), dict(raw.get("counts") or {}))


def check_images(images: np.ndarray, pre: Preprocessing, path: Path, expected_rows: int | None = None) -> None:
    """The array's shape and type must be what the record promises."""
    want = (pre.channels, pre.image_size, pre.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want or images.dtype != np.float16:
        raise MedtlError(f"{path} holds {images.dtype} images of shape {tuple(images.shape[1:])}, but its stats.json "
                         f"records {want} float16 (image_size {pre.image_size}, channels {pre.channels}); "
                         "rerun the preprocess stage (dvc repro)")
    if expected_rows is not None and len(images) != expected_rows:
        raise MedtlError(f"{path} holds {len(images)} images but its record counts {expected_rows}; "
                         "rerun the preprocess stage (dvc repro)")


def load_images(prepared: Path, split: str, stats: PreparedStats | None = None) -> np.ndarray:
    """One split's images (memory-mapped), checked against the record."""
    stats = stats or load_stats(prepared)
    path = images_path(prepared, split)
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise MedtlError(f"cannot read the prepared images {path}: {e}; run the preprocess stage") from e
    check_images(images, stats.preprocessing, path, stats.counts.get(split))
    return images


def load_split(prepared: Path, split: str, stats: PreparedStats | None = None) -> PreparedSplit:
    stats = stats or load_stats(prepared)
    images = load_images(prepared, split, stats)
    path = rows_path(prepared, split)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(images):
        raise MedtlError(f"{path} has {len(rows)} rows for {len(images)} images in {split}.npy; "
                         "rerun the preprocess stage (dvc repro)")
    labels = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
    return PreparedSplit(images, labels, rows)
