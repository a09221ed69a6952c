"""Several labelled sources in one ingest, each a named site.

`ingest.sources` lists sources, each any source kind with its own options.
They are enumerated one after another as one source: every item is tagged
with its site (the `site` metadata column of the manifest, and a prefix of
its `source_ref` key, so equal relative paths at two sites stay two files).
Everything else is ingest's as for one source: one pseudonym key, so a
patient id found at two sites is one group; duplicates and label conflicts
looked for across all sites; splits stratified by site and label.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medtl.errors import MedtlError
from medtl.intake.sources import (SOURCES, Resolved, Source, SourceItem, SourceName, check_source_paths, open_source,
                                  source_inputs)
from medtl.intake.sources.demo import SITE_NAME
from medtl.intake.sources.sections import SourceSections, sections_of
from medtl.params import require

SITE_COLUMN = "site"
NAME_RULE = "a plain identifier (letters, digits and '_', not starting with a digit, at most 64 characters)"


@dataclass(frozen=True)
class SiteSource(SourceSections):
    """One named source of `ingest.sources`: its site name, its kind and that kind's options."""

    name: str
    source: SourceName

    def check(self, key: str) -> None:
        require(bool(SITE_NAME.fullmatch(self.name)), f"{key}.name", self.name, NAME_RULE)
        require(self.source in SOURCES, f"{key}.source", self.source, "one of " + ", ".join(SOURCES))
        check_source_paths(self, key)
        sites = self.demo.site_list()
        require(self.source != "demo" or len(sites) <= 1, f"{key}.demo.sites", [s.name for s in sites],
                "at most one site: a source of ingest.sources is one site (give each site its own source)")

    def source_inputs(self) -> list[str]:
        return source_inputs(self)

    def as_ingest(self, params):
        """The ingest params with this source in place of the single-source keys (what source modules read)."""
        return dataclasses.replace(params, sources=[], source=self.source, **sections_of(self))


def check_sources(sources: list[SiteSource], data: str, demo_data: str, key: str) -> None:
    """Distinct site names, and every source's files inside `data`, the one path dvc tracks for them all."""
    names = [s.name for s in sources]
    require(len(set(names)) == len(names), f"{key}.sources", names, "sources with distinct names")
    root = Path(data).resolve()
    for i, s in enumerate(sources):
        for path in s.source_inputs():
            require(data != demo_data and Path(path).resolve().is_relative_to(root), f"{key}.sources[{i}].{s.source}",
                    path, f"a path inside {key}.data ({data!r}), which dvc tracks so that ingest reruns when any "
                    f"source changes; set {key}.data to the folder that holds every source")


def open_sources(params, workdir: Path) -> Source:
    """The source(s) of the ingest params: the single source, or every source of `sources` as one."""
    if not params.sources:
        return open_source(params, workdir)
    opened: list[tuple[SiteSource, Source, Iterator[SourceItem]]] = []
    try:
        for i, spec in enumerate(params.sources):
            key = f"ingest.sources[{i}]"
            try:
                src = open_source(spec.as_ingest(params), workdir)
            except MedtlError as e:
                message = str(e).replace(f"ingest.{spec.source}.", f"{key}.{spec.source}.")
                raise type(e)(f"{key} (site {spec.name}): {message}") from None
            opened.append((spec, src, iter(())))
            items = iter(src.items)
            first = next(items, None)  # an empty source stops ingest before any decoding
            if first is None:
                raise MedtlError(f"{key} (site {spec.name}, source {spec.source}) has no files; expected the "
                                 f"images of site {spec.name}, or remove the source from ingest.sources")
            opened[-1] = (spec, src, itertools.chain([first], items))
    except BaseException:
        for _, src, _ in opened:
            if src.cleanup:
                src.cleanup()
        raise
    return _combined(opened)


def _tagged(spec: SiteSource, items: Iterator[SourceItem]) -> Iterator[SourceItem]:
    for item in items:
        item.site = spec.name
        item.extra = {**item.extra, SITE_COLUMN: spec.name}
        yield item


def _combined(opened: list[tuple[SiteSource, Source, Iterator[SourceItem]]]) -> Source:
    sources = [src for _, src, _ in opened]
    found: list[str] = []
    for src in sources:  # the classes the sources name, in the order they first appear
        found += [c for c in src.classes if c not in found]
    counts = [s.count if s.count is not None else len(s.items) if isinstance(s.items, list) else None for s in sources]
    resolvers = {spec.name: src.resolve for spec, src, _ in opened if src.resolve is not None}

    def resolve(item: SourceItem, identity: dict) -> Resolved:
        own = resolvers.get(item.site)
        return own(item, identity) if own else Resolved(item.label, item.group)

    def unmatched() -> list[SourceItem]:
        return [item for spec, src, _ in opened if src.unmatched
                for item in _tagged(spec, iter(src.unmatched()))]

    def cleanup() -> None:
        for src in sources:
            if src.cleanup:
                src.cleanup()

    header_groups = [src.header_group for src in sources if src.resolve is not None]
    return Source(
        items=itertools.chain.from_iterable(_tagged(spec, items) for spec, _, items in opened),
        classes=found,
        description={"source": "sources", "sources": [{"name": spec.name, **src.description} for spec, src, _ in opened]},
        cleanup=cleanup,
        count=None if None in counts else sum(counts),
        resolve=resolve if resolvers else None,
        unmatched=unmatched,
        header_group=header_groups[0] if header_groups else "PatientID",
    )
