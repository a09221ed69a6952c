"""Group-aware stratified splits, splits fixed by a source, and duplicates linked before splitting."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest

from medtl.errors import MedtlError
from medtl.ingest.splits import SPLITS, Duplicate, assign_split_codes, find_copies, link_duplicates, split_codes
from medtl.ingest.table import digest_ids

RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}


def assign_splits(groups, labels, ratios, seed, fixed=None) -> list[str]:
    """`assign_split_codes` on names, as ingest calls it on codes numbered in name order."""
    _, group_codes = np.unique(np.array(groups, dtype=object).astype(str), return_inverse=True)
    label_names, label_codes = np.unique(np.array(labels, dtype=object).astype(str), return_inverse=True)
    codes = assign_split_codes(group_codes, label_codes, label_names.tolist(), ratios, seed,
                               split_codes(fixed or [None] * len(groups)))
    return [SPLITS[c] for c in codes]


def find_duplicates(keys, splits, kind) -> list[Duplicate]:
    """`find_copies` on key and split names, as `Duplicate`s."""
    ids: dict = {}
    key_ids = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    codes = split_codes(splits)
    rows, firsts = find_copies(key_ids, codes)
    return [Duplicate(int(i), int(j), kind, bool(codes[i] != codes[j])) for i, j in zip(rows, firsts)]


def patients(n: int, per: int = 3) -> tuple[list[str], list[str]]:
    groups = [f"P{i}" for i in range(n) for _ in range(per)]
    labels = ["pos" if i % 3 == 0 else "neg" for i in range(n) for _ in range(per)]
    return groups, labels


def spans(groups, split) -> dict[str, set[str]]:
    out = defaultdict(set)
    for g, s in zip(groups, split):
        out[g].add(s)
    return out


def test_no_patient_in_two_splits_and_every_class_everywhere():
    groups, labels = patients(30)
    split = assign_splits(groups, labels, RATIOS, seed=1)
    assert all(len(s) == 1 for s in spans(groups, split).values())
    for s in ("train", "val", "test"):
        assert {y for y, x in zip(labels, split) if x == s} == {"pos", "neg"}
    assert split.count("train") == 3 * 18  # 60% of 30 patients, by patient
    assert split == assign_splits(groups, labels, RATIOS, seed=1)
    assert split != assign_splits(groups, labels, RATIOS, seed=2)


def test_too_few_groups_in_a_class_names_it():
    groups = ["a", "b", "c", "d", "e", "r1", "r1"]
    labels = ["common"] * 5 + ["rare"] * 2
    with pytest.raises(MedtlError, match="class 'rare' has 1 group"):
        assign_splits(groups, labels, RATIOS, seed=0)


def test_fixed_splits_are_kept_and_val_is_drawn_from_train():
    groups, labels = patients(40, per=2)
    fixed = ["test" if int(g[1:]) >= 30 else "train" for g in groups]
    split = assign_splits(groups, labels, RATIOS, seed=0, fixed=fixed)
    assert all(s == "test" for s, f in zip(split, fixed) if f == "test")
    assert {s for s, f in zip(split, fixed) if f == "train"} == {"train", "val"}
    assert all(len(s) == 1 for s in spans(groups, split).values())
    with pytest.raises(MedtlError, match="both"):
        assign_splits(["a", "a"], ["x", "x"], RATIOS, 0, fixed=["train", "test"])


def test_duplicates_merge_groups_unless_fixed_apart():
    groups = ["A", "B", "C", "D"]
    keys = [["h1"], ["h1"], ["h1"], ["h2"]]
    assert len(set(link_duplicates(groups, keys, [None] * 4)[:3])) == 1
    merged = link_duplicates(groups, keys, ["test", "train", "train", None])
    assert merged[1] == merged[2] != merged[0]  # train copies share a group; the test copy stays apart


def test_find_duplicates_flags_the_later_split():
    dups = find_duplicates(["h", "h", "k"], ["test", "train", "train"], "file")
    assert dups == [Duplicate(row=0, duplicate_of=1, kind="file", cross_split=True)]


def reference_link(groups, keys, fixed):
    """Duplicate linking written plainly: a dict union-find over group names, merging toward the smaller name."""
    parent = {g: g for g in groups}
    split_of = {}
    for g, s in zip(groups, fixed):
        if s is not None:
            split_of.setdefault(g, s)

    def root(g):
        while parent[g] != g:
            g = parent[g]
        return g

    holders = defaultdict(list)
    for g, ks in zip(groups, keys):
        for k in ks:
            for other in holders[k]:
                a, b = sorted((root(g), root(other)))
                sa, sb = split_of.get(a), split_of.get(b)
                if a == b or (sa and sb and sa != sb):
                    continue
                parent[b], split_of[a] = a, sa or sb
            if g not in holders[k]:
                holders[k].append(g)
    return [root(g) for g in groups]


def reference_duplicates(keys, splits, kind):
    first, dups = {}, []
    for i in sorted(range(len(keys)), key=lambda i: (("train", "val", "test").index(splits[i]), i)):
        j = first.setdefault(keys[i], i)
        if j != i:
            dups.append(Duplicate(i, j, kind, splits[i] != splits[j]))
    return dups


@pytest.mark.parametrize("seed", range(40))
def test_array_linking_and_duplicates_match_a_plain_reference(seed):
    """Copies found through file and pixel digests, some images without a file digest, some splits fixed."""
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    groups = [f"g{rng.randint(0, n // 2)}" for _ in range(n)]
    fixed_of = {g: rng.choice([None, None, "train", "test"]) for g in groups}
    fixed = [fixed_of[g] for g in groups] if seed % 2 else [None] * n
    keys = [([f"file{rng.randint(0, n)}"] if rng.random() < 0.7 else []) + [b"pixels%d" % rng.randint(0, n)]
            for _ in range(n)]
    assert link_duplicates(groups, keys, fixed) == reference_link(groups, keys, fixed)
    split = [rng.choice(["train", "val", "test"]) for _ in range(n)]
    for kind, column in (("file", [k[0] for k in keys]), ("pixels", [k[-1] for k in keys])):
        assert find_duplicates(column, split, kind) == reference_duplicates(column, split, kind)


def test_digest_ids_group_equal_digests():
    digests = np.frombuffer(bytes(range(32)) + bytes(32) + bytes(range(32)) + bytes(31) + b"\1", "S32")
    count, ids = digest_ids(np.ascontiguousarray(digests))
    assert count == 3 and ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3
