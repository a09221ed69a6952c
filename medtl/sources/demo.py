"""The built-in demo: synthetic DICOM written to a temporary folder, then ingested like any DICOM.

The files carry fake patient names and ids in their headers, so they are kept
outside the project (a temporary folder) and only their hashes, pseudonymous
groups and decoded pixels reach the artifacts.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtl import demo
from medtl.params import require
from medtl.sources import Source, SourceItem


@dataclass(frozen=True)
class DemoParams:
    patients: int = 200
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


def open_source(params, workdir: Path) -> Source:
    p = params.demo
    tmp = Path(tempfile.mkdtemp(prefix="medtl-demo-"))
    rng = np.random.default_rng(p.seed)
    items = []
    for patient in demo.fake_patients(p.patients, p.prevalence, p.seed):
        n = int(rng.integers(p.min_images_per_patient, p.max_images_per_patient + 1))
        for path in demo.write_patient_images(patient, n, (p.min_size, p.max_size), p.seed, tmp):
            items.append(
                SourceItem(
                    "demo/" + path.relative_to(tmp).as_posix(),
                    path=path,
                    label=demo.CLASSES[int(patient.diseased)],
                    group=patient.patient_id,  # the generator's patient, pseudonymised by ingest
                    group_kind="source",
                )
            )
    return Source(
        items=items,
        classes=list(demo.CLASSES),
        description={"source": "demo", "generator": "medtl.demo", "seed": p.seed, "patients": p.patients},
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )
