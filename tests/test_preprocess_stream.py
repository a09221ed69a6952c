"""Preprocess reads the manifest as a stream: rows and arrays stay aligned, and a bad manifest writes nothing."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from medtl.errors import MedtlError
from medtl.ingest.manifest import read_manifest
from medtl.ingest.splits import SPLITS
from medtl.ingest.store import PixelStore
from medtl.intake.readers.base import ReadOptions
from medtl.prepare.imaging import model_input
from medtl.prepare.prepared import load_split, load_stats
from medtl.prepare.preprocess import PreprocessParams, run_preprocess


def test_each_split_keeps_manifest_order_and_row_array_alignment(tiny_run, tmp_path):
    ingested = tiny_run.path / "data/ingested"
    run_preprocess(PreprocessParams(image_size=24), ReadOptions(), ingested, tmp_path)
    manifest = read_manifest(ingested / "manifest.csv")
    store = PixelStore(ingested / "pixels.u16")
    stats = load_stats(tmp_path)
    for split in SPLITS:
        part = [r for r in manifest if r["split"] == split]
        got = load_split(tmp_path, split, stats)
        assert [r["image_id"] for r in got.rows] == [r["image_id"] for r in part]
        assert part and stats.counts[split] == len(part)
        for k in (0, len(part) - 1):  # the first and last image of the split are its own pixels
            r = part[k]
            pixels = store.get(int(r["offset"]), int(r["height"]), int(r["width"]), int(r["channels"]))
            assert np.array_equal(got.images[k], model_input(pixels, stats.preprocessing).astype(np.float16))


def test_a_manifest_short_of_its_record_fails_before_anything_is_written(tiny_run, tmp_path):
    ingested = tmp_path / "ingested"
    shutil.copytree(tiny_run.path / "data/ingested", ingested)
    path = ingested / "manifest.csv"
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.readlines()
    path.write_text("".join(lines[:-1]), encoding="utf-8")  # the record still counts the dropped row
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(MedtlError, match=rf"has {len(lines) - 2} rows, its format record says {len(lines) - 1}"):
        run_preprocess(PreprocessParams(image_size=24), ReadOptions(), ingested, out)
    assert not any(out.iterdir())
