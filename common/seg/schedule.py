"""How long a segmentation training runs, in optimiser steps (or epochs), and its case order.

``step_schedule`` turns ``max_iterations`` (or ``max_epochs`` when that is 0 or None) and
``val_interval`` (optimiser steps between validations) into ignite's terms: the trainer runs
``max_epochs`` "epochs" of ``epoch_length`` iterations, i.e. blocks of ``val_interval``
optimiser steps, validated (and saved for resuming) after each block. So every regime of the
downstream study trains the same number of steps whatever its number of cases.
``StepSampler`` feeds those blocks from a stream of seeded permutations of the cases: every
case is seen equally often, a dataset smaller than a block is passed through several times,
and block ``e`` depends only on the seed and ``e``, so a resumed training sees the cases an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from ignite.engine import Engine, Events
from torch.utils.data import Sampler


@dataclass(frozen=True)
class StepSchedule:
    """``max_epochs`` trainer epochs of ``epoch_length`` iterations (None: one pass over the
    cases), validated every ``val_epochs`` epochs."""

    max_epochs: int
    epoch_length: int | None
    val_epochs: int


def step_schedule(
    max_iterations: int | None,
    max_epochs: int,
    val_interval: int,
    num_cases: int,
    batch_size: int,
) -> StepSchedule:
    """``max_iterations`` optimiser steps validated every ``val_interval`` steps; with
    ``max_iterations`` 0 or None, ``max_epochs`` passes over the ``num_cases`` cases validated about
    every ``val_interval`` steps (rounded to whole epochs of ``ceil(num_cases / batch_size)``
    steps, at least one)."""
    if not max_iterations:
        per_epoch = math.ceil(int(num_cases) / int(batch_size))
        return StepSchedule(int(max_epochs), None, max(1, round(int(val_interval) / per_epoch)))
    steps, every = int(max_iterations), int(val_interval)
    if steps < 1 or every < 1:
        raise ValueError(f"max_iterations={steps} and val_interval={every} must be >= 1")
    if steps % every:
        divisor = max(d for d in range(1, every + 1) if steps % d == 0)
        raise ValueError(
            f"max_iterations={steps} is not a multiple of val_interval={every} (optimiser "
            f"steps between validations); set val_interval to a divisor of it, e.g. {divisor}"
        )
    return StepSchedule(steps // every, every, 1)


class StepSampler(Sampler[int]):
    """The case indices of one trainer epoch: ``epoch_length * batch_size`` of them (all
    ``num_cases`` when ``epoch_length`` is None), cut from the stream of permutations
    ``default_rng([seed, p]).permutation(num_cases)``, p = 0, 1, ...

    ``FollowEpochs(sampler)``, a trainer handler, moves it to each epoch as it starts.
    """

    def __init__(self, num_cases: int, batch_size: int, epoch_length: int | None, seed: int = 0):
        self.num_cases, self.seed, self.epoch = int(num_cases), int(seed), 1
        self.size = self.num_cases if epoch_length is None else int(epoch_length) * int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        start = (self.epoch - 1) * self.size
        first, last = start // self.num_cases, (start + self.size - 1) // self.num_cases
        stream = np.concatenate(
            [
                np.random.default_rng([self.seed, p]).permutation(self.num_cases)
                for p in range(first, last + 1)
            ]
        )
        offset = start - first * self.num_cases
        return iter(stream[offset : offset + self.size].tolist())


class FollowEpochs:
    """Trainer handler: sets ``sampler``'s epoch to ignite's 1-based ``state.epoch`` as each
    epoch starts, so a resumed run draws the cases it would have drawn. In a config it is a
    ``_target_`` entry of the train handlers, as MONAI Label's trainer needs every handler to
    be (a bare reference there fails its ``/train/``)."""

    def __init__(self, sampler: StepSampler):
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda e: self.sampler.set_epoch(e.state.epoch)
        )
