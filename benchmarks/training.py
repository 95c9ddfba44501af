"""Training throughput of each bundle's demo training: step time and the data loader's share."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from benchmarks.suite import bundle_config, stage
from medgen3d.bundles import TRAIN_STAGES

# bundle demo trainings: (name, the bundle's training stage)
TRAININGS = (
    ("mask_diffusion (MC-DPM)", TRAIN_STAGES["masks"]),
    ("image_synthesis generator", TRAIN_STAGES["generator"]),
    ("image_synthesis refiner (axial)", TRAIN_STAGES["refiner"]),
    ("seg_downstream (unet3d)", TRAIN_STAGES["seg"]),
)


def _timed_run(trainer, data, iters: int) -> float:
    """Seconds per iteration of ``trainer`` over ``data``, ``iters + 1`` iterations, the first
    (warm-up) not counted."""
    stamps: list[float] = []
    handle = trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter())
    )
    trainer.state.max_epochs = None  # a fresh run of exactly iters + 1 iterations
    Engine.run(trainer, data, max_epochs=1, epoch_length=iters + 1)
    handle.remove()
    return (stamps[-1] - stamps[0]) / iters


def _batch_size(batch) -> int:
    """Samples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, dict):
        return _batch_size(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    return int(batch.shape[0])


def training(iters: int, memory: dict, datalist: str | Path, trainings=TRAININGS) -> list[dict]:
    """Each bundle's demo training on ``datalist``: ``iters`` iterations through its own data
    pipeline (CacheDataset, random crops) and then over the same batches already in memory."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (bundle, files, _) in trainings:
            overrides = {
                "bundle_root": tmp,
                "dataset_dir": str(Path(datalist).parent),
                "datalist": str(datalist),
                "train#handlers": [],
                "device": "$torch.device('cpu')",
            }
            if bundle == "seg_downstream":
                overrides["validate_data"] = False
            config = bundle_config(bundle, files, **overrides)
            with stage(memory, f"training {name}"):
                t0 = time.perf_counter()
                loader = config.get_parsed_content("train#dataloader")
                cache_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                batches = list(islice(_cycle(loader), iters + 1))
                loader_s = (time.perf_counter() - t0) / len(batches)
                trainer = config.get_parsed_content("train#trainer")
                real_s = _timed_run(trainer, loader, iters)
                memory_s = _timed_run(trainer, batches, iters)
            samples = _batch_size(batches[0])
            rows.append(
                {
                    "name": name,
                    "cache_s": cache_s,
                    "samples_per_iter": samples,
                    "loader_s": loader_s,
                    "step_s": real_s,
                    "step_in_memory_s": memory_s,
                    "loader_share": loader_s / real_s,
                }
            )
    return rows


def _cycle(loader) -> Iterator:
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader
