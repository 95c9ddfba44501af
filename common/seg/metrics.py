"""Segmentation quality on held-out cases: Dice and HD95 (mm) per label, and their tables.

The metric objects are MONAI's (``DiceMetric``, ``HausdorffDistanceMetric``); the evaluator's
handlers collect per-case values ``(n_cases, K-1)`` (background excluded) in
``engine.state.metric_details``. ``summarise`` turns them into per-label means and the overall
mean; ``markdown_table`` and ``write_results`` lay out a study grid as the paper's tables
(rows = regimes, columns = networks).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric

from common.core.io import atomic_path, write_json


def voxel_spacing(y: torch.Tensor) -> list[list[float]] | None:
    """Voxel size in mm of every item of a batch ``(B, C, *spatial)``; None without an affine."""
    if not isinstance(y, MetaTensor):
        return None
    dims = y.ndim - 2
    affines = torch.as_tensor(y.affine).reshape(-1, dims + 1, dims + 1)
    spacing = [affine_to_spacing(a, r=dims).tolist() for a in affines]
    return spacing * y.shape[0] if len(spacing) == 1 else spacing


class HausdorffDistance95(HausdorffDistanceMetric):
    """95th-percentile Hausdorff distance in mm, background excluded.

    Unlike the plain MONAI metric (voxel units unless ``spacing`` is passed, and the ignite
    handler passes none) the spacing of each case is read from the affine of its label
    ``y (B, K, *spatial)`` (a MetaTensor, as the bundle's transforms produce).
    """

    def __init__(self, include_background: bool = False, reduction: str = "mean"):
        super().__init__(include_background=include_background, percentile=95, reduction=reduction)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("spacing") is None:
            kwargs["spacing"] = voxel_spacing(y)
        return super()._compute_tensor(y_pred, y, **kwargs)


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarise(details: Mapping[str, torch.Tensor], label_names: Sequence[str]) -> dict:
    """Per-case metric tensors ``{"dice": (N, K-1), "hd95": (N, K-1)}`` -> a summary dict.

    ``label_names`` are the K names (background first). Returns
    ``{"n_cases": N, "dice": {"mean": .., "<label>": ..}, "hd95": {...}}``; a label absent
    from a case (NaN/inf) is left out of that label's mean, the overall mean averages labels.
    """
    out: dict = {}
    for metric, values in details.items():
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1, len(label_names) - 1)
        out["n_cases"] = values.shape[0]
        per_label = {
            name: _nanmean(values[:, i].tolist()) for i, name in enumerate(label_names[1:])
        }
        out[metric] = {"mean": _nanmean(list(per_label.values())), **per_label}
    return out


def write_metrics(
    state, label_names: Sequence[str], out_dir: str | Path, names: Mapping[str, str]
) -> dict:
    """Summarise an evaluator's ``state.metric_details`` into ``out_dir/metrics.{json,csv}``.

    ``names`` maps summary names to the evaluator's metric names, e.g.
    ``{"dice": "val_mean_dice", "hd95": "val_hd95"}``. Returns the summary.
    """
    details = {metric: state.metric_details[key] for metric, key in names.items()}
    summary = summarise(details, label_names)
    out_dir = Path(out_dir)
    write_json(summary, out_dir / "metrics.json")
    with atomic_path(out_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *names])
        for label in ["mean", *label_names[1:]]:
            writer.writerow([label, *(f"{summary[m][label]:.4f}" for m in names)])
    return summary


def report(
    state, label_names: Sequence[str], out_dir: str | Path, metric_names: Mapping[str, str]
) -> str:
    """``write_metrics`` then the markdown ``summary_table`` (the evaluate config prints it)."""
    return summary_table(write_metrics(state, label_names, out_dir, metric_names))


def summary_table(summary: Mapping) -> str:
    """Markdown table of a ``summarise`` result: one row per label and the mean (Dice, HD95,
    and the Dice on each case's own grid when the summary has ``dice_own_grid``)."""
    own = "dice_own_grid" in summary
    lines = [
        "| label | Dice | HD95 (mm) |" + (" Dice, own grid |" if own else ""),
        "|---|---|---|" + ("---|" if own else ""),
    ]
    for label, dice in summary["dice"].items():
        cells = f"| {label} | {dice:.3f} | {summary['hd95'][label]:.1f} |"
        lines.append(cells + (f" {summary['dice_own_grid'][label]:.3f} |" if own else ""))
    return "\n".join(lines)


def markdown_table(
    cells: Mapping[tuple[str, str], float],
    rows: Sequence[str],
    columns: Sequence[str],
    fmt: str = "{:.3f}",
) -> str:
    """Markdown table of ``cells[(row, column)]``, e.g. rows = regimes, columns = networks.

    Missing or non-finite cells read ``-``.
    """
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [cells.get((row, column)) for column in columns]
        shown = ["-" if v is None or not math.isfinite(v) else fmt.format(v) for v in values]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def write_results(
    results: Mapping[tuple[str, str], dict],
    regimes: Sequence[str],
    networks: Sequence[str],
    out: Path,
) -> str:
    """``results.{csv,json,md}`` of a study grid ``results[(regime, network)]`` (summaries).

    Returns the markdown: mean Dice and mean HD95 with rows = regimes, columns = networks (the
    paper's layout), then Dice per label for each network.
    """
    rows = [
        [network, regime, label, f"{r['dice'][label]:.4f}", f"{r['hd95'][label]:.2f}"]
        for (regime, network), r in results.items()
        for label in r["dice"]
    ]
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([["network", "regime", "label", "dice", "hd95_mm"], *rows])
    write_json(
        [{"regime": k[0], "network": k[1], **v} for k, v in results.items()], out / "results.json"
    )

    def mean(metric: str) -> dict:
        return {key: r[metric]["mean"] for key, r in results.items()}

    n_test = next(iter(results.values()))["n_cases"]
    md = [
        f"## Mean Dice on {n_test} held-out real cases (background excluded)",
        "",
        markdown_table(mean("dice"), regimes, networks),
        "",
        "## Mean HD95 (mm)",
        "",
        markdown_table(mean("hd95"), regimes, networks, "{:.1f}"),
    ]
    for network in networks:
        labels = [k for k in results[(regimes[0], network)]["dice"] if k != "mean"]
        cells = {
            (g, label): results[(g, network)]["dice"][label] for g in regimes for label in labels
        }
        md += ["", f"## Dice per label, {network}", "", markdown_table(cells, regimes, labels)]
    text = "\n".join(md) + "\n"
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return text
