"""Honest splits: by group (patient), stratified by label, duplicates caught across splits.

The work is done on integer codes in numpy arrays, so that ingest can split
hundreds of thousands of images without a Python object per image: groups
and labels are numbered in the order of their names (`np.unique` gives that
order), so every tie broken by name is broken the same way by number. The
cross-validation's `link_duplicates` takes lists of names and wraps the coded one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtl.errors import MedtlError

SPLITS = ("train", "val", "test")
NO_SPLIT = -1  # split code of an image whose source fixed none


def split_codes(splits: list[str | None]) -> np.ndarray:
    """Split names (None: not fixed) as int8 codes into SPLITS (NO_SPLIT for None)."""
    return np.array([NO_SPLIT if s is None else SPLITS.index(s) for s in splits], dtype=np.int8)


def first_disagreement(groups: np.ndarray, codes: np.ndarray) -> tuple[int, int] | None:
    """(i, j): the first row i whose code (>= 0) differs from that of row j, the first coded row of its group."""
    rows = np.flatnonzero(codes >= 0)
    if not len(rows):
        return None
    _, first, inverse = np.unique(groups[rows], return_index=True, return_inverse=True)
    differ = np.flatnonzero(codes[rows] != codes[rows[first]][inverse])
    if not len(differ):
        return None
    k = differ[0]
    return int(rows[k]), int(rows[first[inverse[k]]])


def assign_split_codes(
    groups: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    ratios: dict[str, float],
    seed: int,
    fixed: np.ndarray,
) -> np.ndarray:
    """A split code (into SPLITS) for each image such that no group spans two splits.

    `groups` and `labels` are codes numbered in name order, `fixed` split codes
    (NO_SPLIT: not fixed). Groups are shuffled per stratum (the group's majority
    label) with `seed` and cut by `ratios`; every split with a positive ratio
    gets at least one group of every class. Images whose source fixed a split
    keep it, and so does the rest of their group. When the source fixes train
    (and test) but no val, and val has a positive ratio, val groups are drawn
    from the source's train groups in the ratio val : train, as published
    datasets rarely have one.
    """
    clash = first_disagreement(groups, fixed)
    if clash:
        i, j = clash
        raise MedtlError(f"a group appears in both the '{SPLITS[fixed[j]]}' and '{SPLITS[fixed[i]]}' splits "
                         "fixed by the source")
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    group_split = np.full(n_groups, NO_SPLIT, dtype=np.int8)
    coded = fixed >= 0
    group_split[groups[coded]] = fixed[coded]
    majority = _majority(groups, labels, n_groups, len(label_names))
    rng = np.random.default_rng(seed)

    present = np.zeros(n_groups, dtype=bool)
    present[groups] = True  # codes may skip numbers (groups merged into others)
    pools = [(np.flatnonzero(present & (group_split == NO_SPLIT)), {s: ratios.get(s, 0) for s in SPLITS}, "")]
    fixed_splits = {SPLITS[c] for c in np.unique(group_split) if c != NO_SPLIT}
    if fixed_splits and "val" not in fixed_splits and ratios.get("val", 0) > 0 and "train" in fixed_splits:
        from_train = np.flatnonzero(group_split == SPLITS.index("train"))
        group_split[from_train] = NO_SPLIT
        pools.append((from_train, {"train": ratios.get("train", 0), "val": ratios["val"]},
                      " (val is drawn from the source's train split, which the source fixed)"))
    for members, pool_ratios, note in pools:
        if len(members):
            _assign(members, majority, label_names, pool_ratios, rng, note, group_split)
    return group_split[groups]


def _majority(groups: np.ndarray, labels: np.ndarray, n_groups: int, n_labels: int) -> np.ndarray:
    """Each group's most common label code; ties go to the smaller code, i.e. the first name."""
    pairs, counts = np.unique(groups.astype(np.int64) * n_labels + labels, return_counts=True)
    group_of, label_of = pairs // n_labels, pairs % n_labels
    order = np.lexsort((label_of, -counts, group_of))  # by group, then most common, then smallest code
    group_of, label_of = group_of[order], label_of[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = group_of[1:] != group_of[:-1]
    best = np.empty(n_groups, dtype=np.int64)
    best[group_of[first]] = label_of[first]
    return best


def _assign(members: np.ndarray, majority: np.ndarray, label_names: list[str], ratios: dict[str, float], rng,
            note: str, group_split: np.ndarray) -> None:
    """Cut each stratum of `members` (group codes, ascending) into the wanted splits, writing into group_split."""
    wanted = [s for s in SPLITS if ratios.get(s, 0) > 0]
    total = sum(ratios[s] for s in wanted)
    for label in np.unique(majority[members]):
        group_list = members[majority[members] == label]
        if len(group_list) < len(wanted):
            raise MedtlError(
                f"class '{label_names[label]}' has {len(group_list)} group(s) (patients) to split, too few to put at "
                f"least one in each of the {', '.join(wanted)} splits{note}; add data for this class or change the "
                "split ratios"
            )
        order = group_list[rng.permutation(len(group_list))]
        counts = _cut(len(order), [ratios[s] / total for s in wanted])
        start = 0
        for split, n in zip(wanted, counts):
            group_split[order[start : start + n]] = SPLITS.index(split)
            start += n


def link_duplicates(groups: list[str], keys: list[list[str]], fixed: list[str | None]) -> list[str]:
    """Groups merged wherever two images share a key (file or pixel hash), for splitting only (see `link_copies`)."""
    names, group_codes = np.unique(np.array(groups, dtype=object).astype(str), return_inverse=True)
    ids: dict = {}
    width = max((len(ks) for ks in keys), default=0)
    columns = [np.array([ids.setdefault(ks[j], len(ids)) if j < len(ks) else -1 for ks in keys], dtype=np.int64)
               for j in range(width)]
    roots = link_copies(group_codes, columns, split_codes(fixed))
    return names[roots].tolist()


def link_copies(groups: np.ndarray, key_columns: list[np.ndarray], fixed: np.ndarray) -> np.ndarray:
    """Each image's group code after merging groups wherever two images share a key, for splitting only.

    `groups` are codes in name order; each of `key_columns` holds a key id per
    image (-1: none), ids shared by all columns. Copies of one image then land
    in one split instead of leaking across two. Components that the source
    fixed to different splits are not merged; such copies are caught
    afterwards by `find_copies`. Only keys held by two or more images are
    visited, in image order, so the work grows with the copies, not the images.
    """
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    parent = np.arange(n_groups)
    split_of = np.full(n_groups, NO_SPLIT, dtype=np.int8)
    coded = np.flatnonzero(fixed >= 0)
    fixed_groups, first = np.unique(groups[coded], return_index=True)
    split_of[fixed_groups] = fixed[coded[first]]  # a group's first fixed split
    shared = _shared_keys(key_columns)
    rows = np.flatnonzero(_holds(shared, key_columns))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    holders: dict[int, list[int]] = {}  # shared key -> groups holding it, in the order first seen
    for i in rows:
        g = int(groups[i])
        for column in key_columns:
            k = int(column[i])
            if k < 0 or not shared[k]:
                continue
            held = holders.setdefault(k, [])
            for other in held:
                a, b = root(g), root(other)
                if a == b:
                    continue
                sa, sb = split_of[a], split_of[b]
                if sa != NO_SPLIT and sb != NO_SPLIT and sa != sb:
                    continue
                a, b = min(a, b), max(a, b)  # merge toward the smaller name: the result does not depend on row order
                parent[b] = a
                split_of[a] = sa if sa != NO_SPLIT else sb
            if g not in held:
                held.append(g)
    return _roots(parent)[groups]


def holds_copy(key_columns: list[np.ndarray]) -> np.ndarray:
    """Per image: True where another image holds one of its keys."""
    return _holds(_shared_keys(key_columns), key_columns)


def _holds(shared: np.ndarray, key_columns: list[np.ndarray]) -> np.ndarray:
    if not key_columns:
        return np.zeros(0, dtype=bool)
    return np.any([shared[c] for c in key_columns], axis=0)


def _shared_keys(key_columns: list[np.ndarray]) -> np.ndarray:
    """Indexed by key id: True where two or more images hold the key; index -1 (no key) is False."""
    ids = np.concatenate([c[c >= 0] for c in key_columns]) if key_columns else np.zeros(0, np.int64)
    counts = np.bincount(ids) if len(ids) else np.zeros(0, np.int64)
    return np.append(counts > 1, False)  # shared[-1] (no key) is False


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every node's root in a union-find forest, by pointer jumping."""
    roots = parent.copy()
    while True:
        up = roots[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


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


def find_copies(keys: np.ndarray, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, copy_of): rows whose key id (>= 0) an earlier row holds, and that row; earlier = an earlier split, then order.

    Rows come in that same order (split, then row), as a walk through the images would meet them.
    """
    rows = np.flatnonzero(keys >= 0)
    order = rows[np.lexsort((rows, splits[rows], keys[rows]))]  # by key, then split, then row
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = keys[order[1:]] != keys[order[:-1]]
    first = order[np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))]
    later, of = order[~is_first], first[~is_first]
    by_walk = np.lexsort((later, splits[later]))
    return later[by_walk], of[by_walk]
