"""Seconds per mask volume of the MC-DPM at the demo size for several samplers.

    python benchmarks/mask_sampling_speed.py --ckpt bundles/mask_diffusion/models/model.pt \
        --samplers ddim:50,ddim:20,ddpm:1000,rflow:30

Sampling cost does not depend on the weights; a sampler whose objective differs from the
checkpoint's (rflow vs a v-prediction DDPM model) runs on freshly initialised weights and is
reported as timing only.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.bundle import ConfigParser

from common.diffusion import make_scheduler
from common.io import load_weights
from common.mcdpm import sample_mask_volumes

CONFIGS = [
    "bundles/mask_diffusion/configs/inference.yaml",
    "bundles/mask_diffusion/configs/demo.yaml",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", default="bundles/mask_diffusion/models/model.pt")
    parser.add_argument("--samplers", default="ddim:50,ddim:20,rflow:30,ddpm:1000")
    parser.add_argument("--volumes", type=int, default=1)
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(CONFIGS)
    net = load_weights(config.get_parsed_content("network_def"), args.ckpt).eval()
    m, n, size = config["m"], config["n"], config["spatial_size"]
    k = config["num_classes"]
    print(f"| sampler | steps | s / volume | threads {torch.get_num_threads()} |")
    print("|---|---|---|---|")
    for item in args.samplers.split(","):
        kind, steps = item.split(":")
        start = time.perf_counter()
        sample_mask_volumes(
            net, make_scheduler(kind), k, size, m, n, int(steps), seeds=list(range(args.volumes))
        )
        per_volume = (time.perf_counter() - start) / args.volumes
        print(f"| {kind} | {steps} | {per_volume:.1f} | |", flush=True)


if __name__ == "__main__":
    main()
