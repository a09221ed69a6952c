"""Group-aware stratified splits, splits fixed by a source, and duplicates linked before splitting."""
from __future__ import annotations

from collections import defaultdict

import pytest

from medtl.errors import MedtlError
from medtl.splits import Duplicate, assign_splits, find_duplicates, link_duplicates

RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}


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
