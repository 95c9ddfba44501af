"""Masks -> images in one object (as diffusers composes models and a scheduler).

``ImagePipeline(onehot (B, K, H, W, D), seeds)`` runs the sequence generator, then the view
refiners, and returns both volumes; no file I/O (``common.images.generation`` writes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import Scheduler
from torch import nn

from common.core.io import load_weights, weights_fingerprint
from common.core.savers import as_flag, compile_networks
from common.core.seeds import case_seed
from common.images.refiner import VIEWS, load_view_models, refine_volume
from common.images.sequence_generator import generate_volume


class ImagePipeline:
    """Sequence generator, then the three-view refiner (MedGen3D image stages 1 and 2).

    Args:
        generator: the slice generator (``SliceGenerator``), weights loaded.
        refiners: ``{view: network}`` for some of ``axial``, ``coronal``, ``sagittal``.
        scheduler: the refiners' sampler (``common.diffusion.schedulers.make_scheduler``).
        t0, guidance, steps, slice_batch, bf16: as ``common.images.refiner.refine_volume``.
        refine: False returns the generator's volume as the refined one (no refiners needed).
        compile: ``torch.compile`` the refiners (``common.core.savers.compile_networks``):
            faster per slice batch after each view compiles once per slice shape (about a
            minute on a CPU), so it pays only for many volumes (benchmarks/results.md).

    ``pipeline(onehot, seeds)``: one-hot {0, 1} masks ``(B, K, H, W, D)`` and one seed per
    volume (or an int, see ``refine_volume``) -> ``(sequence_only, refined)``, both
    ``(B, 1, H, W, D)`` in [-1, 1] on the generator's device. The volumes run one at a time,
    so a volume's result depends on its mask and seed alone: bit for bit not on the other
    volumes of the batch, and beyond float rounding not on ``slice_batch``.
    """

    def __init__(
        self,
        generator: nn.Module,
        refiners: Mapping[str, nn.Module],
        scheduler: Scheduler,
        t0: int = 10,
        guidance: float = 1.5,
        steps: int = 1000,
        slice_batch: int = 64,
        refine: bool = True,
        bf16: bool = False,
        compile: bool = False,
    ):
        refine = as_flag(refine, "refine")
        if refine and not refiners:
            raise ValueError("refine=True needs refiners {view: network}")
        self.generator, self.refiners, self.scheduler = generator.eval(), dict(refiners), scheduler
        compile_networks(self.refiners.values(), compile)
        self.t0, self.guidance, self.steps = int(t0), float(guidance), int(steps)
        self.slice_batch, self.refine = int(slice_batch), refine
        self.bf16 = as_flag(bf16, "bf16")

    @classmethod
    def from_checkpoints(
        cls,
        generator: nn.Module,
        refiner: nn.Module,
        ckpt_dir: str | Path,
        views: Sequence[str] = VIEWS,
        refine: bool = True,
        device: str | torch.device = "cpu",
        **settings,
    ) -> ImagePipeline:
        """The pipeline with ``ckpt_dir/model.pt`` (the model zoo's name) in ``generator`` and
        ``ckpt_dir/refiner_<view>.pt`` in a copy of ``refiner`` per view (not read when
        ``refine`` is False), on ``device``; ``settings`` go to the constructor."""
        refine = as_flag(refine, "refine")
        generator = load_weights(generator, Path(ckpt_dir) / "model.pt").to(device)
        refiners = load_view_models(refiner, ckpt_dir, views, device) if refine else {}
        return cls(generator, refiners, refine=refine, **settings)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def settings(self) -> dict:
        """Everything besides the mask and the seed that an image depends on (JSON): the
        refinement settings and a fingerprint of each network's weights."""
        out = {"refine": self.refine, "generator": weights_fingerprint(self.generator)}
        if self.refine:
            out |= {
                "sampler": type(self.scheduler).__name__,
                "steps": self.steps,
                "t0": self.t0,
                "guidance": self.guidance,
                "bf16": self.bf16,
                "refiners": {v: weights_fingerprint(n) for v, n in self.refiners.items()},
            }
        return out

    @torch.inference_mode()
    def __call__(
        self, onehot: torch.Tensor, seeds: int | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seeds = (
            [case_seed(int(seeds), b) for b in range(len(onehot))] if np.ndim(seeds) == 0 else seeds
        )
        if len(seeds) != len(onehot):
            raise ValueError(f"got {len(seeds)} seeds for {len(onehot)} volumes")
        # one volume at a time: batched convolutions round differently from single ones
        rough, refined = zip(*(self._one(m[None], int(s)) for m, s in zip(onehot, seeds)))
        rough = torch.cat(rough)
        return (rough, rough) if not self.refine else (rough, torch.cat(refined))

    def _one(self, onehot: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One volume: ``onehot (1, K, H, W, D)`` -> ``(sequence_only, refined)``, each
        ``(1, 1, H, W, D)``."""
        onehot = onehot.to(self.device)
        rough = generate_volume(self.generator, onehot)
        if not self.refine:
            return rough, rough
        refined = refine_volume(
            self.refiners,
            self.scheduler,
            rough,
            onehot,
            self.t0,
            self.guidance,
            self.steps,
            [seed],
            self.slice_batch,
            bf16=self.bf16,
        )
        return rough, refined
