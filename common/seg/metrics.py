"""Segmentation quality on held-out cases: Dice and HD95 (mm) per label, and their tables.

The metric objects are MONAI's (``DiceMetric``, ``HausdorffDistanceMetric``); the evaluator's
handlers collect per-case values ``(n_cases, K-1)`` (background excluded) in
``engine.state.metric_details``. ``summarise`` turns them into per-label means and the overall
mean; ``write_metrics`` keeps them with the per-case values; ``markdown_table`` and
``write_results`` lay out a study as the paper's tables (rows = regimes, columns = networks),
with the spread over seeds and each regime's difference to E2-1 (``common.seg.statistics``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric

from common.core.io import atomic_path, write_json
from common.seg.statistics import bootstrap_difference, case_means, mean_sd


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
    ``{"dice": "val_mean_dice", "hd95": "val_hd95"}``. metrics.json also holds the per-case
    values (``per_case[metric]``: ``(n_cases, K-1)`` lists, in the evaluation's case order).
    Returns the summary.
    """
    details = {metric: state.metric_details[key] for metric, key in names.items()}
    summary = summarise(details, label_names)
    per_case = {
        m: torch.as_tensor(v, dtype=torch.float64).reshape(-1, len(label_names) - 1).tolist()
        for m, v in details.items()
    }
    out_dir = Path(out_dir)
    write_json({**summary, "per_case": per_case}, out_dir / "metrics.json")
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
    cells: Mapping[tuple[str, str], float | str],
    rows: Sequence[str],
    columns: Sequence[str],
    fmt: str = "{:.3f}",
) -> str:
    """Markdown table of ``cells[(row, column)]``, e.g. rows = regimes, columns = networks.

    Numbers are shown with ``fmt``, text as it is; missing or non-finite cells read ``-``.
    """
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [cells.get((row, column)) for column in columns]
        shown = [
            v if isinstance(v, str) else "-" if v is None or not math.isfinite(v) else fmt.format(v)
            for v in values
        ]
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _mean_sd(mean: float, sd: float, fmt: str = "{:.3f}") -> str:
    """``mean ± sd`` (the mean alone for one seed); ``-`` when there is no mean."""
    if not math.isfinite(mean):
        return "-"
    return f"{fmt.format(mean)} ± {fmt.format(sd)}" if math.isfinite(sd) else fmt.format(mean)


def _interval(d: float, low: float, high: float) -> str:
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]" if math.isfinite(d) else "-"


def _steps(runs: Sequence[Mapping]) -> str:
    """A regime's optimiser steps, e.g. ``240`` or ``360 (240 + 120)`` (its stages); the range
    over seeds when they differ (early stopping)."""
    totals = sorted({sum(r["steps"]) for r in runs})
    shown = str(totals[0]) if len(totals) == 1 else f"{totals[0]}-{totals[-1]}"
    parts = runs[0]["steps"]
    return shown + (f" ({' + '.join(map(str, parts))})" if len(parts) > 1 else "")


def study_statistics(
    runs: Sequence[Mapping],
    regimes: Sequence[str],
    compared: Sequence[str] = (),
    reference: str = "E2-1",
    seed: int = 0,
) -> dict:
    """One network's evaluations ``runs`` (``regime``, ``seed``, ``steps``, ``write_metrics``
    summary) -> ``{regime: {"seeds", "steps", "dice": {label: [mean, sd]}, "hd95": [mean, sd],
    "difference": {label: [d, low, high]}}}``.

    Labels include ``mean`` (each case's mean over its labels). ``difference``: for each of
    ``compared``, its Dice minus that of ``reference``, paired by seed and case (a seeded
    bootstrap, ``seed``).
    """
    labels = [k for k in runs[0]["dice"] if k != "mean"]
    by_regime = {
        g: sorted((r for r in runs if r["regime"] == g), key=lambda r: r["seed"]) for g in regimes
    }

    def scores(regime: str) -> dict[str, np.ndarray]:
        """``{label: (seeds, cases)}`` Dice of a regime."""
        dice = np.array([r["per_case"]["dice"] for r in by_regime[regime]], dtype=np.float64)
        return {"mean": case_means(dice), **{k: dice[..., i] for i, k in enumerate(labels)}}

    base = scores(reference) if compared else {}
    out = {}
    for regime in regimes:
        own, evaluated = scores(regime), by_regime[regime]
        out[regime] = {
            "seeds": [r["seed"] for r in evaluated],
            "steps": _steps(evaluated),
            "dice": {k: list(mean_sd(v)) for k, v in own.items()},
            "hd95": list(mean_sd([[r["hd95"]["mean"]] for r in evaluated])),
        }
        if regime in compared:
            out[regime]["difference"] = {
                k: list(bootstrap_difference(v, base[k], seed=seed)) for k, v in own.items()
            }
    return out


def _network_tables(
    net: str, stats: Mapping, regimes: Sequence[str], compared: Sequence[str], reference: str
) -> list[str]:
    """Markdown lines: a network's steps and Dice per label, then its differences to E2-1."""
    labels = list(stats[regimes[0]]["dice"])
    cells = {(g, "steps"): stats[g]["steps"] for g in regimes}
    cells |= {(g, k): _mean_sd(*stats[g]["dice"][k]) for g in regimes for k in labels}
    md = [
        "",
        f"## {net}: optimiser steps (sum over the regime's stages) and Dice per label",
        "",
        markdown_table(cells, regimes, ["steps", *labels]),
    ]
    if compared:
        diffs = {(g, k): _interval(*stats[g]["difference"][k]) for g in compared for k in labels}
        md += [
            "",
            f"## {net}: Dice difference to {reference} with its 95% bootstrap interval "
            "(test cases and seeds resampled, paired)",
            "",
            markdown_table(diffs, compared, labels),
        ]
    return md


def write_results(
    runs: Sequence[Mapping],
    regimes: Sequence[str],
    networks: Sequence[str],
    out: Path,
    compared: Sequence[str] = (),
    reference: str = "E2-1",
    seed: int = 0,
) -> str:
    """``results.{csv,json,md}`` and ``statistics.json`` (``study_statistics`` per network) of
    a study's evaluations ``runs`` (dicts with ``regime``, ``network``, ``seed``, ``steps``:
    one count per stage, and a ``write_metrics`` summary).

    Returns the markdown: mean Dice (mean ± sd over seeds) and mean HD95 with rows = regimes,
    columns = networks (the paper's layout); per network each regime's steps and Dice per
    label, and the difference of each of ``compared`` to ``reference`` with its 95%
    bootstrap interval.
    """
    rows = [
        [r["network"], r["regime"], r["seed"], sum(r["steps"]), label]
        + [f"{r['dice'][label]:.4f}", f"{r['hd95'][label]:.2f}"]
        for r in runs
        for label in r["dice"]
    ]
    header = ["network", "regime", "seed", "steps", "label", "dice", "hd95_mm"]
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    write_json(list(runs), out / "results.json")
    stats = {
        net: study_statistics(
            [r for r in runs if r["network"] == net], regimes, compared, reference, seed
        )
        for net in networks
    }
    write_json(stats, out / "statistics.json")
    seeds = len(stats[networks[0]][regimes[0]]["seeds"])
    dice = {(g, n): _mean_sd(*stats[n][g]["dice"]["mean"]) for n in networks for g in regimes}
    hd95 = {(g, n): _mean_sd(*stats[n][g]["hd95"], "{:.1f}") for n in networks for g in regimes}
    md = [
        f"## Mean Dice on {runs[0]['n_cases']} held-out real cases, {seeds} seed(s) "
        "(mean ± sd over seeds; background excluded)",
        "",
        markdown_table(dice, regimes, networks),
        "",
        "## Mean HD95 (mm)",
        "",
        markdown_table(hd95, regimes, networks),
    ]
    for net in networks:
        md += _network_tables(net, stats[net], regimes, compared, reference)
    text = "\n".join(md) + "\n"
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return text
