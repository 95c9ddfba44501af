"""A volume as a sequence of axial slices: windows of ``m`` slices and their start ``z``.

Shapes: volume ``(C, H, W, D)``, windows ``(N, C, H, W, m)``, starts ``(N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.transforms import MapTransform, Randomizable


def window_starts(depth: int, m: int, stride: int | None = None) -> list[int]:
    """Starts of windows of ``m`` slices, ``stride`` apart, covering ``0..depth-1``.

    The last window is moved back to end at ``depth`` so no window leaves the volume.
    """
    stride = stride or m
    if not 1 <= m <= depth:
        raise ValueError(f"window of {m} slices does not fit a volume of {depth} slices")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, depth - m + 1, stride))
    if starts[-1] + m < depth:
        starts.append(depth - m)
    return starts


@dataclass(frozen=True)
class WindowStep:
    """One window of sequential generation: slices ``start..start+m-1``.

    ``given`` slices at the window's low end (``direction="forward"``, growing upward in z)
    or high end (``"backward"``, growing downward) are copied from what exists;
    ``direction="none"`` is the first, unconditional window.
    """

    start: int
    given: int
    direction: str


def extension_plan(depth: int, m: int, n: int, z0: int) -> list[WindowStep]:
    """Windows that grow one window at ``z0`` to cover ``0..depth-1``, as MC-DPM samples.

    First the unconditional window at ``z0``; then upward windows conditioned on the last
    ``n`` generated slices; then downward windows conditioned on the first ``n``. A window
    that would leave the volume is moved back inside; it then keeps more than ``n`` given
    slices, so no slice is ever generated twice.
    """
    if not 0 < n < m <= depth:
        raise ValueError(f"need 0 < n < m <= depth, got n={n}, m={m}, depth={depth}")
    if not 0 <= z0 <= depth - m:
        raise ValueError(f"z0={z0} outside 0..{depth - m}")
    plan = [WindowStep(z0, 0, "none")]
    top = z0 + m  # first slice not yet generated above
    while top < depth:
        start = min(top - n, depth - m)
        plan.append(WindowStep(start, top - start, "forward"))
        top = start + m
    bottom = z0  # lowest generated slice
    while bottom > 0:
        start = max(bottom + n - m, 0)
        plan.append(WindowStep(start, start + m - bottom, "backward"))
        bottom = start
    return plan


class RandWindowd(Randomizable, MapTransform):
    """Crop ``num_samples`` random windows of ``m`` axial slices from ``(C, H, W, D)`` volumes.

    Each output dict holds the windows ``(C, H, W, m)`` under the same keys and the start
    slice under ``z_key`` (a long tensor), which the MC-DPM embeds as its position.
    """

    def __init__(self, keys, m: int, num_samples: int = 1, z_key: str = "z"):
        MapTransform.__init__(self, keys)
        self.m, self.num_samples, self.z_key = int(m), int(num_samples), z_key

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        depth = d[self.keys[0]].shape[-1]
        if depth < self.m:
            raise ValueError(f"volume has {depth} slices, fewer than the window m={self.m}")
        out = []
        for z in self.R.randint(0, depth - self.m + 1, size=self.num_samples):
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = d[key][..., int(z) : int(z) + self.m]
            sample[self.z_key] = torch.tensor(int(z), dtype=torch.long)
            out.append(sample)
        return out


class SlidingWindowsd(MapTransform):
    """All windows of ``m`` slices, ``stride`` apart, of ``(C, H, W, D)`` volumes (validation).

    Deterministic counterpart of ``RandWindowd``: a list of dicts, each with ``z_key``.
    """

    def __init__(self, keys, m: int, stride: int | None = None, z_key: str = "z"):
        super().__init__(keys)
        self.m, self.stride, self.z_key = int(m), stride, z_key

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        out = []
        for z in window_starts(d[self.keys[0]].shape[-1], self.m, self.stride):
            sample = {**d, **{k: d[k][..., z : z + self.m] for k in self.key_iterator(d)}}
            sample[self.z_key] = torch.tensor(z, dtype=torch.long)
            out.append(sample)
        return out
