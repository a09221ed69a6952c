"""The multi-site demo: sites that differ the way scanners do, deterministic, and the single-site demo unchanged."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pydicom
import pytest

from medtl.errors import ParamsError
from medtl.ingest.ingest import IngestParams
from medtl.intake import demo
from medtl.intake.readers import read
from medtl.intake.readers.base import ReadOptions
from medtl.intake.sources import open_source
from medtl.params import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SMALL = {"patients": 8, "min_size": 40, "max_size": 48, "min_images_per_patient": 1, "max_images_per_patient": 2}


def items_of(tmp_path, **demo_params):
    src = open_source(build(IngestParams, {"demo": {**SMALL, **demo_params}}, "ingest"), tmp_path)
    return src, list(src.items)


def test_preset_sites_differ_as_scanners_do_and_are_deterministic(tmp_path):
    src, items = items_of(tmp_path, sites=2)
    try:
        by_site: dict[str, list] = {}
        for item in items:
            by_site.setdefault(item.extra["site"], []).append(item)
        assert sorted(by_site) == ["a", "b"] and src.description["sites"] == ["a", "b"]
        assert all(i.relative.startswith(f"demo/{i.extra['site']}/") for i in items)
        # patients are distinct across sites (one patient is one site here)
        groups = {s: {i.group for i in its} for s, its in by_site.items()}
        assert not groups["a"] & groups["b"]
        photometric = {s: Counter(pydicom.dcmread(i.path).PhotometricInterpretation for i in its)
                       for s, its in by_site.items()}
        assert photometric["b"]["MONOCHROME1"] > photometric["a"]["MONOCHROME1"]  # preset b: 70% vs 25%
        pixels = {s: [read(i.path, ReadOptions())[0].pixels.astype(np.float32) for i in its] for s, its in by_site.items()}
        body = {s: np.mean([p[p > 0.2].mean() for p in ps]) for s, ps in pixels.items()}
        assert body["b"] < body["a"] - 0.1  # b's transfer curve (gamma 1.8) darkens the body
        borders = {s: np.mean([(p[0] == 0).mean() + (p[:, 0] == 0).mean() for p in ps]) for s, ps in pixels.items()}
        assert borders["b"] > borders["a"]  # collimation: dark bands at the edges
        digest = hashlib.sha256(b"".join(i.path.read_bytes() for i in items)).hexdigest()
    finally:
        src.cleanup()
    src2, items2 = items_of(tmp_path, sites=2)
    try:
        assert hashlib.sha256(b"".join(i.path.read_bytes() for i in items2)).hexdigest() == digest
    finally:
        src2.cleanup()


def test_named_sites_with_their_own_prevalence(tmp_path):
    src, items = items_of(tmp_path, patients=20, sites=[{"name": "north", "prevalence": 0.2},
                                                        {"name": "south", "prevalence": 0.8, "patients": 10}])
    src.cleanup()
    patients = {(i.extra["site"], i.group, i.label) for i in items}
    count = Counter((s, label) for s, _, label in patients)
    assert count[("north", "lesion")] == 4 and count[("north", "normal")] == 16
    assert count[("south", "lesion")] == 8 and count[("south", "normal")] == 2


def test_single_site_demo_has_no_site(tmp_path):
    src, items = items_of(tmp_path)
    src.cleanup()
    assert all(i.extra == {} and i.relative.startswith("demo/case") for i in items)
    assert "sites" not in src.description


@pytest.mark.parametrize("sites, key", [
    ([{"name": "a"}, {"name": "a"}], "ingest.demo.sites"),
    ([{"name": "site b"}], "ingest.demo.sites[0].name"),
    ([{"name": "1st"}], "ingest.demo.sites[0].name"),
    ([{"name": "a", "gamma": 0}], "ingest.demo.sites[0].gamma"),
    (len(demo.PRESETS) + 1, "ingest.demo.sites"),
])
def test_bad_demo_sites_name_the_key(sites, key):
    with pytest.raises(ParamsError, match=key.replace("[", r"\[").replace("]", r"\]")):
        build(IngestParams, {"demo": {"sites": sites}}, "ingest")
