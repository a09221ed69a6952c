"""3. Precision: fp32 vs bf16 autocast + channels_last on this CPU, speed and accuracy, and what `auto` picks.

Throughput is forward (+ backward + step) on batches already in memory. The
accuracy of each is the demo's test AUC after the same full fine-tuning run
(`medtl.train.finetune.fit`, same seed and epochs) in that precision.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Result, Timer, auc, load_stats
from benchmarks.train_path import memory_batches, raw_train
from medtl.prepare.prepared import load_split

NAME = "precision"


def infer_seconds(model, batches, hw, warmup: int = 1) -> float:
    model.eval()
    with torch.no_grad(), hw.autocast():
        for x, _ in batches[:warmup]:
            model(x)
        with Timer() as t:
            for x, _ in batches:
                model(x)
    return t.seconds


def build(arch: str, stats: dict, hw):
    from medtl.model.classifier import Classifier
    from medtl.model.start import build_backbone

    torch.manual_seed(0)
    model = Classifier(build_backbone(arch, stats["channels"], "none"), len(stats["classes"]), stats["mean"], stats["std"])
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def run(prepared: Path, epochs: int, batch_size: int, steps: int, auc_tolerance: float, arch: str = "resnet18") -> Result:
    from medtl import hardware
    from medtl.model.inference import forward_batches
    from medtl.train.finetune import FinetuneParams, fit

    stats = load_stats(prepared)
    train, val, test = (load_split(prepared, s) for s in ("train", "val", "test"))
    auto = hardware.select("auto", "auto")
    res = Result(NAME, "Precision: fp32 vs bf16 + channels_last",
                 {"arch": arch, "size": stats["size"], "batch_size": batch_size, "timed_steps": steps,
                  "accuracy_epochs": epochs, "cpu_bf16": hardware.cpu_bf16()})
    speed, scores, models = {}, {}, {}
    for precision in ("fp32", "bf16"):
        hw = hardware.Hardware(torch.device("cpu"), precision)
        bs = min(batch_size, len(train.labels))
        batches = memory_batches(train.images, train.labels, bs, steps, hw)
        train_ips = steps * bs / raw_train(build(arch, stats, hw), batches, hw, warmup=1)
        infer_ips = steps * bs / infer_seconds(build(arch, stats, hw), batches, hw)
        model = build(arch, stats, hw)
        params = FinetuneParams(strategy="full", epochs=epochs, batch_size=batch_size, patience=epochs, seed=0,
                                device="cpu", precision=precision)
        fit(params, model, train, val, hw)
        probs = torch.softmax(forward_batches(model, test.images, 64, hw, "test"), 1).numpy()
        speed[precision] = (train_ips, infer_ips)
        scores[precision] = (auc(test.labels, probs[:, 1]), float((probs.argmax(1) == test.labels).mean()))
        models[precision] = model
        label = precision + (" + channels_last" if hw.channels_last else "")
        res.add(f"train {label}", round(train_ips, 1), "img/s")
        res.add(f"inference {label}", round(infer_ips, 1), "img/s")
        res.add(f"test AUC / accuracy {label}", f"{scores[precision][0]:.3f} / {scores[precision][1]:.3f}")
    res.add("bf16 / fp32 train speed", round(speed["bf16"][0] / speed["fp32"][0], 2), "x")
    res.add("bf16 / fp32 inference speed", round(speed["bf16"][1] / speed["fp32"][1], 2), "x")
    res.check("|test AUC bf16 - fp32|", round(abs(scores["bf16"][0] - scores["fp32"][0]), 3), "<=", auc_tolerance)
    fastest = max(speed, key=lambda p: speed[p][0])
    res.check(f"precision auto picks the faster one ({fastest})", auto.precision, "==", fastest)
    int8_rows(res, models["fp32"], prepared, test, speed, scores)
    if hardware.cpu_bf16() is None:
        res.notes.append("this CPU has no native bf16 (AMX or AVX-512 BF16): bf16 runs through emulated kernels "
                         "and is slower; precision auto stays on fp32 here")
    return res


def int8_rows(res: Result, model, prepared: Path, test, speed: dict, scores: dict, repeats: int = 3) -> None:
    """The fp32-trained model exported by `medtl export --int8` (calibrated on val): images/s in onnxruntime
    (INT8 and its fp32 export) beside the torch rows above, and the test AUC change with its interval."""
    import tempfile

    import numpy as np

    from medtl.deploy.export import export
    from medtl.deploy.int8 import export_int8
    from medtl.model import classifier as medtl_model
    from medtl.model.model_file import save_model
    from medtl.prepare.prepared import load_stats as load_prepared_stats

    with tempfile.TemporaryDirectory(prefix="medtl-bench-int8-") as tmp:
        path = Path(tmp) / "model.pt"
        pre = load_prepared_stats(prepared).preprocessing
        save_model(medtl_model.model_file(model.float().to(memory_format=torch.contiguous_format), pre,
                                                      strategy="full"), path)
        int8, record = export_int8(path, prepared, None, 0.99)  # measured here, never refused
        fp32, _ = export(path, "onnx", None)
    import onnxruntime as ort

    images = np.asarray(test.images, dtype=np.float32)
    batches = [images[i:i + 64] for i in range(0, len(images), 64)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the torch rows' threads, not onnxruntime's default
    sessions = {name: ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                for name, data in (("onnx fp32", fp32), ("onnx int8", int8))}
    times = {name: [] for name in sessions}
    for _ in range(repeats):  # interleaved, the median kept; sessions started and warmed beforehand
        for name, sess in sessions.items():
            sess.run(["probabilities"], {"image": batches[0]})
            with Timer() as t:
                for x in batches:
                    sess.run(["probabilities"], {"image": x})
            times[name].append(t.seconds)
    ips = {k: len(images) / float(np.median(v)) for k, v in times.items()}
    res.add("inference onnxruntime fp32 (exported model)", round(ips["onnx fp32"], 1), "img/s")
    res.add("inference onnxruntime INT8 (medtl export --int8)", round(ips["onnx int8"], 1), "img/s")
    res.add("INT8 / onnx fp32 inference speed", round(ips["onnx int8"] / ips["onnx fp32"], 2), "x")
    res.add("INT8 / torch bf16 inference speed", round(ips["onnx int8"] / speed["bf16"][1], 2), "x")
    res.add("test AUC fp32 / bf16 / INT8", f"{record['test_auc_fp32']:.3f} / {scores['bf16'][0]:.3f} / "
                                          f"{record['test_auc_int8']:.3f}")
    res.add("INT8 test AUC change (95% CI, patients resampled)",
            f"{record['auc_change']:+.3f} [{record['auc_change_ci_low']:+.3f}, {record['auc_change_ci_high']:+.3f}]")
