"""The demo's figures and ``report.md``: tables, timings, montages and volume histograms."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import monai  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.core.io import atomic_path, read_json  # noqa: E402
from common.data.datalists import datalist_label_set, read_datalist  # noqa: E402
from common.images.metrics import markdown_table as image_table  # noqa: E402
from common.masks.metrics import markdown_table as mask_table  # noqa: E402
from common.seg.agreement import markdown_table as agreement_table  # noqa: E402
from medgen3d.preview import PreviewCase, load_case, montage  # noqa: E402


def _cases(datalist: Path, rows: int, key: str = "image", prefix: str = "") -> list[PreviewCase]:
    """The first ``rows`` cases of a datalist, ``key`` as the image, titled by case name."""
    entries = read_datalist(datalist)["training"][:rows]
    return [load_case(e[key], e["label"], f"{prefix}{e.get('case', '')}") for e in entries]


def _masks_only(cases: list[PreviewCase]) -> list[PreviewCase]:
    """The same cases with a blank image, so that the montage shows the masks alone."""
    return [PreviewCase(np.zeros_like(c.image), c.label, c.spacing, c.title) for c in cases]


def _interleave(a: list, b: list) -> list:
    return [x for pair in zip(a, b) for x in pair]


def label_volumes_ml(datalist: Path) -> dict[str, np.ndarray]:
    """Per label (background excluded): the volume in ml of every case of a datalist."""
    doc = read_datalist(datalist)
    names = datalist_label_set(doc, datalist).names
    volumes = {name: [] for name in names[1:]}
    for case in doc["training"]:
        img = nib.load(case["label"])
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        counts = np.bincount(np.asarray(img.dataobj).astype(np.int64).ravel(), minlength=len(names))
        for value, name in enumerate(names[1:], 1):
            volumes[name].append(counts[value] * voxel_ml)
    return {k: np.asarray(v) for k, v in volumes.items()}


def volume_histograms(real: Path, synthetic: Path, out: Path) -> Path:
    """One panel per label: histograms of real vs synthetic label volumes (ml)."""
    real_ml, syn_ml = label_volumes_ml(real), label_volumes_ml(synthetic)
    fig, axes = plt.subplots(1, len(real_ml), figsize=(3.2 * len(real_ml), 2.8), squeeze=False)
    for ax, name in zip(axes[0], real_ml):
        values = np.concatenate([real_ml[name], syn_ml[name]])
        bins = np.linspace(values.min(), values.max() + 1e-6, 12)
        ax.hist(real_ml[name], bins=bins, alpha=0.6, label=f"real (n={len(real_ml[name])})")
        ax.hist(syn_ml[name], bins=bins, alpha=0.6, label=f"synthetic (n={len(syn_ml[name])})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("volume (ml)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("cases", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def demo_figures(
    fig_dir: Path, real_grid: Path, synthetic: Path, from_real: Path, rows: int = 3
) -> dict[str, Path]:
    """The demo's PNGs, each real and synthetic on one model grid, in three views.

    ``real_vs_synthetic``: real (held-out) and synthetic pairs row by row, masks overlaid;
    ``masks``: the same masks alone; ``from_real_masks``: for real masks, the real image, the
    sequence generator's and the refined image; ``label_volumes``: volume histograms.
    """
    fig_dir = Path(fig_dir)
    real = _cases(real_grid, rows, prefix="real ")
    syn = _cases(synthetic, rows)  # named synthetic_NNNN
    pairs = _interleave(real, syn)
    made = []
    for case in read_datalist(from_real)["training"][:2]:
        name = case.get("case", "")
        made += [
            load_case(case["image_sequence"], case["label"], f"{name} sequence gen."),
            load_case(case["image"], case["label"], f"{name} refined"),
        ]
    names = list(datalist_label_set(read_datalist(real_grid), real_grid).names)
    return {
        "real_vs_synthetic": montage(pairs, fig_dir / "real_vs_synthetic.png", names=names),
        "masks": montage(_masks_only(pairs), fig_dir / "masks.png", alpha=1.0, names=names),
        "from_real_masks": montage(
            [c for i, r in enumerate(real[:2]) for c in (r, *made[2 * i : 2 * i + 2])],
            fig_dir / "from_real_masks.png",
            alpha=0.15,
            names=names,
        ),
        "label_volumes": volume_histograms(real_grid, synthetic, fig_dir / "label_volumes.png"),
    }


def _demote(markdown: str) -> str:
    """Headings one level down, to nest a section's own markdown in the report."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.split("\n"))


def seg_protocol(splits: Path) -> str:
    """The segmentation study's protocol in words, from its ``splits.json``."""
    doc = read_json(splits)
    train, val, test = (len(doc[f"real_{k}"]) for k in ("train", "val", "test"))
    synthetic = len(doc.get("synthetic_pool", []))
    return (
        f"The paper's protocol: the segmenter learns from the generators' own training cases "
        f"({train} real cases train, {val} validate and pick the best checkpoint; the "
        f"synthetic regimes add {synthetic} synthetic pairs) and is tested on the {test} "
        "held-out cases that neither the generators nor the segmenter saw. Every regime runs "
        "the same number of optimiser steps (`steps`), once per seed; ± is the standard "
        "deviation over seeds, and each difference to E2-1 comes with a 95% bootstrap interval "
        "(test cases and seeds resampled with replacement, paired; `seg_study/statistics.json`)."
    )


def write_report(run, weights, results: dict, seg: str, figures: dict, settings: dict) -> Path:
    """Write ``run.out/report.md``: setup, timings, mask / image / segmentation tables and
    the figures (linked relative to the report)."""
    out = Path(run.out)
    total = sum(s for _, s in run.timings)
    timing_rows = [f"| {title} | {seconds:.0f} |" for title, seconds in run.timings]
    figure_lines = [
        f"![{name}]({Path(path).relative_to(out).as_posix()})" for name, path in figures.items()
    ]
    lines = [
        f"# MedGen3D demo report: {run.dataset}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; command: `{' '.join(sys.argv)}`",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}"
        f", device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        f"- cohort: {settings['cases']} {run.dataset} demo cases (seed {settings['seed']}); the "
        f"first {settings['cases'] - settings['heldout']} train the generators, the last "
        f"{settings['heldout']} are held out for every evaluation below",
        f"- weights: {weights.source}; scale `{settings['scale']}`",
        f"- generation: {settings['n']} paired volumes, masks by {settings['sampler']}-"
        f"{settings['steps']}, images by the sequence generator then the three-view refiner",
        "",
        "## Timings",
        "",
        "| step | seconds |",
        "|---|---|",
        *timing_rows,
        f"| **total** | **{total:.0f}** |",
        "",
        "A rerun into the same folder keeps finished volumes and study stages, so its timings "
        "count only the work it redid.",
        "",
        "## Masks: synthetic vs held-out real (model grid)",
        "",
        "As written, after keep-largest (the largest piece of each single-piece organ):",
        "",
        _demote(mask_table(results["masks"])),
        "",
        "As sampled (the same seeds, before keep-largest):",
        "",
        _demote(mask_table(results["masks_raw"])),
        "",
        "## Images made from the held-out real masks, vs their real images (paired)",
        "",
        image_table(results["images_paired"]),
        "",
        "## Images of the synthetic pairs vs the held-out real images (unpaired)",
        "",
        image_table(results["images_unpaired"]),
        "",
        "## Downstream segmentation (seg_downstream bundle)",
        "",
        seg_protocol(out / "seg_study" / "splits.json"),
        "",
        _demote(seg),
        "",
        "## Mask-image agreement (the first E2-1 segmenter, trained on real cases)",
        "",
        "Its raw prediction (argmax, model grid) on each synthetic image against the generated "
        "mask, next to its Dice on the held-out real test images against their labels; median "
        "intensity inside each label from the files (`agreement/agreement.json`).",
        "",
        agreement_table(results["agreement"]),
        "",
        "## Figures",
        "",
        "Radiological view (patient right on the image left). Rows alternate real held-out "
        "and synthetic cases; coronal and sagittal panels cut through the label centre.",
        "",
        *figure_lines,
        "",
        "Files: `synthetic/datalist.json` (the pairs, a decathlon datalist), `evaluation/`, "
        "`seg_study/`, `from_real_masks/`, `real_model_space/`.",
        "",
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
