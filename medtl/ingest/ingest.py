"""Ingest: enumerate a source, decode every image once, and write the manifest, pixel store and report.

Nothing is dropped silently: every file seen ends up either as a manifest row
or as a quarantined entry with a reason, and
files_seen = files_decoded + quarantined holds in every report.

Nothing identifying leaves this stage: files are named by `source_ref` (a
keyed hash of the relative path) and sha256, groups by a keyed pseudonym,
metadata only through the whitelist, and quarantine reasons are fixed words
and numbers. Library warnings raised while decoding (which may quote header
values) are counted by kind in the report instead of reaching the log. Decoding and
the header checks are `medtl.intake.decode`'s, the same for every entry point.
"""
from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medtl.errors import MedtlError, ParamsError
from medtl.ingest import splits as splitting
from medtl.ingest.manifest import ManifestRow, manifest_path, write_manifest
from medtl.ingest.report import write_report
from medtl.ingest.store import PixelStoreWriter, pixels_path, quantize
from medtl.ingest.table import Columns, ImageTable, Record
from medtl.intake import decode as intake, phi
from medtl.intake.decode import Intake
from medtl.intake.readers.base import ReadOptions
from medtl.intake.sites import SITE_COLUMN, SiteSource, check_sources, open_sources
from medtl.intake.sources import SOURCES, Source, SourceItem, SourceName, check_source_paths, section_paths, source_inputs
from medtl.intake.sources.sections import SourceSections
from medtl.params import require

# Quarantine reasons every report counts, even at zero, so a reviewer sees they were looked for.
COUNTED_REASONS = intake.COUNTED_REASONS + ("label_conflict",)
GROUPING_KINDS = ("patient_id", "column", "rule", "source", "image")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container limit)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass(frozen=True)
class ReadParams:
    """How images are decoded (see medtl.intake.readers.base.ReadOptions)."""

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


DEMO_DATA = "medtl/intake/demo.py"


@dataclass(frozen=True)
class IngestParams(SourceSections):
    # The single source's kind; its options are the section of that name (medtl.intake.sources.sections).
    source: SourceName = "demo"
    # What dvc tracks as the source data (dvc.yaml interpolates it): your data folder or file.
    data: str = DEMO_DATA
    classes: list[str] = field(default_factory=list)  # expected labels in index order; empty: those found
    seed: int = 42
    split: SplitRatios = field(default_factory=SplitRatios)
    duplicates: Literal["drop", "fail"] = "drop"
    # Identical pixels under different labels: quarantine every copy, fail, or keep them (reported either way).
    label_conflicts: Literal["quarantine", "fail", "keep"] = "quarantine"
    # DICOM BurnedInAnnotation YES (text such as a name drawn into the pixels): quarantine or keep.
    burned_in: Literal["quarantine", "keep"] = "quarantine"
    # A group (patient) that the source's own split puts in two splits: fail; keep_published (the published split
    # as it is, the group in both, recorded); regroup (the group's images move to the published split holding most).
    split_conflicts: Literal["fail", "keep_published", "regroup"] = "fail"
    max_quarantine_fraction: float = 0.05
    workers: int = 2
    read: ReadParams = field(default_factory=ReadParams)
    # Several labelled sources, each a named site (medtl.intake.sites); when set, they replace the single source above.
    sources: list[SiteSource] = field(default_factory=list)

    def check(self, key: str) -> None:
        r = self.split
        require(min(r.train, r.val, r.test) >= 0 and r.train > 0 and abs(r.train + r.val + r.test - 1) < 1e-6,
                f"{key}.split", asdict(r), "non-negative ratios train, val, test summing to 1 with train > 0")
        require(0 <= self.max_quarantine_fraction <= 1, f"{key}.max_quarantine_fraction",
                self.max_quarantine_fraction, "a fraction between 0 and 1")
        cores = available_cores()
        require(1 <= self.workers <= cores, f"{key}.workers", self.workers,
                f"between 1 and the {cores} CPU core(s) this machine gives the process")
        require(self.source in SOURCES, f"{key}.source", self.source, "one of " + ", ".join(SOURCES))
        require(len(set(self.classes)) == len(self.classes) and all(c.strip() for c in self.classes),
                f"{key}.classes", self.classes, "distinct, non-empty class names")
        require(self.source == "demo" or self.data != DEMO_DATA, f"{key}.data", self.data,
                f"the folder or file holding your {self.source} data, so that dvc reruns ingest when it changes")
        if self.sources:
            check_sources(self.sources, self.data, DEMO_DATA, key)
            for i, each in enumerate(self.each_source()):
                if each.source != "demo":
                    intake.check_data_paths(self.data, each.source_paths(f"{key}.sources[{i}]"), f"{key}.data")
        else:
            check_source_paths(self, key)
            if self.source != "demo":  # every source path inside what DVC tracks, none relative out of the project
                intake.check_data_paths(self.data, self.source_paths(key), f"{key}.data")

    def source_paths(self, key: str) -> list[tuple[str, str]]:
        """(params key, path) of every file or folder the source reads, its root included."""
        out = [(f"{key}.{name}", value) for name, value, _ in section_paths(self)]
        if self.source == "csv" and not self.csv.root:
            out.append((f"{key}.csv.manifest (its folder, the images' root)", self.source_root()))
        return out

    def each_source(self) -> list:
        """The single source, or each of `sources` as ingest params of one source."""
        return [s.as_ingest(self) for s in self.sources] if self.sources else [self]

    def source_kinds(self) -> set[str]:
        return {p.source for p in self.each_source()}

    def csv_columns(self) -> tuple[list[str], list[str]]:
        """The metadata columns the CSV source(s) copy, and those of them allowed although they look identifying."""
        csvs = [p.csv for p in self.each_source() if p.source == "csv"]
        return sorted({c for p in csvs for c in p.metadata}), sorted({c for p in csvs for c in p.allow_columns})

    def read_options(self) -> ReadOptions:
        return self.read.options()

    def source_inputs(self) -> list[str]:
        """Files or folders the source(s) read; the demo reads none."""
        return [path for p in self.each_source() for path in source_inputs(p)]

    def source_root(self, site: str | None = None) -> str | None:
        """The folder that source refs are relative paths of; None for generated data.

        With several sources: that of `site`, or without one the data folder that holds them all.
        """
        if self.sources:
            named = {s.name: s.as_ingest(self) for s in self.sources}
            if site is None:
                return None if self.source_kinds() == {"demo"} else self.data
            return named[site].source_root()
        return {
            "demo": None,
            "folder": self.folder.root,
            "csv": self.csv.root or str(Path(self.csv.manifest).parent),
            "dicom": self.dicom.root,
            "medmnist": str(Path(self.medmnist.path).parent),
        }[self.source]

    def group_rule(self) -> str | None:
        if self.sources:
            rules = [f"{s.name}: {s.as_ingest(self).group_rule()}" for s in self.sources if s.as_ingest(self).group_rule()]
            return "; ".join(rules) or None
        return {"folder": self.folder.group_rule, "csv": self.csv.group_rule}.get(self.source)


# Decoding (runs in worker processes).

@dataclass
class DecodedImage:
    pixels: np.ndarray  # quantized (H, W, C) uint16, as stored
    metadata: dict[str, str]  # whitelisted header metadata, values checked
    pixel_hash: bytes  # sha256 digest of the quantized pixels and their shape


@dataclass
class DecodeResult:
    """An intake result (`medtl.intake.decode.decode_item`) with its images quantized as stored, to cross back from a worker."""

    intake: Intake
    images: list[DecodedImage] = field(default_factory=list)


def _decode(job: tuple[SourceItem, ReadOptions, str]) -> DecodeResult:
    """Worker: one item through the intake, its images quantized for the pixel store."""
    item, options, burned_in = job
    res = intake.decode_item(item, options, burned_in)
    images = []
    for image in res.images:
        q = quantize(image.pixels)
        images.append(DecodedImage(q, image.metadata, hashlib.sha256(q.tobytes() + str(q.shape).encode()).digest()))
    res.images = []  # float pixels stay in the worker
    return DecodeResult(res, images)


# The ingest itself.

@dataclass
class QuarantineEntry:
    source_ref: str
    reason: str
    detail: str
    line: int | None = None  # of the source's CSV, when a CSV names the item
    index: str | None = None  # inside an array container ("train/17")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def run_ingest(params: IngestParams, out_dir: Path) -> dict:
    """Write manifest.csv, pixels.u16 and report.json into out_dir (a fresh folder); return the report."""
    check_pseudonym_key(params)
    # Workers fork before the source is enumerated, so they inherit none of it (fork copies the parent's memory).
    pool = multiprocessing.get_context("fork").Pool(params.workers) if params.workers > 1 else None
    try:
        source = open_sources(params, out_dir)
        try:
            return _ingest(params, source, out_dir, pool)
        finally:
            if source.cleanup:
                source.cleanup()
    finally:
        if pool:
            pool.terminate()


def steady_heap(size: int = 128 * 1024) -> None:
    """Keep blocks over `size` in their own memory mappings, returned whole when freed (glibc only).

    glibc raises this threshold each time a larger mapped block is freed; from
    then on the images arriving from the workers are carved from the heap
    between longer-lived blocks, and the heap grows with the run (some 6 MB
    more at 50k images than at 10k). Setting it turns the raising off.
    It is process-wide, so only a process that does nothing but ingest calls it
    (the stage script, not `run_ingest`): torch's large tensors in a process
    that trains afterwards are faster with glibc's own adaptive threshold.
    """
    try:
        ctypes.CDLL(None).mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def check_pseudonym_key(params: IngestParams) -> None:
    """Real DICOM ids and paths pseudonymised with the public key could be recomputed by anyone: refuse or warn."""
    kinds = params.source_kinds()
    phi.pseudonym_key()  # a short key is refused before any work
    for kind in sorted(kinds):
        phi.refuse_demo_key(kind, f"ingest.source {kind}")
    if kinds == {"demo"} or not phi.uses_default_key():
        return
    if "dicom" in kinds:
        raise MedtlError(f"ingest.source is dicom and no pseudonym key is set, so patient ids and file paths would be "
                         f"pseudonymised with the public demo key, which anyone can use to reverse them; {phi.HOW_TO_SET_KEY}")
    # One line on every run: enough to notice, short enough not to bury the stage's own output.
    print(f"ingest: warning: pseudonyms of this {'/'.join(sorted(kinds - {'demo'}))} source use the public demo key "
          f"(anyone can recompute them); set {phi.KEY_ENV} to a secret (docs/data.md)", file=sys.stderr)


def _label_problem(label: str, classes: list[str]) -> tuple[str, str] | None:
    if not label:
        return "no_label", "the label is empty"
    if classes and label not in classes:  # the value is not repeated: a label cell may hold anything
        return "unknown_label", f"the label is not one of the {len(classes)} classes in ingest.classes"
    return None


@dataclass
class _Run:
    """What the decode loop gathers."""

    images: ImageTable
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    seen: int = 0
    decoded: int = 0
    warnings: Counter = field(default_factory=Counter)
    burned_in_kept: int = 0
    ungrouped: Counter = field(default_factory=Counter)  # files the group rule did not match, by class folder (label)

    def quarantine(self, item: SourceItem, reason: str, detail: str) -> None:
        if reason == "no_group":
            self.ungrouped[item.label or ""] += 1
        self.quarantined.append(QuarantineEntry(phi.source_ref(item.ref_key), reason, intake.safe_detail(detail, item),
                                                item.line, item.index))


def _ingest(params: IngestParams, source: Source, out_dir: Path, pool) -> dict:
    options = params.read_options()
    classes = list(params.classes) or list(source.classes)
    extra_columns, allow_columns = params.csv_columns()
    allowed = phi.check_metadata_columns(extra_columns, allow_columns)  # before any work

    def jobs():
        for item in source.items:
            if not item.problem and item.label is not None and source.resolve is None:
                item.label = item.label.strip()
                problem = _label_problem(item.label, classes)
                if problem:  # not worth decoding
                    item.problem, item.detail = problem
            yield item, options, params.burned_in

    total = source.count if source.count is not None else len(source.items) if isinstance(source.items, list) else None
    run = _Run(ImageTable(out_dir))
    try:
        writer = PixelStoreWriter(pixels_path(out_dir))
        results = pool.imap(_decode, jobs(), chunksize=8) if pool else map(_decode, jobs())
        try:
            for res in tqdm(results, total=total, desc="ingest", unit="file", leave=False, mininterval=1.0):
                _take(res, run, source, classes, params, extra_columns, allowed, writer)
        finally:
            writer.close()
        for item in source.unmatched() if source.unmatched else []:
            run.seen += 1
            run.quarantine(item, item.problem or "missing_file", item.detail)
        return _finish(params, source, classes, run, allowed, out_dir)
    finally:
        run.images.close()


def _take(decoded: DecodeResult, run: _Run, source: Source, classes: list[str], params: IngestParams,
          extra_columns: list[str], allowed: list[str], writer: PixelStoreWriter) -> None:
    """Fold one decode result into the run: images kept, or the file quarantined with its reason."""
    res = decoded.intake
    item = res.item
    run.seen += 1
    run.warnings.update(res.warnings)
    if res.problem:
        run.quarantine(item, res.problem, res.detail)
        return
    label, group, group_kind = item.label, item.group, item.group_kind
    if source.resolve is not None:
        found = source.resolve(item, res.identity)
        if found.problem:
            run.quarantine(item, found.problem, found.detail)
            return
        label, group = found.label, found.group
        if group and group != item.group:
            group_kind = "patient_id" if source.header_group == "PatientID" else "source"
    label = (label or "").strip()
    problem = _label_problem(label, classes)
    if problem:
        run.quarantine(item, *problem)
        return
    run.burned_in_kept += res.burned_in  # a file with burned-in text is quarantined by the intake unless kept
    if not group and res.identity.get("PatientID"):
        group, group_kind = res.identity["PatientID"], "patient_id"
    if not group:  # no group information: the image (file) is its own group
        group, group_kind = "image:" + item.ref_key, "image"
    run.decoded += 1
    ref = res.ref
    pseudonym = phi.pseudonymise(group)
    file_digest = bytes.fromhex(res.sha256) if item.pixels is None else None  # array items share their container's
    for image in decoded.images:
        offset, h, w, c = writer.append(image.pixels)
        metadata = phi.filter_metadata({**image.metadata, **item.extra}, sorted(set(extra_columns) | set(item.extra)), allowed)
        run.images.append(run.seen, label, pseudonym, group_kind, item.split, file_digest, image.pixel_hash,
                          Record(ref, res.sha256, h, w, c, offset, metadata, item.index))


def _offenders(quarantined: list[QuarantineEntry], n: int = 5) -> str:
    return "; ".join(f"{q.source_ref} ({q.reason}: {q.detail})" for q in quarantined[:n]) + \
        " (`medtl locate REF` shows the file)"


def _ungrouped(run: _Run, params: IngestParams) -> str:
    """Where the files are that the group rule left ungrouped: class folders (labels) are named, never paths."""
    if not run.ungrouped:
        return ""
    where = ", ".join(f"{label or '(no class)'} ({n})" for label, n in sorted(run.ungrouped.items()))
    return (f"; the group rule {params.group_rule()!r} matches no file name of {sum(run.ungrouped.values())} file(s) "
            f"in class folder(s) {where}: write a rule that covers their naming scheme too (docs/data.md shows one "
            "for a dataset whose classes are named differently)")


def _finish(params: IngestParams, source: Source, classes: list[str], run: _Run, allowed: list[str],
            out_dir: Path) -> dict:
    table = run.images
    images = table.columns()
    conflicts, images = _label_conflicts(run, images, params)
    seen = run.seen
    assert seen == run.decoded + len(run.quarantined)
    if not len(images):
        raise MedtlError(f"ingest found no usable image among {seen} file(s) of source {params.source}; "
                         f"first problems: {_offenders(run.quarantined)}")
    fraction = len(run.quarantined) / max(seen, 1)
    reasons = Counter(q.reason for q in run.quarantined)
    if fraction > params.max_quarantine_fraction:
        listed = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        raise MedtlError(
            f"ingest quarantined {len(run.quarantined)} of {seen} files ({fraction:.1%}: {listed}), more than "
            f"ingest.max_quarantine_fraction={params.max_quarantine_fraction}{_ungrouped(run, params)}; first "
            f"offenders: {_offenders(run.quarantined)}"
        )
    label_names = table.labels.values
    present = {label_names[c] for c in np.unique(images.label)}
    classes = classes or sorted(present)
    empty = [c for c in classes if c not in present]
    if empty:
        raise MedtlError(f"class(es) {', '.join(empty)} have no usable image; remove them from ingest.classes "
                         "or add images for them")
    pseudonyms, group = np.unique(images.group, return_inverse=True)  # codes in the order of the pseudonyms
    split_conflicts, split_basis = _split_conflicts(params, source, table, images, group)
    sorted_labels = sorted(label_names)
    label = np.array([sorted_labels.index(n) for n in label_names], dtype=np.int64)[images.label]
    keys = [images.file_key, images.pixel_key]
    split_groups = splitting.link_copies(split_basis, keys, images.fixed)
    strata, strata_names = _strata(table, images, split_groups, label, sorted_labels, params)
    split = splitting.assign_split_codes(split_groups, strata, strata_names, asdict(params.split), params.seed,
                                         images.fixed)
    duplicates = _duplicates(images, split)
    cross = [d for d in duplicates if d.cross_split]
    named_rows = table.lookup(images.row[i] for d in duplicates for i in (d.row, d.duplicate_of))

    def named(i: int) -> dict:
        r = named_rows[images.row[i]]
        return {"source_ref": r.source_ref, "split": splitting.SPLITS[split[i]], **({"index": r.index} if r.index else {})}

    if cross and params.duplicates == "fail":
        listed = "; ".join(f"{named(d.row)} = {named(d.duplicate_of)}" for d in cross[:5])
        raise MedtlError(
            f"{len(cross)} image(s) are duplicated across splits (ingest.duplicates=fail): {listed}; remove the copies "
            "from the source (`medtl locate REF` shows the files), or set ingest.duplicates to drop to remove them "
            "from the later split"
        )
    dup_report = [
        {"image": named(d.row), "duplicate_of": named(d.duplicate_of), "kind": d.kind,
         "action": "removed" if d.cross_split else "kept (same split)"}
        for d in sorted(duplicates, key=lambda d: d.row)
    ]
    del named_rows
    kept = np.ones(len(images), dtype=bool)
    kept[[d.row for d in cross]] = False
    kept_rows = np.flatnonzero(kept)

    def manifest_rows():  # made one at a time as the manifest is written, from the spilled records
        for n, (i, (_, r)) in enumerate(zip(kept_rows, table.records(images.row[kept_rows]))):
            yield ManifestRow(
                image_id=f"img{n:06d}", source_ref=r.source_ref, sha256=r.sha256, label=label_names[images.label[i]],
                group=table.pseudonym(pseudonyms[group[i]]), split=splitting.SPLITS[split[i]], height=r.height,
                width=r.width, channels=r.channels, offset=r.offset, modality=r.metadata.get("modality", ""),
                metadata=r.metadata,
            )

    metadata_keys = {k for c in np.unique(images.keyset[kept]) for k in table.keysets.values[c]}
    write_manifest(manifest_rows(), manifest_path(out_dir), metadata_keys)
    kept_kinds = [table.kinds.values[c] for c in images.kind[kept]]
    metadata_columns = sorted(metadata_keys | {"modality"})
    report = {
        "source": source.description,
        "classes": classes,
        # files_seen = files_decoded + quarantined; images_decoded = images + duplicates_removed
        # (a NIfTI volume read with slice: all is one file and several images).
        "files_seen": seen,
        "files_decoded": run.decoded,
        "quarantined": len(run.quarantined),
        "images_decoded": len(images),
        "duplicates_removed": len(cross),
        "images": len(kept_rows),
        "quarantine_reasons": dict(sorted({**{r: 0 for r in COUNTED_REASONS}, **reasons}.items())),
        "grouping": grouping(kept_kinds, params.group_rule()),
        "pseudonym_key": phi.key_kind(),
        "metadata_columns": metadata_columns,
        "allowed_identifier_columns": sorted(allowed),
        # every metadata column kept by ingest.csv.allow_columns, with what flagged it (its name, its values)
        "allowed_columns": source.description.get("allowed_columns", {}),
        "burned_in_annotation": {"policy": params.burned_in, "quarantined": reasons.get("burned_in_annotation", 0),
                                 "kept": run.burned_in_kept},
        "label_conflicts": conflicts,
        "split_conflicts": split_conflicts,
        "decode_warnings": dict(sorted(run.warnings.items())),
        "counts": _counts(classes, label_names, images.label[kept], group[kept], split[kept]),
        "quarantine": [q.to_json() for q in run.quarantined],
        "duplicates": dup_report,
    }
    write_report(out_dir, report)
    return report


def _strata(table: ImageTable, images: Columns, groups: np.ndarray, label: np.ndarray, label_names: list[str],
            params: IngestParams) -> tuple[np.ndarray, list[str]]:
    """What the split is stratified by: the label, and the site where images carry one (several sources).

    A class with too few patients at a site to reach every split is split
    with that class's patients of the other sites (said on stderr).
    """
    if not any(SITE_COLUMN in table.keysets.values[c] for c in np.unique(images.keyset)):
        return label, label_names
    names = [r.metadata.get(SITE_COLUMN, "") for _, r in table.records(images.row)]
    sites, site = np.unique(np.array(names, dtype=object).astype(str), return_inverse=True)
    demo_sites = params.demo.site_list() if params.source == "demo" and not params.sources else []
    expected = [s.name for s in params.sources or demo_sites]
    missing = [s for s in expected if s not in set(sites.tolist())]
    if missing:
        raise MedtlError(f"site(s) {', '.join(missing)} have no usable image: every file of theirs was quarantined "
                         "(unreadable, unlabelled or a label conflict); fix the source, or remove the site from ingest")
    n_labels = len(label_names)
    strata = site.astype(np.int64) * n_labels + label
    names = [f"{name} at site {s}" for s in sites for name in label_names]
    n_groups = int(groups.max()) + 1
    present = np.zeros(n_groups, dtype=bool)
    present[groups] = True
    per_stratum = np.bincount(splitting._majority(groups, strata, n_groups, len(names))[present], minlength=len(names))
    wanted = sum(1 for r in asdict(params.split).values() if r > 0)
    small = (per_stratum > 0) & (per_stratum < wanted)
    if small.any():
        print("ingest: note: too few patients to stratify by site for " +
              ", ".join(f"{names[k]} ({per_stratum[k]})" for k in np.flatnonzero(small)) +
              "; they are split together with the other sites' patients of their class", file=sys.stderr)
        strata = np.where(small[strata], len(names) + label, strata)
        names += [f"{name} (sites pooled)" for name in label_names]
    return strata, names


def _duplicates(images: Columns, split: np.ndarray) -> list[splitting.Duplicate]:
    """Copies of an earlier image: the same file first, then the same pixels in another file."""
    duplicates = []
    for kind, keys in (("file", images.file_key), ("pixels", images.pixel_key)):
        rows, copy_of = splitting.find_copies(keys, split)
        duplicates += [splitting.Duplicate(int(i), int(j), kind, bool(split[i] != split[j]))
                       for i, j in zip(rows, copy_of)]
    same_file = {d.row for d in duplicates if d.kind == "file"}
    return [d for d in duplicates if d.kind == "file" or d.row not in same_file]


def _counts(classes: list[str], label_names: list[str], label: np.ndarray, group: np.ndarray,
            split: np.ndarray) -> dict:
    """Images, groups and images per class in each split (of the kept images)."""
    code = {name: c for c, name in enumerate(label_names)}
    counts = {}
    for s, name in enumerate(splitting.SPLITS):
        here = split == s
        counts[name] = {
            "images": int(here.sum()),
            "groups": len(np.unique(group[here])),
            "per_class": {c: int((here & (label == code.get(c, -1))).sum()) for c in classes},
        }
    return counts


def grouping(kinds: list[str], rule: str | None) -> dict:
    """How patients were told apart: the weakest kind any kept image has ("image": patient independence not established)."""
    counts = Counter(kinds)
    if not counts or "image" in counts:
        kind = "image"
    else:
        kind = counts.most_common(1)[0][0]
    return {"kind": kind, "rule": rule, "images_by_kind": dict(sorted(counts.items()))}


def _label_conflicts(run: _Run, images: Columns, params: IngestParams) -> tuple[list[dict], Columns]:
    """Identical pixels (or the same file) under different labels: reported, and by default every copy quarantined.

    Returns the report's entries and the images left.
    """
    keys = [images.file_key, images.pixel_key]
    copied = np.flatnonzero(splitting.holds_copy(keys))  # an image without a copy cannot conflict
    copies = splitting.link_copies(np.arange(len(copied)), [k[copied] for k in keys],
                                   np.full(len(copied), splitting.NO_SPLIT, dtype=np.int8))
    conflicts = [copied[m].tolist() for m in _mixed_labels(copies, images.label[copied])]
    if not conflicts:
        return [], images
    table = run.images
    label_names = table.labels.values
    records = table.lookup(images.row[i] for m in conflicts for i in m)

    def entry(i: int) -> dict:
        r = records[images.row[i]]
        return {"source_ref": r.source_ref, "label": label_names[images.label[i]], **({"index": r.index} if r.index else {})}

    def labels(m: list[int]) -> set[str]:
        return {label_names[images.label[i]] for i in m}

    listed = [{"images": [entry(i) for i in m], "labels": sorted(labels(m)),
               "action": {"quarantine": "quarantined", "keep": "kept", "fail": "failed"}[params.label_conflicts]}
              for m in conflicts]
    print(f"ingest: warning: {len(conflicts)} label conflict(s): identical images carry different labels "
          f"(ingest.label_conflicts={params.label_conflicts}; details under label_conflicts in report.json)",
          file=sys.stderr)
    if params.label_conflicts == "fail":
        shown = "; ".join(" / ".join(f"{e['source_ref']} ({e['label']})" for e in c["images"]) for c in listed[:5])
        raise MedtlError(f"{len(conflicts)} set(s) of identical images carry different labels "
                         f"(ingest.label_conflicts=fail): {shown}; fix the labels (`medtl locate REF` shows the files), "
                         "or set ingest.label_conflicts to quarantine or keep")
    if params.label_conflicts == "quarantine":
        labels_of_item: dict[int, set[str]] = {}  # a file is quarantined once, with every label its copies carry
        for m in conflicts:
            for no in {int(images.item[i]) for i in m}:
                labels_of_item.setdefault(no, set()).update(labels(m))
        bad_items = sorted(labels_of_item)
        items, first = np.unique(images.item, return_index=True)
        rows = images.row[first[np.searchsorted(items, bad_items)]]  # any image of a file names it: same ref and index
        for no, (_, r) in zip(bad_items, table.records(rows)):
            shown = " and ".join(sorted(labels_of_item[no]))
            run.quarantined.append(QuarantineEntry(r.source_ref, "label_conflict",
                                                   f"identical pixels are labelled {shown}", None, r.index))
        run.decoded -= len(bad_items)
        images = images.take(~np.isin(images.item, bad_items))
    return listed, images


def _mixed_labels(copies: np.ndarray, label: np.ndarray) -> list[np.ndarray]:
    """Sets of copies (images with the same copy id) that carry more than one label, each in image order."""
    if not len(copies):
        return []
    n_labels = int(label.max()) + 1
    pairs = np.unique(copies.astype(np.int64) * n_labels + label)
    ids, labels_each = np.unique(pairs // n_labels, return_counts=True)
    return [np.flatnonzero(copies == c) for c in ids[labels_each > 1]]


def _split_conflicts(params: IngestParams, source: Source, table: ImageTable, images: Columns,
                     group: np.ndarray) -> tuple[dict, np.ndarray]:
    """Groups (patients) that the source's own split puts in two splits, handled by `ingest.split_conflicts`.

    Returns the report's entry and the group codes to split by: with keep_published, each part of a
    conflicting group in its published split splits as a group of its own (the manifest keeps one group).
    """
    policy = params.split_conflicts
    fixed = images.fixed
    coded = np.flatnonzero(fixed >= 0)
    pairs = np.unique(np.stack([group[coded], fixed[coded].astype(np.int64)]), axis=1) if len(coded) else np.empty((2, 0))
    ids, n_splits = np.unique(pairs[0], return_counts=True) if pairs.size else (np.empty(0, np.int64), np.empty(0))
    bad = ids[n_splits > 1]
    entry = {"policy": policy, "groups": int(len(bad))}
    if not len(bad):
        return entry, group
    in_bad = np.isin(group, bad)
    entry["images"] = int(in_bad.sum())
    if policy == "fail":
        clash = splitting.first_disagreement(group, fixed)
        i, j = clash
        refs = table.lookup([images.row[i], images.row[j]])
        ref, other = refs[images.row[j]].source_ref, refs[images.row[i]].source_ref
        s, t = splitting.SPLITS[fixed[j]], splitting.SPLITS[fixed[i]]
        where = ("its split/class folders" if source.description.get("source") == "folder"
                 else "its split column" if source.description.get("source") == "csv" else "its own split")
        fix = ("move the files so that a patient's images share a split folder" if where == "its split/class folders"
               else "fix the split column (or leave it empty for these rows and let ingest choose)")
        raise MedtlError(
            f"the source puts {len(bad)} group(s) (patients) in two splits through {where}: e.g. file {ref} is in "
            f"'{s}' and file {other} in '{t}' (`medtl locate REF` shows the files). A patient's images must share a "
            f"split; {fix}, or set ingest.split_conflicts to regroup (ingest assigns these groups a split of its own "
            "choosing) or keep_published (the published split as it is: these patients stay in two splits, which "
            "the report records)")
    if policy == "regroup":  # each such group wholly in the published split that holds most of its images
        moved = fixed.copy()
        for g in bad:
            members = np.flatnonzero(group == g)
            codes = fixed[members][fixed[members] >= 0]
            moved[members] = np.bincount(codes, minlength=len(splitting.SPLITS)).argmax()
        entry["images_moved"] = int((moved != fixed).sum())
        images.fixed = moved
        print(f"ingest: warning: {len(bad)} group(s) were in two published splits; ingest.split_conflicts=regroup "
              f"moved {entry['images_moved']} image(s) so that each group is in the split holding most of it",
              file=sys.stderr)
        return entry, group
    basis = group.astype(np.int64).copy()  # keep_published: the part in each published split splits on its own
    parts = np.flatnonzero(in_bad & (fixed >= 0))
    _, part_code = np.unique(np.stack([group[parts], fixed[parts].astype(np.int64)]), axis=1, return_inverse=True)
    basis[parts] = int(group.max()) + 1 + part_code.ravel()
    print(f"ingest: warning: {len(bad)} group(s) are in two published splits and are kept there "
          "(ingest.split_conflicts=keep_published): patient independence of the splits is not established for them",
          file=sys.stderr)
    return entry, basis
