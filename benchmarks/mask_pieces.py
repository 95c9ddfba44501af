"""What the pieces of generated masks are: specks or real fragments (issue #18).

"Pieces per label" counts every 26-connected piece. This splits that count by size, per label
over the given raw volumes: the pieces, the share of them with at most ``SPECK`` voxels, the
pieces larger than that, and the share of the label's voxels outside its largest piece (what
keep-largest deletes)::

    python -m benchmarks.mask_pieces "OUT/rflow_volumes/RFLOW-10 bf16" --labels \\
        esophagus,heart,trachea,aorta

The folder holds ``benchmarks/objectives.py``'s kept volumes (``seed<k>.npz``, key ``mask``).
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
from scipy import ndimage

from common.masks.metrics import CONNECTIVITY

SPECK = 5  # voxels


def pieces(mask: np.ndarray, label: int) -> np.ndarray:
    """Sizes (voxels) of the 26-connected pieces of ``label`` in ``mask (H, W, D)``, largest
    first."""
    parts, count = ndimage.label(mask == label, CONNECTIVITY)
    return np.sort(np.bincount(parts.ravel(), minlength=count + 1)[1:])[::-1]


def label_row(masks: list[np.ndarray], label: int) -> dict:
    """Means over ``masks``: pieces, share of specks, pieces above ``SPECK`` voxels, share of
    voxels outside the largest piece (a volume without the label counts 0 pieces)."""
    rows = []
    for mask in masks:
        sizes = pieces(mask, label)
        if not len(sizes):
            rows.append((0, 0.0, 0, 0.0))
            continue
        specks = int((sizes <= SPECK).sum())
        rows.append(
            (len(sizes), specks / len(sizes), len(sizes) - specks, 1 - sizes[0] / sizes.sum())
        )
    n, speck_share, large, outside = np.mean(rows, axis=0)
    return {"pieces": n, "speck_share": speck_share, "large": large, "outside_largest": outside}


def main(folder: str, labels: str | tuple = "esophagus,heart,trachea,aorta") -> None:
    """Print the table for the ``seed*.npz`` volumes in ``folder`` (labels 1..K named)."""
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    files = sorted(Path(folder).glob("seed*.npz"))
    masks = [np.load(f)["mask"] for f in files]
    print(f"{len(masks)} volumes in {folder}\n")
    head = f"| label | pieces | <= {SPECK} voxels | pieces > {SPECK} voxels | outside the largest |"
    print(head)
    print("|---|---|---|---|---|")
    for k, name in enumerate(names, start=1):
        r = label_row(masks, k)
        print(
            f"| {name} | {r['pieces']:.0f} | {r['speck_share']:.0%} | {r['large']:.1f} | "
            f"{r['outside_largest']:.0%} |"
        )


if __name__ == "__main__":
    fire.Fire(main)
