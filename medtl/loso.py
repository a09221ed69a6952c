"""Leave-one-site-out: one site's images are the test set, the other sites train and validate.

With `preprocess.cv.held_out_site` set, every image of that site (whatever
ingest's split) becomes test; the other sites keep ingest's train and val, and
their test images join train, so all other-site data serves development.
Images of the other sites whose patient group also appears at the held-out
site are left out, so no patient is on both sides. `medtl cv run --by site`
queues one experiment per site.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from medtl.errors import MedtlError
from medtl.splits import SPLITS

SITE_COLUMN = "site"
KEEP, DROPPED = -1, -2  # split codes besides SPLITS' indices: keep the row's own split; leave the row out


def site_splits(rows: Iterable[dict], site: str, where: str = "the manifest") -> tuple[np.ndarray, dict]:
    """Each row's split code with `site` held out, and a summary for data/prepared/cv.json."""
    sites: list[str] = []
    groups: list[str] = []
    splits: list[str] = []
    for r in rows:
        if SITE_COLUMN not in r:
            raise MedtlError(f"preprocess.cv.held_out_site is {site!r} but {where} has no '{SITE_COLUMN}' column; "
                             "sites come from ingest.sources or a csv metadata column named 'site'")
        sites.append(r[SITE_COLUMN])
        groups.append(r["group"])
        splits.append(r["split"])
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
            codes[i] = SPLITS.index("val") if sp == "val" else SPLITS.index("train")
    count = Counter((s, int(c)) for s, c in zip(sites, codes))
    summary = {
        "method": "leave one site out", "held_out_site": site, "sites": found,
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
