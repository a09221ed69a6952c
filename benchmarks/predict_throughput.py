"""6. `medtl predict` on DICOM files vs the model's raw inference on tensors already in memory.

`medtl.predict.predict` does what the command does after parsing its
arguments: walk the folder, decode each file, prepare it as the pipeline
does, batch, infer and write the CSV. The reference is the same model, batch
size and precision on the same images, prepared beforehand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Result, Timer, cpu_fp32

NAME = "predict"


def write_inputs(folder: Path, n: int, min_size: int, max_size: int) -> list[Path]:
    from medtl import demo

    done = folder / ".complete"
    if done.is_file():
        return sorted(folder.rglob("*.dcm"))
    paths: list[Path] = []
    for p in demo.fake_patients(-(-n // 4), 0.4, seed=21):
        paths += demo.write_patient_images(p, 4, (min_size, max_size), 21, folder)
    for extra in paths[n:]:
        extra.unlink()
    done.touch()
    return paths[:n]


def save_model(path: Path, prepared: Path, arch: str) -> None:
    """A model file in fine-tune's format (weights untrained: throughput does not depend on them)."""
    from medtl import model as medtl_model
    from medtl.backbones import build_backbone
    from medtl.prepared import load_stats

    pre = load_stats(prepared).preprocessing
    torch.manual_seed(0)
    classifier = medtl_model.Classifier(build_backbone(arch, pre.channels, "none"), len(pre.classes), pre.mean, pre.std)
    medtl_model.save_model(medtl_model.model_file(classifier, pre, strategy="full"), path)


def run(work: Path, prepared: Path, n: int, batch_size: int, arch: str = "resnet18") -> Result:
    from medtl.imaging import decode, model_input
    from medtl.model import load_classifier, model_preprocessing
    from medtl.predict import predict

    hw = cpu_fp32()
    model_path = work / "predict-model.pt"
    save_model(model_path, prepared, arch)
    files = write_inputs(work / "predict-in", n, 96, 160)
    res = Result(NAME, "medtl predict vs raw inference",
                 {"arch": arch, "images": len(files), "format": "DICOM, 96-160 px", "batch_size": batch_size,
                  "precision": hw.precision, "threads": torch.get_num_threads()})
    with Timer() as t:
        out = predict(model_path, [str(work / "predict-in")], work / "predictions.csv", batch_size,
                      threshold=0.5, hw=hw)
    assert out["ok"] == len(files), out
    predict_ips = len(files) / t.seconds

    model, ckpt = load_classifier(model_path)
    with Timer() as dec:
        pre = model_preprocessing(ckpt, model_path)
        images = np.stack([model_input(decode(f, pre)[0].pixels, pre) for f in files])
    batches = [torch.from_numpy(images[i:i + batch_size].astype(np.float32)) for i in range(0, len(images), batch_size)]
    with torch.no_grad():
        model(batches[0])  # warm-up
        with Timer() as raw:
            for x in batches:
                model(x)
    raw_ips = len(files) / raw.seconds
    res.add("medtl predict (files -> CSV)", round(predict_ips, 1), "img/s")
    res.add("raw inference, tensors in memory", round(raw_ips, 1), "img/s")
    res.add("decode + prepare alone, one process", round(len(files) / dec.seconds, 1), "img/s")
    res.check("predict / raw", round(predict_ips / raw_ips, 3), ">=", 0.8)
    return res
