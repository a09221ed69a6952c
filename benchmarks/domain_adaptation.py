"""Adapting to a new site's unlabelled images: target-site test AUC of source-only, target AdaBN, DANN and DANN + target AdaBN.

`make bench-transfer` / `python -m benchmarks.domain_adaptation`. Every arm
uses the same seed, architecture, epochs and batches; a model trained on the
target's own labels is the reference that bounds what adaptation can recover.
Two problems:

- demo: the multi-site demo's sites (`medtl.intake.demo.PRESETS`, as `ingest.demo.sites`
  makes them): source site a (the original demo's scanner), target site b,
  whose scanner differs in transfer curve, noise, resolution, blur and
  collimation, and whose prevalence differs;
- ham10000 (when ../shared/data/ham10000 is present): melanoma vs naevus,
  source the three Austrian sources (ViDIR MoleMax, ViDIR modern, Vienna DIAS),
  target the Rosendahl practice in Australia, split by lesion.

The target images are split by patient (lesion) into an unlabelled pool, used
for adaptation (and, with its labels, by the reference), and a test half that
no arm sees before scoring: no arm is transductive. AUCs carry 95%
patient-bootstrap intervals. Writes reports/bench_transfer.json and prints a
Markdown table (docs/transfer.md).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000"  # ../shared/data beside the project


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.domain_adaptation", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="demo,ham10000", help="comma-separated: demo, ham10000")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--dann-weight", type=lambda t: [float(v) for v in t.split(",")], default=[0.1, 1.0],
                   help="comma-separated DANN weights (lambda), one arm each")
    p.add_argument("--dann-lr-mult", type=float, default=1.0)
    p.add_argument("--demo-patients", type=int, default=150, help="per site, 2-4 images each")
    p.add_argument("--ham-nv", type=int, default=1200, help="source naevi sampled (all source melanomas are kept)")
    p.add_argument("--ham", type=Path, default=HAM)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("reports/bench_transfer.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs, measures nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.demo_patients, a.ham_nv, a.bootstrap, a.data = 1, 16, 40, 20, "demo"
    return a


# ---------------------------------------------------------------- data


def _split(images, labels, groups):
    from medtl.prepare.prepared import PreparedSplit

    return PreparedSplit(np.asarray(images, dtype=np.float16), np.asarray(labels, dtype=np.int64),
                         [{"group": str(g)} for g in groups])


def _by_group(n_groups: int, fractions: list[float], seed: int) -> np.ndarray:
    """A part index per group, by the given fractions."""
    order = np.random.default_rng(seed).permutation(n_groups)
    part = np.zeros(n_groups, dtype=np.int64)
    edges = np.cumsum(fractions)[:-1] * n_groups
    for i, g in enumerate(order):
        part[g] = int(np.searchsorted(edges, i, side="right"))
    return part


def _site_splits(images, labels, groups, seed: int, source: bool) -> dict:
    """Source: train/val (80/20 by group). Target: pool (unlabelled for adaptation; train/val for the reference) and test."""
    uniq, inv = np.unique(groups, return_inverse=True)
    if source:
        part = _by_group(len(uniq), [0.8, 0.2], seed)[inv]
        return {"train": _split(images[part == 0], labels[part == 0], groups[part == 0]),
                "val": _split(images[part == 1], labels[part == 1], groups[part == 1])}
    part = _by_group(len(uniq), [0.4, 0.1, 0.5], seed + 1)[inv]  # train + val: the pool
    pool = part <= 1
    return {"pool": _split(images[pool], labels[pool], groups[pool]),
            "train": _split(images[part == 0], labels[part == 0], groups[part == 0]),
            "val": _split(images[part == 1], labels[part == 1], groups[part == 1]),
            "test": _split(images[part == 2], labels[part == 2], groups[part == 2])}


def demo_sites(patients: int, size: int, seed: int, target_site: str = "b") -> tuple[dict, dict]:
    """Source: the demo's site a; target: `target_site`, both as the multi-site demo renders them (in memory)."""
    import cv2

    from medtl.intake import demo

    presets = {name: (prevalence, scanner) for name, prevalence, scanner in demo.PRESETS}
    sites = []
    for site, s in (("a", seed + 11), (target_site, seed + 23)):
        prevalence, scanner = presets[site]
        rng = np.random.default_rng(s)
        images, labels, groups = [], [], []
        for p in demo.fake_patients(patients, prevalence, s):
            tone = rng.normal(0, 0.05)
            for _ in range(int(rng.integers(2, 5))):
                img = demo.render(rng, demo.synth_image(rng, 128, 128, p.diseased, tone, scanner.noise), scanner)
                images.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)[None])
                labels.append(int(p.diseased))
                groups.append(f"{site}{p.index}")
        sites.append((np.stack(images), np.array(labels), np.array(groups)))
    return _site_splits(*sites[0], seed, True), _site_splits(*sites[1], seed, False)


def ham_sites(root: Path, size: int, nv_sample: int, seed: int) -> tuple[dict, dict]:
    """Melanoma (1) vs naevus (0); source: the Austrian sources, target: Rosendahl (Australia); groups are lesions."""
    from medtl.intake.readers import read
    from medtl.intake.readers.base import ReadOptions
    from medtl.prepare.imaging import Preprocessing, model_input, read_record

    pre = Preprocessing(read=read_record(ReadOptions()), image_size=size, channels=3, resize="pad", mean=[0.5] * 3,
                        std=[0.25] * 3, classes=["nv", "mel"])
    with open(root / "HAM10000_metadata_sites.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["dx"] in ("mel", "nv")]
    rng = np.random.default_rng(seed)
    source = [r for r in rows if r["dataset"] != "rosendahl"]
    nv = [r for r in source if r["dx"] == "nv"]
    keep = {r["image_id"] for r in source if r["dx"] == "mel"} | \
        {nv[i]["image_id"] for i in rng.choice(len(nv), min(nv_sample, len(nv)), replace=False)}
    out = []
    for rows_ in ([r for r in source if r["image_id"] in keep], [r for r in rows if r["dataset"] == "rosendahl"]):
        images = np.stack([model_input(read(root / r["dx"] / f"{r['image_id']}.jpg", pre.read_options())[0].pixels, pre)
                           for r in rows_])
        out.append((images, np.array([int(r["dx"] == "mel") for r in rows_]), np.array([r["lesion_id"] for r in rows_])))
    return _site_splits(*out[0], seed, True), _site_splits(*out[1], seed, False)


# ---------------------------------------------------------------- arms


def _auc(model, split, hw, n_resamples: int, seed: int) -> dict:
    from medtl.evaluate.metrics_report import evaluate_split
    from medtl.metrics import apply_temperature
    from medtl.model.inference import predict_logits

    probs = apply_temperature(predict_logits(model, split.images, 128, hw, "bench"), 1.0)
    r = evaluate_split(split.labels, probs, ["0", "1"], groups=[x["group"] for x in split.rows], n_resamples=n_resamples,
                       seed=seed)
    return {k: r[k] for k in ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "n", "n_groups")}


def run_problem(name: str, source: dict, target: dict, a) -> dict:
    import torch

    from medtl import hardware
    from medtl.model.classifier import Classifier
    from medtl.model.start import build_backbone
    from medtl.train.data import AugmentParams
    from medtl.train.domain import DomainAdversarialParams, adabn_target
    from medtl.train.finetune import FinetuneParams, fit
    from medtl.train.target import TargetParams

    hw = hardware.Hardware(torch.device("cpu"), "fp32")
    channels = source["train"].images.shape[1]
    mean = [float(source["train"].images[:, c].astype(np.float32).mean()) for c in range(channels)]
    std = [float(source["train"].images[:, c].astype(np.float32).std()) + 1e-3 for c in range(channels)]

    def classifier():
        torch.manual_seed(a.seed)
        return Classifier(build_backbone("resnet18", channels, "none"), 2, mean, std)

    base = FinetuneParams(strategy="full", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.epochs,
                          seed=a.seed, device="cpu", precision="fp32", augment=AugmentParams(rotate_limit=10.0))
    pool, test = target["pool"].images, target["test"]
    rows, timings = {}, {}

    def arm(label, params, train, val, adapt_pool=None, adabn=False):
        t0 = time.perf_counter()
        model = classifier()
        summary = fit(params, model, train, val, hw, target=adapt_pool)
        timings[label] = time.perf_counter() - t0
        rows[label] = {**_auc(model, test, hw, a.bootstrap, a.seed), "best_epoch": summary["best_epoch"],
                       "seconds": round(timings[label], 1)}
        if "domain_accuracy" in summary["history"][-1]:
            rows[label]["domain_accuracy_last_epoch"] = summary["history"][-1]["domain_accuracy"]
        print(f"{name}: {label}: {rows[label]}", file=sys.stderr, flush=True)
        if adabn:
            adabn_target(model, pool, 64, hw)
            rows[label + " + target AdaBN"] = {**_auc(model, test, hw, a.bootstrap, a.seed),
                                               "best_epoch": summary["best_epoch"]}
            print(f"{name}: {label} + target AdaBN: {rows[label + ' + target AdaBN']}", file=sys.stderr, flush=True)

    arm("source-only", base, source["train"], source["val"], adabn=True)
    for w in a.dann_weight:
        dann = replace(base, target=TargetParams(source="demo"),
                       domain_adversarial=DomainAdversarialParams(weight=w, lr_mult=a.dann_lr_mult))
        arm(f"DANN (weight {w:g})", dann, source["train"], source["val"], adapt_pool=pool, adabn=True)
    # The reference sees fewer (target) images: it gets as many optimiser steps as the source arms, not fewer.
    ref_epochs = a.epochs * max(1, round(len(source["train"].labels) / len(target["train"].labels)))
    arm("target-trained (reference)", replace(base, epochs=ref_epochs, patience=ref_epochs), target["train"], target["val"])
    src, ref = rows["source-only"]["roc_auc"], rows["target-trained (reference)"]["roc_auc"]
    for label, r in rows.items():
        r["gap_closed"] = None if ref is None or src is None or ref == src else (r["roc_auc"] - src) / (ref - src)
    counts = {"source_train": len(source["train"].labels), "source_val": len(source["val"].labels),
              "target_pool": len(pool), "target_test": len(test.labels),
              "target_test_positive": int(test.labels.sum())}
    return {"arms": rows, "counts": counts}


def markdown(results: dict) -> str:
    lines = ["| data | arm | target-site test ROC AUC (95% CI) | share of the gap closed | train s |",
             "|---|---|---|---|---|"]
    for data, r in results["problems"].items():
        for label, x in r["arms"].items():
            gap = "" if x.get("gap_closed") is None or label in ("source-only", "target-trained (reference)") \
                else f"{x['gap_closed']:+.2f}"
            lines.append(f"| {data} | {label} | {x['roc_auc']:.3f} ({x['roc_auc_ci_low']:.3f}-{x['roc_auc_ci_high']:.3f}) "
                         f"| {gap} | {x.get('seconds', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse(argv)
    import medtl  # noqa: F401  (before torch, as the stages)
    import torch

    from benchmarks import common
    from medtl.io import write_json

    torch.set_num_threads(a.threads)
    started = time.time()
    results = {"format": "medtl-bench-transfer/1", "machine": common.machine(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "problems": {}}
    for data in a.data.split(","):
        if data == "demo":
            source, target = demo_sites(a.demo_patients, a.size, a.seed)
        elif data == "ham10000":
            if not (a.ham / "HAM10000_metadata_sites.csv").is_file():
                print(f"skipping ham10000: {a.ham} not found", file=sys.stderr)
                continue
            source, target = ham_sites(a.ham, a.size, a.ham_nv, a.seed)
        else:
            raise SystemExit(f"--data: unknown {data!r}; choose demo, ham10000")
        results["problems"][data] = run_problem(data, source, target, a)
        results["seconds"] = round(time.time() - started, 1)
        results["load_average"] = list(os.getloadavg())
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, common.clean(results))
    print(f"CPU {results['machine']['cpu']}, {a.threads} torch thread(s), {results.get('seconds')} s")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
