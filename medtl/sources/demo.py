"""The built-in demo: synthetic DICOM written to a temporary folder, then ingested like any DICOM.

The files carry fake patient names and ids in their headers, so they are kept
outside the project (a temporary folder) and only their hashes, pseudonymous
groups and decoded pixels reach the artifacts.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from medtl import demo
from medtl.sources import Source, SourceItem


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
                    source_path="demo/" + path.relative_to(tmp).as_posix(),
                    path=path,
                    label=demo.CLASSES[int(patient.diseased)],
                    # group left to the DICOM PatientID, pseudonymised by ingest
                )
            )
    return Source(
        items=items,
        classes=list(demo.CLASSES),
        description={"source": "demo", "generator": "medtl.demo", "seed": p.seed, "patients": p.patients},
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    )
