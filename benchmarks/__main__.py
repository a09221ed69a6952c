"""`make bench` / `python -m benchmarks`: medtl against the classic recipe and the machine's own limits.

Prints a table and writes reports/bench.json. Every comparison is a ratio of
two measurements taken in this run on the same data. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = ("model_speed", "threads", "linear_probe", "train_path", "precision", "ingest_scale", "dvc_overhead",
              "predict")

# Smallest sizes that still exercise every code path (the smoke test runs these).
QUICK = {"patients": 12, "size": 32, "linear_epochs": [1, 2], "train_epochs": 1, "cpu_epochs": 0, "precision_epochs": 1,
         "precision_steps": 2, "batch_size": 8, "ingest_sizes": [16, 32], "dvc_images": 96, "dvc_targets": ["preprocess"],
         "ingest_formats": "dicom,png,csv", "predict_images": 16, "deploy_images": 4, "deploy_archs": ["resnet18"], "dataloader_workers": 0, "speed_archs": ["resnet18"],
         "speed_sizes": [32], "fused_sizes": [32], "fused_modes": ["trace-freeze"], "speed_batch": 2, "speed_steps": 1, "matmul_n": 128, "thread_size": 32, "speed_repeats": 1}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--out", type=Path, default=Path("reports/bench.json"))
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--quick", action="store_true", help="smallest sizes: proves the suite runs, measures nothing useful")
    p.add_argument("--large", action="store_true", help="the issue's full sizes: ingest 1k/10k/50k, dvc on 50k images")
    # One thread by default: the least disturbed by other jobs on a shared machine; `threads` measures the others.
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides of every ratio "
                                                          "(default: %(default)s; 0: the stages' default, one per available core)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--patients", type=int, default=160, help="demo patients (2-4 images each) for 1, 2, 3")
    p.add_argument("--size", type=int, default=64, help="image side for 1, 2, 3, 6 (params.yaml's preprocess.image_size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--linear-epochs", type=_ints, default=[10, 30])
    p.add_argument("--dataloader-workers", type=int, default=2, help="the classic recipe's DataLoader workers")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--cpu-epochs", type=int, default=2,
                   help="train_path: epochs of the fine-tune timed with /usr/bin/time for its CPU use (0 skips)")
    p.add_argument("--precision-epochs", type=int, default=3)
    p.add_argument("--precision-steps", type=int, default=8)
    p.add_argument("--auc-tolerance", type=float, default=0.05)
    p.add_argument("--ingest-sizes", type=_ints, default=[1000, 5000, 10000])
    p.add_argument("--ingest-formats", default="dicom,png")
    p.add_argument("--ingest-image-side", type=_ints, default=[64, 128], help="MIN,MAX side of the synthetic sources")
    p.add_argument("--dvc-images", type=int, default=10000)
    p.add_argument("--predict-images", type=int, default=2000)
    p.add_argument("--deploy-images", type=int, default=256,
                   help="predict: images per format of the 224 px rows (colour PNG, DICOM); 0 skips them")
    p.add_argument("--deploy-archs", type=lambda t: t.split(","), default=["resnet18", "resnet50"],
                   help="predict: architectures of the 224 px rows")
    p.add_argument("--speed-archs", type=lambda t: t.split(","), default=["resnet18", "resnet50"],
                   help="model_speed: architectures")
    p.add_argument("--speed-sizes", type=_ints, default=[28, 64, 128, 224], help="model_speed: image sides")
    p.add_argument("--fused-sizes", type=_ints, default=[224], help="model_speed: image sides of the fused rows")
    p.add_argument("--fused-modes", type=lambda t: t.split(","), default=["trace-freeze", "compile"],
                   help="model_speed: fused inference forms (medtl.model.fused) measured against eager")
    p.add_argument("--speed-batch", type=int, default=8, help="model_speed/threads: batch at >= 128 px (4x below)")
    p.add_argument("--speed-steps", type=int, default=2, help="model_speed/threads: timed steps per measurement")
    p.add_argument("--speed-repeats", type=int, default=2,
                   help="model_speed: interleaved repeats of every measurement, the best kept")
    p.add_argument("--matmul-n", type=int, default=2048, help="model_speed: side of the matrices of the limit")
    p.add_argument("--thread-size", type=int, default=224, help="threads: image side")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU rows: model_speed on CUDA (ResNet-18/50 at 128 and 224 px, fp32, channels_last, AMP); "
                        "benchmarks/gpu.sh adds DDP over every GPU")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.ingest_image_side = [32, 48]
    else:
        args.dvc_targets = []
    if args.large:
        args.ingest_sizes, args.dvc_images = [1000, 10000, 50000], 50000
    args.device = "cpu"
    if args.gpu:
        args.device, args.only = "cuda", "model_speed"
        if not args.quick:
            args.speed_sizes, args.speed_batch, args.speed_steps, args.matmul_n = [128, 224], 64, 10, 8192
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    return args


def table(results: list) -> str:
    lines = []
    for r in results:
        lines.append(f"\n== {r.title}  ({r.seconds:.0f} s)")
        for row in r.rows:
            lines.append(f"  {row['measure']:<58} {row['value']!s:>16} {row['unit']}")
        for c in r.checks:
            mark = "ok" if c["ok"] else "MISS"
            lines.append(f"  {c['check']:<58} {c['value']!s:>16}   target {c['target']:<10} {mark}")
        for note in r.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if m.get(f)) or "none of avx2/avx512/amx"
    return (f"medtl benchmarks on {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
            f"CPU flags: {flags}, GPU {m['cuda'] or 'none'}, load average {m['load_average']}")


def write_report(args, results: list, started: float) -> dict:
    import torch

    from benchmarks import common
    from medtl.io import write_json

    report = {"format": "medtl-bench/1", "machine": common.machine(), "quick": args.quick, "large": args.large,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "seconds": round(time.time() - started, 1),
              "load_average": list(os.getloadavg()),
              "benchmarks": {r.name: r.to_json() for r in results},
              "gpu": "not measured: no GPU on this machine" if not torch.cuda.is_available() else "see rows"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import medtl  # noqa: F401  (before torch: medtl sets OpenMP's wait policy, which OpenMP reads when it loads)
    import torch

    from benchmarks import common

    if args.gpu and not torch.cuda.is_available():
        print("python -m benchmarks --gpu: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from medtl import hardware
        hardware.limit_threads()
    selected = [b for b in BENCHMARKS if b in args.only.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="medtl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started, results = time.time(), []
    # The machine first: every number below means something only next to it.
    print(machine_line(common.machine()), flush=True)
    try:
        prepared = None
        if {"linear_probe", "train_path", "precision", "predict"} & set(selected):
            print(f"bench: demo data, {args.patients} patients at {args.size} px", file=sys.stderr)
            prepared = common.demo_prepared(work / "demo", args.patients, args.size)
        for name in selected:
            print(f"bench: {name}", file=sys.stderr)
            t0, load0 = time.perf_counter(), os.getloadavg()[0]
            if name == "model_speed":
                from benchmarks import model_speed
                r = model_speed.run(args.speed_archs, args.speed_sizes, args.speed_batch, args.speed_steps,
                                    args.device, args.matmul_n, args.speed_repeats, tuple(args.fused_sizes),
                                    tuple(args.fused_modes))
            elif name == "threads":
                from benchmarks import model_speed
                r = model_speed.thread_rows(args.arch, args.thread_size, args.speed_batch, args.speed_steps,
                                            args.speed_repeats)
            elif name == "linear_probe":
                from benchmarks import linear_probe
                r = linear_probe.run(work / "linear", prepared, args.linear_epochs, args.batch_size,
                                     args.dataloader_workers, args.auc_tolerance, args.arch)
            elif name == "train_path":
                from benchmarks import train_path
                r = train_path.run(prepared, args.train_epochs, args.batch_size, args.arch, args.cpu_epochs)
            elif name == "precision":
                from benchmarks import precision
                r = precision.run(prepared, args.precision_epochs, args.batch_size, args.precision_steps,
                                  args.auc_tolerance, args.arch)
            elif name == "ingest_scale":
                from benchmarks import ingest_scale
                r = ingest_scale.run(work / "ingest", args.ingest_sizes, args.ingest_formats.split(","),
                                     *args.ingest_image_side)
            elif name == "dvc_overhead":
                from benchmarks import dvc_overhead
                r = dvc_overhead.run(work / "dvc", args.dvc_images, args.dvc_targets)
            else:
                from benchmarks import predict_throughput
                r = predict_throughput.run(work / "predict", prepared, args.predict_images, max(args.batch_size, 8) * 2,
                                           args.arch, args.deploy_images, tuple(args.deploy_archs),
                                           args.speed_repeats)
            r.seconds = time.perf_counter() - t0
            # a shared machine's load moves every absolute number: record it with each benchmark
            r.params["load_average_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            results.append(r)
            print(table([r]), file=sys.stderr)
            write_report(args, results, started)  # after each benchmark: a long run cut short keeps what it measured
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = write_report(args, results, started)
    print(f"{machine_line(report['machine'])}; {report['seconds']:.0f} s")
    print(table(results))
    missed = [f"{r.name}: {c['check']}" for r in results for c in r.checks if not c["ok"]]
    print(f"\n{sum(len(r.checks) for r in results) - len(missed)} checks met, {len(missed)} missed -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
