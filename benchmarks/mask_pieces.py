"""What the pieces of generated masks are: specks or real fragments (issue #18).

"Pieces per label" counts every 26-connected piece. This splits that count by size, per label
over the given raw volumes: the pieces, the share of them with at most ``SPECK`` voxels, the
pieces larger than that, and the share of the label's voxels outside its largest piece (what
keep-largest deletes); and where the specks are: their distance to the label's largest piece
and what surrounds them (background, or another label: a voxel of one organ inside another)::

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


def speck_places(masks: list[np.ndarray], label: int) -> dict:
    """Where the specks (pieces of at most ``SPECK`` voxels, not the largest) of ``label`` are,
    over ``masks (H, W, D)``: ``count``; ``median_distance``, voxels from the speck's nearest
    voxel to the label's largest piece (Euclidean); ``near``, the share within 3 voxels of it;
    ``inside_other``, the share whose 26-neighbour ring is mostly another label (else mostly
    background or the label itself). Distances and shares are None without specks."""
    distances, inside_other = [], []
    for mask in masks:
        parts, count = ndimage.label(mask == label, CONNECTIVITY)
        if count < 2:
            continue
        sizes = np.bincount(parts.ravel(), minlength=count + 1)[1:]
        largest = 1 + int(sizes.argmax())
        to_largest = ndimage.distance_transform_edt(parts != largest)
        for piece in np.flatnonzero(sizes <= SPECK) + 1:
            if piece == largest:
                continue
            voxels = parts == piece
            ring = ndimage.binary_dilation(voxels, CONNECTIVITY) & ~voxels
            around = np.bincount(mask[ring].astype(np.int64))
            distances.append(float(to_largest[voxels].min()))
            inside_other.append(int(around.argmax()) not in (0, label))
    if not distances:
        return {"count": 0, "median_distance": None, "near": None, "inside_other": None}
    return {
        "count": len(distances),
        "median_distance": float(np.median(distances)),
        "near": float(np.mean(np.array(distances) <= 3)),
        "inside_other": float(np.mean(inside_other)),
    }


def main(folder: str, labels: str | tuple = "esophagus,heart,trachea,aorta") -> None:
    """Print the table for the ``seed*.npz`` volumes in ``folder`` (labels 1..K named)."""
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    files = sorted(Path(folder).glob("seed*.npz"))
    masks = [np.load(f)["mask"] for f in files]
    print(f"{len(masks)} volumes in {folder}\n")
    head = (
        f"| label | pieces | <= {SPECK} voxels | pieces > {SPECK} voxels | outside the largest | "
        "specks: median voxels to the largest | within 3 voxels | inside another label |"
    )
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for k, name in enumerate(names, start=1):
        r, w = label_row(masks, k), speck_places(masks, k)
        where = (
            f"{w['median_distance']:.1f} | {w['near']:.0%} | {w['inside_other']:.0%}"
            if w["count"]
            else "- | - | -"
        )
        print(
            f"| {name} | {r['pieces']:.0f} | {r['speck_share']:.0%} | {r['large']:.1f} | "
            f"{r['outside_largest']:.0%} | {where} |"
        )


if __name__ == "__main__":
    fire.Fire(main)
