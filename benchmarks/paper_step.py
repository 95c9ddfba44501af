"""One measured training step or sampling forward of a stage, for ``benchmarks.paper_memory``
(which runs each in a fresh process): built from the bundle's own training config at a scale
preset with the savers of a mode; parameters, FLOPs, seconds and peak memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.engine import Events
from monai.networks.blocks.selfattention import SABlock
from torch.utils.flop_counter import FlopCounterMode

from common.core.bundle_configs import bundle_parser
from common.core.savers import autocast
from common.images.sequence_generator import CONTEXT, generate_volume
from medgen3d.bundles import BUNDLES

# the savers' config keys per mode (flash: the diffusion bundles' flash_attention)
MODES = {
    "fp32": {},
    "bf16": {"bf16": True},
    "bf16+ckpt": {"bf16": True, "activation_checkpointing": True},
    "bf16+flash": {"bf16": True, "flash_attention": True},
    "bf16+flash+ckpt": {"bf16": True, "flash_attention": True, "activation_checkpointing": True},
}
ATTENTION = ("mcdpm", "refiner")  # the stages whose networks have attention
TRAIN_FILES = {
    "mcdpm": ("mask_diffusion", ["inference.yaml", "train.yaml"]),
    "generator": ("image_synthesis", ["inference.yaml", "train.yaml", "train_generator.yaml"]),
    "refiner": ("image_synthesis", ["inference.yaml", "train.yaml", "train_refiner.yaml"]),
    "seg": ("seg_downstream", ["train.yaml"]),
}
UNIT = {"mcdpm": "window", "generator": "window", "refiner": "slice", "seg": "volume"}


@dataclass
class Stage:
    """One measurement: ``run()`` does the work; ``networks`` run at sampling, ``trained``
    are the optimised ones."""

    run: Callable[[], object]
    networks: list[torch.nn.Module]
    trained: list[torch.nn.Module]


def config(stage: str, device: str = "cpu", mode: str = "fp32", scale: str = "paper"):
    """The thorax config of ``stage``'s training at ``scale``, with the savers of ``mode``."""
    bundle, files = TRAIN_FILES[stage]
    off = dict.fromkeys(("bf16", "activation_checkpointing", "flash_attention"), False)
    values = {"device": device, "num_workers": 0, **off, **MODES[mode]}
    return bundle_parser(BUNDLES / bundle, files, scale, "thorax", values)


def default_samples(cfg, kind: str, stage: str) -> int:
    """Samples of one training step, or inputs of one sampling forward, at the preset's
    defaults (MC-DPM sampling: ``batch_size`` volumes x the upward and downward window of a
    round; refiner: ``sdm_slice_batch``; both x2 with guidance)."""

    def get(key):
        return cfg.get_parsed_content(key)

    if kind == "train":
        keys = {
            "mcdpm": ("batch_size", "windows_per_volume"),
            "generator": ("gen_batch_size", "gen_windows_per_volume"),
            "refiner": ("sdm_batch_size", "sdm_slices_per_volume"),
            "seg": ("batch_size",),
        }[stage]
        return math.prod(get(k) for k in keys)
    if stage == "mcdpm":
        return get("batch_size") * 2 * (2 if get("guidance") != 1 else 1)
    if stage == "refiner":
        return get("sdm_slice_batch") * (2 if get("sdm_guidance") != 1 else 1)
    return 1


def _onehot(samples: int, k: int, *size: int) -> torch.Tensor:
    labels = torch.randint(0, k, (samples, *size))
    return torch.nn.functional.one_hot(labels, k).movedim(-1, 1).float()


def _batch(cfg, stage: str, samples: int) -> dict:
    """Random training data of ``stage``'s shape, as its data loader gives it."""
    k, (h, w, d) = cfg.get_parsed_content("num_classes"), cfg.get_parsed_content("spatial_size")
    if stage == "mcdpm":
        m = cfg.get_parsed_content("m")
        return {"label": _onehot(samples, k, h, w, m), "z": torch.randint(0, d - m + 1, (samples,))}
    if stage == "generator":
        size = (h, w, CONTEXT + cfg.get_parsed_content("gen_sequence_length"))
    elif stage == "refiner":
        size = (h, w)
    else:
        size = (h, w, d)
    label = (
        _onehot(samples, k, *size) if stage != "seg" else torch.randint(0, k, (samples, 1, *size))
    )
    return {"image": torch.rand(samples, 1, *size) * 2 - 1, "label": label.float()}


TRAINED = {"generator": ["generator", "image_discriminator", "temporal_discriminator"]}


def train_stage(cfg, stage: str, samples: int, counter: FlopCounterMode, mark) -> Stage:
    """Two steps of the config's ``train#trainer`` (no handlers) over one random batch: the
    first counted by ``counter`` (it changes what checkpointing keeps), ``mark()`` at the
    start of the second, which is timed."""
    cfg["train#handlers"] = []
    cfg["train#dataloader"] = []
    cfg["train#trainer#max_epochs"], cfg["train#trainer#epoch_length"] = 1, 2
    trainer = cfg.get_parsed_content("train#trainer")
    batch = _batch(cfg, stage, samples)
    trainer.data_loader = [batch, batch]
    trainer.add_event_handler(Events.ITERATION_STARTED(once=1), counter.__enter__)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=1), lambda: counter.__exit__(None, None, None)
    )
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), mark)
    nets = [cfg.get_parsed_content(n) for n in TRAINED.get(stage, ["network"])]
    return Stage(trainer.run, nets[:1], nets)


def sample_stage(cfg, stage: str, samples: int, bf16: bool) -> Stage:
    """One sampling forward of ``stage`` (the module docstring says which) on random inputs."""
    k, (h, w, d) = cfg.get_parsed_content("num_classes"), cfg.get_parsed_content("spatial_size")
    dev = torch.device(cfg.get_parsed_content("device"))
    name = "refiner_def" if stage == "refiner" else "network_def"
    net = cfg.get_parsed_content(name).to(dev).eval()
    if stage == "mcdpm":
        x = torch.randn(samples, 2 * k + 1, h, w, cfg.get_parsed_content("m"), device=dev)
        t, z = torch.full((samples,), 999, device=dev), torch.zeros(samples, dtype=torch.long)
        args, kwargs = (x,), {"timesteps": t, "class_labels": z.to(dev)}
    elif stage == "refiner":
        x, seg = torch.randn(samples, 1, h, w, device=dev), _onehot(samples, k, h, w).to(dev)
        args, kwargs = (x,), {"timesteps": torch.full((samples,), 10, device=dev), "seg": seg}
    elif stage == "generator":
        args, kwargs = (_onehot(samples, k, h, w, d).to(dev),), {}
    else:
        args, kwargs = (torch.randn(samples, 1, h, w, d, device=dev),), {}
    call = (lambda: generate_volume(net, *args)) if stage == "generator" else None

    def run():
        with torch.inference_mode(), autocast(dev, bf16):
            return call() if call else net(*args, **kwargs)

    return Stage(run, [net], [])


def _rss(field: str = "VmRSS") -> int:
    """Resident memory of this process in bytes (``VmHWM``: its peak)."""
    text = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(field))) * 1024


def measure_one(spec: str, device: str = "cpu", scale: str = "paper") -> dict:
    """``kind:stage:mode:samples`` (``samples`` a number or ``default``), e.g.
    ``train:mcdpm:bf16+ckpt:1``, measured in this process: parameters, FLOPs, and the
    seconds, resident memory at the start (``rss_start``) and peak (``rss_peak``) of the
    measured step or forward (CUDA: ``gpu_start``, ``gpu_peak`` allocated)."""
    kind, stage, mode, samples = spec.split(":")
    bf16 = MODES[mode].get("bf16", False)
    torch.manual_seed(0)
    cfg = config(stage, device, mode if kind == "train" else "fp32", scale)
    default = default_samples(cfg, kind, stage)
    n = default if samples == "default" else int(samples)
    cuda, start = device.startswith("cuda"), {}

    def mark():
        """The measured part starts: reset the peaks, note the memory and the time."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start["gpu"] = torch.cuda.memory_allocated()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start["rss"], start["time"] = _rss(), time.perf_counter()

    counter = FlopCounterMode(display=False)
    if kind == "train":
        job = train_stage(cfg, stage, n, counter, mark)
        job.run()
    else:
        job = sample_stage(cfg, stage, n, bf16)
        attention = _count_attention(job.networks)
        with counter:
            job.run()  # warm-up: kernels, autocast's weight cache
        attention = sum(attention())
        mark()
        job.run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start["time"]
    return {
        "spec": spec,
        "samples": n,
        "default_samples": default,
        "params": sum(p.numel() for net in job.networks for p in net.parameters()),
        "trained_params": sum(p.numel() for net in job.trained for p in net.parameters()),
        "seconds": seconds,
        "flops": counter.get_total_flops(),
        "rss_start": start["rss"],
        "rss_peak": _rss("VmHWM"),
        "gpu_start": start.get("gpu"),
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "attention_probs": None if kind == "train" else attention / n,
    }


def _count_attention(networks: list[torch.nn.Module]) -> Callable[[], list[int]]:
    """Count the attention probabilities (heads x tokens^2 per item) of MONAI's ``SABlock``s
    from now until the returned function is called; it gives the counts, one per call."""
    counts = []

    def hook(module, args, output):
        x = args[0]  # (B, tokens, C)
        counts.append(module.num_heads * x.shape[0] * x.shape[1] ** 2)

    hooks = [
        m.register_forward_hook(hook)
        for net in networks
        for m in net.modules()
        if isinstance(m, SABlock)
    ]

    def stop() -> list[int]:
        for h in hooks:
            h.remove()
        return counts

    return stop
