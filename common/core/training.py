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
from monai.transforms import Compose, Randomizable
from torch import nn

from common.core.io import atomic_path

logger = logging.getLogger(__name__)


def _pack_numpy(state: tuple) -> dict:
    """A numpy RandomState state as tensors and numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = state
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "gauss": [has_gauss, gauss],
    }


def _unpack_numpy(state: Mapping) -> tuple:
    has_gauss, gauss = state["gauss"]
    keys = state["keys"].numpy().astype(np.uint32)
    return "MT19937", keys, int(state["pos"]), int(has_gauss), gauss


class GlobalRNG:
    """The global torch / numpy / python RNG states, as a checkpointable object."""

    def state_dict(self) -> dict:
        version, py_state, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": _pack_numpy(np.random.get_state()),
            "python": torch.tensor(py_state, dtype=torch.int64),
            "python_meta": [version, py_gauss],
        }

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_unpack_numpy(state["numpy"]))
        version, py_gauss = state["python_meta"]
        random.setstate((version, tuple(int(v) for v in state["python"]), py_gauss))


class GeneratorRNG:
    """A ``torch.Generator``'s state, as a checkpointable object."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["state"])


class TransformRNG:
    """The random states of a ``Compose``'s random transforms (and the random transforms
    they hold, e.g. ``RandSpatialCropd.cropper``), as a checkpointable object."""

    def __init__(self, transforms: Compose):
        self.randoms = []
        for t in transforms.flatten().transforms:
            for obj in (t, *vars(t).values()):
                if isinstance(obj, Randomizable) and obj not in self.randoms:
                    self.randoms.append(obj)

    def state_dict(self) -> dict:
        return {str(i): _pack_numpy(t.R.get_state()) for i, t in enumerate(self.randoms)}

    def load_state_dict(self, state: Mapping) -> None:
        for i, t in enumerate(self.randoms):
            t.R.set_state(_unpack_numpy(state[str(i)]))


def _checkpointable(obj):
    """``obj``, or a wrapper with ``state_dict``/``load_state_dict`` for RNG holders; a
    DistributedDataParallel network gives its inner module (plain keys, as ignite loads)."""
    if isinstance(obj, nn.parallel.DistributedDataParallel):
        return obj.module
    if isinstance(obj, torch.Generator):
        return GeneratorRNG(obj)
    if isinstance(obj, Compose):
        return TransformRNG(obj)
    return obj


class ResumeCheckpoint:
    """Save ``objects`` to ``ckpt_dir/name`` after every epoch; load it at start.

    ``objects`` maps names to things with ``state_dict``/``load_state_dict`` (network,
    optimizer, LR scheduler, prepare-batch, ...), to ``torch.Generator``s or to the training
    ``Compose`` (its random transforms' states); the engine and the global RNG are added.
    A killed run restarted with the same command continues from the last finished epoch
    as if never stopped. The file is replaced atomically, so a kill never half-writes it.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        objects: Mapping[str, object],
        resume: bool = True,
        name: str = "resume.pt",
    ):
        self.path = Path(ckpt_dir) / name
        self.objects = {k: _checkpointable(v) for k, v in objects.items()}
        self.resume = resume

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


def require_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss``; a NaN/inf value raises FloatingPointError (call it before the optimiser step)."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"training loss is {loss.item()}: stopped before the weights were changed; "
            "the last good weights are in the resume checkpoint. Lower the learning rate "
            "or check the data (medgen3d validate)."
        )
    return loss


class FiniteLoss(nn.Module):
    """Wrap a loss; a NaN/inf value raises before the optimiser step, so weights stay good."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return require_finite(self.loss(*args, **kwargs))
