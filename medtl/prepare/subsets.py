"""Nested training subsets for the label-efficiency curve: patient-grouped, class-stratified, fixed val and test.

`preprocess.train_subset.images: n` keeps n images of the training split
(0: all). Training patients are put in one order per `train_subset.seed`:
shuffled within each class (a patient's class is that of most of its
images), then interleaved so that every prefix holds the classes in the
split's proportions. The subset is the first n images in that order, whole
patients first, so the subset of 50 contains the subset of 25. Validation
and test are untouched.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from medtl.errors import MedtlError
from medtl.params import require

DROPPED = -2


@dataclass(frozen=True)
class SubsetParams:
    images: int = 0  # training images kept; 0: the whole training split
    seed: int = 0  # the order patients are added in (one per repeat of the curve)

    def check(self, key: str) -> None:
        require(self.images >= 0, f"{key}.images", self.images, "0 (all training images) or a positive number")


def patient_order(groups: list[str], labels: list[str], seed: int) -> list[str]:
    """Training patients in the order the nested subsets take them."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for g, y in zip(groups, labels):
        votes[g][y] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for g in sorted(votes):  # sorted first: the order depends on the seed only, not on the manifest's row order
        by_class[min(votes[g].items(), key=lambda kv: (-kv[1], kv[0]))[0]].append(g)
    rng = np.random.default_rng(seed)
    keyed = []
    for c in sorted(by_class):
        members = by_class[c]
        rng.shuffle(members)
        n = len(members)
        # The j-th patient of a class sits at (j + u) / n: every prefix holds each class in proportion.
        keyed += [((j + rng.random()) / n, g) for j, g in enumerate(members)]
    return [g for _, g in sorted(keyed)]


def subset_rows(groups: list[str], labels: list[str], images: int, seed: int) -> np.ndarray:
    """Indices (into `groups`) of the first `images` training images in patient order."""
    if images > len(groups):
        raise MedtlError(f"preprocess.train_subset.images is {images} but the training split has {len(groups)} "
                         f"images; use at most {len(groups)} (or 0 for all)")
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    taken: list[int] = []
    for g in patient_order(groups, labels, seed):
        taken += rows_of[g][: images - len(taken)]  # the last patient may give only some of its images
        if len(taken) == images:
            break
    return np.array(sorted(taken), dtype=np.int64)


def apply_subset(codes: np.ndarray, groups: list[str], labels: list[str], train_code: int,
                 params: SubsetParams) -> tuple[np.ndarray, dict]:
    """`codes` (each row's split code) with training rows outside the subset set to DROPPED, and a summary."""
    train = np.flatnonzero(codes == train_code)
    g = [groups[i] for i in train]
    y = [labels[i] for i in train]
    keep = subset_rows(g, y, params.images, params.seed)
    out = codes.copy()
    out[train] = DROPPED
    out[train[keep]] = train_code
    kept_y = Counter(y[i] for i in keep)
    if len(kept_y) < len(set(y)):
        raise MedtlError(f"preprocess.train_subset.images is {params.images}: too few for every class "
                         f"({dict(sorted(kept_y.items()))} of {sorted(set(y))}); use more images")
    summary = {"images": int(len(keep)), "patients": len({g[i] for i in keep}), "seed": params.seed,
               "of_images": len(train), "of_patients": len(set(g)), "per_class": dict(sorted(kept_y.items()))}
    return out, summary
