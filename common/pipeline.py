"""Paired synthetic volumes from the bundles' trained weights: masks, then images.

The bundles stay the source of truth: networks, schedulers and geometry come from their
``configs/inference.yaml`` + preset, weights from their ``models/`` folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.bundle import ConfigParser

from common import distributed
from common.bundles import BUNDLES, preset_file
from common.image_generation import synthesize_images
from common.mask_generation import generate_mask_cases


def bundle_config(bundle: str, preset: str = "demo", **overrides) -> ConfigParser:
    """A bundle's inference config merged with ``configs/<preset>.yaml`` and ``overrides``."""
    files = [BUNDLES / bundle / "configs" / "inference.yaml", preset_file(bundle, preset)]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser


@distributed.process_group()
def generate_pairs(
    n: int,
    out: str | Path,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 20,
    refine: bool = True,
    preset: str = "demo",
    device: str | None = None,
    mask_ckpt: str | Path | None = None,
    image_models: str | Path | None = None,
) -> Path:
    """``n`` paired volumes in ``out`` (``masks/labels``, ``images``, ``datalist.json``).

    Case ``k`` uses ``case_seed(seed, k)`` for its mask and its refinement noise (recorded in
    the datalists), so a case can be remade alone; finished cases are kept on a rerun.
    Weights: ``mask_ckpt`` (MC-DPM state dict) and ``image_models`` (a folder with
    ``generator.pt`` and ``refiner_<view>.pt``), by default the bundles' ``models/``.
    Under ``torchrun --nproc_per_node=N -m common.cli generate`` the N ranks share the cases
    (one GPU each) and make the same volumes as one process.
    """
    image_models = Path(image_models or BUNDLES / "image_synthesis" / "models")
    out = Path(out)
    dev = torch.device(device or distributed.device())
    masks = bundle_config("mask_diffusion", preset, sampler=sampler, steps=steps)
    mask_datalist = generate_mask_cases(
        network=masks.get_parsed_content("network_def"),
        scheduler=masks.get_parsed_content("scheduler"),
        ckpt_path=str(mask_ckpt or masks.get_parsed_content("ckpt_path")),
        label_set=masks["label_set"],
        output_dir=str(out / "masks"),
        num_cases=n,
        spatial_size=masks["spatial_size"],
        output_pixdim=masks["output_pixdim"],
        m=masks["m"],
        n=masks["n"],
        steps=steps,
        seed=seed,
        guidance=masks["guidance"],
        modality=masks["modality"],
        device=dev,
    )
    images = bundle_config("image_synthesis", preset)
    return synthesize_images(
        generator=images.get_parsed_content("network_def"),
        refiner=images.get_parsed_content("refiner_def"),
        scheduler=images.get_parsed_content("scheduler"),
        generator_ckpt=str(image_models / "generator.pt"),
        refiner_dir=str(image_models),
        mask_datalist=str(mask_datalist),
        output_dir=str(out),
        value_range=images["value_range"],
        views=images["sdm_views"],
        refine=refine,
        t0=images["sdm_t0"],
        guidance=images["sdm_guidance"],
        steps=images["sdm_steps"],
        seed=seed,
        device=dev,
    )
