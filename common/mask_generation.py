"""Write generated mask volumes as NIfTI files plus a mask-only datalist; reruns resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.schedulers import Scheduler
from tqdm import tqdm

from common.datalist import write_datalist
from common.distributed import rank0_writes, shard
from common.io import load_weights, save_nifti
from common.labels import load_label_set
from common.mcdpm import keep_single_components, sample_mask_volumes
from common.seeds import case_seed
from common.transforms import model_space_affine


def generate_mask_cases(
    network: torch.nn.Module,
    scheduler: Scheduler,
    ckpt_path: str,
    label_set: str,
    output_dir: str,
    num_cases: int,
    spatial_size: Sequence[int],
    output_pixdim: Sequence[float],
    m: int,
    n: int,
    steps: int,
    seed: int = 0,
    guidance: float = 1.0,
    batch_size: int = 4,
    keep_largest: bool = True,
    modality: str = "CT",
    device: str | torch.device = "cpu",
) -> Path:
    """Generate ``num_cases`` label volumes ``(H, W, D)`` into ``output_dir/labels``.

    Case ``k`` is seeded with ``case_seed(seed, k)`` (recorded in the datalist), so any
    case can be remade alone. Existing case files are kept (a rerun finishes the rest);
    files appear only when complete. Under torchrun each rank makes its share of the cases
    (``common.distributed.shard``); rank 0 writes the datalist once every rank has finished.
    Returns ``output_dir/datalist.json`` (``"masks_only": true``).
    """
    labels = load_label_set(label_set)
    load_weights(network, ckpt_path)
    network.to(device).eval()
    out = Path(output_dir)
    affine = model_space_affine(output_pixdim, spatial_size)
    description = "labels: " + ",".join(f"{v} {n}" for v, n in enumerate(labels.names) if v)
    single = [labels.names.index(name) for name in labels.single_component] if keep_largest else []
    cases = [
        {
            "label": str(out / "labels" / f"mask_{k:04d}.nii.gz"),
            "case": f"mask_{k:04d}",
            "seed": case_seed(seed, k),
        }
        for k in range(num_cases)
    ]
    todo = [c for c in shard(cases) if not Path(c["label"]).exists()]  # this rank's share
    for start in tqdm(range(0, len(todo), batch_size), desc="mask volumes", disable=not todo):
        batch = todo[start : start + batch_size]
        volumes = sample_mask_volumes(
            network,
            scheduler,
            labels.num_classes,
            spatial_size,
            m,
            n,
            steps,
            seeds=[c["seed"] for c in batch],
            guidance=guidance,
            device=device,
        )
        for case, volume in zip(batch, volumes):
            volume = keep_single_components(volume, single)
            save_nifti(volume.numpy().astype("uint8"), affine, case["label"], description)
    path = (out / "datalist.json").absolute()
    rank0_writes(
        lambda: write_datalist(
            path,
            cases,
            labels,
            modality,
            "generated_masks",
            masks_only=True,
            seed=seed,
            steps=steps,
            guidance=guidance,
        )
    )
    return path
