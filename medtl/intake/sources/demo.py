"""The built-in demo: synthetic DICOM written to a temporary folder, then ingested like any DICOM.

The files carry fake patient names and ids in their headers, so they are kept
outside the project (a temporary folder) and only their hashes, pseudonymous
groups and decoded pixels reach the artifacts.

With `sites` (a number of preset sites, or a list of named sites), the demo
emits several sites whose scanners differ (medtl.intake.demo.Scanner) and whose
prevalence differs; each image's `site` metadata names its site.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from medtl.intake import demo
from medtl.intake.sources import Source, SourceItem
from medtl.params import require

SITE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a plain identifier: a manifest value and a metrics key


@dataclass(frozen=True)
class DemoSite:
    """One site of the multi-site demo: its scanner (medtl.intake.demo.Scanner), prevalence and patients."""

    name: str = ""
    patients: int | None = None  # null: the demo's patients
    prevalence: float | None = None  # null: the demo's prevalence
    seed: int | None = None  # null: the demo's seed + 1000 x (position in the list + 1)
    gamma: float = 1.0
    noise: float = 0.045
    resolution: float = 1.0
    blur: float = 0.0
    monochrome1: float = 0.25
    collimation: float = 0.0

    def validate(self, key: str) -> None:
        """Called by DemoParams.check (not `check`: inside `list | int`, build would lose the key to the union)."""
        require(bool(SITE_NAME.fullmatch(self.name)), f"{key}.name", self.name,
                "a plain identifier (letters, digits and '_', not starting with a digit, at most 64 characters)")
        require(self.patients is None or self.patients >= 6, f"{key}.patients", self.patients, "at least 6, or null")
        require(self.prevalence is None or 0 < self.prevalence < 1, f"{key}.prevalence", self.prevalence,
                "a fraction strictly between 0 and 1, or null")
        require(0.2 <= self.gamma <= 5, f"{key}.gamma", self.gamma, "an exponent between 0.2 and 5")
        require(0 <= self.noise <= 0.5, f"{key}.noise", self.noise, "a standard deviation between 0 and 0.5")
        require(0.1 <= self.resolution <= 1, f"{key}.resolution", self.resolution, "a fraction between 0.1 and 1")
        require(0 <= self.blur <= 0.1, f"{key}.blur", self.blur, "a fraction of the image side between 0 and 0.1")
        require(0 <= self.monochrome1 <= 1, f"{key}.monochrome1", self.monochrome1, "a share between 0 and 1")
        require(0 <= self.collimation <= 0.3, f"{key}.collimation", self.collimation, "a fraction between 0 and 0.3")

    def scanner(self) -> demo.Scanner:
        return demo.Scanner(self.gamma, self.noise, self.resolution, self.blur, self.monochrome1, self.collimation)


def preset_sites(n: int) -> list[DemoSite]:
    """The first n of medtl.intake.demo.PRESETS as sites."""
    return [DemoSite(name, prevalence=prevalence, **vars(scanner)) for name, prevalence, scanner in demo.PRESETS[:n]]


@dataclass(frozen=True)
class DemoParams:
    PATHS: ClassVar[tuple[str, ...]] = ()  # generated: reads no files

    patients: int = 200
    min_images_per_patient: int = 2
    max_images_per_patient: int = 4
    min_size: int = 96
    max_size: int = 160
    prevalence: float = 0.4
    seed: int = 7
    # Several sites: a number of preset sites (medtl.intake.demo.PRESETS), or a list of DemoSite; 0: one site, no `site` column.
    sites: list[DemoSite] | int = 0

    def check(self, key: str) -> None:
        require(self.patients >= 6, f"{key}.patients", self.patients, "at least 6")
        require(1 <= self.min_images_per_patient <= self.max_images_per_patient, f"{key}.min_images_per_patient",
                self.min_images_per_patient, f"between 1 and max_images_per_patient ({self.max_images_per_patient})")
        require(16 <= self.min_size <= self.max_size <= 2048, f"{key}.min_size", self.min_size,
                f"between 16 and max_size ({self.max_size}), at most 2048")
        require(0 < self.prevalence < 1, f"{key}.prevalence", self.prevalence, "a fraction strictly between 0 and 1")
        if isinstance(self.sites, int):
            require(0 <= self.sites <= len(demo.PRESETS), f"{key}.sites", self.sites,
                    f"a number of preset sites between 0 and {len(demo.PRESETS)}, or a list of sites")
        else:
            for i, site in enumerate(self.sites):
                site.validate(f"{key}.sites[{i}]")
        names = [s.name for s in self.site_list()]
        require(len(set(names)) == len(names), f"{key}.sites", names, "sites with distinct names")

    def site_list(self) -> list[DemoSite]:
        return preset_sites(self.sites) if isinstance(self.sites, int) else list(self.sites)


def open_source(params, workdir: Path) -> Source:
    p = params.demo
    tmp = Path(tempfile.mkdtemp(prefix="medtl-demo-"))
    sites = p.site_list()
    items = []
    if not sites:
        items = _site_items(p.patients, p.prevalence, p.seed, p, None, tmp, None)
    for k, site in enumerate(sites):
        seed = site.seed if site.seed is not None else p.seed + 1000 * (k + 1)
        items += _site_items(site.patients or p.patients, site.prevalence or p.prevalence, seed, p, site.scanner(),
                             tmp / site.name, site.name)
    description = {"source": "demo", "generator": "medtl.intake.demo", "seed": p.seed, "patients": p.patients}
    if sites:
        description["sites"] = [s.name for s in sites]
    return Source(
        items=items,
        classes=list(demo.CLASSES),
        description=description,
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )


def _site_items(patients: int, prevalence: float, seed: int, p: DemoParams, scanner: demo.Scanner | None,
                folder: Path, site: str | None) -> list[SourceItem]:
    """One site's patients written under `folder`, as items (tagged with the site when there are several)."""
    rng = np.random.default_rng(seed)
    prefix = "demo/" if site is None else f"demo/{site}/"
    items = []
    for patient in demo.fake_patients(patients, prevalence, seed):
        n = int(rng.integers(p.min_images_per_patient, p.max_images_per_patient + 1))
        for path in demo.write_patient_images(patient, n, (p.min_size, p.max_size), seed, folder, scanner):
            items.append(
                SourceItem(
                    prefix + path.relative_to(folder).as_posix(),
                    path=path,
                    label=demo.CLASSES[int(patient.diseased)],
                    group=patient.patient_id,  # the generator's patient, pseudonymised by ingest
                    group_kind="source",
                    extra={} if site is None else {"site": site},
                )
            )
    return items
