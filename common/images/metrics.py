"""How realistic, diverse and label-faithful generated image volumes are, against real ones.

Images are ``(N, 1, H, W, D)`` (or lists of ``(1, H, W, D)`` / ``(H, W, D)``) on one grid, in the
model range [-1, 1], ``D`` = axial slices; labels are integer volumes ``(H, W, D)`` of one label
set, one per image. The measures follow MedGen3D's Table 1 in kind plus MAISI's organ check:

- distribution: FID and Gaussian-kernel MMD between features of the axial slices of the generated
  and the real set; the feature extractor is a slice encoder trained here on the real slices, or a
  caller's model (``common.images.slice_encoder``; nothing is downloaded);
- diversity: mean pairwise MS-SSIM among generated volumes (lower = more diverse; the paper's
  LPIPS needs downloaded weights), with the same among real volumes as the reference;
- paired (``generated[i]`` made from ``real_labels[i]``): MAE, PSNR and 3D SSIM per volume;
- intensity: per label median and IQR in HU / the original range, ``|median gen - median real|``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from monai.metrics import FIDMetric, MAEMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from common.core.io import atomic_path, write_json
from common.data.labels import LabelSet
from common.data.transforms import to_original_intensity
from common.images.slice_encoder import (
    ENCODER_EPOCHS,
    SAME_GRID_FIX,
    SliceFeatureExtractor,
    as_volumes,
    axial_slices,
    slice_features,
    train_slice_encoder,
)

PSNR_CAP_DB = 100.0  # identical volumes have infinite PSNR; reported as this
SSIM_WINDOW = 7  # Gaussian window (sigma 1.5) of SSIM and MS-SSIM, smaller where a dim is smaller
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
TABLE_COLUMNS = (
    "method",
    "FID ↓",
    "MMD ↓",
    "MS-SSIM gen (real) ↓",
    "MAE (orig.) ↓",
    "PSNR dB ↑",
    "SSIM ↑",
    "mean \\|Δ median\\| (orig.) ↓",
)


def _finite(x) -> float | None:
    """``float(x)``, None where it is NaN or infinite (JSON has neither)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _mean(values: list[float | None]) -> float | None:
    """Mean of the non-None values, None if there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _ssim_window(spatial_shape) -> tuple[int, ...]:
    """Per-dim SSIM window: ``SSIM_WINDOW``, or the largest odd size fitting a smaller dim."""
    return tuple(min(SSIM_WINDOW, s - 1 + s % 2) for s in spatial_shape)


def paired_metrics(generated, real, value_range: tuple[float, float] | None = None) -> dict:
    """MAE, PSNR, 3D SSIM of ``generated[i]`` vs ``real[i]``, both ``(N, 1, H, W, D)`` in [-1, 1].

    Returns per-volume lists ``mae`` (model units), ``psnr`` (dB, peak 2, capped at
    ``PSNR_CAP_DB``), ``ssim`` (data range 2 on the images shifted to [0, 2]: SSIM's luminance
    term needs non-negative intensities) and their means ``*_mean``; with ``value_range = (lo,
    hi)`` also ``mae_original``/``mae_original_mean``, the MAE in HU / the original range.
    """
    gen, ref = as_volumes(generated, "generated"), as_volumes(real, "real")
    if gen.shape != ref.shape:
        raise ValueError(f"generated {tuple(gen.shape)} and real {tuple(ref.shape)} differ")
    ssim = SSIMMetric(spatial_dims=3, data_range=2.0, win_size=_ssim_window(gen.shape[2:]))
    per_volume = {
        "mae": MAEMetric()(gen, ref),
        "psnr": PSNRMetric(max_val=2.0)(gen, ref).clamp(max=PSNR_CAP_DB),
        "ssim": ssim(gen + 1.0, ref + 1.0),
    }
    if value_range is not None:
        per_volume["mae_original"] = per_volume["mae"] * (value_range[1] - value_range[0]) / 2.0
    out = {}
    for key, values in per_volume.items():
        out[key] = [_finite(v) for v in values.flatten()]
        out[f"{key}_mean"] = _mean(out[key])
    return out


def _as_labels(x) -> list[np.ndarray]:
    """Label volumes ``(H, W, D)`` as int64 arrays, from ``(N, [1,] H, W, D)`` or a list."""
    return [np.rint(np.asarray(v)).astype(np.int64).reshape(np.shape(v)[-3:]) for v in x]


def _quantile_stats(values: np.ndarray) -> dict:
    """``median``, ``iqr`` (None when empty) and ``voxels`` of a 1D array."""
    if not values.size:
        return {"median": None, "iqr": None, "voxels": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": float(q3 - q1), "voxels": int(values.size)}


def label_intensity_stats(
    images, labels, label_set: LabelSet, value_range: tuple[float, float]
) -> dict[str, dict]:
    """Median and IQR of each label's voxels pooled over the volumes, in HU / the original range.

    ``images``: ``(N, 1, H, W, D)`` or a list of ``(H, W, D)`` in [-1, 1], mapped to ``value_range
    = (lo, hi)`` (e.g. the CT window ``(-1000, 1000)``); ``labels``: one ``(H, W, D)`` volume of
    values ``0..K-1`` per image. Returns ``{name: {"median", "iqr", "voxels"}}`` for every label
    but background; median and IQR are None for a label found in no volume.
    """
    vols, labs = as_volumes(images, "image")[:, 0].numpy(), _as_labels(labels)
    if len(labs) != len(vols) or any(lab.shape != vols.shape[1:] for lab in labs):
        raise ValueError(
            f"need one label volume of shape {vols.shape[1:]} per image; got {len(labs)} labels "
            f"of shapes {sorted({lab.shape for lab in labs})} for {len(vols)} images"
        )
    lo, hi = value_range
    vols = to_original_intensity(vols.astype(np.float64), lo, hi)
    return {
        name: _quantile_stats(np.concatenate([v[lab == value] for v, lab in zip(vols, labs)]))
        for value, name in enumerate(label_set.names[1:], start=1)
    }


def intensity_agreement(gen_stats: dict[str, dict], real_stats: dict[str, dict]) -> dict:
    """Per-label agreement of two ``label_intensity_stats`` results (MAISI's median check).

    Returns ``{"labels": {name: {"median_gen", "median_real", "iqr_gen", "iqr_real",
    "median_diff" (gen - real, signed), "abs_median_diff"}}, "mean_abs_median_diff"}``; the
    differences are None unless the label is in both sets, the mean is over those labels.
    """
    labels = {}
    for name, real in real_stats.items():
        gen = gen_stats[name]
        both = gen["median"] is not None and real["median"] is not None
        diff = gen["median"] - real["median"] if both else None
        labels[name] = {
            "median_gen": gen["median"],
            "median_real": real["median"],
            "iqr_gen": gen["iqr"],
            "iqr_real": real["iqr"],
            "median_diff": diff,
            "abs_median_diff": abs(diff) if both else None,
        }
    mean_abs = _mean([m["abs_median_diff"] for m in labels.values()])
    return {"labels": labels, "mean_abs_median_diff": mean_abs}


def ms_ssim_settings(h: int, w: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights of 2D MS-SSIM on ``h x w`` slices.

    MONAI's MultiScaleSSIMMetric needs ``min(h, w) // (scales - 1)**2 > kernel - 1``. The kernel
    is ``SSIM_WINDOW`` (7) with the most scales (<= 5) that fit, weighted by the first standard
    weights renormalised to sum 1: 32x32 slices get 3 scales, 64x64 4, 128x128 and more 5. Slices
    under 7 pixels get one scale (plain SSIM) with the largest odd kernel that fits.
    """
    size = min(h, w)
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if size // max(1, scales - 1) ** 2 > SSIM_WINDOW - 1:
            weights = MS_SSIM_WEIGHTS[:scales]
            return SSIM_WINDOW, tuple(x / sum(weights) for x in weights)
    return size - 1 + size % 2, (1.0,)


def diversity(volumes) -> dict:
    """Mean pairwise MS-SSIM among volumes ``(N, 1, H, W, D)`` in [-1, 1]; lower = more diverse.

    Each pair ``i < j`` scores the mean 2D MS-SSIM of slice ``k`` of ``i`` against slice ``k`` of
    ``j`` (images shifted to [0, 2], data range 2; see ``ms_ssim_settings``). Returns
    ``{"ms_ssim" (1 = identical volumes; None for N < 2), "pairs", "scales", "kernel_size"}``.
    """
    vols = as_volumes(volumes, "volume") + 1.0
    kernel, weights = ms_ssim_settings(*vols.shape[2:4])
    metric = MultiScaleSSIMMetric(
        spatial_dims=2, data_range=2.0, kernel_size=kernel, weights=weights
    )
    slices = vols.permute(0, 4, 1, 2, 3)  # (N, D, 1, H, W)
    scores = [metric(a, b).mean() for a, b in combinations(slices, 2)]
    return {
        "ms_ssim": _finite(torch.stack(scores).mean()) if scores else None,
        "pairs": len(scores),
        "scales": len(weights),
        "kernel_size": kernel,
    }


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to features ``(n_a, F)`` and ``(n_b, F)``, ``n >= 2``.

    MONAI's FIDMetric; clamped at 0 against round-off (identical sets give about 0).
    """
    if min(len(feat_a), len(feat_b)) < 2:
        raise ValueError(
            f"FID needs >= 2 feature vectors per set, got {len(feat_a)}, {len(feat_b)}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # MONAI passes scipy's old sqrtm(disp=)
        fid = FIDMetric()(torch.as_tensor(feat_a), torch.as_tensor(feat_b))
    return max(float(fid), 0.0)


def _gaussian_kernel_mean(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean of ``exp(-|a_i - b_j|^2 / (2 bandwidth^2))`` over all pairs."""
    dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.exp(-dist.square() / (2.0 * bandwidth**2)).mean()


def mmd(feat_a: torch.Tensor, feat_b: torch.Tensor, bandwidth: float | None = None) -> float:
    """Squared MMD with a Gaussian kernel between features ``(n_a, F)`` and ``(n_b, F)``.

    The biased (V-statistic) estimate: >= 0, exactly 0 for identical sets. ``bandwidth`` defaults
    to the median non-zero pairwise distance within ``feat_b`` (the real reference set, so every
    method compared against it gets the same kernel); 1 if ``feat_b`` has no distinct vectors.
    (MONAI's MMDMetric is a linear-kernel MMD on images of equal-size sets, so not used here.)
    """
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feat_a, feat_b))
    if bandwidth is None:
        dist = torch.cdist(b, b, compute_mode="donot_use_mm_for_euclid_dist")
        dist = dist[dist > 0]
        bandwidth = float(dist.median()) if dist.numel() else 1.0
    k_aa, k_bb = _gaussian_kernel_mean(a, a, bandwidth), _gaussian_kernel_mean(b, b, bandwidth)
    return max(float(k_aa + k_bb - 2.0 * _gaussian_kernel_mean(a, b, bandwidth)), 0.0)


def fid_mmd(generated, real, extractor: SliceFeatureExtractor) -> dict:
    """``{"fid", "mmd", "slices_gen", "slices_real"}`` over the axial-slice features of two sets."""
    feat_gen, feat_real = slice_features(generated, extractor), slice_features(real, extractor)
    return {
        "fid": _finite(frechet_distance(feat_gen, feat_real)),
        "mmd": _finite(mmd(feat_gen, feat_real)),
        "slices_gen": len(feat_gen),
        "slices_real": len(feat_real),
    }


def real_slice_encoder(
    real, seed: int = 0, epochs: int = ENCODER_EPOCHS
) -> tuple[SliceFeatureExtractor, str]:
    """The feature extractor ``evaluate_images`` trains when given none, and its description:
    a slice encoder trained on the axial slices of the real volumes ``(N, 1, H, W, D)``. Train
    it once to compare several generated sets with the same real set."""
    extractor = train_slice_encoder(axial_slices(as_volumes(real, "real")), epochs, seed)
    return extractor, f"slice autoencoder trained on the real slices ({epochs} epochs, seed {seed})"


def evaluate_images(
    generated,
    real,
    generated_labels,
    real_labels,
    label_set: LabelSet,
    value_range: tuple[float, float],
    extractor: SliceFeatureExtractor | None = None,
    seed: int = 0,
    paired: bool = False,
    encoder_epochs: int = ENCODER_EPOCHS,
    extractor_name: str = "supplied",
) -> dict:
    """Compare generated images with real ones; all ``(N, 1, H, W, D)`` in [-1, 1] on one grid.

    ``generated_labels``/``real_labels``: the masks of each image. ``paired``: ``generated[i]``
    was made from ``real_labels[i]``, which adds the paired metrics. ``value_range = (lo, hi)``:
    what -1 and 1 stand for (the HU window for CT). Without ``extractor`` a slice encoder is
    trained on the real slices (``real_slice_encoder(real, seed, encoder_epochs)``);
    ``extractor_name`` describes a given one in the results.
    Returns a JSON-serialisable dict (None where undefined, never NaN)::

        {"n_generated", "n_real", "paired", "value_range", "feature_extractor",
         "fid", "mmd",                    # generated vs real axial-slice features, lower = closer
         "slices_gen", "slices_real",     # slices behind FID/MMD
         "diversity_gen", "diversity_real": {"ms_ssim", "pairs", "scales", "kernel_size"},
         "paired_metrics": None | paired_metrics(...) with mae_original,
         "intensity": intensity_agreement(...)}  # per-label medians, |Δ median| in HU / original
    """
    gen, ref = as_volumes(generated, "generated"), as_volumes(real, "real")
    if gen.shape[1:] != ref.shape[1:]:
        raise ValueError(
            f"generated {tuple(gen.shape[1:])} and real {tuple(ref.shape[1:])} volumes differ; "
            f"{SAME_GRID_FIX}"
        )
    if paired and len(gen) != len(ref):
        raise ValueError(f"paired sets need equal sizes, got {len(gen)} generated, {len(ref)} real")
    name = extractor_name
    if extractor is None:
        extractor, name = real_slice_encoder(ref, seed, encoder_epochs)
    intensity = intensity_agreement(
        label_intensity_stats(gen, generated_labels, label_set, value_range),
        label_intensity_stats(ref, real_labels, label_set, value_range),
    )
    return {
        "n_generated": len(gen),
        "n_real": len(ref),
        "paired": paired,
        "value_range": [float(v) for v in value_range],
        "feature_extractor": name,
        **fid_mmd(gen, ref, extractor),
        "diversity_gen": diversity(gen),
        "diversity_real": diversity(ref),
        "paired_metrics": paired_metrics(gen, ref, value_range) if paired else None,
        "intensity": intensity,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    """``x`` rounded to ``digits`` decimals, a dash for None."""
    return "–" if x is None else f"{x:.{digits}f}"


def original_digits(value_range: Sequence[float]) -> int:
    """Decimals that show a value in the original units, and differences of about 1e-4 of the
    range: 1 where the range spans 100 units or more (HU, 8-bit MRI), else 4 (MRI scaled to
    about [0, 1])."""
    return 1 if value_range[1] - value_range[0] >= 100 else 4


def markdown_table(results_by_method: dict[str, dict]) -> str:
    """Table 1-style markdown of ``evaluate_images`` results: one row per method."""
    rows = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for method, r in results_by_method.items():
        p = r["paired_metrics"] or {}
        digits = original_digits(r["value_range"])
        cells = [
            method,
            _fmt(r["fid"]),
            _fmt(r["mmd"], 4),
            f"{_fmt(r['diversity_gen']['ms_ssim'])} ({_fmt(r['diversity_real']['ms_ssim'])})",
            _fmt(p.get("mae_original_mean"), digits),
            _fmt(p.get("psnr_mean"), 2),
            _fmt(p.get("ssim_mean")),
            _fmt(r["intensity"]["mean_abs_median_diff"], digits),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    rows += [
        "",
        "FID / MMD: between features of the generated and real axial slices. MS-SSIM: mean "
        "pairwise among the generated volumes, the real volumes' in brackets (lower = more "
        "diverse). MAE / PSNR / SSIM: generated vs real image of the same held-out real mask "
        "(paired sets only). orig.: HU for CT, the source intensity range for MRI; |Δ median|: "
        "per label |median generated − median real|, mean over labels.",
    ]
    return "\n".join(rows) + "\n"


def write_report(results_by_method: dict[str, dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``image_metrics.json`` and ``image_metrics.md`` to ``out_dir`` atomically."""
    json_path = write_json(results_by_method, Path(out_dir) / "image_metrics.json")
    md_path = Path(out_dir) / "image_metrics.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(results_by_method))
    return json_path, md_path
