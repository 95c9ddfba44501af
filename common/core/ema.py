"""An exponential moving average (EMA) of a network's weights, the weights a diffusion
training validates and saves (as DDPM and its successors sample from)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn


class WeightAverage:
    """``network`` holds the EMA of ``source``'s weights, updated after every iteration.

    After update ``k`` (from 1) the average moves toward the weights by ``1 - d``,
    ``d = min(decay, (k - 1) / (k + 9))``: the first update copies them, and the early,
    fast-changing weights fade quickly. Buffers (integers) are copied. ``decay`` 0 turns it
    off: ``network`` is ``source`` itself and nothing is copied or updated, so a training
    without it is unchanged. A DDP-wrapped ``source`` is averaged through its ``module``.

    Checkpointable (``state_dict``: the averaged weights and the update count). A resume
    file from before it existed (or written with ``decay`` 0) leaves the count at 0: when
    the run starts, the average restarts from the resumed weights (``start``).
    """

    optional_in_resume = True

    def __init__(self, source: nn.Module, decay: float = 0.0):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.source = getattr(source, "module", source)
        self.updates = 0
        if self.decay == 0.0:
            self.network = source
            return
        self.network = copy.deepcopy(self.source).eval()
        self.network.requires_grad_(False)

    def attach(self, engine: Engine) -> None:
        if self.decay > 0.0:
            engine.add_event_handler(Events.STARTED, self.start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    @torch.no_grad()
    def start(self, engine: Engine | None = None) -> None:
        """Before the first update, the average is ``source``'s weights as they are now (those
        a resume loaded): a resumed run with nothing left to train saves them, not the
        network as it was built."""
        if self.updates == 0:
            self.network.load_state_dict(self.source.state_dict())

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        self.updates += 1
        d = min(self.decay, (self.updates - 1) / (self.updates + 9))
        current = self.source.state_dict()
        for name, average in self.network.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - d)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        weights = self.network.state_dict() if self.decay > 0.0 else {}
        return {"network": weights, "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        if self.decay > 0.0 and state["updates"] > 0:
            self.network.load_state_dict(state["network"])
            self.updates = int(state["updates"])
