"""Paired synthetic volumes from the bundles' trained weights: masks, then images.

The bundles stay the source of truth: every sampling setting (network, scheduler, steps,
guidance, post-processing, batch sizes) comes from their ``configs/inference.yaml`` and the
presets; this module only passes the user's choices as overrides and runs the bundles'
own writers (``generate``, ``synthesize``).
"""

from __future__ import annotations

from pathlib import Path

from common.core import distributed
from medgen3d.bundles import bundle_config


def _given(**choices) -> dict:
    """The choices the user made (``None`` leaves the bundle config's value)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in choices.items() if v is not None}


@distributed.process_group()
def generate_pairs(
    n: int,
    out: str | Path,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    refine: bool = True,
    scale: str | None = None,
    dataset: str | None = None,
    device: str | None = None,
    mask_ckpt: str | Path | None = None,
    image_models: str | Path | None = None,
    depth: int | None = None,
    extent_mm: float | None = None,
    raw_masks: str | Path | None = None,
) -> Path:
    """``n`` paired volumes in ``out`` (``masks/labels``, ``images``, ``datalist.json``).

    Case ``k`` uses ``case_seed(seed, k)`` for its mask and its refinement noise (recorded in
    the datalists), so a case can be remade alone; finished cases are kept on a rerun.
    Weights: ``mask_ckpt`` (MC-DPM state dict) and ``image_models`` (a folder with
    ``model.pt``, the sequence generator, and ``refiner_<view>.pt``), by default the bundles'
    ``models/``, which the base configs describe; ``scale`` and ``dataset`` name the presets
    of other weights. ``depth`` (slices) or ``extent_mm`` set the volumes' axial length
    (default: the model grid's depth). ``raw_masks``: a folder for the masks as sampled
    too, before keep-largest (from the same sampling run).
    Under ``torchrun --nproc_per_node=N -m medgen3d.cli generate`` the N ranks share the
    cases (one GPU each) and make the same volumes as one process.
    """
    out = Path(out)
    dev = device or str(distributed.device())
    masks = bundle_config(
        "mask_diffusion",
        scale,
        dataset,
        **_given(
            output_dir=out / "masks",
            num_cases=n,
            seed=seed,
            sampler=sampler,
            steps=steps,
            ckpt_path=mask_ckpt,
            device=dev,
            depth=depth,
            extent_mm=extent_mm,
            raw_output_dir=raw_masks,
        ),
    )
    mask_datalist = masks.get_parsed_content("generate")()
    images = bundle_config(
        "image_synthesis",
        scale,
        dataset,
        **_given(
            mask_datalist=mask_datalist,
            output_dir=out,
            seed=seed,
            refine=refine,
            ckpt_dir=image_models,
            device=dev,
        ),
    )
    return images.get_parsed_content("synthesize")()


def check_pairs(datalist: Path, ranges: dict, retries: int, seed: int, **generation) -> dict:
    """The quality gate (``common.images.qc.quality_gate``) on a ``generate_pairs`` datalist:
    the failing pairs are remade by ``generate_pairs`` with the same ``generation`` settings
    and new seeds, in ``<datalist folder>/qc/retry_<round>``; prints what it did."""
    from common.images.qc import qc_summary, quality_gate

    folder = Path(datalist).parent / "qc"

    def regenerate(count: int, run_seed: int, name: str) -> Path:
        return generate_pairs(count, folder / name, run_seed, **generation)

    report = quality_gate(datalist, ranges, regenerate, seed, retries)
    print(qc_summary(report))
    return report
