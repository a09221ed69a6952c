"""6. `medtl predict` on DICOM files vs the model's raw inference on tensors already in memory, and at 224 px
on colour PNGs and DICOMs vs a plain bf16 loop over the same files (deploy_rows).

`medtl.deploy.predict.predict` does what the command does after parsing its
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
    from medtl.intake import demo

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
    from medtl.model import classifier as medtl_model
    from medtl.model.model_file import save_model
    from medtl.model.start import build_backbone
    from medtl.prepare.prepared import load_stats

    pre = load_stats(prepared).preprocessing
    torch.manual_seed(0)
    classifier = medtl_model.Classifier(build_backbone(arch, pre.channels, "none"), len(pre.classes), pre.mean, pre.std)
    save_model(medtl_model.model_file(classifier, pre, strategy="full"), path)


def run(work: Path, prepared: Path, n: int, batch_size: int, arch: str = "resnet18", deploy_images: int = 0,
        deploy_archs: tuple[str, ...] = ("resnet18", "resnet50"), repeats: int = 2) -> Result:
    from medtl.deploy.predict import predict
    from medtl.intake.readers import read
    from medtl.model.classifier import load_classifier, model_preprocessing
    from medtl.prepare.imaging import model_input

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
        images = np.stack([model_input(read(f, pre.read_options())[0].pixels, pre) for f in files])
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
    if deploy_images:
        deploy_rows(res, work, deploy_images, batch_size, list(deploy_archs), repeats)
    return res


# Rows at deployment size: `medtl predict` end to end (defaults: precision auto, its decode workers and torch
# threads) vs the plain loop a user would write around the same model: decode each file (Pillow / pydicom),
# resize with torch, and run the model under bf16 autocast (channels_last) in batches, with torch's threads
# on every core. Both read the same files from disk; the ratio is end to end.

def write_colour_pngs(folder: Path, n: int, side: int = 224) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(22)
    paths = []
    for i in range(n):
        base = rng.random((side // 8, side // 8, 3))
        img = np.kron(base, np.ones((8, 8, 1)))  # smooth blocks: compresses like a photograph, not like noise
        path = folder / f"img{i:05d}.png"
        Image.fromarray((img * 255).astype(np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def save_deploy_model(path: Path, arch: str, channels: int, side: int) -> None:
    from medtl.intake.readers.base import ReadOptions
    from medtl.model import classifier as medtl_model
    from medtl.model.model_file import save_model
    from medtl.model.start import build_backbone
    from medtl.prepare.imaging import Preprocessing, read_record

    pre = Preprocessing(read=read_record(ReadOptions()), image_size=side, channels=channels, resize="pad",
                        mean=[0.5] * channels, std=[0.25] * channels, classes=["normal", "lesion"])
    torch.manual_seed(0)
    classifier = medtl_model.Classifier(build_backbone(arch, channels, "none"), 2, pre.mean, pre.std)
    save_model(medtl_model.model_file(classifier, pre, strategy="full"), path)


def plain_loop(model_path: Path, files: list[Path], batch_size: int, side: int, channels: int) -> float:
    """Seconds of the plain bf16 loop over `files` (decode, resize, infer), model loading included."""
    import torch.nn.functional as F

    from medtl.model.classifier import load_classifier

    def load(path: Path) -> torch.Tensor:
        if path.suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(path)
            a = ds.pixel_array.astype(np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            t = torch.from_numpy(a)[None]
        else:
            from PIL import Image

            with Image.open(path) as im:
                t = torch.from_numpy(np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255)
            t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        return F.interpolate(t[None], size=(side, side), mode="bilinear", antialias=True)[0]

    with Timer() as t:
        model, _ = load_classifier(model_path)
        model.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, len(files), batch_size):
                x = torch.stack([load(f) for f in files[i:i + batch_size]]).contiguous(memory_format=torch.channels_last)
                model(x)
    return t.seconds


def deploy_rows(res: Result, work: Path, n: int, batch_size: int, archs: list[str], repeats: int = 2) -> None:
    """predict / plain loop on n 224 px colour PNGs and n DICOMs (96-160 px, resized to 224), per arch."""
    from medtl import hardware
    from medtl.deploy.predict import decode_workers, predict

    side = 224
    inputs = {"224 px colour PNG": (work / "png224", write_colour_pngs(work / "png224", n, side), 3),
              "DICOM to 224 px": (work / "dcm224", write_inputs(work / "dcm224", n, 96, 160), 1)}
    saved = torch.get_num_threads()
    torch.set_num_threads(hardware.available_cores())  # both sides as a user runs them: every core
    workers, threads = decode_workers(None)
    res.params["deploy"] = {"images": n, "batch_size": batch_size, "archs": archs, "repeats": repeats,
                            "predict decode workers": workers, "predict torch threads": threads,
                            "plain loop torch threads": torch.get_num_threads(), "plain loop": "eager bf16 autocast"}
    try:
        for arch in archs:
            for what, (folder, files, channels) in inputs.items():
                model_path = work / f"deploy-{arch}-{channels}.pt"
                save_deploy_model(model_path, arch, channels, side)
                ratios, mode = [], ""
                for _ in range(repeats):  # interleaved: a load spike hits one side of one repeat
                    with Timer() as t:
                        out = predict(model_path, [str(folder)], work / "deploy.csv", batch_size,
                                      threshold=0.5, hw=hardware.select("cpu", "auto"), precision="auto")
                    assert out["ok"] == len(files), out
                    mode = out["inference"]["mode"]
                    plain = plain_loop(model_path, files, batch_size, side, channels)
                    ratios.append((len(files) / t.seconds, len(files) / plain))
                ratios.sort(key=lambda r: r[0] / r[1])
                med = ratios[len(ratios) // 2]
                res.add(f"{arch} {what}: medtl predict ({mode})", round(med[0], 1), "img/s")
                res.add(f"{arch} {what}: plain bf16 loop", round(med[1], 1), "img/s")
                res.check(f"{arch} {what}: predict / plain bf16 loop", round(med[0] / med[1], 2), ">=", 0.9)
    finally:
        torch.set_num_threads(saved)
