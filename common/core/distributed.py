"""Multi-process helpers for ``torchrun``: rank, process group, DDP, case sharding, barriers.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for each process; without it
every helper sees one process of rank 0 and does nothing collective, so the same code runs
single-process. The bundles' ``multi_gpu_*.yaml`` configs and ``medgen3d.pairs`` use these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def rank() -> int:
    """Global rank of this process (``RANK`` from torchrun; 0 without it)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (``WORLD_SIZE`` from torchrun; 1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when there is a GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> bool:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU).

    Ignite's view of the group is set up here, on every rank at once: ignite does it lazily
    with a collective call, which hangs when only rank 0 makes it (e.g. a CheckpointSaver).
    Does nothing outside torchrun (no ``MASTER_ADDR``) or when already joined; returns
    whether it joined.
    """
    if "MASTER_ADDR" not in os.environ or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    idist.sync()
    return True


def destroy() -> None:
    """Leave the process group, if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
        idist.sync()


@contextmanager
def process_group() -> Iterator[None]:
    """``init()`` for the block; leaves the group afterwards only if the block joined it."""
    joined = init()
    try:
        yield
    finally:
        if joined:
            destroy()


def barrier() -> None:
    """Wait for every rank; a no-op for a single process.

    Raises RuntimeError under torchrun before ``init()``: ranks would not wait for each other.
    """
    if world_size() == 1:
        return
    if not dist.is_initialized():
        raise RuntimeError(
            "several torchrun processes but no process group: call common.core.distributed.init() "
            "first (sharded generation: torchrun ... -m medgen3d.cli generate)"
        )
    dist.barrier()


def rank_seed(seed: int) -> int:
    """``seed + rank``: each rank of a torchrun job draws its own random stream."""
    return int(seed) + rank()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one from index ``rank``."""
    return list(items[rank() :: world_size()])


def rank0_writes(write: Callable[[], object]) -> None:
    """Wait for every rank, run ``write`` on rank 0 alone, then wait until it has finished."""
    barrier()
    if rank() == 0:
        write()
    barrier()


def ddp(module: nn.Module, dev: torch.device) -> nn.Module:
    """``module`` on ``dev`` wrapped in DistributedDataParallel (its gradients are averaged
    across ranks; checkpoint savers store the inner module)."""
    module = module.to(dev)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dev] if dev.type == "cuda" else None
    )
