"""Leave-one-site-out: one site's images are the test set, the other sites train and validate.

With `preprocess.cv.held_out_site` set, every image of that site (whatever
ingest's split) becomes test; the other sites' images are cut anew into train
and val (one fifth of their patients, more when a class has fewer than five,
stratified by class, by `preprocess.cv.seed`), so validation holds every class however ingest split
each site.
Images of the other sites whose patient group also appears at the held-out
site are left out, so no patient is on both sides. `medtl cv run --by site`
queues one experiment per site.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from medtl.errors import MedtlError
from medtl.ingest.splits import SPLITS
from medtl.prepare.folds import fold_of_groups

SITE_COLUMN = "site"
KEEP, DROPPED = -1, -2  # split codes besides SPLITS' indices: keep the row's own split; leave the row out


VAL_FOLDS = 5  # one fold of five is validation


def site_splits(rows: Iterable[dict], site: str, where: str = "the manifest", seed: int = 0) -> tuple[np.ndarray, dict]:
    """Each row's split code with `site` held out, and a summary for data/prepared/cv.json."""
    sites: list[str] = []
    groups: list[str] = []
    splits: list[str] = []
    labels: list[str] = []
    for r in rows:
        if SITE_COLUMN not in r:
            raise MedtlError(f"preprocess.cv.held_out_site is {site!r} but {where} has no '{SITE_COLUMN}' column; "
                             "sites come from ingest.sources or a csv metadata column named 'site'")
        sites.append(r[SITE_COLUMN])
        groups.append(r["group"])
        splits.append(r["split"])
        labels.append(r["label"])
    found = sorted(set(sites))
    if site not in found:
        raise MedtlError(f"preprocess.cv.held_out_site is {site!r}, not a site of {where}; sites: {', '.join(found)}")
    if len(found) < 2:
        raise MedtlError(f"preprocess.cv.held_out_site: {where} has one site ({site}); leaving it out leaves "
                         "nothing to train on")
    held = {g for s, g in zip(sites, groups) if s == site}
    codes = np.empty(len(sites), dtype=np.int8)
    for i, (s, g, sp) in enumerate(zip(sites, groups, splits)):
        if sp not in SPLITS:  # quarantined by ingest: stays out
            codes[i] = KEEP
        elif s == site:
            codes[i] = SPLITS.index("test")
        elif g in held:
            codes[i] = DROPPED
        else:
            codes[i] = SPLITS.index("train")
    dev = np.flatnonzero(codes == SPLITS.index("train"))
    dev_groups, dev_labels = [groups[i] for i in dev], [labels[i] for i in dev]
    # One fifth of the patients, or a larger share when a class has fewer than five patients.
    folds = min(VAL_FOLDS, min(Counter(y for _, y in set(zip(dev_groups, dev_labels))).values(), default=0))
    if folds < 2:
        raise MedtlError(f"preprocess.cv.held_out_site {site!r}: the other sites have too few patients of some "
                         "class to hold it in both train and val")
    fold = fold_of_groups(dev_groups, dev_labels, folds, seed)
    codes[dev[fold == 0]] = SPLITS.index("val")
    count = Counter((s, int(c)) for s, c in zip(sites, codes))
    summary = {
        "method": "leave one site out", "held_out_site": site, "sites": found, "val_fraction": round(1 / folds, 4),
        "per_site": {s: {name: count[(s, i)] for i, name in enumerate(SPLITS)} | {"left_out": count[(s, DROPPED)]}
                     for s in found},
    }
    if not (codes == SPLITS.index("val")).any() or not (codes == SPLITS.index("train")).any():
        raise MedtlError(f"preprocess.cv.held_out_site {site!r}: the other sites leave no train or no val images")
    return codes, summary


def sites_of(rows: Iterable[dict]) -> list[str]:
    """The sites of a manifest, sorted; empty when it has no site column."""
    out: set[str] = set()
    for r in rows:
        if SITE_COLUMN not in r:
            return []
        out.add(r[SITE_COLUMN])
    return sorted(out)
