"""Ingest: enumerate a source, decode every image once, and write the manifest, pixel store and report.

Nothing is dropped silently: every file seen ends up either as a manifest row
or as a quarantined row with a reason.
"""
from __future__ import annotations

import csv
import hashlib
import multiprocessing
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medtl import splits as splitting
from medtl.errors import MedtlError, UnreadableImage
from medtl.params import require
from medtl.readers import ReadOptions, read
from medtl.sources import SOURCES, SourceItem, open_source
from medtl.store import PixelStoreWriter, quantize

MANIFEST_COLUMNS = [
    "image_id", "source_path", "sha256", "label", "group", "split", "modality",
    "height", "width", "channels", "offset",
]


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class DemoParams:
    patients: int = 120
    min_images_per_patient: int = 2
    max_images_per_patient: int = 4
    min_size: int = 96
    max_size: int = 160
    prevalence: float = 0.4
    seed: int = 7

    def check(self, key: str) -> None:
        require(self.patients >= 6, f"{key}.patients", self.patients, "at least 6")
        require(1 <= self.min_images_per_patient <= self.max_images_per_patient, f"{key}.min_images_per_patient",
                self.min_images_per_patient, f"between 1 and max_images_per_patient ({self.max_images_per_patient})")
        require(16 <= self.min_size <= self.max_size <= 2048, f"{key}.min_size", self.min_size,
                f"between 16 and max_size ({self.max_size}), at most 2048")
        require(0 < self.prevalence < 1, f"{key}.prevalence", self.prevalence, "a fraction strictly between 0 and 1")


@dataclass(frozen=True)
class IngestParams:
    source: Literal["demo"] = "demo"
    seed: int = 42
    split: SplitRatios = field(default_factory=SplitRatios)
    duplicates: Literal["drop", "fail"] = "drop"
    max_quarantine_fraction: float = 0.05
    workers: int = 2
    demo: DemoParams = field(default_factory=DemoParams)

    def check(self, key: str) -> None:
        r = self.split
        require(min(r.train, r.val, r.test) >= 0 and r.train > 0 and abs(r.train + r.val + r.test - 1) < 1e-6,
                f"{key}.split", asdict(r), "non-negative ratios train, val, test summing to 1 with train > 0")
        require(0 <= self.max_quarantine_fraction <= 1, f"{key}.max_quarantine_fraction",
                self.max_quarantine_fraction, "a fraction between 0 and 1")
        require(self.workers >= 1, f"{key}.workers", self.workers, "at least 1")
        require(self.source in SOURCES, f"{key}.source", self.source, "one of " + ", ".join(SOURCES))

    def read_options(self) -> ReadOptions:
        return ReadOptions()

    def source_inputs(self) -> list[str]:
        """Files or folders the source reads (recorded with their hashes); the demo reads none."""
        return []

    def source_root(self) -> str | None:
        """The folder that manifest source paths are relative to; None for generated data."""
        return None


def _decode(job: tuple[SourceItem, ReadOptions]) -> dict:
    """Worker: decode one item into quantized images, or say why it cannot be."""
    item, options = job
    out: dict = {"item": item}
    try:
        if item.problem:
            raise UnreadableImage(item.problem)
        if item.pixels is not None:
            decoded = [(item.pixels, {}, {})]
            out["sha256"] = hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).hexdigest()
        else:
            data = item.path.read_bytes()
            out["sha256"] = hashlib.sha256(data).hexdigest()
            decoded = [(d.pixels, d.metadata, d.identity) for d in read(item.path, options)]
        images = []
        for pixels, meta, identity in decoded:
            q = quantize(pixels)
            pixel_hash = hashlib.sha256(q.tobytes() + str(q.shape).encode()).hexdigest()
            images.append((q, meta, identity, pixel_hash))
        out["images"] = images
    except UnreadableImage as e:
        out["problem"] = (e.reason, e.detail)
    except Exception as e:  # a reader bug must not take the whole dataset down; it is reported
        out["problem"] = ("decode_error", f"{type(e).__name__}: {e}")
    return out


def _pseudonym(value: str) -> str:
    from medtl.phi import pseudonymise

    return pseudonymise(value)


def run_ingest(params: IngestParams, out_dir: Path) -> dict:
    """Write manifest.csv, pixels.u16 and report.json into out_dir (a fresh folder); return the report."""
    source = open_source(params, out_dir)
    try:
        return _ingest(params, source, out_dir)
    finally:
        if source.cleanup:
            source.cleanup()


def _ingest(params: IngestParams, source, out_dir: Path) -> dict:
    options = params.read_options()
    jobs = [(item, options) for item in source.items]
    rows: list[dict] = []
    quarantined: list[dict] = []
    pixel_hashes: list[str] = []
    writer = PixelStoreWriter(out_dir / "pixels.u16")
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(params.workers) if params.workers > 1 and len(jobs) > 1 else None
    results = pool.imap(_decode, jobs, chunksize=8) if pool else map(_decode, jobs)
    try:
        for res in tqdm(results, total=len(jobs), desc="ingest", unit="file", leave=False):
            item: SourceItem = res["item"]
            if "problem" in res:
                reason, detail = res["problem"]
                quarantined.append({"source_path": item.source_path, "reason": reason, "detail": detail})
                continue
            for k, (q, meta, identity, pixel_hash) in enumerate(res["images"]):
                offset, h, w, c = writer.append(q)
                raw_group = item.group or identity.get("PatientID") or item.source_path
                rows.append({
                    "source_path": item.source_path + (f"#{k}" if len(res["images"]) > 1 else ""),
                    "sha256": res["sha256"],
                    "label": item.label,
                    "group": _pseudonym(raw_group),
                    "split": item.split,
                    "modality": meta.get("modality", ""),
                    "height": h, "width": w, "channels": c, "offset": offset,
                    **{k2: v for k2, v in meta.items() if k2 != "modality"},
                    **item.extra,
                })
                pixel_hashes.append(pixel_hash)
    finally:
        writer.close()
        if pool:
            pool.terminate()
    return _finish(params, source, rows, quarantined, pixel_hashes, out_dir)


def _finish(params, source, rows, quarantined, pixel_hashes, out_dir: Path) -> dict:
    seen = len(rows) + len(quarantined)  # images, plus files that gave none
    if not rows:
        raise MedtlError(f"ingest found no usable image among {len(quarantined)} file(s); first problems: "
                         + "; ".join(f"{q['source_path']} ({q['reason']})" for q in quarantined[:5]))
    fraction = len(quarantined) / max(seen, 1)
    if fraction > params.max_quarantine_fraction:
        raise MedtlError(
            f"ingest quarantined {len(quarantined)} of {seen} files ({fraction:.1%}), more than "
            f"ingest.max_quarantine_fraction={params.max_quarantine_fraction}; first offenders: "
            + "; ".join(f"{q['source_path']} ({q['reason']}: {q['detail']})" for q in quarantined[:5])
        )
    ratios = asdict(params.split)
    split = splitting.assign_splits([r["group"] for r in rows], [r["label"] for r in rows], ratios,
                                    params.seed, [r["split"] for r in rows])
    for r, s in zip(rows, split):
        r["split"] = s
    duplicates = splitting.find_duplicates([r["sha256"] for r in rows], split, "file") + \
        splitting.find_duplicates(pixel_hashes, split, "pixels")
    cross = [d for d in duplicates if d["cross_split"]]
    if cross and params.duplicates == "fail":
        first = cross[0]
        raise MedtlError(
            f"{len(cross)} image(s) are duplicated across splits (ingest.duplicates=fail), e.g. "
            f"{rows[first['row']]['source_path']} ({split[first['row']]}) duplicates "
            f"{rows[first['duplicate_of']]['source_path']} ({split[first['duplicate_of']]})"
        )
    dropped = {d["row"] for d in cross}
    dup_report = [
        {"source_path": rows[d["row"]]["source_path"], "duplicate_of": rows[d["duplicate_of"]]["source_path"],
         "kind": d["kind"], "splits": [split[d["row"]], split[d["duplicate_of"]]],
         "action": "removed" if d["cross_split"] else "kept (same split)"}
        for d in duplicates
    ]
    kept = [r for i, r in enumerate(rows) if i not in dropped]
    for i, r in enumerate(kept):
        r["image_id"] = f"img{i:06d}"
    _write_manifest(kept, out_dir / "manifest.csv")
    report = {
        "source": source.description,
        "classes": source.classes,
        "files_seen": seen,
        "images": len(kept),
        "quarantined": len(quarantined),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantined).items())),
        "duplicates_removed": len(dropped),
        "counts": {
            s: {
                "images": sum(r["split"] == s for r in kept),
                "groups": len({r["group"] for r in kept if r["split"] == s}),
                "per_class": {c: sum(r["split"] == s and r["label"] == c for r in kept) for c in source.classes},
            }
            for s in splitting.SPLITS
        },
        "quarantine": quarantined,
        "duplicates": dup_report,
    }
    from medtl.io import write_json

    write_json(out_dir / "report.json", report)
    return report


def _write_manifest(rows: list[dict], path: Path) -> None:
    extra = sorted({k for r in rows for k in r} - set(MANIFEST_COLUMNS))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS + extra, extrasaction="raise", restval="")
        w.writeheader()
        w.writerows(rows)


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
