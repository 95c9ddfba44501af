"""Write a MaskPipeline's label volumes as NIfTI files plus a mask-only datalist; reruns resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from common.core.distributed import rank0_writes, shard
from common.core.io import save_nifti
from common.core.seeds import case_seed
from common.data.datalists import write_datalist
from common.data.labels import LabelSet
from common.data.transforms import model_space_affine
from common.masks.pipeline import MaskPipeline


def generate_mask_cases(
    pipeline: MaskPipeline,
    labels: LabelSet,
    output_dir: str,
    num_cases: int,
    output_pixdim: Sequence[float],
    seed: int = 0,
    modality: str = "CT",
) -> Path:
    """Generate ``num_cases`` label volumes ``(H, W, D)`` into ``output_dir/labels``.

    Case ``k`` is seeded with ``case_seed(seed, k)`` (recorded in the datalist), so any
    case can be remade alone. Existing case files are kept (a rerun finishes the rest);
    files appear only when complete, ``pipeline.batch_size`` cases at a time. Under torchrun
    each rank makes its share of the cases (``common.core.distributed.shard``); rank 0 writes
    the datalist once every rank has finished. Voxel size ``output_pixdim`` (mm).
    Returns ``output_dir/datalist.json`` (``"masks_only": true``).
    """
    out = Path(output_dir)
    affine = model_space_affine(output_pixdim, pipeline.spatial_size)
    description = "labels: " + ",".join(f"{v} {n}" for v, n in enumerate(labels.names) if v)
    cases = [
        {
            "label": str(out / "labels" / f"mask_{k:04d}.nii.gz"),
            "case": f"mask_{k:04d}",
            "seed": case_seed(seed, k),
        }
        for k in range(num_cases)
    ]
    todo = [c for c in shard(cases) if not Path(c["label"]).exists()]  # this rank's share
    step = pipeline.batch_size
    for start in tqdm(range(0, len(todo), step), desc="mask volumes", disable=not todo):
        batch = todo[start : start + step]
        volumes = pipeline([c["seed"] for c in batch])
        for case, volume in zip(batch, volumes):
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
            steps=pipeline.steps,
            guidance=pipeline.guidance,
        )
    )
    return path
