"""DDP with nccl on every GPU of one node: aggregate training images/s against N x one GPU.

    torchrun --standalone --nproc_per_node N -m benchmarks.ddp_speed --out reports/bench-gpu-ddp.json

(`benchmarks/gpu.sh` runs it when the node has more than one GPU.) Rank 0
first measures one GPU alone, then every rank trains the same model under
DistributedDataParallel with the same per-GPU batch.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def steps_per_second(model, batches, hw, opt) -> float:
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(x, y):
        with hw.autocast():
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*batches[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in batches:
        step(x, y)
    torch.cuda.synchronize()
    return len(batches) / (time.perf_counter() - start)


def main() -> None:
    from benchmarks.model_speed import build, random_batches
    from medtl import hardware
    from medtl.train import distributed

    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_speed")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-per-gpu", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("reports/bench-gpu-ddp.json"))
    args = p.parse_args()
    world = distributed.world_from_env()
    hw = hardware.select("cuda", "auto")
    hw = hardware.Hardware(distributed.device_for(world, hw.device), hw.precision)
    distributed.init(world, "cuda")
    batches = random_batches(args.batch_per_gpu, args.steps, 1, args.size, hw)
    single = None
    if world.is_main:
        model = build(args.arch, 1, hw)
        single = steps_per_second(model, batches, hw, torch.optim.AdamW(model.parameters())) * args.batch_per_gpu
    distributed.barrier(world)
    model = nn.parallel.DistributedDataParallel(build(args.arch, 1, hw), device_ids=[hw.device.index])
    rate = steps_per_second(model, batches, hw, torch.optim.AdamW(model.parameters()))
    total = distributed.all_reduce_sum([rate * args.batch_per_gpu], world)[0]
    if world.is_main:
        from medtl.io import write_json

        report = {"format": "medtl-bench-ddp/1", "gpu": torch.cuda.get_device_name(hw.device), "gpus": world.size,
                  "arch": args.arch, "size": args.size, "batch_per_gpu": args.batch_per_gpu,
                  "precision": hw.precision, "channels_last": hw.channels_last,
                  "one_gpu_img_s": round(single, 1), "ddp_img_s": round(total, 1),
                  "ddp / (gpus x one gpu)": round(total / (world.size * single), 3)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
        print(f"DDP nccl, {world.size} x {report['gpu']}, {args.arch} {args.size}px {hw.precision}: "
              f"{total:.0f} img/s vs one GPU {single:.0f} img/s -> scaling {report['ddp / (gpus x one gpu)']:.2f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
