"""The measurements of the benchmark suite; ``benchmarks/run.py`` calls them and writes the report.

Every section function returns plain dicts (numbers, one per table row) so the report and the
tests read the same values. Timings exclude model loading; peak memory is the resident set
size (Linux ``VmHWM``, reset at the start of each stage; elsewhere the process's lifetime peak).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from common.core.bundle_configs import bundle_parser
from common.data.datalists import datalist_label_set, read_datalist
from common.data.labels import LabelSet
from common.diffusion.schedulers import objective
from common.images.refiner import refine_volume, start_timestep
from common.masks.mcdpm import keep_single_components, plan_rounds
from common.masks.metrics import evaluate_masks
from common.masks.pipeline import MaskPipeline
from common.masks.windows import extension_plan
from medgen3d.bundles import BUNDLES

REPO = Path(__file__).resolve().parents[1]
TRAIN_DATALIST = REPO / "data" / "thorax_demo" / "train.json"
QUALITY_KEYS = ("volume_w1_rel", "components_gen", "z_continuity_gen")


def bundle_config(bundle: str, files: Sequence[str], **overrides) -> ConfigParser:
    """A bundle's ``files`` with the demo thorax presets and ``id: value`` overrides."""
    parser = bundle_parser(BUNDLES / bundle, files, "demo", "thorax")
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


def numbers(value, kind=float) -> list:
    """A comma list as fire passes it (``"1,2"``, ``2`` or ``(1, 2)``) -> ``[kind(...)]``."""
    return [kind(v) for v in str(value).strip("()[] ").split(",") if v.strip()]


def changed(pipeline, **settings):
    """A copy of a pipeline that shares its networks, with other ``settings`` (attributes)."""
    unknown = set(settings) - set(vars(pipeline))
    if unknown:
        raise ValueError(f"not a setting of {type(pipeline).__name__}: {sorted(unknown)}")
    variant = copy.copy(pipeline)
    vars(variant).update(settings)
    return variant


def mask_config(scale: str = "demo", **overrides) -> ConfigParser:
    """The mask bundle's inference config (thorax) at ``scale`` with ``overrides``."""
    parser = bundle_parser(BUNDLES / "mask_diffusion", ("inference.yaml",), scale, "thorax")
    for key, value in overrides.items():
        parser[key] = value
    return parser


def mask_pipeline(config: ConfigParser, ckpt: str | Path | None) -> MaskPipeline:
    """The config's pipeline with weights from ``ckpt`` (untrained, seed 0, when None)."""
    if ckpt is None:
        torch.manual_seed(0)
        config["pipeline#network"] = "@network_def"
    else:
        config["ckpt_path"] = str(ckpt)
    return config.get_parsed_content("pipeline")


def with_sampler(
    pipeline: MaskPipeline, config: ConfigParser, sampler: Sampler, per_call: int = 1
) -> MaskPipeline:
    """``pipeline`` sampling as ``sampler`` says, ``per_call`` volumes per batch."""
    config["sampler"] = sampler.kind  # the config's scheduler, of this kind
    # any sampler on any weights, for timing: mask_sampling scores only the same objective
    config["scheduler#trained_as"] = None
    return changed(
        pipeline,
        scheduler=config.get_parsed_content("scheduler"),
        steps=sampler.steps,
        eta=sampler.eta,
        bf16=sampler.bf16,
        batch_size=per_call,
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
    pipeline: MaskPipeline, seeds: Sequence[int]
) -> tuple[list[np.ndarray], list[float]]:
    """Raw volumes (before post-processing), one per seed, ``pipeline.batch_size`` per call;
    the volumes and the seconds of each call.

    Every volume starts from a first window in the middle of the volume (the plan with the
    fewest rounds), so all volumes cost the same work.
    """
    volumes, seconds = [], []
    z0 = (pipeline.spatial_size[2] - pipeline.m) // 2
    for i in range(0, len(seeds), pipeline.batch_size):
        chunk = list(seeds[i : i + pipeline.batch_size])
        t0 = time.perf_counter()
        out = pipeline(chunk, postprocess=False, z0=[z0] * len(chunk))
        seconds.append(time.perf_counter() - t0)
        volumes += [v.numpy() for v in out]
    return volumes, seconds


def real_masks(
    datalist: str | Path, scale: str = "demo"
) -> tuple[list[np.ndarray], LabelSet, list]:
    """The datalist's real label volumes on the mask model's grid at ``scale`` (as the bundle
    evaluates), its label set and the grid's voxel size in mm."""
    config = mask_config(scale)
    preprocessing = config.get_parsed_content("preprocessing")
    doc = read_datalist(datalist)
    masks = [
        np.asarray(preprocessing(case)["label"][0]).round().astype(np.int64)
        for case in doc["training"]
    ]
    spacing = list(config.get_parsed_content("output_pixdim"))
    return masks, datalist_label_set(doc, datalist), spacing


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
    config = mask_config()
    pipeline = mask_pipeline(config, ckpt)
    sha = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:12] if ckpt else None
    rows = []
    for sampler in samplers:
        sampling = with_sampler(pipeline, config, sampler)
        with stage(memory, f"MC-DPM {sampler.name}, 1 volume per call"):
            masks, seconds = sample_timed(sampling, range(sampler.volumes))
        same_objective = objective(sampling.scheduler) == objective(pipeline.scheduler)
        valid = ckpt is not None and real is not None and same_objective
        single = pipeline.single_component
        kept = [keep_single_components(torch.from_numpy(v), single) for v in masks]
        rows.append(
            {
                "sampler": sampler,
                "s_per_volume": float(np.mean(seconds)),
                "seconds": seconds,
                "quality": quality(masks, real) if valid else None,
                "quality_kept": quality([v.numpy() for v in kept], real) if valid else None,
            }
        )
    out = {"rows": rows, "spatial_size": pipeline.spatial_size, "n_real": 0, "ckpt": None}
    if real is not None:
        out["n_real"] = len(real[0])
    if ckpt:
        out["ckpt"] = {"path": str(ckpt), "sha256": sha}
    out.update(m=pipeline.m, n=pipeline.n, guidance=pipeline.guidance)
    singles = next((r for r in rows if r["sampler"] == default), None)
    single_s = (
        sum(singles["seconds"][:batch_volumes])
        if singles and default.volumes >= batch_volumes
        else sum(sample_timed(with_sampler(pipeline, config, default), range(batch_volumes))[1])
    )
    batching = with_sampler(pipeline, config, default, batch_volumes)
    with stage(memory, f"MC-DPM {default.name}, {batch_volumes} volumes per call"):
        _, batched = sample_timed(batching, range(batch_volumes))
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
    config = bundle_config("image_synthesis", ("inference.yaml",))
    pipeline = config.get_parsed_content("pipeline")
    masks, _, _ = real_masks(datalist)
    labels = torch.as_tensor(np.stack(masks[:volumes]))
    onehot = F.one_hot(labels, config.get_parsed_content("num_classes")).movedim(-1, 1).float()
    sequence_only = changed(pipeline, refine=False)
    with stage(memory, "sequence generator, 1 volume"):
        sequence_only(onehot[:1], 0)
    seq_single = memory["sequence generator, 1 volume"]["seconds"]
    with stage(memory, f"sequence generator, {volumes} volumes per call"):
        rough, _ = sequence_only(onehot, 0)
    seq_batched = memory[f"sequence generator, {volumes} volumes per call"]["seconds"] / volumes
    scheduler, steps = pipeline.scheduler, pipeline.steps
    t_start = start_timestep(scheduler, steps, pipeline.t0)
    scheduler.set_timesteps(steps)
    t_steps = sum(int(t) <= t_start for t in scheduler.timesteps)

    def refine(slice_batch: int, bf16: bool = False) -> None:
        """The pipeline's refinement alone, of the generator's volumes ``rough``."""
        p = pipeline
        refine_volume(
            p.refiners, scheduler, rough, onehot, p.t0, p.guidance, steps, 0, slice_batch, bf16=bf16
        )

    refine(slice_batches[0])  # warm-up
    rows = []
    for slice_batch, bf16 in [(b, False) for b in slice_batches] + [(slice_batches[-1], True)]:
        name = f"refiner, slice batch {slice_batch}{', bf16' if bf16 else ''}"
        with stage(memory, name):
            refine(slice_batch, bf16)
        calls = t_steps * sum(-(-volumes * onehot.shape[i] // slice_batch) for i in (2, 3, 4))
        rows.append(
            {
                "slice_batch": slice_batch,
                "bf16": bf16,
                "s_per_volume": memory[name]["seconds"] / volumes,
                "forward_calls": calls,
            }
        )
    t0, guidance = pipeline.t0, pipeline.guidance
    return {
        "spatial_size": list(onehot.shape[2:]),
        "volumes": volumes,
        "seqgen_s": seq_single,
        "seqgen_batched_s": seq_batched,
        "sampler": config.get_parsed_content("sdm_sampler"),
        "steps": steps,
        "t0": t0,
        "t_steps": t_steps,
        "guidance": guidance,
        "views": list(pipeline.refiners),
        "refiner": rows,
    }


# ---------------------------------------------------------------- scaling


def scaling(depths: Sequence[int], sizes: Sequence[int], base: tuple[int, int], steps: int) -> dict:
    """Seconds per mask volume of an untrained demo-architecture MC-DPM (DDIM, ``steps``
    steps, one volume, first window in the middle) vs depth D at in-plane ``base[0]``, and vs
    in-plane size at depth ``base[1]``."""

    def run(h: int, d: int) -> dict:
        config = mask_config(spatial_size=[h, h, d], sampler="ddim", steps=steps, batch_size=1)
        pipeline = mask_pipeline(config, None)
        z0 = (d - pipeline.m) // 2
        rounds = plan_rounds(extension_plan(d, pipeline.m, pipeline.n, z0))
        t0 = time.perf_counter()
        pipeline([0], postprocess=False, z0=[z0])
        seconds = time.perf_counter() - t0
        windows = sum(len(r) for r in rounds)
        return {"size": h, "depth": d, "windows": windows, "rounds": len(rounds), "s": seconds}

    by_depth = [run(base[0], d) for d in depths]
    by_size = [run(h, base[1]) for h in sizes]
    return {"steps": steps, "by_depth": by_depth, "by_size": by_size}
