"""Honest splits: by group (patient), stratified by label, duplicates caught across splits."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

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
    rest of their group. When the source fixes train (and test) but no val, and
    val has a positive ratio, val groups are drawn from the source's train
    groups in the ratio val : train, as published datasets rarely have one.
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
    majority = group_label(labels_by_group)
    rng = np.random.default_rng(seed)

    free = sorted(g for g in majority if g not in group_split)
    pools = [(free, {s: ratios.get(s, 0) for s in SPLITS}, "")]
    fixed_splits = set(group_split.values())
    if fixed_splits and "val" not in fixed_splits and ratios.get("val", 0) > 0 and "train" in fixed_splits:
        from_train = sorted(g for g, s in group_split.items() if s == "train")
        for g in from_train:
            del group_split[g]
        pools.append((from_train, {"train": ratios.get("train", 0), "val": ratios["val"]},
                      " (val is drawn from the source's train split, which the source fixed)"))
    for members, pool_ratios, note in pools:
        if members:
            group_split.update(_assign(members, majority, pool_ratios, rng, note))
    return [group_split[g] for g in groups]


def _assign(members: list[str], majority: dict[str, str], ratios: dict[str, float], rng, note: str) -> dict[str, str]:
    strata: dict[str, list[str]] = defaultdict(list)
    for g in members:
        strata[majority[g]].append(g)
    wanted = [s for s in SPLITS if ratios.get(s, 0) > 0]
    total = sum(ratios[s] for s in wanted)
    out = {}
    for label in sorted(strata):
        group_list = strata[label]
        if len(group_list) < len(wanted):
            raise MedtlError(
                f"class '{label}' has {len(group_list)} group(s) (patients) to split, too few to put at least one "
                f"in each of the {', '.join(wanted)} splits{note}; add data for this class or change the split ratios"
            )
        order = [group_list[i] for i in rng.permutation(len(group_list))]
        counts = _cut(len(order), [ratios[s] / total for s in wanted])
        start = 0
        for split, n in zip(wanted, counts):
            for g in order[start : start + n]:
                out[g] = split
            start += n
    return out


def link_duplicates(groups: list[str], keys: list[list[str]], fixed: list[str | None]) -> list[str]:
    """Groups merged wherever two images share a key (file or pixel hash), for splitting only.

    Copies of one image then land in one split instead of leaking across two.
    Components that the source fixed to different splits are not merged; such
    copies are caught afterwards by `find_duplicates`.
    """
    parent = {g: g for g in groups}
    split_of: dict[str, str | None] = {}
    for g, s in zip(groups, fixed):
        if s is not None:
            split_of.setdefault(g, s)

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    holders: dict[str, list[str]] = defaultdict(list)  # key -> groups holding it
    for g, ks in zip(groups, keys):
        for k in ks:
            for other in holders[k]:
                a, b = root(g), root(other)
                if a == b:
                    continue
                sa, sb = split_of.get(a), split_of.get(b)
                if sa is not None and sb is not None and sa != sb:
                    continue
                a, b = sorted((a, b))  # merge toward the smaller name: the result does not depend on row order
                parent[b] = a
                split_of[a] = sa or sb
            if g not in holders[k]:
                holders[k].append(g)
    return [root(g) for g in groups]


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


@dataclass(frozen=True)
class Duplicate:
    row: int  # the later copy
    duplicate_of: int  # the copy it repeats
    kind: str  # what they share: "file" (sha256 of the bytes) or "pixels"
    cross_split: bool  # in different splits: a leak


def find_duplicates(keys: list[str], splits: list[str], kind: str) -> list[Duplicate]:
    """Rows that share `key` (a file or pixel hash) with an earlier row; earlier = an earlier split, then order."""
    rank = {s: i for i, s in enumerate(SPLITS)}
    first: dict[str, int] = {}
    order = sorted(range(len(keys)), key=lambda i: (rank[splits[i]], i))
    dups = []
    for i in order:
        j = first.setdefault(keys[i], i)
        if j != i:
            dups.append(Duplicate(i, j, kind, splits[i] != splits[j]))
    return dups
