"""Ingest: enumerate a source, decode every image once, and write the manifest, pixel store and report.

Nothing is dropped silently: every file seen ends up either as a manifest row
or as a quarantined row with a reason.
"""
from __future__ import annotations

import csv
import hashlib
import multiprocessing
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medtl import splits as splitting
from medtl.errors import MedtlError, ParamsError, UnreadableImage
from medtl.io import sha256_file, write_json
from medtl.params import require
from medtl.phi import filter_metadata, pseudonymise
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
class ReadParams:
    """How images are decoded (see medtl.readers.ReadOptions)."""

    window: str | list[float] | None = None  # null: the file's own window; a CT preset name; or [centre, width]
    frame: str | int = "middle"  # multi-frame DICOM / multi-page TIFF: first, middle or a 0-based index
    axis: int = 2  # NIfTI volumes: 0 sagittal, 1 coronal, 2 axial
    slice: str | int = "middle"  # NIfTI volumes: middle, a 0-based index, or all (one image per slice)

    def check(self, key: str) -> None:
        self.options(key)

    def options(self, key: str = "ingest.read") -> ReadOptions:
        try:
            return ReadOptions(window=self.window, frame=self.frame, axis=self.axis, slice=self.slice)
        except ParamsError as e:
            raise ParamsError(str(e).replace("read option '", f"params key '{key}.")) from None


@dataclass(frozen=True)
class FolderParams:
    root: str = ""  # one subfolder per class, or per split (Training/, Testing/) each with one per class
    layout: Literal["auto", "classes", "splits"] = "auto"


@dataclass(frozen=True)
class CsvParams:
    manifest: str = ""  # CSV file, one row per image
    root: str = ""  # folder the paths are relative to; default: the manifest's folder
    path_column: str = "path"
    path_template: str | None = None  # instead of path_column, e.g. "{dx}/{image_id}.jpg"
    label_column: str = "label"
    group_column: str | None = None  # default: a column named "group" if there is one
    split_column: str | None = None  # default: a column named "split" if there is one
    metadata: list[str] = field(default_factory=list)  # extra columns copied into the manifest


@dataclass(frozen=True)
class DicomParams:
    root: str = ""  # a tree of DICOM files
    labels: str = ""  # CSV with a key column and a label column
    key: Literal["path", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"] = "path"
    key_column: str | None = None  # default: the key's own name (path, SOPInstanceUID, ...)
    label_column: str = "label"
    group: Literal["PatientID", "StudyInstanceUID", "SeriesInstanceUID"] = "PatientID"
    include: str = "*"  # file-name pattern, e.g. "*.dcm" to leave sidecar files out


@dataclass(frozen=True)
class MedmnistParams:
    path: str = ""  # e.g. data/raw/pneumoniamnist.npz
    url: str = ""  # downloaded to `path` when it is missing
    md5: str = ""  # checked after a download

    def check(self, key: str) -> None:
        require(not self.md5 or re.fullmatch(r"[0-9a-fA-F]{32}", self.md5) is not None, f"{key}.md5", self.md5,
                "32 hexadecimal digits")
        require(not self.url or bool(self.md5), f"{key}.md5", self.md5, "the file's md5 whenever url is set")


DEMO_DATA = "medtl/demo.py"


@dataclass(frozen=True)
class IngestParams:
    source: Literal["demo", "folder", "csv", "dicom", "medmnist"] = "demo"
    # What dvc tracks as the source data (dvc.yaml interpolates it): your data folder or file.
    data: str = DEMO_DATA
    classes: list[str] = field(default_factory=list)  # expected labels in index order; empty: those found
    seed: int = 42
    split: SplitRatios = field(default_factory=SplitRatios)
    duplicates: Literal["drop", "fail"] = "drop"
    max_quarantine_fraction: float = 0.05
    workers: int = 2
    read: ReadParams = field(default_factory=ReadParams)
    demo: DemoParams = field(default_factory=DemoParams)
    folder: FolderParams = field(default_factory=FolderParams)
    csv: CsvParams = field(default_factory=CsvParams)
    dicom: DicomParams = field(default_factory=DicomParams)
    medmnist: MedmnistParams = field(default_factory=MedmnistParams)

    def check(self, key: str) -> None:
        r = self.split
        require(min(r.train, r.val, r.test) >= 0 and r.train > 0 and abs(r.train + r.val + r.test - 1) < 1e-6,
                f"{key}.split", asdict(r), "non-negative ratios train, val, test summing to 1 with train > 0")
        require(0 <= self.max_quarantine_fraction <= 1, f"{key}.max_quarantine_fraction",
                self.max_quarantine_fraction, "a fraction between 0 and 1")
        require(self.workers >= 1, f"{key}.workers", self.workers, "at least 1")
        require(self.source in SOURCES, f"{key}.source", self.source, "one of " + ", ".join(SOURCES))
        require(len(set(self.classes)) == len(self.classes) and all(c.strip() for c in self.classes),
                f"{key}.classes", self.classes, "distinct, non-empty class names")
        require(self.source == "demo" or self.data != DEMO_DATA, f"{key}.data", self.data,
                f"the folder or file holding your {self.source} data, so that dvc reruns ingest when it changes")
        required = {"folder": [("folder.root", self.folder.root)],
                    "csv": [("csv.manifest", self.csv.manifest)],
                    "dicom": [("dicom.root", self.dicom.root), ("dicom.labels", self.dicom.labels)],
                    "medmnist": [("medmnist.path", self.medmnist.path)]}.get(self.source, [])
        for name, value in required:
            require(bool(value), f"{key}.{name}", value, f"a path (required by source {self.source})")

    def read_options(self) -> ReadOptions:
        return self.read.options()

    def source_inputs(self) -> list[str]:
        """Files or folders the source reads (recorded with their hashes); the demo reads none."""
        return {
            "demo": [],
            "folder": [self.folder.root],
            "csv": [self.csv.manifest] + ([self.csv.root] if self.csv.root else []),
            "dicom": [self.dicom.root, self.dicom.labels],
            "medmnist": [self.medmnist.path],
        }[self.source]

    def source_root(self) -> str | None:
        """The folder that manifest source paths are relative to; None for generated data."""
        return {
            "demo": None,
            "folder": self.folder.root,
            "csv": self.csv.root or str(Path(self.csv.manifest).parent),
            "dicom": self.dicom.root,
            "medmnist": str(Path(self.medmnist.path).parent),
        }[self.source]


def _decode(job: tuple[SourceItem, ReadOptions]) -> dict:
    """Worker: decode one item into quantized images, or say why it cannot be."""
    item, options = job
    out: dict = {"item": item}
    try:
        if item.problem:
            raise UnreadableImage(item.problem, item.detail)
        if item.pixels is not None:
            decoded = [(item.pixels, {}, {})]
            out["sha256"] = item.sha256 or hashlib.sha256(np.ascontiguousarray(item.pixels).tobytes()).hexdigest()
        else:
            out["sha256"] = sha256_file(item.path)
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


def run_ingest(params: IngestParams, out_dir: Path) -> dict:
    """Write manifest.csv, pixels.u16 and report.json into out_dir (a fresh folder); return the report."""
    source = open_source(params, out_dir)
    try:
        return _ingest(params, source, out_dir)
    finally:
        if source.cleanup:
            source.cleanup()


def _label_problem(label: str, classes: list[str]) -> tuple[str, str] | None:
    if not label:
        return "no_label", "the label is empty"
    if classes and label not in classes:
        return "unknown_label", f"label {label!r} is not one of the classes {', '.join(classes)}"
    return None


def _ingest(params: IngestParams, source, out_dir: Path) -> dict:
    options = params.read_options()
    classes = list(params.classes) or list(source.classes)
    extra_columns = sorted({c for c in (params.csv.metadata if params.source == "csv" else [])})
    filter_metadata({}, extra_columns)  # refuses identifying column names before any work

    def jobs():
        for item in source.items:
            if not item.problem and item.label is not None and source.resolve is None:
                item.label = item.label.strip()
                problem = _label_problem(item.label, classes)
                if problem:  # not worth decoding
                    item.problem, item.detail = problem
            yield item, options

    total = source.count if source.count is not None else len(source.items)
    rows: list[dict] = []
    quarantined: list[dict] = []
    pixel_hashes: list[str] = []
    counts = Counter()  # items seen, files decoded
    writer = PixelStoreWriter(out_dir / "pixels.u16")
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(params.workers) if params.workers > 1 and total > 1 else None
    results = pool.imap(_decode, jobs(), chunksize=8) if pool else map(_decode, jobs())

    def quarantine(item: SourceItem, reason: str, detail: str) -> None:
        quarantined.append({"source_path": item.source_path, "reason": reason, "detail": _relative(detail, item)})

    try:
        for res in tqdm(results, total=total, desc="ingest", unit="file", leave=False, mininterval=1.0):
            item: SourceItem = res["item"]
            counts["seen"] += 1
            if "problem" in res:
                quarantine(item, *res["problem"])
                continue
            images = res["images"]
            label, group = item.label, item.group
            if source.resolve is not None:
                label, group, reason, detail = source.resolve(item, images[0][2])
                if reason:
                    quarantine(item, reason, detail)
                    continue
            label = (label or "").strip()
            problem = _label_problem(label, classes)
            if problem:
                quarantine(item, *problem)
                continue
            counts["decoded"] += 1
            for q, meta, identity, pixel_hash in images:
                offset, h, w, c = writer.append(q)
                raw_group = group or identity.get("PatientID") or item.source_path
                safe = filter_metadata({**meta, **item.extra}, extra_columns + list(item.extra))
                rows.append({
                    "source_path": item.source_path,
                    "sha256": res["sha256"],
                    "label": label,
                    "group": pseudonymise(raw_group),
                    "split": item.split,
                    "height": h, "width": w, "channels": c, "offset": offset,
                    **safe,
                    "modality": safe.get("modality", ""),
                    "_file_key": res["sha256"] if item.pixels is None else None,
                })
                pixel_hashes.append(pixel_hash)
    finally:
        writer.close()
        if pool:
            pool.terminate()
    for item in source.unmatched() if source.unmatched else []:
        counts["seen"] += 1
        quarantine(item, item.problem or "missing_file", item.detail)
    return _finish(params, source, classes, rows, quarantined, pixel_hashes, counts, out_dir)


def _relative(detail: str, item: SourceItem) -> str:
    """Reasons name files by their source path, not by where they lie on this machine."""
    if item.path is not None and detail:
        detail = detail.replace(str(item.path), item.source_path)
    return detail


def _offenders(quarantined: list[dict], n: int = 5) -> str:
    return "; ".join(f"{q['source_path']} ({q['reason']}: {q['detail']})" for q in quarantined[:n])


def _finish(params, source, classes, rows, quarantined, pixel_hashes, counts, out_dir: Path) -> dict:
    seen = counts["seen"]
    assert seen == counts["decoded"] + len(quarantined)
    if not rows:
        raise MedtlError(f"ingest found no usable image among {seen} file(s) of source {params.source}; "
                         f"first problems: {_offenders(quarantined)}")
    fraction = len(quarantined) / max(seen, 1)
    if fraction > params.max_quarantine_fraction:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(Counter(q["reason"] for q in quarantined).items()))
        raise MedtlError(
            f"ingest quarantined {len(quarantined)} of {seen} files ({fraction:.1%}: {reasons}), more than "
            f"ingest.max_quarantine_fraction={params.max_quarantine_fraction}; first offenders: {_offenders(quarantined)}"
        )
    classes = classes or sorted({r["label"] for r in rows})
    present = {r["label"] for r in rows}
    empty = [c for c in classes if c not in present]
    if empty:
        raise MedtlError(f"class(es) {', '.join(empty)} have no usable image; remove them from ingest.classes "
                         "or add images for them")
    _check_fixed_splits(rows)
    file_keys = [r.pop("_file_key") for r in rows]
    fixed = [r["split"] for r in rows]
    groups = [r["group"] for r in rows]
    split_groups = splitting.link_duplicates(groups, [[k for k in (f, p) if k] for f, p in zip(file_keys, pixel_hashes)],
                                             fixed)
    split = splitting.assign_splits(split_groups, [r["label"] for r in rows], asdict(params.split), params.seed, fixed)
    for r, s in zip(rows, split):
        r["split"] = s
    unique = [k or f"row{i}" for i, k in enumerate(file_keys)]  # array items share their container's hash
    duplicates = splitting.find_duplicates(unique, split, "file")
    same_file = {d["row"] for d in duplicates}
    duplicates += [d for d in splitting.find_duplicates(pixel_hashes, split, "pixels") if d["row"] not in same_file]
    cross = [d for d in duplicates if d["cross_split"]]
    if cross and params.duplicates == "fail":
        listed = "; ".join(f"{rows[d['row']]['source_path']} ({split[d['row']]}) = "
                           f"{rows[d['duplicate_of']]['source_path']} ({split[d['duplicate_of']]})" for d in cross[:5])
        raise MedtlError(
            f"{len(cross)} image(s) are duplicated across splits (ingest.duplicates=fail): {listed}; remove the copies "
            "from the source, or set ingest.duplicates to drop to remove them from the later split"
        )
    dropped = {d["row"] for d in cross}
    dup_report = [
        {"source_path": rows[d["row"]]["source_path"], "duplicate_of": rows[d["duplicate_of"]]["source_path"],
         "kind": d["kind"], "splits": [split[d["row"]], split[d["duplicate_of"]]],
         "action": "removed" if d["cross_split"] else "kept (same split)"}
        for d in sorted(duplicates, key=lambda d: d["row"])
    ]
    kept = [r for i, r in enumerate(rows) if i not in dropped]
    for i, r in enumerate(kept):
        r["image_id"] = f"img{i:06d}"
    _write_manifest(kept, out_dir / "manifest.csv")
    report = {
        "source": source.description,
        "classes": classes,
        # files_seen = files_decoded + quarantined; images_decoded = images + duplicates_removed
        # (a NIfTI volume read with slice: all is one file and several images).
        "files_seen": seen,
        "files_decoded": counts["decoded"],
        "quarantined": len(quarantined),
        "images_decoded": len(rows),
        "duplicates_removed": len(dropped),
        "images": len(kept),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantined).items())),
        "counts": {
            s: {
                "images": sum(r["split"] == s for r in kept),
                "groups": len({r["group"] for r in kept if r["split"] == s}),
                "per_class": {c: sum(r["split"] == s and r["label"] == c for r in kept) for c in classes},
            }
            for s in splitting.SPLITS
        },
        "quarantine": quarantined,
        "duplicates": dup_report,
    }
    write_json(out_dir / "report.json", report)
    return report


def _check_fixed_splits(rows: list[dict]) -> None:
    """A source whose own split puts one patient in two splits leaks; say which files."""
    seen: dict[str, tuple[str, str]] = {}
    for r in rows:
        if r["split"] is None:
            continue
        s, path = seen.setdefault(r["group"], (r["split"], r["source_path"]))
        if s != r["split"]:
            raise MedtlError(
                f"the source puts one group (patient) in two splits: {path} is in '{s}' and {r['source_path']} in "
                f"'{r['split']}'; a patient's images must share a split, so fix the split column (or leave it empty "
                "for these rows and let ingest choose)"
            )


def _write_manifest(rows: list[dict], path: Path) -> None:
    extra = sorted({k for r in rows for k in r} - set(MANIFEST_COLUMNS))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS + extra, extrasaction="raise", restval="")
        w.writeheader()
        w.writerows(rows)


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
