"""One paired volume with the paper scale on a GPU: seconds and peak GPU memory per stage.

    benchmarks/gpu.sh            # or: .venv/bin/python -m benchmarks.gpu [options]

Networks are the paper scale's architectures, untrained (no paper-size weights ship;
sampling cost does not depend on the weights). Stages: the MC-DPM with the paper's sampler
(DDPM-1000), the fast sampler on one volume, on ``--batch-volumes`` volumes in one call and in
as many single calls (the batching ratio; target <= 0.5), the fast sampler again under bf16
autocast + channels-last, the sequence generator, and the refiner in fp32 and in bf16 +
channels-last. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import time

import torch
import torch.nn.functional as F

from benchmarks.suite import (
    Sampler,
    mask_config,
    mask_pipeline,
    sample_timed,
    with_sampler,
)
from common.core.bundle_configs import bundle_parser
from common.images.refiner import refine_volume
from common.images.sequence_generator import generate_volume
from medgen3d.bundles import BUNDLES

SDM_SETTINGS = (
    "sdm_views",
    "sdm_sampler",
    "sdm_steps",
    "sdm_t0",
    "sdm_guidance",
    "sdm_slice_batch",
)


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="paper", help="bundle scale preset (paper, demo)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--mask-sampler", help="kind:steps[:bf16][:eta=X] (default: the config's sampler)"
    )
    parser.add_argument("--fast-sampler", default="ddim:20", help="kind:steps[:eta=X]")
    parser.add_argument("--batch-volumes", type=int, default=8)
    return parser.parse_args(argv)


def _channels_last(nets) -> None:
    """Networks to the channels-last memory format (2D or 3D)."""
    for net in nets:
        fmt = torch.channels_last_3d if _spatial_dims(net) == 3 else torch.channels_last
        net.to(memory_format=fmt)


def _spatial_dims(net: torch.nn.Module) -> int:
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
    return 3 if isinstance(conv, torch.nn.Conv3d) else 2


class Stages:
    """Seconds and peak GPU memory of named stages."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        self.rows.append((name, time.perf_counter() - t0, peak))
        print(f"{name}: {self.rows[-1][1]:.1f} s", flush=True)


def main(argv=None) -> list[tuple]:
    args = _parse(argv)
    device = torch.device(args.device)
    stages = Stages(device)
    mask_cfg = mask_config(args.scale, device=str(device))
    paper = args.mask_sampler or ":".join(str(mask_cfg[k]) for k in ("sampler", "steps"))
    paper = Sampler.parse_setting(paper)
    fast = Sampler.parse_setting(args.fast_sampler)
    pipeline = mask_pipeline(mask_cfg, None)
    n = args.batch_volumes

    def masks(sampler, seeds, per_call=1):
        return sample_timed(with_sampler(pipeline, mask_cfg, sampler, per_call), seeds)[0]

    masks(dataclasses.replace(fast, steps=1), [0])  # warm-up: kernels, allocator
    with stages(f"MC-DPM {paper.name}, 1 volume"):
        labels = masks(paper, [0])
    with stages(f"MC-DPM {fast.name}, 1 volume"):
        masks(fast, [0])
    with stages(f"MC-DPM {fast.name}, {n} single-volume calls"):
        masks(fast, range(n))
    with stages(f"MC-DPM {fast.name}, {n} volumes in one call"):
        masks(fast, range(n), n)
    _channels_last([pipeline.network])
    fast16 = dataclasses.replace(fast, bf16=True)
    masks(dataclasses.replace(fast16, steps=1), [0])  # warm-up
    with stages(f"MC-DPM {fast16.name}, 1 volume, channels-last"):
        masks(fast16, [0])
    pipeline.network.cpu()  # later stages' peak memory without it

    image_cfg = bundle_parser(
        BUNDLES / "image_synthesis", ("inference.yaml",), args.scale, "thorax", {"device": device}
    )
    setting = {k: image_cfg.get_parsed_content(k) for k in SDM_SETTINGS}
    generator = image_cfg.get_parsed_content("network_def").to(device).eval()
    onehot = F.one_hot(torch.as_tensor(labels[0]), image_cfg.get_parsed_content("num_classes"))
    onehot = onehot.movedim(-1, 0)[None].float().to(device)
    with stages("sequence generator, 1 volume"):
        rough = generate_volume(generator, onehot)
    generator.cpu()
    refiner = image_cfg.get_parsed_content("refiner_def")
    views = {v: copy.deepcopy(refiner).to(device).eval() for v in setting["sdm_views"]}
    scheduler = image_cfg.get_parsed_content("scheduler")
    with torch.inference_mode():  # warm-up: kernels, allocator
        x, seg = rough[..., 0].expand(2, -1, -1, -1), onehot[..., 0].expand(2, -1, -1, -1)
        for net in views.values():
            net(x, timesteps=0, seg=seg)
    refine_args = (setting["sdm_t0"], setting["sdm_guidance"], setting["sdm_steps"], 0)
    label = (
        f"refiner, {setting['sdm_sampler'].upper()}-{setting['sdm_steps']} from "
        f"t0={setting['sdm_t0']}, {len(views)} views, slice batch {setting['sdm_slice_batch']}"
    )
    for bf16 in (False, True):
        if bf16:
            _channels_last(views.values())
        with stages(label + (", bf16 + channels-last" if bf16 else "")):
            refine_volume(
                views,
                scheduler,
                rough,
                onehot,
                *refine_args,
                setting["sdm_slice_batch"],
                bf16=bf16,
            )
    _print(stages.rows, device, n, f"MC-DPM {fast.name}")
    return stages.rows


def _print(rows: list[tuple], device: torch.device, n: int, fast: str) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\n{name}, torch {torch.__version__}\n")
    print("| stage | s | peak GPU memory GiB |\n|---|---|---|")
    for stage, seconds, peak in rows:
        print(f"| {stage} | {seconds:.1f} | {'–' if peak is None else f'{peak:.2f}'} |")
    times = dict((r[0], r[1]) for r in rows)
    ratio = times[f"{fast}, {n} volumes in one call"] / times[f"{fast}, {n} single-volume calls"]
    print(f"\nBatched generation: {n} volumes in one call / {n} single calls = {ratio:.2f}")


if __name__ == "__main__":
    main()
