"""PNG montages of volumes with their masks overlaid: axial slices, coronal and sagittal."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from common.core.io import atomic_path, load_volume  # noqa: E402
from common.data.datalists import datalist_label_set, read_datalist  # noqa: E402

LABEL_COLOURS = plt.get_cmap("tab10").colors


@dataclass
class PreviewCase:
    """One row of a montage: image and label ``(H, W, D)`` in RAS, voxel ``spacing`` in mm."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    title: str


def load_case(image_path: str, label_path: str, title: str) -> PreviewCase:
    """Read a pair from disk and reorient it to RAS for display."""
    img = nib.as_closest_canonical(load_volume(image_path))
    lab = nib.as_closest_canonical(load_volume(label_path))
    return PreviewCase(
        np.asanyarray(img.dataobj, dtype=np.float32).squeeze(),
        np.asanyarray(lab.dataobj).squeeze().astype(np.int16),
        tuple(float(s) for s in img.header.get_zooms()[:3]),
        title,
    )


def _panels(case: PreviewCase, n_axial: int):
    """Yield ``(image_2d, label_2d, aspect, name)`` panels, rows = display vertical."""
    sx, sy, sz = case.spacing
    zs = np.nonzero(case.label.reshape(-1, case.label.shape[2]).any(0))[0]
    lo, hi = (zs.min(), zs.max()) if zs.size else (0, case.label.shape[2] - 1)
    centre = [
        int(c.mean()) if c.size else s // 2
        for c, s in zip(np.nonzero(case.label), case.label.shape)
    ]
    for z in np.linspace(lo, hi, n_axial + 2)[1:-1].round().astype(int):
        yield case.image[::-1, :, z].T, case.label[::-1, :, z].T, sy / sx, f"axial z={z}"
    cor = (case.image[::-1, centre[1], :].T, case.label[::-1, centre[1], :].T)
    yield *cor, sz / sx, "coronal"
    yield case.image[centre[0], :, :].T, case.label[centre[0], :, :].T, sz / sy, "sagittal"


def montage(
    cases: list[PreviewCase],
    out: str | Path,
    n_axial: int = 4,
    alpha: float = 0.4,
    names: list[str] | None = None,
) -> Path:
    """Write a PNG: one row per case, ``n_axial`` axial slices then coronal and sagittal.

    Image grey values are scaled by the case's 0.5-99.5 percentiles; labels are coloured
    (background transparent), with a legend of their ``names`` (value order) when given. RAS
    arrays (+x = patient right) are shown in radiological view: patient right on the image
    left, anterior up (axial), superior up (coronal, sagittal).
    """
    cols = n_axial + 2
    fig, axes = plt.subplots(
        len(cases), cols, figsize=(2.2 * cols, 2.4 * len(cases)), squeeze=False
    )
    n_labels = max(int(c.label.max()) for c in cases) + 1
    cmap = ListedColormap(
        [(0, 0, 0, 0)] + [(*LABEL_COLOURS[(i - 1) % 10], 1.0) for i in range(1, n_labels)]
    )
    for row, case in zip(axes, cases):
        vmin, vmax = np.percentile(case.image, [0.5, 99.5])
        for ax, (img, lab, aspect, name) in zip(row, _panels(case, n_axial)):
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect)
            shown = np.ma.masked_where(lab == 0, lab)
            ax.imshow(
                shown,
                cmap=cmap,
                vmin=0,
                vmax=n_labels - 1,
                alpha=alpha,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
            ax.set_title(f"{case.title} {name}", fontsize=7)
            ax.axis("off")
    handles = [
        Patch(color=cmap(v), label=names[v]) for v in range(1, min(n_labels, len(names or [])))
    ]
    if handles:
        fig.legend(
            handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False
        )
    fig.tight_layout(rect=(0, 0.03 if handles else 0, 1, 1))
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def preview_datalist(
    datalist: str | Path, out: str | Path, cases: int = 3, section: str = "training"
) -> Path:
    """Montage of the first ``cases`` pairs of a datalist section. With a ``labels`` block the
    label files' values become the label set's (a ``source_map``, e.g. FreeSurfer aseg codes,
    is applied) and the legend names them; without one, raw values and no legend."""
    doc = read_datalist(datalist)
    entries = doc.get(section, [])[:cases]
    rows = [
        load_case(e["image"], e["label"], e.get("case", Path(e["image"]).name.split(".")[0]))
        for e in entries
    ]
    if not rows:
        raise ValueError(f"{datalist}: section {section!r} has no cases to preview")
    if "labels" not in doc:
        return montage(rows, out)
    label_set = datalist_label_set(doc, datalist)
    rows = [replace(r, label=label_set.remap(r.label)) for r in rows]
    return montage(rows, out, names=list(label_set.names))
