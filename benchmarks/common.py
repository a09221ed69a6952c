"""What every benchmark shares: results with checks, timing, memory sampling, the demo data, the machine."""
from __future__ import annotations

import math
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGET_OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "==": lambda v, t: v == t}


def clean(v):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class Result:
    """One benchmark: measured values, and the checks against its targets."""

    name: str
    title: str
    params: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, measure: str, value, unit: str = "") -> None:
        self.rows.append({"measure": measure, "value": value, "unit": unit})

    def check(self, name: str, value, op: str, target) -> bool:
        ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and TARGET_OPS[op](value, target)
        self.checks.append({"check": name, "value": value, "target": f"{op} {target}", "ok": bool(ok)})
        return ok

    def to_json(self) -> dict:
        return clean({"title": self.title, "params": self.params, "rows": self.rows, "checks": self.checks,
                      "notes": self.notes, "seconds": round(self.seconds, 2)})


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class MemorySampler:
    """Peak anonymous and total RSS of this process, sampled every few ms (file-backed pages are reclaimable)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon, self.peak_rss = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def _read() -> tuple[int, int]:
        anon = rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return anon, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = self._read()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        anon, rss = self._read()
        self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def machine() -> dict:
    import torch

    from medtl import hardware

    info = {"cpu": platform.processor() or "unknown", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["cpu"] = names[0] if names else info["cpu"]
        info["avx2"], info["avx512f"], info["avx512_bf16"] = "avx2" in flags, "avx512f" in flags, "avx512_bf16" in flags
        info["amx_bf16"] = hardware.cpu_has_amx_bf16()
    except OSError:
        pass
    info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def demo_prepared(work: Path, patients: int, size: int, min_size: int = 96, max_size: int = 160) -> Path:
    """The pipeline's own demo, ingested and preprocessed by medtl into `work`; returns the prepared folder."""
    from medtl.ingest.ingest import IngestParams, run_ingest
    from medtl.intake.readers.base import ReadOptions
    from medtl.intake.sources.demo import DemoParams
    from medtl.prepare.preprocess import PreprocessParams, run_preprocess

    ingested, prepared = work / "ingested", work / "prepared"
    if (prepared / "stats.json").is_file():
        return prepared
    ingested.mkdir(parents=True, exist_ok=True)
    prepared.mkdir(parents=True, exist_ok=True)
    params = IngestParams(workers=2, demo=DemoParams(patients=patients, min_size=min_size, max_size=max_size))
    run_ingest(params, ingested)
    run_preprocess(PreprocessParams(image_size=size), ReadOptions(), ingested, prepared)
    return prepared


def load_stats(prepared: Path) -> dict:
    """data/prepared/stats.json's record as a flat dict (size = the image side)."""
    from medtl.prepare.prepared import load_stats as load

    stats = load(prepared)
    return {**stats.preprocessing.to_dict(), "size": stats.preprocessing.image_size, "counts": stats.counts}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def cpu_fp32():
    import torch

    from medtl import hardware

    return hardware.Hardware(torch.device("cpu"), "fp32")
