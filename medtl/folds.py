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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtl.errors import MedtlError
from medtl.params import require
from medtl.splits import link_duplicates
from medtl.store import PixelStore, quantize

DEVELOPMENT = ("train", "val")


@dataclass(frozen=True)
class CvParams:
    folds: int = 0  # 0: ingest's own train/val split; k >= 2: k-fold cross-validation by patient
    fold: int = 0  # which fold is validation, 0 .. folds-1
    seed: int = 0  # the partition into folds

    def check(self, key: str) -> None:
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


def _pixel_keys(rows: list[dict], store: PixelStore) -> list[list[str]]:
    """The same pixel hash ingest uses to find copies of one image."""
    keys = []
    for r in rows:
        q = quantize(store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"])))
        keys.append([hashlib.sha256(q.tobytes() + str(q.shape).encode()).hexdigest()])
    return keys


def assign_fold(rows: list[dict], cv: CvParams, ingested: Path) -> tuple[list[dict], dict]:
    """Rows with train/val reassigned for fold `cv.fold` of `cv.folds`, and a summary for data/prepared/cv.json."""
    dev = [i for i, r in enumerate(rows) if r["split"] in DEVELOPMENT]
    dev_rows = [rows[i] for i in dev]
    groups = link_duplicates([r["group"] for r in dev_rows], _pixel_keys(dev_rows, PixelStore(ingested / "pixels.u16")),
                             [None] * len(dev_rows))
    labels = [r["label"] for r in dev_rows]
    fold = fold_of_groups(groups, labels, cv.folds, cv.seed)
    out = [dict(r) for r in rows]
    for i, f in zip(dev, fold):
        out[i]["split"] = "val" if f == cv.fold else "train"
    summary = {
        "folds": cv.folds, "fold": cv.fold, "seed": cv.seed, "method": "stratified group k-fold over train + val",
        "per_fold": [
            {"fold": k, "images": int((fold == k).sum()), "groups": len({g for g, f in zip(groups, fold) if f == k}),
             "per_class": dict(sorted(Counter(y for y, f in zip(labels, fold) if f == k).items()))}
            for k in range(cv.folds)
        ],
    }
    return out, summary
