"""4. Ingest and preprocess at growing N: images per second and peak memory, DICOM, PNG and CSV.

The sources are written here: DICOM files by medtl's demo generator (12-bit,
rescale, window, some MONOCHROME1) with a labels CSV, 16-bit PNG files in
one folder per class, and for the csv source such PNG files named by a CSV
manifest (path, label, group and one metadata column). Each stage runs in a
fresh process, so each peak is its own: peak RSS and peak anonymous memory
(RSS less the file-backed pages of memory-mapped arrays, which the kernel can
drop) of the main process, and the peak RSS of the largest decode worker.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import MemorySampler, Result, Timer, maxrss_mib

NAME = "ingest_scale"


def write_sources(root: Path, fmt: str, n: int, min_size: int, max_size: int) -> Path:
    """n images as DICOM (+ labels.csv), PNG class folders, or PNG class folders + manifest.csv under root;
    returns the source folder."""
    from medtl.intake import demo

    src = root / f"{fmt}-{n}"
    done = src / ".complete"
    if done.is_file():
        return src
    per_patient = 2
    patients = demo.fake_patients(-(-n // per_patient), 0.4, seed=11)
    if fmt == "dicom":
        rows = []
        for p in patients:
            for path in demo.write_patient_images(p, per_patient, (min_size, max_size), 11, src):
                rows.append({"path": path.relative_to(src).as_posix(), "label": demo.CLASSES[int(p.diseased)]})
                if len(rows) == n:
                    break
            if len(rows) == n:
                break
        with open(src / "labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label"])
            w.writeheader()
            w.writerows(rows)
    else:
        count, rows = 0, []
        for p in patients:
            rng = np.random.default_rng([11, p.index])
            for k in range(per_patient):
                if count == n:
                    break
                h, w = (int(rng.integers(min_size, max_size + 1)) for _ in range(2))
                img = demo.synth_image(rng, h, w, p.diseased, 0.0)
                d = src / demo.CLASSES[int(p.diseased)]
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"case{p.index:05d}_{k}.png"), np.round(img * 65535).astype(np.uint16))
                rows.append({"path": f"{d.name}/case{p.index:05d}_{k}.png", "label": d.name,
                             "group": f"case{p.index:05d}", "sex": p.sex})
                count += 1
        if fmt == "csv":
            with open(src / "manifest.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["path", "label", "group", "sex"])
                w.writeheader()
                w.writerows(rows)
    done.touch()
    return src


def _worker(stage: str, fmt: str, src: Path, out: Path) -> dict:
    """Run one stage in this (fresh) process; print its time and memory."""
    from medtl.ingest.ingest import IngestParams, run_ingest, steady_heap
    from medtl.intake.readers.base import ReadOptions
    from medtl.intake.sources.csv import CsvParams
    from medtl.intake.sources.dicom import DicomParams
    from medtl.intake.sources.folder import FolderParams
    from medtl.prepare.preprocess import PreprocessParams, run_preprocess

    with MemorySampler() as mem, Timer() as t:
        if stage == "ingest":
            source = {
                "dicom": {"source": "dicom", "dicom": DicomParams(root=str(src), labels=str(src / "labels.csv"),
                                                                include="*.dcm")},
                "png": {"source": "folder", "folder": FolderParams(root=str(src))},
                "csv": {"source": "csv", "csv": CsvParams(manifest=str(src / "manifest.csv"), metadata=["sex"])},
            }[fmt]
            (out / "ingested").mkdir(parents=True)
            steady_heap()  # as the ingest stage's process does
            report = run_ingest(IngestParams(data=str(src), workers=2, **source), out / "ingested")
            images = report["images"]
        else:
            (out / "prepared").mkdir(parents=True)
            stats = run_preprocess(PreprocessParams(image_size=64), ReadOptions(), out / "ingested", out / "prepared")
            images = sum(stats["counts"].values())
    # ru_maxrss would carry the parent's peak across exec: sample this process instead
    return {"seconds": t.seconds, "images": images, "peak_rss_mib": mem.peak_rss / 2**20,
            "peak_anon_mib": mem.peak_anon / 2**20,
            "worker_peak_rss_mib": maxrss_mib(resource.RUSAGE_CHILDREN)}


def measure(stage: str, fmt: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "benchmarks.ingest_scale", stage, fmt, str(src), str(out)],
                         capture_output=True, text=True, check=False,
                         env={"MEDTL_PSEUDONYM_KEY": "benchmark key, long enough", **os.environ})  # a dicom source needs a key
    if res.returncode != 0:
        raise RuntimeError(f"{stage} of {src} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(work: Path, sizes: list[int], formats: list[str], min_size: int, max_size: int) -> Result:
    import shutil

    res = Result(NAME, "Ingest and preprocess: throughput and peak memory vs N",
                 {"sizes": sizes, "formats": formats, "image_side": [min_size, max_size], "preprocess_size": 64,
                  "ingest_workers": 2})
    peaks: dict[tuple[str, str], list[float]] = {}
    for fmt in formats:
        for n in sizes:
            with Timer() as gen:
                src = write_sources(work / "sources", fmt, n, min_size, max_size)
            out = work / "runs" / f"{fmt}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for stage in ("ingest", "preprocess"):
                m = measure(stage, fmt, src, out)
                res.add(f"{stage} {fmt} N={n}", round(m["images"] / m["seconds"], 1), "img/s")
                res.add(f"{stage} {fmt} N={n} peak RSS / anon / worker RSS",
                        f"{m['peak_rss_mib']:.0f} / {m['peak_anon_mib']:.0f} / {m['worker_peak_rss_mib']:.0f}", "MiB")
                peaks.setdefault((stage, fmt), []).append(max(m["peak_anon_mib"], m["worker_peak_rss_mib"]))
            res.notes.append(f"{fmt} N={n}: sources written in {gen.seconds:.0f} s (not counted)")
            shutil.rmtree(out, ignore_errors=True)
    if len(sizes) > 1:
        for (stage, fmt), p in peaks.items():
            res.check(f"{stage} {fmt}: peak memory N={sizes[-1]} / N={sizes[-2]}", round(p[-1] / p[-2], 2), "<=", 1.25)
    return res


if __name__ == "__main__":
    stage, fmt, src, out = sys.argv[1:5]
    print(json.dumps(_worker(stage, fmt, Path(src), Path(out))))
