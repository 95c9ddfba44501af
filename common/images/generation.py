"""Mask volumes -> paired image volumes as files: ``synthesize_images`` runs an
``ImagePipeline`` (sequence generator, then the three-view refiner) over a mask datalist.

Masks come as a datalist on the model grid (``mask_diffusion`` output, or real masks brought
to the grid by ``export_model_space``). Images are written next to them in HU / the original
range with the mask's affine: ``images/`` (refined) and ``images_sequence/`` (the sequence
generator alone, for comparison), plus a paired ``datalist.json``. Reruns skip finished cases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.core.distributed import rank0_writes, shard
from common.core.io import read_record, remake_reason, remove_temporaries, save_nifti
from common.core.provenance import DATALIST_KEY
from common.core.seeds import case_seed
from common.data.datalists import (
    datalist_label_set,
    datalist_modality,
    read_datalist,
    write_datalist,
)
from common.data.transforms import to_original_intensity
from common.data.validate import require_valid
from common.images.pipeline import ImagePipeline


def export_model_space(datalist: str | Path, preprocessing, output_dir: str | Path) -> Path:
    """Write each case of ``datalist`` on the model grid (``preprocessing`` output) as NIfTI.

    Image values go back to HU / the original range of the modality window; returns the
    new datalist. Used to synthesise from real held-out masks and compare with their images.
    """
    require_valid(datalist)
    doc = read_datalist(datalist)
    label_set, modality = datalist_label_set(doc, datalist), datalist_modality(doc, datalist)
    out = Path(output_dir)
    cases = []
    for case in tqdm(doc["training"], desc="model grid"):
        name = case.get("case") or Path(case["label"]).name.split(".")[0]
        item = preprocessing({"image": case["image"], "label": case["label"]})
        affine = np.asarray(item["image"].affine)
        lo, hi = _range_of(item["image"])
        image = to_original_intensity(item["image"][0].as_tensor(), lo, hi).numpy()
        paths = {
            "image": out / "images" / f"{name}.nii.gz",
            "label": out / "labels" / f"{name}.nii.gz",
        }
        save_nifti(image.astype(np.float32), affine, paths["image"])
        save_nifti(item["label"][0].numpy().round().astype(np.uint8), affine, paths["label"])
        cases.append({**paths, "case": name, "value_range": [lo, hi]})
    return write_datalist(out / "datalist.json", cases, label_set, modality, "model_space")


def _range_of(image) -> tuple[float, float]:
    """The ``[lo, hi]`` the normalisation step mapped to [-1, 1] (from the applied operations)."""
    for op in image.applied_operations:
        if op["class"] == "NormaliseIntensityd":
            return float(op["extra_info"]["lo"]), float(op["extra_info"]["hi"])
    raise ValueError("the image went through no NormaliseIntensityd step")


def synthesize_images(
    pipeline: ImagePipeline,
    mask_datalist: str | Path,
    output_dir: str | Path,
    value_range: Sequence[float],
    seed: int = 0,
    generators: Mapping[str, dict | None] | None = None,
) -> Path:
    """Images for every mask of ``mask_datalist`` from ``pipeline``; returns
    ``output_dir/datalist.json``.

    Args:
        pipeline: masks -> (sequence-only, refined) images; its settings (refined, t0,
            guidance, steps) are recorded in the datalist.
        value_range: model [-1, 1] maps back to this range (CT: the HU window).
        seed: a case without a recorded ``seed`` uses ``case_seed(seed, k)``.
        generators: the records of the real cases that trained the pipeline's weights
            (``common.core.provenance.checkpoint_records``); the datalist keeps them with
            the mask datalist's as ``generator_training_cases``.

    Each case is made alone and written at once. Its two files and its datalist entry record
    how it was made (``settings``: seed, the pipeline's settings and weights, the mask's
    voxels and its own record); a rerun keeps the cases made with the same settings and
    remakes the others (a killed run's hidden temporaries are deleted). The masks are expected
    valid (``medgen3d validate``; the bundle config checks them before any network loads).
    Under torchrun each rank makes its share of the cases (``common.core.distributed.shard``);
    rank 0 writes the datalist once every rank finished.
    """
    doc = read_datalist(mask_datalist)
    label_set, modality = (
        datalist_label_set(doc, mask_datalist),
        datalist_modality(doc, mask_datalist),
    )
    out = Path(output_dir)
    settings = {**pipeline.settings, "value_range": [float(v) for v in value_range]}
    cases = []
    for k, case in enumerate(doc["training"]):
        name = case.get("case", Path(case["label"]).name.split(".")[0])
        cases.append(
            {
                "image": str(out / "images" / f"{name}.nii.gz"),
                "image_sequence": str(out / "images_sequence" / f"{name}.nii.gz"),
                "label": case["label"],
                "case": name,
                "seed": int(case.get("seed", case_seed(seed, k))),
            }
        )

    def read_mask(case: dict) -> tuple[np.ndarray, np.ndarray]:
        """The case's mask ``(H, W, D)`` and affine; records the case's ``settings``."""
        mask = nib.load(case["label"])
        labels = np.asarray(mask.dataobj)
        case["settings"] = {
            "seed": case["seed"],
            **settings,
            "mask": {
                "sha256": _digest(labels, mask.affine),
                "settings": read_record(case["label"]),
            },
        }
        return labels, mask.affine

    mine = shard(cases)  # this rank's share; rank 0 writes every case's settings
    own = {id(case) for case in mine}
    for case in cases:
        if id(case) not in own:
            read_mask(case)
    for case in tqdm(mine, desc="image volumes"):
        labels, affine = read_mask(case)  # each mask is read once
        files = [case["image_sequence"], case["image"]]
        for path in files:
            remove_temporaries(path)
        why = [remake_reason(path, case["settings"]) for path in files]
        if not any(why):
            continue
        if "missing" not in why:
            print(f"{case['image']}: made with other settings ({why[-1]}); remaking it")
        onehot = _one_hot([labels], label_set.num_classes)
        rough, final = pipeline(onehot, [case["seed"]])
        for path, volume in zip(files, (rough[0], final[0])):
            hu = to_original_intensity(volume[0].cpu(), *value_range).numpy().astype(np.float32)
            save_nifti(hu, affine, path, record=case["settings"])
    path = (out / "datalist.json").absolute()
    remove_temporaries(path)
    rank0_writes(
        lambda: write_datalist(
            path,
            cases,
            label_set,
            modality,
            "synthetic_pairs",
            refined=pipeline.refine,
            t0=pipeline.t0,
            guidance=pipeline.guidance,
            steps=pipeline.steps,
            generator_training_cases={**_mask_generators(doc), **(generators or {})},
        )
    )
    return path


def _mask_generators(doc: dict) -> dict:
    """The mask datalist's generator records; generated masks without any give
    ``{"masks": None}`` (unknown), real masks (a model-space export) none."""
    return doc.get(DATALIST_KEY) or ({"masks": None} if doc.get("masks_only") else {})


def _digest(labels: np.ndarray, affine: np.ndarray) -> str:
    """SHA-256 (first 16 hex digits) of a mask's voxels, their type and shape and its affine."""
    labels = np.ascontiguousarray(labels)
    digest = hashlib.sha256(f"{labels.dtype}:{labels.shape}".encode())
    digest.update(labels.tobytes())
    digest.update(np.asarray(affine, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def _one_hot(labels: list[np.ndarray], num_classes: int) -> torch.Tensor:
    """Label volumes ``(H, W, D)`` -> one-hot ``(B, K, H, W, D)`` float {0, 1}."""
    stacked = torch.as_tensor(np.stack(labels).astype(np.int64))
    return F.one_hot(stacked, num_classes).movedim(-1, 1).float()


def model_space_images(paths: Sequence[str], value_range: Sequence[float]) -> torch.Tensor:
    """Model-grid image files (one grid) -> ``(N, 1, H, W, D)`` in [-1, 1], where
    ``value_range`` (HU for CT) is what [-1, 1] stands for."""
    lo, hi = (float(v) for v in value_range)
    arrays = np.stack([np.asarray(nib.load(p).dataobj) for p in paths])
    return torch.as_tensor(arrays[:, None] - lo).float() / (hi - lo) * 2 - 1


def model_space_labels(paths: Sequence[str]) -> list[np.ndarray]:
    """Label files -> integer volumes ``(H, W, D)`` (int64)."""
    return [np.asarray(nib.load(p).dataobj).round().astype(np.int64) for p in paths]


def real_encoder(real_datalist: str | Path, value_range: Sequence[float], seed: int = 0) -> tuple:
    """(slice feature extractor, its description) trained on the axial slices of the real
    model-grid images of ``real_datalist`` (``common.images.metrics.real_slice_encoder``)."""
    from common.images.metrics import real_slice_encoder

    images = [c["image"] for c in read_datalist(real_datalist)["training"]]
    return real_slice_encoder(model_space_images(images, value_range), seed)


def evaluate_synthesis(
    synthetic_datalist: str | Path,
    real_datalist: str | Path,
    value_range: Sequence[float],
    output_dir: str | Path,
    seed: int = 0,
    encoder: tuple | None = None,
) -> dict:
    """Table-1-style comparison of ``images_sequence`` (stage 1) and ``images`` (refined)
    with the real images of ``real_datalist`` (both on the model grid).

    Paired metrics (MAE/PSNR/SSIM) are computed when the synthetic cases were made from the
    real masks (same label files). ``encoder``: ``real_encoder(real_datalist, value_range,
    seed)`` trained before (to compare several synthetic sets with one real set); default:
    trained here. Writes ``image_metrics.{json,md}`` to ``output_dir``.
    """
    from common.images.metrics import evaluate_images, real_slice_encoder, write_report

    syn, real = read_datalist(synthetic_datalist), read_datalist(real_datalist)
    label_set = datalist_label_set(real, real_datalist)
    real_labels = model_space_labels([c["label"] for c in real["training"]])
    syn_labels = model_space_labels([c["label"] for c in syn["training"]])
    paired = [c["label"] for c in syn["training"]] == [c["label"] for c in real["training"]]
    real_images = model_space_images([c["image"] for c in real["training"]], value_range)
    extractor, extractor_name = encoder or real_slice_encoder(real_images, seed)
    results = {
        name: evaluate_images(
            model_space_images([c[key] for c in syn["training"]], value_range),
            real_images,
            syn_labels,
            real_labels,
            label_set,
            tuple(float(v) for v in value_range),
            extractor,
            seed=seed,
            paired=paired,
            extractor_name=extractor_name,
        )
        for name, key in (("sequence generator only", "image_sequence"), ("refined", "image"))
        if all(key in c for c in syn["training"])
    }
    write_report(results, output_dir)
    return results
