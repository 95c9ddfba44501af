"""How plausible, diverse and original generated label volumes are, measured against real ones.

All masks are integer label volumes ``(H, W, D)`` on one grid (``D`` = axial slices) whose values
are those of one label set. Per label (background excluded) the generated set is compared with
the real set on volume, presence, connected components, slice-to-slice continuity and axial
extent; memorisation is measured by each generated mask's Dice to its nearest real mask, with the
real masks' Dice to their nearest other real mask as the reference.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from common.core.errors import DataError
from common.core.io import atomic_path, load_volume, write_json
from common.data.datalists import datalist_label_set, read_datalist
from common.data.labels import LabelSet

SAME_GRID_FIX = "compare masks on the same grid, e.g. real masks preprocessed to the model's shape"
CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connectivity
CHUNK_ELEMENTS = 1 << 24  # voxels x masks per float32 operand of the Dice matrix products
SUMMARY_KEYS = (
    "volume_w1_rel",
    "presence_gen",
    "presence_real",
    "components_gen",
    "components_real",
    "fragmented_gen",
    "fragmented_real",
    "z_continuity_gen",
    "z_continuity_real",
)


def _check_masks(masks: list[np.ndarray], shape: tuple, num_classes: int, kind: str) -> None:
    """Raise ValueError unless every mask has ``shape`` and integer values in ``0..K-1``."""
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(
                f"{kind} mask {i} has shape {m.shape} but real mask 0 has shape {shape}; "
                f"{SAME_GRID_FIX}"
            )
        values = np.unique(m).astype(np.float64)
        if (
            not np.array_equal(values, np.rint(values))
            or values[0] < 0
            or values[-1] >= num_classes
        ):
            raise ValueError(
                f"{kind} mask {i} has values {values.tolist()[:10]} outside the label values "
                f"0..{num_classes - 1}"
            )


def _components(label_mask: np.ndarray, box: tuple[slice, ...] | None) -> int:
    """26-connected components of a boolean mask whose foreground lies inside ``box``."""
    return 0 if box is None else ndimage.label(label_mask[box], CONNECTIVITY)[1]


def slice_pair_dice(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K-1, D-1)``: per label ``1..K-1``, the Dice of axial slices ``z`` and ``z + 1`` of
    ``mask (H, W, D)``; NaN where the label is in neither slice."""
    onehot = mask[None] == np.arange(1, num_classes).reshape(-1, 1, 1, 1)  # (K-1, H, W, D)
    area = onehot.sum((1, 2))  # (K-1, D)
    inter = (onehot[..., :-1] & onehot[..., 1:]).sum((1, 2))  # (K-1, D-1)
    pair = area[:, :-1] + area[:, 1:]
    return np.divide(2.0 * inter, pair, out=np.full(pair.shape, np.nan), where=pair > 0)


def _mask_stats(mask: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-label statistics of one mask ``(H, W, D)``; each value has shape ``(K-1,)``.

    ``count`` voxels, ``components`` (26-connected), ``z_continuity`` (mean Dice of consecutive
    axial slices over pairs where the label is in either), ``z_first``/``z_last`` (first/last
    slice holding the label, / D); NaN where the label is absent.
    """
    onehot = mask[None] == np.arange(1, num_classes).reshape(-1, 1, 1, 1)  # (K-1, H, W, D)
    area = onehot.sum((1, 2))  # (K-1, D)
    pair_dice = slice_pair_dice(mask, num_classes)
    n_pairs = (~np.isnan(pair_dice)).sum(1)
    dice_sum = np.nansum(pair_dice, 1)
    present = area > 0
    any_z = present.any(1)
    depth = mask.shape[2]
    boxes = ndimage.find_objects(mask, max_label=num_classes - 1)
    return {
        "count": area.sum(1),
        "components": np.array([_components(o, box) for o, box in zip(onehot, boxes)]),
        "z_continuity": np.where(n_pairs > 0, dice_sum / np.maximum(n_pairs, 1), np.nan),
        "z_first": np.where(any_z, present.argmax(1), np.nan) / depth,
        "z_last": np.where(any_z, depth - 1 - present[:, ::-1].argmax(1), np.nan) / depth,
    }


def _stack_stats(masks: list[np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """``_mask_stats`` of every mask, stacked to ``(n_masks, K-1)`` per key."""
    per_mask = [_mask_stats(m, num_classes) for m in masks]
    return {k: np.stack([s[k] for s in per_mask]) for k in per_mask[0]}


def _pairwise_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean foreground Dice ``(n_a, n_b)`` between label stacks ``a (n_a, V)`` and ``b (n_b, V)``.

    Per-label intersections are float32 matrix products of the one-hot masks over chunks of the
    voxels foreground in any mask (exact: each chunk's counts stay within 2**24). The mean is
    over labels present in either mask; two all-background masks have Dice 1.
    """
    foreground = a.any(0) | b.any(0)  # background-only voxels add nothing
    a, b = a[:, foreground], b[:, foreground]
    labels = np.arange(1, num_classes)
    inter = np.zeros((len(labels), len(a), len(b)))
    count_a, count_b = np.zeros((len(labels), len(a))), np.zeros((len(labels), len(b)))
    step = max(1, CHUNK_ELEMENTS // max(len(a), len(b)))
    for start in range(0, a.shape[1], step):
        ca, cb = a[:, start : start + step], b[:, start : start + step]
        for i, lab in enumerate(labels):
            fa, fb = (ca == lab).astype(np.float32), (cb == lab).astype(np.float32)
            inter[i] += fa @ fb.T
            count_a[i] += fa.sum(1, dtype=np.float64)
            count_b[i] += fb.sum(1, dtype=np.float64)
    denom = count_a[:, :, None] + count_b[:, None, :]
    dice_sum = np.divide(2.0 * inter, denom, out=np.zeros(denom.shape), where=denom > 0).sum(0)
    n_valid = (denom > 0).sum(0)
    return np.where(n_valid > 0, dice_sum / np.maximum(n_valid, 1), 1.0)


def _mean(x: np.ndarray) -> float | None:
    """Mean of the non-NaN values, None if there are none."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (0 for a single value)."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _label_metrics(gen: dict, real: dict, j: int, voxel_ml: float, single: bool) -> dict:
    """Metrics of label column ``j`` from stacked gen/real stats (see ``evaluate_masks``)."""
    vol_g, vol_r = gen["count"][:, j] * voxel_ml, real["count"][:, j] * voxel_ml
    real_mean = float(vol_r.mean())
    w1 = float(stats.wasserstein_distance(vol_g, vol_r))
    out = {
        "volume_ml_gen_mean": float(vol_g.mean()),
        "volume_ml_gen_sd": _sd(vol_g),
        "volume_ml_real_mean": real_mean,
        "volume_ml_real_sd": _sd(vol_r),
        "volume_w1_ml": w1,
        "volume_w1_rel": w1 / real_mean if real_mean > 0 else None,
        "volume_bias_rel": (float(vol_g.mean()) - real_mean) / real_mean if real_mean > 0 else None,
    }
    for tag, s in (("gen", gen), ("real", real)):
        present = s["count"][:, j] > 0
        comps = s["components"][:, j]
        out[f"presence_{tag}"] = float(present.mean())
        out[f"components_{tag}"] = _mean(comps[present])
        out[f"fragmented_{tag}"] = float((comps > 1).mean()) if single else None
        out[f"z_continuity_{tag}"] = _mean(s["z_continuity"][:, j])
        out[f"z_first_{tag}"] = _mean(s["z_first"][:, j])
        out[f"z_last_{tag}"] = _mean(s["z_last"][:, j])
    return out


def _memorisation(gen: np.ndarray, real: np.ndarray, num_classes: int) -> dict:
    """Nearest-real Dice of generated masks, and nearest-other-real Dice of real masks."""
    nearest = _pairwise_dice(gen, real, num_classes).max(1)
    out = {
        "nearest_real_dice_mean": float(nearest.mean()),
        "nearest_real_dice_max": float(nearest.max()),
        "real_real_nearest_dice_mean": None,
        "real_real_nearest_dice_max": None,
    }
    if len(real) > 1:
        rr = _pairwise_dice(real, real, num_classes)
        np.fill_diagonal(rr, -np.inf)
        out["real_real_nearest_dice_mean"] = float(rr.max(1).mean())
        out["real_real_nearest_dice_max"] = float(rr.max())
    return out


def evaluate_masks(
    generated: list[np.ndarray],
    real: list[np.ndarray],
    label_set: LabelSet,
    spacing=(1.0, 1.0, 1.0),
) -> dict:
    """Compare generated label volumes with real ones; all ``(H, W, D)`` on one grid.

    ``spacing`` is the voxel size in mm. Returns a JSON-serialisable dict (None where a value is
    undefined, e.g. for a label never present)::

        {"n_generated", "n_real", "spacing_mm",
         "labels": {name: {
            "volume_ml_{gen,real}_{mean,sd}",  # label volume per mask (ml), absent = 0
            "volume_w1_ml", "volume_w1_rel",    # 1D Wasserstein gen vs real volumes; / real mean
            "volume_bias_rel",                  # (gen mean - real mean) / real mean
            "presence_{gen,real}",              # fraction of masks holding the label
            "components_{gen,real}",            # mean 26-connected components where present
            "fragmented_{gen,real}",            # single-component labels: fraction with >1 piece
            "z_continuity_{gen,real}",          # mean Dice of consecutive axial slices
            "z_first_{gen,real}", "z_last_{gen,real}"}},  # mean first/last slice index / D
         "summary": {SUMMARY_KEYS: mean over labels,
            "nearest_real_dice_{mean,max}",     # generated -> nearest real, mean foreground Dice
            "real_real_nearest_dice_{mean,max}"}}  # real -> nearest other real: the reference
    """
    if not generated or not real:
        raise ValueError(f"need generated and real masks, got {len(generated)} and {len(real)}")
    generated, real = [np.asarray(m) for m in generated], [np.asarray(m) for m in real]
    k = label_set.num_classes
    shape = real[0].shape
    if len(shape) != 3:
        raise ValueError(f"masks must be 3D (H, W, D), real mask 0 has shape {shape}")
    _check_masks(real, shape, k, "real")
    _check_masks(generated, shape, k, "generated")
    dtype = np.min_scalar_type(k - 1)
    generated = [m.astype(dtype, copy=False) for m in generated]
    real = [m.astype(dtype, copy=False) for m in real]
    gen_stats, real_stats = _stack_stats(generated, k), _stack_stats(real, k)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels = {
        name: _label_metrics(gen_stats, real_stats, j, voxel_ml, name in label_set.single_component)
        for j, name in enumerate(label_set.names[1:])
    }
    summary = {
        key: _mean([m[key] for m in labels.values() if m[key] is not None]) for key in SUMMARY_KEYS
    }
    flat = [np.stack([m.reshape(-1) for m in masks]) for masks in (generated, real)]
    summary.update(_memorisation(*flat, k))
    return {
        "n_generated": len(generated),
        "n_real": len(real),
        "spacing_mm": [float(s) for s in spacing],
        "labels": labels,
        "summary": summary,
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    """``x`` rounded to ``digits`` decimals, a dash for None."""
    return "–" if x is None else f"{x:.{digits}f}"


def _pair(m: dict, key: str) -> str:
    """``'gen / real'`` of ``m[key_gen]`` and ``m[key_real]``."""
    return f"{_fmt(m[f'{key}_gen'])} / {_fmt(m[f'{key}_real'])}"


def markdown_table(metrics: dict) -> str:
    """A markdown report of ``evaluate_masks`` output: one row per label, then memorisation."""
    header = (
        "| label | volume ml gen / real (mean±sd) | W1 ml (rel) | presence gen / real "
        "| components gen / real | fragmented gen / real | z-continuity gen / real "
        "| z-extent gen / real |"
    )
    rows = [
        f"Generated masks: {metrics['n_generated']}, real masks: {metrics['n_real']}.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for name, m in metrics["labels"].items():
        volume = (
            f"{_fmt(m['volume_ml_gen_mean'])}±{_fmt(m['volume_ml_gen_sd'])} / "
            f"{_fmt(m['volume_ml_real_mean'])}±{_fmt(m['volume_ml_real_sd'])}"
        )
        extent = " / ".join(
            f"{_fmt(m[f'z_first_{t}'])}–{_fmt(m[f'z_last_{t}'])}" for t in ("gen", "real")
        )
        cells = [
            name,
            volume,
            f"{_fmt(m['volume_w1_ml'])} ({_fmt(m['volume_w1_rel'])})",
            _pair(m, "presence"),
            _pair(m, "components"),
            _pair(m, "fragmented"),
            _pair(m, "z_continuity"),
            extent,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    s = metrics["summary"]
    rows += [
        "",
        f"Memorisation: nearest-real Dice of generated masks mean "
        f"{_fmt(s['nearest_real_dice_mean'], 3)}, max {_fmt(s['nearest_real_dice_max'], 3)}; "
        f"real-to-nearest-other-real reference mean {_fmt(s['real_real_nearest_dice_mean'], 3)}, "
        f"max {_fmt(s['real_real_nearest_dice_max'], 3)}. "
        "Generated far above the reference suggests copying.",
    ]
    return "\n".join(rows) + "\n"


def _label_paths(doc: dict, path) -> list[str]:
    """The ``label`` files of a datalist's training section."""
    paths = [c["label"] for c in doc.get("training", []) if c.get("label")]
    if not paths:
        raise DataError(
            str(path), "no 'label' entries in its training section", "list the label files there"
        )
    return paths


def _load_label(path: str, label_set: LabelSet) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label values ``(H, W, D)`` of a label file reoriented to RAS, and its voxel size in mm."""
    img = nib.as_closest_canonical(load_volume(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise DataError(path, f"label volume has shape {data.shape}", "expected 3D (H, W, D)")
    bad = [v for v in np.unique(data).tolist() if v not in label_set.source_values]
    if bad:
        raise DataError(
            path,
            f"values {bad[:10]} are not in label set {label_set.name!r}",
            "compare masks of the label set the real datalist declares",
        )
    return label_set.remap(data.astype(np.int64)), tuple(
        float(z) for z in img.header.get_zooms()[:3]
    )


def _record(metrics: dict, generated_datalist, real_datalist, out_dir) -> dict:
    """Add the datalist paths; with ``out_dir`` write ``mask_metrics.json`` and ``.md``."""
    metrics["generated_datalist"] = str(Path(generated_datalist).absolute())
    metrics["real_datalist"] = str(Path(real_datalist).absolute())
    if out_dir is not None:
        write_json(metrics, Path(out_dir) / "mask_metrics.json")
        with atomic_path(Path(out_dir) / "mask_metrics.md") as tmp:
            tmp.write_text(markdown_table(metrics))
    return metrics


def evaluate_against_real(
    generated_datalist, real_datalist, preprocessing, spacing, out_dir=None
) -> dict:
    """Generated masks (model grid) against real masks brought to the model grid.

    ``preprocessing`` is the bundle's transform chain (``common.data.transforms.volume_transforms``
    without one-hot) applied to each real case; ``spacing`` is the generated masks' voxel
    size in mm. With ``out_dir`` writes ``mask_metrics.json`` and ``mask_metrics.md``.
    """
    real_doc, gen_doc = read_datalist(real_datalist), read_datalist(generated_datalist)
    label_set = datalist_label_set(real_doc, real_datalist)
    real = [
        np.asarray(preprocessing(case)["label"][0]).round().astype(np.int64)
        for case in real_doc["training"]
    ]
    gen = [_load_label(p, label_set)[0] for p in _label_paths(gen_doc, generated_datalist)]
    metrics = evaluate_masks(gen, real, label_set, tuple(float(s) for s in spacing))
    return _record(metrics, generated_datalist, real_datalist, out_dir)
