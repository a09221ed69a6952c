"""`medtl export --format onnx --int8`: an INT8 ONNX model, calibrated on validation, refused if it costs AUC.

Static quantisation with onnxruntime.quantization (QDQ: weights int8 per
channel, activations uint8, the u8s8 kernels that VNNI runs): the ranges of
the activations are calibrated on the VALIDATION split only, and the cost is
measured on the TEST split, which calibration never sees, as the change of
ROC AUC from the fp32 export with a paired bootstrap interval resampled by
patient. When |change| exceeds the tolerance nothing is written and the
command exits 1. The measurement travels in the file's metadata
(`medtl.deploy.int8`).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from medtl.deploy.export import INPUT_NAME, export
from medtl.errors import MedtlError
from medtl.io import atomic_path

DEFAULT_TOLERANCE = 0.01  # largest accepted |test AUC change|
CALIBRATION_IMAGES = 256  # validation images used for the ranges, at most
BATCH = 16


def quantize(fp32: bytes, calibration, batch: int = BATCH) -> bytes:
    """The INT8 (QDQ) model of the fp32 ONNX bytes, activation ranges from `calibration` (N, C, S, S) float32."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.ascontiguousarray(calibration[i:i + batch], dtype=np.float32)
                                for i in range(0, len(calibration), batch))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: x}

    with tempfile.TemporaryDirectory(prefix="medtl-int8-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # folds, fuses and infers shapes first
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"])  # the products; the softmax stays fp32
        return out.read_bytes()


def probabilities(data: bytes, images, batch: int = 64):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = [sess.run(["probabilities"], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch], dtype=np.float32)})[0]
           for i in range(0, len(images), batch)]
    return np.concatenate(out)


def paired_auc_change(labels, ref, new, groups, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(new) - AUC(ref) on the same images, with a bootstrap interval resampling patients (both models alike)."""
    import numpy as np

    from medtl.metrics import roc_auc

    labels, groups = np.asarray(labels), np.asarray(groups)
    base, changed = roc_auc(labels, ref), roc_auc(labels, new)
    if base is None or changed is None:
        raise MedtlError("the test split lacks a class, so ROC AUC (and the INT8 model's cost) cannot be measured")
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        a, b = roc_auc(labels[idx], ref[idx]), roc_auc(labels[idx], new[idx])
        if a is not None and b is not None:
            deltas.append(b - a)
    low, high = (np.quantile(deltas, [alpha / 2, 1 - alpha / 2]) if deltas else (float("nan"),) * 2)
    return {"test_auc_fp32": base, "test_auc_int8": changed, "auc_change": changed - base,
            "auc_change_ci_low": float(low), "auc_change_ci_high": float(high), "ci": 1 - alpha,
            "bootstrap": {"n_resamples": n_resamples, "seed": seed, "resampled": "patients", "valid": len(deltas)}}


def export_int8(model_path: Path, prepared: Path, operating_point: Path | None, tolerance: float) -> tuple[bytes, dict]:
    """(INT8 ONNX bytes with metadata, the measurement); MedtlError before anything is written."""
    import onnx

    from medtl.prepare.prepared import load_split, load_stats, stats_path

    if not 0 <= tolerance < 1:
        raise MedtlError(f"--int8-tolerance must be an AUC change in [0, 1), got {tolerance}")
    if not stats_path(prepared).is_file():
        raise MedtlError(f"--int8 needs the prepared arrays ({stats_path(prepared)} not found): calibration uses the "
                         "validation split and the cost is measured on the test split; pass --check data/prepared")
    stats = load_stats(prepared)
    val, test = load_split(prepared, "val", stats), load_split(prepared, "test", stats)
    if len(val.labels) == 0 or len(test.labels) == 0:
        raise MedtlError(f"--int8 needs non-empty validation (calibration) and test (measurement) splits in {prepared}")
    fp32, meta = export(model_path, "onnx", operating_point)
    if json.loads(meta["medtl.input"])["shape"][1:] != list(val.images.shape[1:]):
        raise MedtlError(f"{prepared} holds images of shape {list(val.images.shape[1:])}, not the input of {model_path}; "
                         "rerun the pipeline (dvc repro) so model and data match")
    calibration = val.images[:CALIBRATION_IMAGES]
    int8 = quantize(fp32, calibration)
    change = paired_auc_change(test.labels, probabilities(fp32, test.images), probabilities(int8, test.images),
                               [r["group"] for r in test.rows])
    record = {**change, "tolerance": tolerance, "calibration": {"split": "val", "images": len(calibration)},
              "measured_on": {"split": "test", "images": len(test.labels)},
              "quantisation": "onnxruntime static QDQ, int8 weights per channel, uint8 activations, MinMax"}
    proto = onnx.load_from_string(int8)
    del proto.metadata_props[:]
    for k, v in {**meta, "medtl.deploy.int8": json.dumps(record, sort_keys=True)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString(), record


def cmd_export_int8(args) -> int:
    """The --int8 branch of `medtl export`: exit 1 with nothing written when the AUC change is too large."""
    if args.format != "onnx":
        raise MedtlError(f"--int8 is an ONNX export (onnxruntime runs the INT8 kernels); use --format onnx, not {args.format}")
    if not args.model.is_file():
        raise MedtlError(f"model {args.model} not found; run the pipeline (dvc repro) or name the model file")
    data, r = export_int8(args.model, args.check, args.operating_point, args.int8_tolerance)
    change = (f"test ROC AUC {r['test_auc_fp32']:.4f} -> {r['test_auc_int8']:.4f} (change {r['auc_change']:+.4f}, "
              f"{r['ci']:.0%} CI [{r['auc_change_ci_low']:+.4f}, {r['auc_change_ci_high']:+.4f}], "
              f"{r['measured_on']['images']} test images; calibrated on {r['calibration']['images']} validation images)")
    if abs(r["auc_change"]) > r["tolerance"]:
        print(f"medtl export --int8: refused, nothing written: {change} exceeds the tolerance {r['tolerance']} "
              "(--int8-tolerance)", file=sys.stderr)
        return 1
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        print(f"medtl export --int8: {change}", file=sys.stderr)
        return 0
    out = Path(args.out) if args.out else args.model.with_name(args.model.name.removesuffix(".pt") + ".int8.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    print(f"{out}: INT8 onnx; {change}")
    return 0
