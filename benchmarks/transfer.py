"""Transfer to a new site: source-only vs multi-source vs fine-tuned from a source model, and the same on HAM10000.

`make bench-transfer` (or `python -m benchmarks.transfer demo|ham`). Not part
of `make bench`'s suite and not a timed test: it trains several small models.

demo: the multi-site demo (`ingest.demo.sites: 3`, sites a, b, c; b is the
target, with its own scanner and prevalence). Every arm is tested on site b's
test split (ingest's, the same images in every arm):
  source-only      trained on site a (validated on a)
  multi-source     trained on sites a + c (validated on a + c)
  target-only      50 labelled b images from scratch (validated on b's val split)
  from-source      site a's model fine-tuned on the same 50 b images
  from-multi       the a + c model fine-tuned on the same 50 b images
Each arm runs the pipeline's own stage scripts (stages/*.py) in a folder of
its own, on a copy of one ingest whose manifest rows are filtered per arm.

ham: HAM10000's four acquisition sites (melanoma vs naevus, a few hundred
images per site, downscaled before ingest) in a DVC project:
`medtl cv run --by site` and `medtl cv report --by site`, then a label-efficiency
curve at one target site (`medtl curve run`) starting from the model trained on
the other three sites vs from scratch.

Writes reports/bench_transfer_<part>.json; prints the rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "pretrain-adapt", "fine-tune", "evaluate")


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(cmd: list[str], cwd: Path, what: str) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed ({' '.join(cmd)}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def params_with(extra: dict) -> dict:
    from tests.project import deep_update

    return deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), extra)


# ---------------------------------------------------------------- demo


def ingest_demo(work: Path, args) -> Path:
    """One ingest of the three-site demo; its folder is data/ingested of every arm (manifest rewritten)."""
    base = work / "ingest"
    base.mkdir(parents=True, exist_ok=True)
    p = params_with({"ingest": {"workers": 1, "demo": {"patients": args.patients, "sites": 3, "min_size": 48,
                                                       "max_size": 64}}})
    (base / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh([sys.executable, str(ROOT / "stages/ingest.py")], base, "ingest")
    return base / "data/ingested"


def arm_folder(work: Path, name: str, ingested: Path, keep, params: dict) -> Path:
    """A folder whose data/ingested is `ingested` with only the rows `keep(row)` accepts."""
    d = work / name
    (d / "data/ingested").mkdir(parents=True, exist_ok=True)
    for f in ingested.iterdir():
        if f.name not in ("manifest.csv", "manifest.json"):
            target = d / "data/ingested" / f.name
            if not target.exists():
                target.symlink_to(f.resolve())
    with open(ingested / "manifest.csv", newline="", encoding="utf-8") as src, \
            open(d / "data/ingested/manifest.csv", "w", newline="", encoding="utf-8") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        kept = [r for r in reader if keep(r)]
        writer.writerows(kept)
    meta = json.loads((ingested / "manifest.json").read_text())
    (d / "data/ingested/manifest.json").write_text(json.dumps({**meta, "rows": len(kept)}, indent=2))
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (d / "models").mkdir(exist_ok=True)
    return d


def run_stages(d: Path) -> dict:
    t = time.perf_counter()
    for stage in STAGES:
        sh([sys.executable, str(ROOT / "stages" / f"{stage}.py")], d, f"{d.name}: {stage}")
    m = json.loads((d / "reports/metrics.json").read_text())
    train = sum(1 for _ in open(d / "data/prepared/train.csv")) - 1
    val = sum(1 for _ in open(d / "data/prepared/val.csv")) - 1
    return {"test_roc_auc": m["roc_auc"], "ci_low": m["roc_auc_ci_low"], "ci_high": m["roc_auc_ci_high"],
            "test_images": m["n"], "test_patients": m["n_groups"], "train_images": train, "val_images": val,
            "seconds": round(time.perf_counter() - t, 1)}


def demo(args) -> dict:
    from medtl.io import sha256_file

    work = args.work / "demo"
    ingested = ingest_demo(work, args)
    common = {"preprocess": {"image_size": args.size},
              "finetune": {"epochs": args.epochs, "patience": args.epochs, "batch_size": 32},
              "evaluate": {"saliency": {"enabled": False}, "bootstrap": {"n_resamples": 1000}}}
    source = lambda sites: params_with({**common, "preprocess": {"image_size": args.size,  # noqa: E731
                                                                   "cv": {"held_out_site": "b"}}})
    # Site b's train and val rows are left out of the source arms: b's test split is the shared test set.
    b_test_or = lambda sites: (lambda r: r["site"] in sites or (r["site"] == "b" and r["split"] == "test"))  # noqa: E731
    rows = {}
    for name, sites in (("source-only", {"a"}), ("multi-source", {"a", "c"})):
        d = arm_folder(work, name, ingested, b_test_or(sites), source(sites))
        rows[name] = {**run_stages(d), "target_labels": 0, "sources": sorted(sites)}
    only_b = lambda r: r["site"] == "b"  # noqa: E731
    target = {**common, "preprocess": {"image_size": args.size, "train_subset": {"images": args.target_labels}}}
    for name, start in (("target-only", None), ("from-source", "source-only"), ("from-multi", "multi-source")):
        p = params_with(target)
        if start:
            model = work / start / "models/model.pt"
            p["pretrain"].update({"weights": str(model), "sha256": sha256_file(model)})
        d = arm_folder(work, name, ingested, only_b, p)
        r = run_stages(d)
        rows[name] = {**r, "target_labels": r["train_images"] + r["val_images"], "start": start or "random init"}
    return {"part": "demo", "settings": {"patients_per_site": args.patients, "sites": ["a", "b", "c"], "target": "b",
                                         "image_size": args.size, "epochs": args.epochs,
                                         "target_train_images": args.target_labels, "arch": "resnet18",
                                         "weights": "none"}, "rows": rows}


# ---------------------------------------------------------------- HAM10000


def ham_subset(src: Path, out: Path, nv: int, mel: int, side: int, seed: int = 0) -> dict:
    """Melanoma vs naevus, at most `nv` and `mel` images per site (whole lesions), downscaled to `side` px PNGs."""
    import cv2
    import numpy as np

    rows = list(csv.DictReader(open(src / "HAM10000_metadata_sites.csv", newline="", encoding="utf-8")))
    rng = np.random.default_rng(seed)
    kept, counts = [], {}
    for site in sorted({r["dataset"] for r in rows}):
        for dx, cap in (("nv", nv), ("mel", mel)):
            lesions: dict[str, list[dict]] = {}
            for r in rows:
                if r["dataset"] == site and r["dx"] == dx:
                    lesions.setdefault(r["lesion_id"], []).append(r)
            n = 0
            for lesion in rng.permutation(sorted(lesions)):
                if n >= cap:
                    break
                kept += lesions[lesion]
                n += len(lesions[lesion])
            counts[f"{site}/{dx}"] = n
    for r in kept:
        dst = out / "images" / r["dx"] / f"{r['image_id']}.png"
        if not dst.exists():
            img = cv2.imread(str(src / r["dx"] / f"{r['image_id']}.jpg"), cv2.IMREAD_COLOR)
            scale = side / max(img.shape[:2])
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                                             interpolation=cv2.INTER_AREA))
    with open(out / "images/labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "site"])
        w.writerows([r["lesion_id"], r["image_id"], r["dx"], r["dataset"]] for r in kept)
    return counts


def ham_project(dest: Path, data: Path, extra: dict):
    from tests.project import make_project

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(data, dest.parent / "hamdata-tmp", dirs_exist_ok=True)
    p = make_project(dest, extra)
    shutil.move(str(dest.parent / "hamdata-tmp"), str(dest / "hamdata"))
    p.commit("data")
    return p


def ham(args) -> dict:
    work = args.work / "ham"
    data = work / "subset"
    counts = ham_subset(Path(args.ham), data, args.ham_nv, args.ham_mel, args.ham_side)
    settings = {
        "ingest": {"source": "csv", "data": "hamdata", "classes": ["nv", "mel"], "workers": 1,
                   "csv": {"manifest": "hamdata/images/labels.csv", "path_template": "{dx}/{image_id}.png",
                           "label_column": "dx", "group_column": "lesion_id", "metadata": ["site"]}},
        "preprocess": {"image_size": args.size, "channels": 3},
        "finetune": {"epochs": args.epochs, "patience": args.epochs, "batch_size": 32},
        "evaluate": {"saliency": {"enabled": False}, "bootstrap": {"n_resamples": 500}},
    }
    medtl = [sys.executable, "-m", "medtl.cli"]
    p = ham_project(work / "loso", data, settings)
    t = time.perf_counter()
    p.dvc("repro", "ingest")  # the experiments run the rest
    p.commit("ingested")
    p.run(*medtl, "cv", "run", "--by", "site", "-j", "2", timeout=7200)
    p.run(*medtl, "cv", "report", "--by", "site")
    loso = json.loads((p.path / "reports/cv-site/summary.json").read_text())
    loso_s = round(time.perf_counter() - t, 1)

    # The curve at one target site: its own labels only, from the other three sites' model or from scratch.
    target = args.ham_target
    import dvc.api

    from medtl.experiments.cv_sites import site_experiments
    from medtl.io import sha256_file

    cwd = Path.cwd()
    os.chdir(p.path)
    try:
        _, revs = site_experiments("loso", "HEAD")
    finally:
        os.chdir(cwd)
    source = work / "source-model.pt"
    with dvc.api.open("models/model.pt", repo=str(p.path), rev=revs[target], mode="rb") as f:
        source.write_bytes(f.read())

    q = ham_project(work / "curve", data, settings)
    only = q.path / "hamdata/images/labels.csv"
    lines = only.read_text().splitlines()
    only.write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.rsplit(",", 1)[1] == target]) + "\n")
    # Tracked by DVC (models/pretrained/ is where git sees .dvc files): queued experiments run in a copy of the
    # repository, which holds only what git and DVC track.
    (q.path / "models/pretrained").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, q.path / "models/pretrained/source-model.pt")
    q.dvc("add", "models/pretrained/source-model.pt")
    q.update_params({"pretrain": {"weights": "models/pretrained/source-model.pt", "sha256": sha256_file(source)}})
    q.commit("target site only, from the source model")
    t = time.perf_counter()
    q.dvc("repro", "ingest")
    q.commit("ingested")
    q.run(*medtl, "curve", "run", "--sizes", args.curve_sizes, "--repeats", str(args.curve_repeats), "-j", "2",
          "--compare", "pretrain.weights=none", "--compare", "pretrain.sha256=null", timeout=7200)
    q.run(*medtl, "curve", "report")
    curve = json.loads((q.path / "reports/curve/summary.json").read_text())
    return {"part": "ham", "settings": {**settings, "per_site_cap": {"nv": args.ham_nv, "mel": args.ham_mel},
                                        "downscaled_to": args.ham_side, "subset_counts": counts,
                                        "curve_target": target, "curve_sizes": args.curve_sizes,
                                        "curve_repeats": args.curve_repeats},
            "loso": {k: loso[k] for k in ("sites", "pooled_out_of_site", "across_sites", "worst_site")}
            | {"per_site": [{"site": s["site"], **{k: s["test"][k] for k in ("roc_auc", "roc_auc_ci_low",
                                                                            "roc_auc_ci_high", "n", "n_groups")}}
                            for s in loso["per_site"]], "seconds": loso_s},
            "curve": {arm: [{k: pt[k] for k in ("size", "images", "patients", "repeats", "roc_auc", "roc_auc_sd",
                                                "roc_auc_ci_low", "roc_auc_ci_high")} for pt in a["points"]]
                      for arm, a in curve["arms"].items()} | {"seconds": round(time.perf_counter() - t, 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("demo", "ham"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/medtl-bench-transfer"))
    ap.add_argument("--out", type=Path, default=None, help="default: reports/bench_transfer_<part>.json")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6, help="demo: 6; the HAM run in docs/validation.md used 3")
    ap.add_argument("--patients", type=int, default=60, help="demo: patients per site")
    ap.add_argument("--target-labels", type=int, default=50, help="demo: labelled target training images")
    ap.add_argument("--ham", default="../shared/data/ham10000")
    ap.add_argument("--ham-nv", type=int, default=60, help="naevus images per site (whole lesions)")
    ap.add_argument("--ham-mel", type=int, default=30, help="melanoma images per site (whole lesions)")
    ap.add_argument("--ham-side", type=int, default=64, help="HAM images are downscaled to this side before ingest")
    ap.add_argument("--ham-target", default="rosendahl")
    ap.add_argument("--curve-sizes", default="25,all")
    ap.add_argument("--curve-repeats", type=int, default=2)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t = time.perf_counter()
    result = demo(args) if args.part == "demo" else ham(args)
    result.update({"cpu": cpu(), "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t, 1)})
    out = args.out or ROOT / f"reports/bench_transfer_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
