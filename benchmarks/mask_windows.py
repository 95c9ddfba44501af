"""Where MC-DPM's raw masks break along z, and whether more given slices per window help.

For each number of given slices (``--given 4,8``; the network trains with ``n`` to ``m - 1``),
samples ``--volumes`` raw volumes (seeds 0.., the config's sampler and steps, first window in
the middle) from ``CKPT`` and reports their quality against the held-out ``REAL`` masks
(pieces, z-continuity, volume W1) and, per label, the Dice of consecutive slices (as
z-continuity counts them) split into pairs across a window seam and pairs inside a window::

    OMP_NUM_THREADS=1 python -m benchmarks.mask_windows REAL CKPT --scale standard \\
        --given 4,8,12 --volumes 2 --out OUT.json
"""

from __future__ import annotations

import fire
import numpy as np

from benchmarks import suite
from common.core.io import write_json
from common.masks.metrics import slice_pair_dice
from common.masks.windows import extension_plan


def seam_slices(depth: int, m: int, n: int, z0: int) -> set[int]:
    """Slices ``z`` whose pair ``(z - 1, z)`` crosses a seam: ``z`` is a window's first new
    slice next to its given ones (``extension_plan`` from a first window at ``z0``)."""
    seams = set()
    for step in extension_plan(depth, m, n, z0):
        if step.direction == "forward":
            seams.add(step.start + step.given)
        elif step.direction == "backward":
            seams.add(step.start + m - step.given)
    return seams


def seam_table(volumes: list[np.ndarray], seams: set[int], names: list[str]) -> dict:
    """Per label name: the mean Dice of consecutive slices (``slice_pair_dice``, as the
    z-continuity metric counts them) over pairs whose upper slice is a seam and over the
    others, with their counts."""
    dice = np.concatenate([slice_pair_dice(v, len(names)) for v in volumes], 1)  # (K-1, P)
    upper = np.concatenate([np.arange(1, v.shape[-1]) for v in volumes])
    at_seam = np.isin(upper, sorted(seams))
    table = {}
    for name, row in zip(names[1:], dice):
        at, inside = row[at_seam & ~np.isnan(row)], row[~at_seam & ~np.isnan(row)]
        table[name] = {
            "seam": float(at.mean()) if at.size else None,
            "seam_pairs": int(at.size),
            "inside": float(inside.mean()) if inside.size else None,
            "inside_pairs": int(inside.size),
        }
    return table


def main(
    real: str,
    ckpt: str | None,
    scale: str = "demo",
    given: str | int | tuple = "",
    volumes: int = 2,
    out: str | None = None,
) -> list[dict]:
    """One row per number of given slices (default: the preset's ``n``); ``ckpt`` None
    samples an untrained network (tests)."""
    reference = suite.real_masks(real, scale)
    names = reference[1].names
    base = suite.mask_config(scale)
    counts = suite.numbers(given, int) or [int(base["n"])]
    rows = []
    for n in counts:
        config = suite.mask_config(scale, n=n)
        pipeline = suite.changed(suite.mask_pipeline(config, ckpt), batch_size=volumes)
        masks, seconds = suite.sample_timed(pipeline, range(volumes))
        depth, m = pipeline.spatial_size[2], pipeline.m
        seams = seam_slices(depth, m, n, (depth - m) // 2)
        rows.append(
            {
                "given": n,
                "s_per_call": float(np.median(seconds)),
                "raw": suite.quality(masks, reference),
                "slice_dice": seam_table(masks, seams, names),
            }
        )
        print(rows[-1], flush=True)
    if out:
        write_json({"real": real, "ckpt": ckpt, "scale": scale, "rows": rows}, out)
    return rows


if __name__ == "__main__":
    fire.Fire(main)
