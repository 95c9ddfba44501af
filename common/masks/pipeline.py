"""MaskPipeline: MC-DPM network + scheduler + sampling settings; seeds in, label volumes out.

No file I/O: ``common.masks.generation.generate_mask_cases`` writes what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import Scheduler

from common.core.errors import DataError
from common.core.savers import as_flag
from common.data.labels import LabelSet
from common.masks.mcdpm import keep_single_components, sample_mask_volumes


def single_component_ids(labels: LabelSet) -> list[int]:
    """Label values of the organs that are one connected piece (``labels.single_component``)."""
    return [labels.names.index(name) for name in labels.single_component]


def output_depth(
    spatial_size: Sequence[int],
    z_spacing: float,
    depth: int | None = None,
    extent_mm: float | None = None,
) -> int:
    """Slices of the generated volumes: ``depth``, or ``extent_mm`` at ``z_spacing`` mm per
    slice (rounded), or the model grid's depth ``spatial_size[2]`` when neither is given."""
    if depth is not None and extent_mm is not None:
        raise DataError(
            "depth / extent_mm", "both are set", "give the length in slices or in mm, not both"
        )
    if extent_mm is not None:
        slices = round(float(extent_mm) / float(z_spacing))
        if slices < 1:
            raise DataError(
                "extent_mm",
                f"{extent_mm} mm is less than one slice of {z_spacing:g} mm",
                f"give at least {z_spacing:g} mm",
            )
        return slices
    return int(spatial_size[2]) if depth is None else int(depth)


def resample_depth(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """Label volumes ``(B, H, W, D)`` resampled along z to ``(B, H, W, depth)``.

    Output slice ``j`` is the input slice nearest its centre, ``floor((j + 0.5) D / depth)``:
    every label's voxels scale by ``depth / D`` (up to which slices are repeated or dropped),
    thin organs as much as large ones, and no label is invented. (Interpolating one-hot
    channels instead favours the labels that win ties: the aorta came out at 0.25x for 0.5x.)
    ``depth == D`` returns ``labels`` itself.
    """
    d = labels.shape[-1]
    if depth == d:
        return labels
    nearest = ((torch.arange(depth) + 0.5) * d / depth).floor().long().clamp(max=d - 1)
    return labels[..., nearest]


class MaskPipeline:
    """Sample whole label volumes ``(B, H, W, D)`` window by window, one per seed.

    ``network`` (with its weights loaded) predicts for windows of ``m`` slices given ``n``
    (``common.masks.mcdpm``); ``scheduler`` and ``steps`` choose the sampler. Volume ``b``
    depends only on ``seeds[b]``, not on the batch it is sampled in; ``batch_size`` volumes
    are sampled together. Post-processing (``keep_largest``) keeps the largest 26-connected
    piece of each label in ``single_component``, on the grown volume before it is resampled
    (and again after shrinking). ``eta`` (DDIM only): 1 adds fresh noise every
    step as DDPM does, 0 is deterministic DDIM. ``bf16`` runs the network under bf16 autocast.
    ``spatial_size`` is the model grid ``(H, W, D)`` the network was trained on. The volumes
    have ``depth`` slices (default ``D``, any number ``>= 1``; ``output_size``): the network
    learned one slice density, so every volume is grown window by window at ``D`` slices and
    then resampled along z (``resample_depth``); each organ keeps its share of the length.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        scheduler: Scheduler,
        num_classes: int,
        spatial_size: Sequence[int],
        m: int,
        n: int,
        steps: int,
        guidance: float = 1.0,
        eta: float = 1.0,
        keep_largest: bool = True,
        single_component: Sequence[int] = (),
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        bf16: bool = False,
        depth: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.depth = int(spatial_size[2]) if depth is None else int(depth)
        if self.depth < 1:
            raise DataError(
                "depth",
                f"{self.depth} slices",
                "generate at least 1 slice (depth, or extent_mm at the grid's z spacing)",
            )
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.scheduler = scheduler
        self.num_classes, self.m, self.n = int(num_classes), int(m), int(n)
        self.spatial_size = [int(s) for s in spatial_size]
        self.steps, self.guidance, self.eta = int(steps), float(guidance), float(eta)
        self.keep_largest = as_flag(keep_largest, "keep_largest")
        self.single_component = list(single_component)
        self.batch_size, self.bf16 = int(batch_size), as_flag(bf16, "bf16")

    def _keep_largest(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, D)`` with only the largest piece of each ``single_component`` label."""
        return torch.stack([keep_single_components(v, self.single_component) for v in volumes])

    @property
    def output_size(self) -> list[int]:
        """``[H, W, depth]``: the size of the volumes it makes."""
        return [*self.spatial_size[:2], self.depth]

    def __call__(
        self,
        seeds: Sequence[int],
        postprocess: bool = True,
        z0: Sequence[int] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Label volumes ``(len(seeds), H, W, depth)`` int64 on the CPU, values ``0..K-1``.

        ``postprocess=False`` returns them as sampled (no ``keep_largest``); ``z0`` fixes each
        volume's first window start on the model grid instead of drawing it from its seed.
        """
        raw, kept = self.sample(seeds, z0, progress, postprocess and self.keep_largest)
        return kept if kept is not None else raw

    def sample(
        self,
        seeds: Sequence[int],
        z0: Sequence[int] | None = None,
        progress: bool = False,
        keep: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The volumes ``(len(seeds), H, W, depth)`` as sampled and, if ``keep``, after
        ``keep_largest`` (else ``None``): both from one sampling run, so a caller can keep the
        raw masks beside the written ones at no extra cost."""
        raw, kept = [], []
        for start in range(0, len(seeds), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            grown = sample_mask_volumes(
                self.network,
                self.scheduler,
                self.num_classes,
                self.spatial_size,
                self.m,
                self.n,
                self.steps,
                seeds=list(seeds[chunk]),
                guidance=self.guidance,
                z0=None if z0 is None else list(z0[chunk]),
                device=self.device,
                progress=progress,
                bf16=self.bf16,
                eta=self.eta,
            )
            raw.append(resample_depth(grown, self.depth))
            if keep:
                volumes = resample_depth(self._keep_largest(grown), self.depth)
                if self.depth < self.spatial_size[2]:  # dropping slices can split a piece
                    volumes = self._keep_largest(volumes)
                kept.append(volumes)
        empty = torch.zeros(0, *self.output_size, dtype=torch.long)
        raw = torch.cat(raw) if raw else empty
        if not keep:
            return raw, None
        return raw, torch.cat(kept) if kept else empty
