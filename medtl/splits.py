"""Honest splits: by group (patient), stratified by label, duplicates caught across splits."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from medtl.errors import MedtlError

SPLITS = ("train", "val", "test")


def group_label(labels_by_group: dict[str, list[str]]) -> dict[str, str]:
    """The label that stratifies a group: its most common label (ties broken by name)."""
    return {g: min(Counter(ls).items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, ls in labels_by_group.items()}


def assign_splits(
    groups: list[str],
    labels: list[str],
    ratios: dict[str, float],
    seed: int,
    fixed: list[str | None] | None = None,
) -> list[str]:
    """A split for each image such that no group spans two splits.

    Groups are shuffled per stratum (the group's majority label) with `seed` and
    cut by `ratios`; every split with a positive ratio gets at least one group
    of every class. Images whose source fixed a split keep it, and so does the
    rest of their group.
    """
    fixed = fixed or [None] * len(groups)
    group_split: dict[str, str] = {}
    for g, s in zip(groups, fixed):
        if s is None:
            continue
        if group_split.setdefault(g, s) != s:
            raise MedtlError(f"a group appears in both the '{group_split[g]}' and '{s}' splits fixed by the source")
    labels_by_group: dict[str, list[str]] = defaultdict(list)
    for g, y in zip(groups, labels):
        labels_by_group[g].append(y)
    strata: dict[str, list[str]] = defaultdict(list)
    for g, y in sorted(group_label(labels_by_group).items()):
        if g not in group_split:
            strata[y].append(g)
    wanted = [s for s in SPLITS if ratios.get(s, 0) > 0]
    total = sum(ratios[s] for s in wanted)
    rng = np.random.default_rng(seed)
    for label in sorted(strata):
        members = strata[label]
        if len(members) < len(wanted):
            raise MedtlError(
                f"class '{label}' has {len(members)} group(s) (patients) to split, too few to put at least one "
                f"in each of the {', '.join(wanted)} splits; add data for this class or change the split ratios"
            )
        order = [members[i] for i in rng.permutation(len(members))]
        counts = _cut(len(order), [ratios[s] / total for s in wanted])
        start = 0
        for split, n in zip(wanted, counts):
            for g in order[start : start + n]:
                group_split[g] = split
            start += n
    return [group_split[g] for g in groups]


def _cut(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding with at least one per part."""
    raw = np.array(fractions) * n
    counts = np.maximum(np.floor(raw).astype(int), 1)
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    order = np.argsort(-(raw - np.floor(raw)))
    i = 0
    while counts.sum() < n:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts.tolist()


def find_duplicates(keys: list[str], splits: list[str], kind: str) -> list[dict]:
    """Rows that share `key` (a file or pixel hash) with an earlier row; earlier = an earlier split, then order."""
    rank = {s: i for i, s in enumerate(SPLITS)}
    first: dict[str, int] = {}
    order = sorted(range(len(keys)), key=lambda i: (rank[splits[i]], i))
    dups = []
    for i in order:
        j = first.setdefault(keys[i], i)
        if j != i:
            dups.append({"row": i, "duplicate_of": j, "kind": kind, "cross_split": splits[i] != splits[j]})
    return dups
