"""Failure cases: the evaluated split's most confident false positives and false negatives, with Grad-CAM overlays.

The surest mistakes are where a reviewer looks first: a confident false
positive on a marker, a ruler or a burned-in label says more about a model
than its AUC. Images are named by their image id and source ref (a keyed hash
of the path, which `medtl locate` turns back into the file where the data
lives), never by a path. For K > 2 classes the wrong calls are listed, most
confident first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtl.evaluate import saliency
from medtl.evaluate.reports import write_failures as write_failures_json
from medtl.ingest.manifest import read_manifest
from medtl.metrics import predict_labels
from medtl.params import require

FAILURES_FORMAT = "medtl-failures/1"


@dataclass(frozen=True)
class FailureParams:
    count: int = 5  # the most confident false positives and false negatives, each (0: none)
    image_size: int = 256  # side of each overlay in pixels

    def check(self, key: str) -> None:
        require(0 <= self.count <= 50, f"{key}.count", self.count, "an integer between 0 and 50")
        require(64 <= self.image_size <= 1024, f"{key}.image_size", self.image_size, "a side in pixels between 64 and 1024")


def failure_rows(labels: np.ndarray, probs: np.ndarray, threshold: float | None, count: int) -> dict[str, list[int]]:
    """Row indices of the surest mistakes: FP and FN for a binary task, `wrong` otherwise."""
    cases = saliency.pick_cases(labels, probs, threshold, count)
    return {case: rows for case, rows in cases.items() if case in ("FP", "FN", "wrong")}


def source_refs(manifest: Path | None) -> dict[str, str]:
    """image_id -> source_ref from ingest's manifest; empty when there is none (arrays made without ingest)."""
    if manifest is None or not Path(manifest).is_file():
        return {}
    return {r["image_id"]: r["source_ref"] for r in read_manifest(Path(manifest))}


def write_failures(params: FailureParams, model: torch.nn.Module, data, probs: np.ndarray, classes: list[str],
                   threshold: float | None, out_dir: Path, device: torch.device, refs: dict[str, str]) -> dict:
    """failures.json and the overlays into out_dir; returns the summary kept in evaluation.json."""
    pred = predict_labels(probs, threshold)
    cases = failure_rows(data.labels, probs, threshold, params.count)
    note = None
    files: dict[int, str] = {}
    if params.count and any(cases.values()):
        try:
            names = saliency.write_overlays(model, data, probs, classes, threshold, out_dir, params.count,
                                            params.image_size, device, cases=cases)
            flat = [i for rows in cases.values() for i in rows]
            files = dict(zip(flat, names))
        except saliency.NoTargetLayer as e:
            note = f"no Grad-CAM overlays: {e}"
    binary = probs.shape[1] == 2
    entries = []
    for case, rows in cases.items():
        for rank, i in enumerate(rows):
            row = data.rows[i]
            entries.append({
                "case": case, "rank": rank + 1, "image_id": row["image_id"], "source_ref": refs.get(row["image_id"]),
                "patient": row["group"], "label": classes[int(data.labels[i])], "predicted": classes[int(pred[i])],
                "probability": float(probs[i, 1]) if binary else float(probs[i].max()),
                "overlay": files.get(i),
            })
    wrong = data.labels != pred
    record = {
        "format": FAILURES_FORMAT,
        "threshold": threshold,
        "probability_of": classes[1] if binary else "the predicted class",
        "count": params.count,
        "errors": {"FP": int((wrong & (pred == 1)).sum()), "FN": int((wrong & (pred == 0)).sum())} if binary
        else {"wrong": int(wrong.sum())},
        "note": note,
        "cases": entries,
    }
    write_failures_json(out_dir, record)
    return {"count": params.count, "listed": len(entries), "overlays": len(files), "note": note}
