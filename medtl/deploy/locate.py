"""`medtl locate`: map images and source refs back to the files they came from, where the data lives.

Artifacts name source files only by `source_ref`, a keyed hash of the path
relative to the source root, so they can leave the hospital. The hospital's
own staff, on the machine that holds the data and with the same pseudonym key,
re-enumerate the source named in params.yaml and print the real path:

    medtl locate img000042 f-3c1a9e0b7d2f4a61

`medtl predict` and the external sets of `evaluate.external` name files the
same way; with `--folder` the refs (or external image ids, looked up in
reports/external_predictions.csv) are resolved in that folder, the one given
to predict or the external set's root, instead of the ingest source:

    medtl locate --folder /exports/today f-9e2b44c0a1d35f07
    medtl locate --folder data/external/nih nih-000001
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from medtl.errors import MedtlError
from medtl.evaluate.predictions import EXTERNAL_PREDICTIONS, load_predictions, project_path
from medtl.ingest.manifest import PROJECT_MANIFEST, read_manifest
from medtl.intake import phi
from medtl.io import sha256_file
from medtl.params import load_section

if TYPE_CHECKING:
    from medtl.intake.sources import SourceItem


@dataclass
class Located:
    query: str  # what was asked: an image id or a source ref
    source_ref: str
    item: SourceItem | None  # None: no file of the source has this ref
    sha256: str | None = None  # the manifest's, when the query was an image id


def source_items(params) -> Iterator[tuple[str, SourceItem]]:
    """(source_ref, item) for everything the source enumerates, with the current pseudonym key."""
    from medtl.intake.sites import open_sources

    with tempfile.TemporaryDirectory(prefix="medtl-locate-") as work:
        source = open_sources(params, Path(work))
        try:
            for item in source.items:
                yield phi.source_ref(item.ref_key), item
        finally:
            if source.cleanup:
                source.cleanup()


def locate(params, queries: list[str], manifest: Path) -> list[Located]:
    """Each query (image id or source ref) with the source item it names."""
    wanted: dict[str, tuple[str, str | None]] = {}  # query -> (ref, sha256)
    rows = None
    for q in queries:
        if q.startswith(phi.SOURCE_REF_PREFIX):
            wanted[q] = (q, None)
            continue
        if rows is None:
            if not manifest.is_file():
                raise MedtlError(f"{q} looks like an image id, but the manifest {manifest} does not exist; run ingest "
                                 "first (dvc repro ingest) or pass a source ref (f-...) or --manifest")
            rows = {r["image_id"]: r for r in read_manifest(manifest)}
        if q not in rows:
            raise MedtlError(f"{q} is neither an image id of {manifest} nor a source ref (f- followed by 16 hex digits)")
        wanted[q] = (rows[q]["source_ref"], rows[q]["sha256"])
    refs = {ref for ref, _ in wanted.values()}
    found: dict[str, SourceItem] = {}
    for ref, item in source_items(params):
        if ref in refs and ref not in found:
            found[ref] = item
            if len(found) == len(refs):
                break
    return [Located(q, ref, found.get(ref), sha) for q, (ref, sha) in wanted.items()]


def external_refs(ids: list[str], predictions: Path) -> dict[str, str]:
    """Each id as a file ref: a ref stays itself, an external image id (`nih-000001`) is looked up in `predictions`."""
    wanted = [i for i in ids if not i.startswith(phi.SOURCE_REF_PREFIX)]
    if not wanted:
        return {i: i for i in ids}
    try:
        rows = {r.get("image_id"): r.get("source_ref") or "" for r in load_predictions(predictions)[1]}
    except OSError as e:
        raise MedtlError(f"{', '.join(wanted)} look like external image ids, but {predictions} cannot be read "
                         f"({e.strerror or type(e).__name__}); run evaluate first or pass a file ref (f-...) or "
                         "--predictions") from None
    missing = [i for i in wanted if not rows.get(i)]
    if missing:
        raise MedtlError(f"with --folder, each ID must be a file ref (f- followed by 16 hex digits) or an image id of "
                         f"{predictions} that has a source_ref; got {', '.join(missing)}")
    return {i: i if i.startswith(phi.SOURCE_REF_PREFIX) else rows[i] for i in ids}


def locate_in_folder(folder: Path, refs: list[str]) -> dict[str, Path | None]:
    """Each ref with the file under `folder` whose relative path it is a ref of (None: no such file)."""
    from medtl.intake.decode import folder_items

    if not folder.is_dir():
        raise MedtlError(f"--folder {folder} is not a folder; pass the folder given to `medtl predict`, or the root "
                         "of an external set")
    bad = [r for r in refs if not r.startswith(phi.SOURCE_REF_PREFIX)]
    if bad:
        raise MedtlError(f"with --folder, each ID must be a file ref (f- followed by 16 hex digits), got {', '.join(bad)}")
    found: dict[str, Path | None] = dict.fromkeys(refs)
    for item in folder_items(folder):
        ref = phi.source_ref(item.ref_key)
        if ref in found and found[ref] is None:
            found[ref] = folder / item.relative
    return found


def _describe(loc: Located, params, root: str | None) -> str:
    item = loc.item
    if item is None:
        return (f"{loc.query}: no file of the {params.source} source has ref {loc.source_ref}; was ingest run with "
                f"another pseudonym key ({phi.KEY_ENV} / {phi.KEY_FILE_ENV}) or has the source changed since?")
    names_a_file = root and not (item.path is None and item.problem == "missing_file")  # not a label row without file
    full = Path(root) / item.relative if names_a_file else None
    file = full if full is not None and full.is_file() else None
    where = str(full) if full is not None else item.relative
    if full is not None and file is None:
        where += f" (not a readable file: {item.problem or 'missing'})"
    if item.site is not None:
        where += f" [site {item.site}]"
    if (params.source if item.site is None else {s.name: s.source for s in params.sources}[item.site]) == "demo":
        where += " (generated by the demo source; not kept on disk)"
    if item.index is not None:
        where += f" [image {item.index}]"
    if item.line is not None:
        where += f" [line {item.line} of the source's CSV]"
    check = ""
    if loc.sha256 and file is not None:
        check = "\tsha256 matches" if sha256_file(file) == loc.sha256 else "\tsha256 DIFFERS from the manifest (the file changed since ingest)"
    return f"{loc.query}\t{loc.source_ref}\t{where}{check}"


def run(args: argparse.Namespace) -> int:
    if args.folder is not None:
        asked = external_refs(args.ids, Path(args.predictions))
        found = locate_in_folder(Path(args.folder), sorted(set(asked.values())))
        for query, ref in asked.items():
            f = found[ref]
            named = ref if query == ref else f"{query}\t{ref}"
            print(f"{named}\t{f}" if f else f"{named}: no file under {args.folder} has this ref; was it made with "
                                            f"another pseudonym key ({phi.KEY_ENV} / {phi.KEY_FILE_ENV})?")
        return 0 if all(found.values()) else 1
    params = load_section("ingest", _ingest_params(), args.params)
    found = locate(params, args.ids, Path(args.manifest))
    for loc in found:
        print(_describe(loc, params, params.source_root(loc.item.site if loc.item else None)))
    return 0 if all(loc.item is not None for loc in found) else 1


def _ingest_params():
    from medtl.ingest.ingest import IngestParams  # the params class lives with the stage that reads it

    return IngestParams


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "locate", help="print the source file of an image id or source ref (run where the data lives)",
        description="Re-enumerate the ingest source named in params.yaml and print the file behind each image id "
                    "(from data/ingested/manifest.csv) or source ref (f-...). Needs the pseudonym key ingest used. "
                    "Its output names real files: keep it inside the hospital.")
    p.add_argument("ids", nargs="+", metavar="ID", help="image ids (img000042) or source refs (f-...)")
    p.add_argument("--params", default="params.yaml", help="params file naming the source (default: params.yaml)")
    p.add_argument("--manifest", default=str(PROJECT_MANIFEST), help="manifest to look image ids up in")
    p.add_argument("--folder", default=None,
                   help="look file refs up in this folder (one given to `medtl predict`, or an external set's root) "
                        "instead of the ingest source")
    p.add_argument("--predictions", default=project_path(EXTERNAL_PREDICTIONS),
                   help="with --folder: where external image ids (e.g. nih-000001) are looked up (default: %(default)s)")
    p.set_defaults(func=run)
