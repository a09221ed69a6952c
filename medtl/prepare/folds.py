"""Cross-validation folds by patient: this fold's train/val over the development data, test held out.

With `preprocess.cv.folds` = k > 0, the manifest's train and val rows are
pooled and cut into k folds by stratified group k-fold over the pseudonymous
`group` column: no patient spans two folds, and each fold's class mix follows
the whole. Fold `preprocess.cv.fold` becomes val, the other folds train. The
test split is never touched, so every fold's model is still tested on the same
held-out patients. Images with identical pixels are kept in one fold even when
their groups differ, as ingest does for its splits.

The assignment depends only on the manifest and `preprocess.cv.seed`, so each
fold experiment (`medtl cv run`) sees the same partition.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from medtl.errors import MedtlError
from medtl.ingest.splits import SPLITS, link_duplicates
from medtl.ingest.store import PixelStore, pixels_path, quantize
from medtl.params import require

DEVELOPMENT = ("train", "val")


@dataclass(frozen=True)
class CvParams:
    folds: int = 0  # 0: ingest's own train/val split; k >= 2: k-fold cross-validation by patient
    fold: int = 0  # which fold is validation, 0 .. folds-1
    seed: int = 0  # the partition into folds
    held_out_site: str | None = None  # leave-one-site-out: this site is the test set (see medtl.prepare.loso)

    def check(self, key: str) -> None:
        require(self.held_out_site is None or self.folds == 0, f"{key}.held_out_site", self.held_out_site,
                "null when folds is set (k-fold and leave-one-site-out are separate validations)")
        require(self.held_out_site is None or bool(str(self.held_out_site).strip()), f"{key}.held_out_site",
                self.held_out_site, "null or a site name")
        require(self.folds == 0 or 2 <= self.folds <= 50, f"{key}.folds", self.folds,
                "0 (ingest's train/val split) or a number of folds between 2 and 50")
        require(self.folds == 0 and self.fold == 0 or 0 <= self.fold < self.folds, f"{key}.fold", self.fold,
                f"an index between 0 and folds-1 ({max(self.folds - 1, 0)})")


def fold_of_groups(groups: list[str], labels: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds-1) of each image; a group's images share a fold, classes spread evenly."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if n_groups < folds:
        raise MedtlError(f"preprocess.cv.folds is {folds} but the development data (train + val) holds only "
                         f"{n_groups} patient group(s); use at most {n_groups} folds")
    per_class = Counter()
    for label in set(zip(groups, labels)):
        per_class[label[1]] += 1
    scarce = {c: n for c, n in per_class.items() if n < folds}
    if scarce:
        listed = ", ".join(f"'{c}' ({n})" for c, n in sorted(scarce.items()))
        raise MedtlError(f"preprocess.cv.folds is {folds} but class(es) {listed} have fewer patient groups than "
                         "folds, so some validation fold would have none of them; use fewer folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.empty(len(groups), dtype=np.int64)
    for i, (_, val_idx) in enumerate(splitter.split(np.zeros(len(groups)), labels, groups)):
        fold[val_idx] = i
    return fold


def _pixel_key(row: dict, store: PixelStore) -> bytes:
    """The same pixel hash ingest uses to find copies of one image (its binary digest: only ever compared)."""
    q = quantize(store.get(int(row["offset"]), int(row["height"]), int(row["width"]), int(row["channels"])))
    return hashlib.sha256(q.tobytes() + str(q.shape).encode()).digest()


def fold_splits(rows: Iterable[dict], cv: CvParams, ingested: Path) -> tuple[np.ndarray, dict]:
    """Each row's split index (into SPLITS) for fold `cv.fold` of `cv.folds`, -1 where the row keeps its own
    split (test), and a summary for data/prepared/cv.json.

    `rows` is read once and may be a stream: only the development rows' group,
    label and pixel hash are held, not the rows.
    """
    store = PixelStore(pixels_path(ingested))
    codes = array("b")
    groups: list[str] = []
    labels: list[str] = []
    keys: list[list[bytes]] = []
    for r in rows:
        if r["split"] in DEVELOPMENT:
            codes.append(0)
            groups.append(r["group"])
            labels.append(sys.intern(r["label"]))
            keys.append([_pixel_key(r, store)])
        else:
            codes.append(-1)
    groups = link_duplicates(groups, keys, [None] * len(groups))
    del keys
    fold = fold_of_groups(groups, labels, cv.folds, cv.seed)
    split = np.array(codes, dtype=np.int8)
    split[split == 0] = np.where(fold == cv.fold, SPLITS.index("val"), SPLITS.index("train"))
    summary = {
        "folds": cv.folds, "fold": cv.fold, "seed": cv.seed, "method": "stratified group k-fold over train + val",
        "per_fold": [
            {"fold": k, "images": int((fold == k).sum()), "groups": len({g for g, f in zip(groups, fold) if f == k}),
             "per_class": dict(sorted(Counter(y for y, f in zip(labels, fold) if f == k).items()))}
            for k in range(cv.folds)
        ],
    }
    return split, summary


def assign_fold(rows: list[dict], cv: CvParams, ingested: Path) -> tuple[list[dict], dict]:
    """Rows with train/val reassigned for fold `cv.fold` of `cv.folds`, and a summary for data/prepared/cv.json."""
    split, summary = fold_splits(rows, cv, ingested)
    out = [dict(r) for r in rows]
    for r, s in zip(out, split):
        if s >= 0:
            r["split"] = SPLITS[s]
    return out, summary
