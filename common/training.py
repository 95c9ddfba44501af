"""Training safety shared by the bundles: resume after a kill, stop on a non-finite loss."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from torch import nn

from common.io import atomic_path

logger = logging.getLogger(__name__)


class GlobalRNG:
    """The global torch / numpy / python RNG states, as a checkpointable object."""

    def state_dict(self) -> dict:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        version, py_state, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": pos,
            "numpy_gauss": [has_gauss, gauss],
            "python": torch.tensor(py_state, dtype=torch.int64),
            "python_meta": [version, py_gauss],
        }

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"])
        has_gauss, gauss = state["numpy_gauss"]
        keys = state["numpy"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), gauss))
        version, py_gauss = state["python_meta"]
        random.setstate((version, tuple(int(v) for v in state["python"]), py_gauss))


class ResumeCheckpoint:
    """Save ``objects`` to ``ckpt_dir/resume.pt`` after every epoch; load it at start.

    ``objects`` maps names to things with ``state_dict``/``load_state_dict`` (network,
    optimizer, LR scheduler, prepare-batch generator, ...); the engine and the global RNG
    are added. A killed run restarted with the same command continues from the last
    finished epoch. The file is replaced atomically, so a kill never leaves it half-written.
    """

    def __init__(self, ckpt_dir: str | Path, objects: Mapping[str, object], resume: bool = True):
        self.path = Path(ckpt_dir) / "resume.pt"
        self.objects, self.resume = dict(objects), resume

    def attach(self, engine: Engine) -> None:
        self.objects.update(engine=engine, rng=GlobalRNG())
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.path.exists()):
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.objects, checkpoint=state)
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")

    def save(self, engine: Engine) -> None:
        state = {k: v.state_dict() for k, v in self.objects.items()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


class FiniteLoss(nn.Module):
    """Wrap a loss; a NaN/inf value raises before the optimiser step, so weights stay good."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, *args, **kwargs) -> torch.Tensor:
        value = self.loss(*args, **kwargs)
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"training loss is {value.item()}: stopped before the weights were changed; "
                "the last good weights are in the resume checkpoint. Lower the learning rate "
                "or check the data (medgen3d validate)."
            )
        return value
