"""What `medtl export` compares its output with before writing it, and the reference pair it writes beside it.

Two numbers: the export against the PyTorch model in fp32 (the graph is the
same: enforced within a tolerance), and the export against the audited
`reports/predictions.csv` for the same test images, which evaluate computed at
its own precision (bf16 on CPUs with native bf16: differences of 1e-3 to 1e-2
are expected from an fp32 export; reported, not enforced). The PyTorch model
run at evaluate's precision is compared with predictions.csv too, so a
mismatch there (another model, edited predictions) is told apart from
rounding.
"""
from __future__ import annotations

import csv
from pathlib import Path

from medtl.deploy.export import parity, run_export
from medtl.evaluate.predictions import load_predictions


def test_images(prepared: Path, n: int):
    """(images, image_ids, split) of the first n prepared test images (validation if there is no test split),
    or None when neither split is there."""
    import numpy as np

    from medtl.prepare.prepared import images_path, load_split

    for split in ("test", "val"):
        if images_path(prepared, split).is_file():
            data = load_split(prepared, split)
            k = min(n, len(data.labels))
            return np.asarray(data.images[:k], dtype=np.float32), [r["image_id"] for r in data.rows[:k]], split
    return None


def audited_probabilities(predictions: Path, image_ids: list[str], classes: list[str]):
    """The probabilities predictions.csv holds for these images, in their order; None when it lacks any of them."""
    import numpy as np

    if not predictions.is_file() or image_ids is None:
        return None
    try:
        _, rows = load_predictions(predictions)
        by_id = {r["image_id"]: r for r in rows}
        return np.array([[float(by_id[i][f"prob_{c}"]) for c in classes] for i in image_ids], dtype=np.float64)
    except (KeyError, ValueError, OSError, csv.Error):
        return None


def pytorch_probabilities(model_path: Path, images, temperature: float | None, precision: str):
    """Probabilities of the PyTorch model on the CPU at `precision` (fp32 or bf16, with autocast as evaluate runs it)."""
    import numpy as np

    import torch

    from medtl import hardware
    from medtl.model.classifier import load_classifier
    from medtl.model.inference import prepare_model

    model, _ = load_classifier(model_path)
    hw = hardware.Hardware(torch.device("cpu"), precision if precision in ("fp32", "bf16") else "fp32")
    model = prepare_model(model, hw).eval()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if hw.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), hw.autocast():  # as medtl.model.inference.forward_batches runs evaluate
        logits = model(x).float().numpy().astype(np.float64)
    z = logits / (temperature or 1.0)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def compare(model_path: Path, data: bytes, fmt: str, images, image_ids: list[str], classes: list[str],
            temperature: float | None, evaluated: dict | None, predictions: Path) -> dict:
    """Differences (max abs over probabilities) of the export with fp32 PyTorch and with the audited predictions."""
    import numpy as np

    _, probs = run_export(data, fmt, images)
    out = {"images": len(images), "to_pytorch_fp32": parity(model_path, data, fmt, images, temperature)}
    precision = ((evaluated or {}).get("hardware") or {}).get("precision")
    out["evaluate_precision"] = precision
    out["evaluate_device"] = ((evaluated or {}).get("hardware") or {}).get("device")
    audited = audited_probabilities(predictions, image_ids, classes) if evaluated else None
    if audited is None:
        out["to_audited_predictions"] = None
        out["note"] = (f"no audited predictions for this model in {predictions}" if evaluated
                       else "no evaluate record for this model file: audited predictions not compared")
        return out
    out["to_audited_predictions"] = float(np.abs(probs - audited).max())
    if precision in ("fp32", "bf16"):
        # the PyTorch model at evaluate's precision should give what evaluate wrote (6 decimals in the csv)
        again = pytorch_probabilities(model_path, images, temperature, precision)
        out["pytorch_at_evaluate_precision_to_audited"] = float(np.abs(again - audited).max())
    return out


def reference_pair(path: Path, data: bytes, fmt: str, images, image_ids: list[str], audited) -> None:
    """input (N, C, S, S) float32, the export's own logits and probabilities, and the audited probabilities, as .npz."""
    import numpy as np

    from medtl.io import atomic_path

    logits, probs = run_export(data, fmt, images)
    arrays = {"image": np.asarray(images, dtype=np.float32), "logits": np.asarray(logits, dtype=np.float32),
              "probabilities": np.asarray(probs, dtype=np.float32)}
    if image_ids is not None:
        arrays["image_id"] = np.array(image_ids)
    if audited is not None:
        arrays["audited_probabilities"] = np.asarray(audited, dtype=np.float64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def reference_path(out: Path) -> Path:
    return out.with_name(out.name + ".reference.npz")


def card_path(out: Path) -> Path:
    return out.with_name(out.name + ".card.json")
