"""The seeded prepare-batch base shared by the MC-DPM and refiner trainings."""

from __future__ import annotations

import torch
from monai.engines.utils import PrepareBatch

from common.core.distributed import rank_seed


class SeededPrepareBatch(PrepareBatch):
    """Base of the diffusion prepare-batches: a seeded generator for every random draw.

    ``reseed_every_batch`` makes validation draw the same noise each time; ``state_dict``
    lets a resumed training draw what it would have drawn. Under torchrun rank ``r`` uses
    ``seed + r`` (``rank_seed``), so ranks draw different noise. Subclasses call
    ``start_batch()`` first and ``to_device`` on what they return.
    """

    def __init__(self, seed: int | None = None, reseed_every_batch: bool = False):
        self.seed, self.reseed = None if seed is None else rank_seed(seed), reseed_every_batch
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)

    def start_batch(self) -> None:
        if self.reseed and self.seed is not None:
            self.generator.manual_seed(self.seed)

    @staticmethod
    def to_device(x: torch.Tensor, device=None, non_blocking: bool = False, **kwargs):
        return x.to(device=device, non_blocking=non_blocking, **kwargs)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
