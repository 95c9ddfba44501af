"""The measurements of the benchmark suite; ``benchmarks/run.py`` calls them and writes the report.

Every section function returns plain dicts (numbers, one per table row) so the report and the
tests read the same values. Timings exclude model loading; peak memory is the resident set
size (Linux ``VmHWM``, reset at the start of each stage; elsewhere the process's lifetime peak).
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from common.datalist import datalist_label_set, read_datalist
from common.diffusion import make_scheduler, objective
from common.io import load_weights
from common.labels import LabelSet
from common.mask_metrics import evaluate_masks
from common.mcdpm import keep_single_components, plan_rounds, sample_mask_volumes
from common.refiner import load_view_models, refine_volume, start_timestep
from common.seqgen import generate_volume
from common.sequences import extension_plan

REPO = Path(__file__).resolve().parents[1]
TRAIN_DATALIST = REPO / "data" / "thorax_demo" / "train.json"
MASK_CONFIGS = ("inference.yaml", "demo.yaml")
IMAGE_CONFIGS = ("inference.yaml", "demo.yaml")
# bundle demo trainings: (name, bundle, config files)
TRAININGS = (
    ("mask_diffusion (MC-DPM)", "mask_diffusion", ("train.yaml", "demo.yaml")),
    ("image_synthesis generator", "image_synthesis", ("train_generator.yaml", "demo.yaml")),
    ("image_synthesis refiner (axial)", "image_synthesis", ("train_refiner.yaml", "demo.yaml")),
    ("seg_downstream (unet3d)", "seg_downstream", ("train.yaml", "demo.yaml")),
)
QUALITY_KEYS = ("volume_w1_rel", "components_gen", "z_continuity_gen")


def bundle_config(bundle: str, files: Sequence[str], **overrides) -> ConfigParser:
    """A bundle's configs merged in order, with ``id: value`` overrides (``a#b`` ids)."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


# ---------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB, None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+)", text)
    return int(found.group(1)) if found else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def stage(record: dict, name: str) -> Iterator[None]:
    """Record ``{name: {"seconds", "peak_rss_mb", "start_rss_mb", "load"}}`` of the enclosed
    block; ``load`` is the 1-minute load average at its end (other work on the machine)."""
    reset = _reset_peak()
    start_kb = _status_kb("VmRSS") or 0
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:  # lifetime peak: ru_maxrss is kB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb = rss // 1024 if sys.platform == "darwin" else rss
    record[name] = {
        "seconds": seconds,
        "peak_rss_mb": peak_kb / 1024,
        "start_rss_mb": start_kb / 1024,
        "lifetime_peak": not reset,
        "load": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- MC-DPM sampling


def load_mask_model(ckpt: str | Path | None, **overrides) -> tuple[torch.nn.Module, ConfigParser]:
    """The mask bundle's demo network (weights from ``ckpt``; untrained when None)."""
    config = bundle_config("mask_diffusion", MASK_CONFIGS, **overrides)
    torch.manual_seed(0)
    net = config.get_parsed_content("network_def")
    if ckpt is not None:
        load_weights(net, ckpt)
    return net.eval(), config


def mask_scheduler(config: ConfigParser, kind: str):
    """A scheduler of ``kind`` with the bundle's training schedule."""
    return make_scheduler(
        kind,
        num_train_timesteps=config["num_train_timesteps"],
        schedule=config["beta_schedule"],
        prediction_type=config["prediction_type"],
    )


@dataclass(frozen=True)
class Sampler:
    """A sampler setting: ``kind`` and ``steps``, ``volumes`` to sample, bf16 autocast, DDIM eta.

    Written ``kind:steps:volumes[:bf16][:eta=X]``, e.g. ``ddim:20:8:bf16``.
    """

    kind: str
    steps: int
    volumes: int = 1
    bf16: bool = False
    eta: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Sampler:
        kind, steps, volumes, *flags = text.split(":")
        etas = [float(f.removeprefix("eta=")) for f in flags if f.startswith("eta=")]
        unknown = [f for f in flags if f != "bf16" and not f.startswith("eta=")]
        if unknown:
            raise ValueError(f"unknown sampler flags {unknown} in {text!r}: use bf16, eta=X")
        return cls(kind, int(steps), int(volumes), "bf16" in flags, etas[-1] if etas else 1.0)

    @classmethod
    def parse_setting(cls, text: str, volumes: int = 1) -> Sampler:
        """``kind:steps[:bf16][:eta=X]``, without a volume count, for ``volumes`` volumes."""
        kind, steps, *flags = text.split(":")
        return cls.parse(":".join([kind, steps, str(volumes), *flags]))

    @property
    def name(self) -> str:
        eta = f" eta={self.eta:g}" if self.kind == "ddim" else ""
        return f"{self.kind.upper()}-{self.steps}{eta}{' bf16' if self.bf16 else ''}"


def sample_timed(
    net,
    config: ConfigParser,
    sampler: Sampler,
    seeds: Sequence[int],
    per_call: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[list[np.ndarray], list[float]]:
    """Sample a volume per seed, ``per_call`` volumes per call; volumes and seconds per call.

    Every volume starts from a first window in the middle of the volume (the plan with the
    fewest rounds), so all volumes cost the same work.
    """
    volumes, seconds = [], []
    scheduler = mask_scheduler(config, sampler.kind)
    depth, m = config["spatial_size"][2], config["m"]
    for i in range(0, len(seeds), per_call):
        t0 = time.perf_counter()
        chunk = list(seeds[i : i + per_call])
        out = sample_mask_volumes(
            net,
            scheduler,
            config["num_classes"],
            config["spatial_size"],
            m,
            config["n"],
            sampler.steps,
            seeds=chunk,
            guidance=config["guidance"],
            z0=[(depth - m) // 2] * len(chunk),
            device=device,
            bf16=sampler.bf16,
            eta=sampler.eta,
        )
        seconds.append(time.perf_counter() - t0)
        volumes += [v.numpy() for v in out]
    return volumes, seconds


def real_masks(datalist: str | Path) -> tuple[list[np.ndarray], LabelSet, list]:
    """The datalist's real label volumes on the mask model's grid (as the bundle evaluates),
    its label set and the grid's voxel size in mm."""
    config = bundle_config("mask_diffusion", ("evaluate.yaml", "demo.yaml"))
    preprocessing = config.get_parsed_content("preprocessing")
    doc = read_datalist(datalist)
    masks = [
        np.asarray(preprocessing(case)["label"][0]).round().astype(np.int64)
        for case in doc["training"]
    ]
    return masks, datalist_label_set(doc, datalist), list(config["output_pixdim"])


def quality(volumes: list[np.ndarray], real: tuple) -> dict:
    """Per generated volume ``QUALITY_KEYS`` against the real set: their mean and sd."""
    masks, label_set, spacing = real
    per_volume = [evaluate_masks([v], masks, label_set, spacing)["summary"] for v in volumes]
    out = {}
    for key in QUALITY_KEYS:
        values = np.array([np.nan if s[key] is None else s[key] for s in per_volume], float)
        out[key] = float(np.nanmean(values))
        out[f"{key}_sd"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else None
    reference = evaluate_masks(masks[:1], masks, label_set, spacing)["summary"]
    out["components_real"] = reference["components_real"]
    out["z_continuity_real"] = reference["z_continuity_real"]
    return out


def keep_largest(volumes: list[np.ndarray], label_set: LabelSet) -> list[np.ndarray]:
    """The bundle's default post-processing: one piece per single-component label."""
    single = [label_set.names.index(name) for name in label_set.single_component]
    return [keep_single_components(torch.from_numpy(v), single).numpy() for v in volumes]


def mask_sampling(
    samplers: Sequence[Sampler],
    ckpt: str | Path | None,
    batch_volumes: int,
    default: Sampler,
    memory: dict,
    real: tuple | None = None,
) -> dict:
    """Seconds per mask volume and quality (raw, and after ``keep_largest``) per sampler.

    Every volume is sampled alone (volume ``i`` from seed ``i``); the ``default`` sampler
    also samples ``batch_volumes`` volumes in one call, compared with as many single-volume
    calls. Samplers whose objective differs from the checkpoint's (rflow on a DDPM model)
    are timing only.
    """
    net, config = load_mask_model(ckpt)
    sha = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:12] if ckpt else None
    trained = mask_scheduler(config, config["sampler"])
    rows = []
    for sampler in samplers:
        with stage(memory, f"MC-DPM {sampler.name}, 1 volume per call"):
            masks, seconds = sample_timed(net, config, sampler, range(sampler.volumes))
        kind = objective(mask_scheduler(config, sampler.kind))
        valid = ckpt is not None and real is not None and kind == objective(trained)
        rows.append(
            {
                "sampler": sampler,
                "s_per_volume": float(np.mean(seconds)),
                "seconds": seconds,
                "quality": quality(masks, real) if valid else None,
                "quality_kept": quality(keep_largest(masks, real[1]), real) if valid else None,
            }
        )
    out = {"rows": rows, "spatial_size": list(config["spatial_size"])}
    out["n_real"] = len(real[0]) if real is not None else 0
    out["ckpt"] = {"path": str(ckpt), "sha256": sha} if ckpt else None
    out.update(m=config["m"], n=config["n"], guidance=config["guidance"])
    singles = next((r for r in rows if r["sampler"] == default), None)
    single_s = (
        sum(singles["seconds"][:batch_volumes])
        if singles and default.volumes >= batch_volumes
        else sum(sample_timed(net, config, default, range(batch_volumes))[1])
    )
    with stage(memory, f"MC-DPM {default.name}, {batch_volumes} volumes per call"):
        _, batched = sample_timed(net, config, default, range(batch_volumes), batch_volumes)
    out["batched"] = {
        "sampler": default,
        "volumes": batch_volumes,
        "single_s": single_s,
        "batched_s": batched[0],
        "ratio": batched[0] / single_s,
    }
    return out


# ---------------------------------------------------------------- image stage


def image_stage(
    volumes: int, slice_batches: Sequence[int], memory: dict, datalist: str | Path
) -> dict:
    """Seconds per volume of the sequence generator and of the refiner (shipped demo weights)
    on the real masks of ``datalist``, ``volumes`` volumes per call; the refiner once per
    ``slice_batch`` after a warm-up, then at the last slice batch under bf16 autocast."""
    config = bundle_config("image_synthesis", IMAGE_CONFIGS)
    models_dir = REPO / "bundles" / "image_synthesis" / "models"
    generator = load_weights(config.get_parsed_content("network_def"), models_dir / "generator.pt")
    views = load_view_models(
        config.get_parsed_content("refiner_def"), models_dir, config["sdm_views"]
    )
    scheduler = config.get_parsed_content("scheduler")
    masks, _, _ = real_masks(datalist)
    labels = torch.as_tensor(np.stack(masks[:volumes]))
    onehot = F.one_hot(labels, config["num_classes"]).movedim(-1, 1).float()
    with stage(memory, "sequence generator, 1 volume"):
        rough = generate_volume(generator.eval(), onehot[:1])
    seq_single = memory["sequence generator, 1 volume"]["seconds"]
    with stage(memory, f"sequence generator, {volumes} volumes per call"):
        rough = generate_volume(generator, onehot)
    seq_batched = memory[f"sequence generator, {volumes} volumes per call"]["seconds"] / volumes
    steps, t0, guidance = config["sdm_steps"], config["sdm_t0"], config["sdm_guidance"]
    t_start = start_timestep(scheduler, steps, t0)
    scheduler.set_timesteps(steps)
    t_steps = sum(int(t) <= t_start for t in scheduler.timesteps)
    refine_args = (views, scheduler, rough, onehot, t0, guidance, steps, 0)
    refine_volume(*refine_args, slice_batches[0])  # warm-up
    rows = []
    for slice_batch, bf16 in [(b, False) for b in slice_batches] + [(slice_batches[-1], True)]:
        name = f"refiner, slice batch {slice_batch}{', bf16' if bf16 else ''}"
        with stage(memory, name):
            refine_volume(*refine_args, slice_batch, bf16=bf16)
        calls = t_steps * sum(-(-volumes * onehot.shape[i] // slice_batch) for i in (2, 3, 4))
        rows.append(
            {
                "slice_batch": slice_batch,
                "bf16": bf16,
                "s_per_volume": memory[name]["seconds"] / volumes,
                "forward_calls": calls,
            }
        )
    return {
        "spatial_size": list(onehot.shape[2:]),
        "volumes": volumes,
        "seqgen_s": seq_single,
        "seqgen_batched_s": seq_batched,
        "sampler": config["sdm_sampler"],
        "steps": steps,
        "t0": t0,
        "t_steps": t_steps,
        "guidance": guidance,
        "views": list(config["sdm_views"]),
        "refiner": rows,
    }


# ---------------------------------------------------------------- training


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
        for name, bundle, files in trainings:
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


# ---------------------------------------------------------------- scaling


def scaling(depths: Sequence[int], sizes: Sequence[int], base: tuple[int, int], steps: int) -> dict:
    """Seconds per mask volume of an untrained demo-architecture MC-DPM (DDIM, ``steps``
    steps, one volume, first window in the middle) vs depth D at in-plane ``base[0]``, and vs
    in-plane size at depth ``base[1]``."""

    def run(h: int, d: int) -> dict:
        net, config = load_mask_model(None, spatial_size=[h, h, d])
        m, n = config["m"], config["n"]
        z0 = (d - m) // 2
        rounds = plan_rounds(extension_plan(d, m, n, z0))
        t0 = time.perf_counter()
        sample_mask_volumes(
            net, mask_scheduler(config, "ddim"), config["num_classes"], [h, h, d], m, n, steps,
            seeds=[0], z0=[z0],
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        windows = sum(len(r) for r in rounds)
        return {"size": h, "depth": d, "windows": windows, "rounds": len(rounds), "s": seconds}

    by_depth = [run(base[0], d) for d in depths]
    by_size = [run(h, base[1]) for h in sizes]
    return {"steps": steps, "by_depth": by_depth, "by_size": by_size}
