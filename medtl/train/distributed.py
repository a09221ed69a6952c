"""Data-parallel training on PyTorch's own engine: torchrun, DDP, and a batch sampler shared by all ranks.

The stage runs unchanged on one process or under `torchrun --nproc_per_node N`:
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, each rank trains on its share
of every global batch, gradients are averaged by DistributedDataParallel, and
metrics are reduced across ranks. Only rank 0 writes files.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medtl.errors import MedtlError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_from_env() -> World:
    """The process's place in the job, from torchrun's environment (a single process without it)."""
    if not under_torchrun():
        return World()
    try:
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise MedtlError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {e}") from e


def init(world: World, device_type: str) -> None:
    """Join the process group: nccl between GPUs, gloo between CPU processes."""
    if not world.distributed or dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
        # DDP's gradients go through nccl; the small bookkeeping collectives below use CPU tensors, hence gloo too
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank; CPU ranks share the CPU."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(local: torch.Tensor, world: World, total: int) -> torch.Tensor:
    """Concatenate each rank's contiguous shard (see `shard`) in rank order: the full split's rows."""
    if not world.distributed:
        return local
    width = -(-total // world.size)
    # A rank whose shard is empty (fewer rows than ranks) has no row shape of its own: take a non-empty rank's.
    shapes: list = [None] * world.size
    dist.all_gather_object(shapes, (tuple(local.shape[1:]), local.dtype) if len(local) else None)
    row_shape, dtype = next((s for s in shapes if s is not None), (tuple(local.shape[1:]), local.dtype))
    padded = torch.zeros((width, *row_shape), dtype=dtype)
    if len(local):
        padded[: len(local)] = local
    parts = [torch.zeros_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    sizes = [min(total, (r + 1) * width) - min(total, r * width) for r in range(world.size)]
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def shard(n: int, world: World) -> slice:
    """This rank's contiguous share of n rows for inference (the last rank may get fewer)."""
    width = -(-n // world.size)
    return slice(min(n, world.rank * width), min(n, (world.rank + 1) * width))


def broadcast_flag(flag: bool, world: World) -> bool:
    """Rank 0's decision, on every rank (early stopping must stop all ranks together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, 0)
    return bool(t.item())


class EpochBatches:
    """The batches of one epoch, the same global batches on any number of processes.

    Each epoch draws one order of the training rows from (seed, epoch): a
    permutation, or with `weights` a class-balanced draw with replacement. It
    is cut into global batches of `batch_size`; rank r takes rows r, r+W,
    r+2W, ... of each. The union of the ranks' batches is the single-process
    batch, so DDP with the same global batch trains the same model up to
    floating-point order (and batch-norm statistics, which are per rank).
    Because the order is a pure function of the epoch, resuming needs no
    sampler state. This plays the part of torch's DistributedSampler, which
    has no class-balanced mode and splits the epoch rather than each batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, world: World, weights: np.ndarray | None = None):
        if batch_size % world.size:
            raise MedtlError(f"the global batch size {batch_size} must be divisible by the number of processes {world.size}")
        self.n, self.batch_size, self.seed, self.world = n, batch_size, seed, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # the ragged last batch is dropped (a batch of one breaks batch norm), unless it is the only one
        return max(1, self.n // self.batch_size)

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "order"))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        order = self.order()
        size = min(self.batch_size, self.n)
        for b in range(len(self)):
            chunk = order[b * size:(b + 1) * size]
            yield chunk[self.world.rank::self.world.size].tolist()


def derive_seed(seed: int, epoch: int, purpose: str, rank: int = 0) -> int:
    """An independent 63-bit seed per (seed, epoch, purpose, rank): every random stream restarts each epoch."""
    tag = int.from_bytes(purpose.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return int(np.random.SeedSequence([seed, epoch, tag, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def relaunch_with_torchrun(nproc: int, script: str | Path) -> int:
    """Run `script` again under torchrun with `nproc` processes on this machine; return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return subprocess.call(cmd)
