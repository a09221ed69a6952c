"""Several labelled sources in one ingest (`ingest.sources`): the site column, one patient across sites,
copies and label conflicts across sites, splits stratified by site, and the bad inputs that stop it."""
from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.deploy.locate import locate
from medtl.errors import MedtlError, ParamsError
from medtl.ingest.ingest import IngestParams, run_ingest
from medtl.ingest.manifest import read_manifest
from medtl.intake.phi import KEY_ENV, pseudonymise
from medtl.params import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sites test key, long enough")


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


def site_csv(root: Path, seed: int, rows: list[tuple[str, str, str]] = (), per_class: int = 4) -> dict:
    """A CSV source under root: per_class patients of each class, one image each (same file names at every site)."""
    out = list(rows)
    for c, label in enumerate(("benign", "malignant")):
        for i in range(per_class):
            out.append((f"{label}_{i}.png", label, f"{root.name}-{label}-{i}"))
    for k, (rel, _, _) in enumerate(out):
        if not (root / rel).exists():
            png(root / rel, seed * 1000 + k)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(out)
    return {"manifest": str(root / "labels.csv")}


def params(data: Path, sources: list[dict], **raw) -> IngestParams:
    return build(IngestParams, {"data": str(data), "workers": 1, "sources": sources, **raw}, "ingest")


def test_two_sites_one_manifest(tmp_path):
    data = tmp_path / "data"
    site_csv(data / "vienna", 1, per_class=6)
    # rosendahl: one patient also seen in vienna (same id), a copy of a vienna file (same bytes), and a vienna
    # image relabelled (same bytes, other label)
    png(data / "rosendahl" / "shared_patient.png", 77)
    shutil.copy(data / "vienna" / "benign_0.png", data / "rosendahl" / "copy_of_vienna.png")
    shutil.copy(data / "vienna" / "benign_1.png", data / "rosendahl" / "relabelled.png")
    site_csv(data / "rosendahl", 2, rows=[("shared_patient.png", "benign", "vienna-benign-2"),
                                          ("copy_of_vienna.png", "benign", "r-copy"),
                                          ("relabelled.png", "malignant", "r-relabelled")])
    out = tmp_path / "out"
    out.mkdir()
    report = run_ingest(p := params(data, [{"name": "vienna", "source": "csv", "csv": site_csv(data / "vienna", 1, per_class=6)},
                                      {"name": "rosendahl", "source": "csv",
                                       "csv": {"manifest": str(data / "rosendahl" / "labels.csv")}}],
                                 max_quarantine_fraction=0.2), out)
    rows = read_manifest(out / "manifest.csv")
    assert {r["site"] for r in rows} == {"vienna", "rosendahl"}
    assert report["source"]["source"] == "sources"
    assert [s["name"] for s in report["source"]["sources"]] == ["vienna", "rosendahl"]
    # equal relative paths at two sites are two files
    refs = Counter(r["source_ref"] for r in rows)
    assert max(refs.values()) == 1
    # `medtl locate` finds each file at its own site
    (found,) = locate(p, [rows[-1]["image_id"]], out / "manifest.csv")
    assert found.item.site == rows[-1]["site"] and found.item.path.is_relative_to(data / rows[-1]["site"])
    # one patient at two sites is one group, in one split
    shared = [r for r in rows if r["group"] == pseudonymise("vienna-benign-2")]
    assert sorted(r["site"] for r in shared) == ["rosendahl", "vienna"] and len({r["split"] for r in shared}) == 1
    # a copy across sites is found (and kept in its original's split), a relabelled copy is a conflict
    dup = [d for d in report["duplicates"] if d["kind"] == "file"]
    assert len(dup) == 1 and dup[0]["action"] == "kept (same split)"
    assert len(report["label_conflicts"]) == 1
    assert sorted(report["label_conflicts"][0]["labels"]) == ["benign", "malignant"]
    assert report["quarantine_reasons"]["label_conflict"] == 2
    # stratified by site and label: every site has both classes in every split
    strata = Counter((r["site"], r["split"], r["label"]) for r in rows)
    for site in ("vienna", "rosendahl"):
        for split in ("train", "val", "test"):
            for label in ("benign", "malignant"):
                assert strata[(site, split, label)] >= 1, (site, split, label)


def test_single_source_form_has_no_site_column(tmp_path):
    data = tmp_path / "data"
    csv_params = site_csv(data / "only", 1)
    out = tmp_path / "out"
    out.mkdir()
    run_ingest(build(IngestParams, {"data": str(data), "workers": 1, "source": "csv", "csv": csv_params}, "ingest"), out)
    assert "site" not in read_manifest(out / "manifest.csv")[0]


@pytest.mark.parametrize("sources, key", [
    ([{"name": "a", "source": "demo"}, {"name": "a", "source": "demo"}], "ingest.sources'"),
    ([{"name": "site a", "source": "demo"}], r"ingest.sources\[0\].name"),
    ([{"name": "a", "source": "folder"}], r"ingest.sources\[0\].folder.root"),
    ([{"name": "a"}], r"ingest.sources\[0\].source"),
    ([{"name": "a", "source": "demo", "demo": {"sites": 2}}], r"ingest.sources\[0\].demo.sites"),
    ([{"name": "a", "source": "folder", "folder": {"root": "/elsewhere"}}], r"ingest.sources\[0\].folder.*ingest.data"),
])
def test_bad_sources_stop_before_work(tmp_path, sources, key):
    with pytest.raises(ParamsError, match=key):
        params(tmp_path, sources)


def test_an_empty_source_stops_ingest_and_names_it(tmp_path):
    data = tmp_path / "data"
    (data / "empty").mkdir(parents=True)
    p = params(data, [{"name": "full", "source": "csv", "csv": site_csv(data / "full", 1)},
                      {"name": "empty", "source": "folder", "folder": {"root": str(data / "empty")}}])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MedtlError, match=r"ingest.sources\[1\] \(site empty\): ingest.sources\[1\].folder.root .* has no subfolders"):
        run_ingest(p, out)
    assert not any(out.iterdir())


def test_the_evidence_names_every_source_not_the_unused_single_one():
    from medtl.provenance.card import data_source

    ingest = {"source": "demo", "sources": [{"name": "vienna", "source": "csv"}, {"name": "b", "source": "demo"}]}
    assert data_source({"params": {"ingest": ingest}}) == "sources: vienna (csv), b (demo)"
    assert data_source({"params": {"ingest": {**ingest, "sources": [{"name": "b", "source": "demo"}]}}}) == "demo"


def test_a_site_column_of_a_single_csv_source_is_the_site(tmp_path):
    data = tmp_path / "data"
    rows = [(f"{label}_{site}_{i}.png", label, f"{site}-{label}-{i}", site)
            for site in ("x", "y") for label in ("benign", "malignant") for i in range(3)]
    for k, (rel, *_ ) in enumerate(rows):
        png(data / rel, k)
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group", "site"), *rows])
    out = tmp_path / "out"
    out.mkdir()
    run_ingest(build(IngestParams, {"data": str(data), "workers": 1, "source": "csv",
                                    "csv": {"manifest": str(data / "labels.csv"), "metadata": ["site"]}}, "ingest"), out)
    strata = Counter((r["site"], r["split"], r["label"]) for r in read_manifest(out / "manifest.csv"))
    assert len(strata) == 12 and set(strata.values()) == {1}  # 3 patients per site and class: one in each split
