"""Write a MaskPipeline's label volumes as NIfTI files plus a mask-only datalist; reruns resume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from common.core.distributed import rank0_writes, shard
from common.core.io import remake_reason, remove_temporaries, save_nifti, weights_fingerprint
from common.core.seeds import case_seed
from common.data.datalists import write_datalist
from common.data.labels import LabelSet
from common.data.transforms import model_space_affine
from common.masks.pipeline import MaskPipeline


def mask_settings(pipeline: MaskPipeline, output_pixdim: Sequence[float]) -> dict:
    """Everything besides the seed that a mask volume depends on (JSON)."""
    return {
        "sampler": type(pipeline.scheduler).__name__,
        "steps": pipeline.steps,
        "guidance": pipeline.guidance,
        "eta": pipeline.eta,
        "m": pipeline.m,
        "n": pipeline.n,
        "spatial_size": pipeline.output_size,
        "keep_largest": pipeline.keep_largest,
        "single_component": pipeline.single_component if pipeline.keep_largest else [],
        "pixdim": [float(p) for p in output_pixdim],
        "weights": weights_fingerprint(pipeline.network),
    }


def generate_mask_cases(
    pipeline: MaskPipeline,
    labels: LabelSet,
    output_dir: str,
    num_cases: int,
    output_pixdim: Sequence[float],
    seed: int = 0,
    modality: str = "CT",
    generators: Mapping[str, dict | None] | None = None,
    raw_output_dir: str | None = None,
) -> Path:
    """Generate ``num_cases`` label volumes ``(H, W, depth)`` into ``output_dir/labels``.

    Case ``k`` is seeded with ``case_seed(seed, k)``. Each file records its settings (seed,
    sampler, steps, guidance, ..., a fingerprint of the weights; ``common.core.io.read_record``)
    and so does its datalist entry (``settings``). A rerun keeps the files made with the same
    settings and remakes the others (a killed run's hidden temporaries are deleted); files
    appear only when complete, ``pipeline.batch_size`` cases at a time. Under torchrun each
    rank makes its share of the cases (``common.core.distributed.shard``); rank 0 writes the
    datalist once every rank has finished. Voxel size ``output_pixdim`` (mm).
    ``generators``: the records of the real cases that trained the weights
    (``common.core.provenance.checkpoint_records``), kept in the datalist as
    ``generator_training_cases`` so a test on those cases can be refused.
    ``raw_output_dir``: also write each volume as sampled, before ``keep_largest``, with its
    own datalist there (the same sampling run, no extra cost), to measure what post-processing
    hides. Returns ``output_dir/datalist.json`` (``"masks_only": true``).
    """
    folders = {"kept": Path(output_dir)}
    if raw_output_dir is not None:
        folders["raw"] = Path(raw_output_dir)
    affine = model_space_affine(output_pixdim, pipeline.output_size)
    description = "labels: " + ",".join(f"{v} {n}" for v, n in enumerate(labels.names) if v)
    kept_settings = mask_settings(pipeline, output_pixdim)
    raw_settings = {**kept_settings, "keep_largest": False, "single_component": []}
    settings = {"kept": kept_settings, "raw": raw_settings}
    cases = {kind: [] for kind in folders}
    for k in range(num_cases):
        for kind, out in folders.items():
            record = {"seed": case_seed(seed, k), **settings[kind]}
            label = out / "labels" / f"synthetic_{k:04d}.nii.gz"
            cases[kind].append({"label": str(label), "case": label.name[:-7], "settings": record})
    todo = []
    for k in shard(range(num_cases)):  # this rank's share
        stale = False
        for kind in folders:
            case = cases[kind][k]
            remove_temporaries(case["label"])
            why = remake_reason(case["label"], case["settings"])
            if why and why != "missing":
                print(f"{case['label']}: made with other settings ({why}); remaking it")
            stale = stale or bool(why)
        todo += [k] if stale else []
    step = pipeline.batch_size
    for start in tqdm(range(0, len(todo), step), desc="mask volumes", disable=not todo):
        batch = todo[start : start + step]
        seeds = [cases["kept"][k]["settings"]["seed"] for k in batch]
        raw, kept = pipeline.sample(seeds, keep=pipeline.keep_largest)
        volumes = {"raw": raw, "kept": raw if kept is None else kept}
        for kind in folders:
            for k, volume in zip(batch, volumes[kind]):
                case = cases[kind][k]
                label = volume.numpy().astype("uint8")
                save_nifti(label, affine, case["label"], description, record=case["settings"])
    for kind, out in folders.items():
        path = (out / "datalist.json").absolute()
        remove_temporaries(path)
        rank0_writes(
            lambda path=path, kind=kind: write_datalist(
                path,
                [{**c, "seed": c["settings"]["seed"]} for c in cases[kind]],
                labels,
                modality,
                "generated_masks",
                masks_only=True,
                seed=seed,
                steps=pipeline.steps,
                guidance=pipeline.guidance,
                generator_training_cases=dict(generators or {}),
            )
        )
    return (folders["kept"] / "datalist.json").absolute()
