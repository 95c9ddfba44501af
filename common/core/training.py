"""Training safety shared by the bundles: resume after a kill with the best score kept,
checkpoints written atomically, one training per checkpoint set, stop on a non-finite loss."""

from __future__ import annotations

import logging
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver
from monai.transforms import Compose, Randomizable
from torch import nn

from common.core.errors import DataError
from common.core.io import atomic_path, remove_temporaries
from common.core.lock import claim, release
from common.core.provenance import attach_record
from common.core.savers import as_flag

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
        if len(state) != len(self.randoms):
            raise ValueError(  # ResumeCheckpoint names the file
                f"{len(state)} random transform states for {len(self.randoms)} random "
                "transforms: written with other transforms (e.g. another z_shift_max); "
                "--resume false starts over"
            )
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


def _first_line(err: BaseException) -> str:
    """``Type: the first sentence of the message`` (with its next line after a colon)."""
    lines = [line.strip() for line in str(err).strip().splitlines()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    first = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".")  # up to a new sentence
    return f"{type(err).__name__}: {first}"


def save_checkpoint(state: Mapping, path: Path) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file (see ``atomic_path``), after
    deleting the temporaries of ``path`` a killed run left. A failed write raises DataError
    naming ``path`` (torch reports a full disk as a RuntimeError, "unexpected pos ...")."""
    remove_temporaries(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:
        free = shutil.disk_usage(path.parent).free / 2**20
        problem = f"could not be written ({_first_line(e)}; {free:.0f} MB free on its disk)"
        fix = "free disk space or choose another output folder, then rerun: training resumes"
        raise DataError(str(path), problem, fix) from e


class _AtomicSaver(BaseSaveHandler):
    """Rank 0 writes each checkpoint with :func:`save_checkpoint`, with the training's
    ``record`` (``common.core.provenance.TrainingCases``) when given.

    With a fixed ``filename`` the old file is replaced by the rename, never removed first
    (ignite removes the previous best before it saves the new one).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, record=None):
        self.dirname, self.filename, self.record = Path(dirname), filename, record

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None):
        if idist.get_rank() == 0:
            if self.record is not None:
                checkpoint = attach_record(checkpoint, self.record.state_dict())
            save_checkpoint(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None and idist.get_rank() == 0:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) with atomic writes: a kill or a full disk
    leaves the previous complete file, never a partial one (MONAI 1.6 writes in place).
    ``record``: the training cases (``common.core.provenance.TrainingCases``) that every file
    it writes records.

    Its state (``state_dict``/``load_state_dict``, for :class:`ResumeCheckpoint`) is the best
    score so far: the key-metric file's and the evaluator's ``best_metric``, so a resumed run
    replaces the best file, and logs a new best, only for a better score.
    """

    def __init__(self, save_dir: str, save_dict: dict, record=None, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        self.engine: Engine | None = None
        for ckpt in (
            self._final_checkpoint,
            self._key_metric_checkpoint,
            self._interval_checkpoint,
        ):
            if ckpt is not None:
                ckpt.save_handler = _AtomicSaver(save_dir, ckpt.save_handler.filename, record)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self.engine = engine

    def state_dict(self) -> dict:
        state = self.engine.state
        return {
            "checkpoint": self._key_metric_checkpoint.state_dict(),
            "best_metric": state.best_metric,
            "best_metric_epoch": state.best_metric_epoch,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        super().load_state_dict(state_dict["checkpoint"])
        self.engine.state.best_metric = state_dict["best_metric"]
        self.engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


_RESTORED_AT_START = (Engine, GlobalRNG, GeneratorRNG, TransformRNG)


class ResumeCheckpoint:
    """Save ``objects`` to ``ckpt_dir/name`` after every epoch; load it before the run.

    ``objects`` maps names to things with ``state_dict``/``load_state_dict`` (network,
    optimizer, LR scheduler, prepare-batch, the best-checkpoint saver, the training cases
    (``common.core.provenance.TrainingCases``), ...), to
    ``torch.Generator``s or to the training ``Compose`` (its random transforms' states); the
    engine and the global RNG are added. A killed run restarted with the same command
    continues from the last finished epoch as if never stopped, with its best score. The file
    is replaced atomically, so a kill never half-writes it.

    Weights, optimiser and best score are loaded by :meth:`attach`, before anything runs (a
    validation at start sees them); the engine and the random states when the run starts.
    From creation until the run completes it holds the lock ``ckpt_dir/name.lock``: a second
    training into the same checkpoints is refused with a DataError naming this process.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        objects: Mapping[str, object],
        resume: bool = True,
        name: str = "resume.pt",
    ):
        self.path = Path(ckpt_dir) / name
        self.lock = self.path.with_name(f"{name}.lock")
        claim(self.lock)
        self.objects = {k: _checkpointable(v) for k, v in objects.items()}
        self.resume = as_flag(resume, "resume")
        self.state: dict | None = None

    def attach(self, engine: Engine) -> None:
        self.objects.update(engine=engine, rng=GlobalRNG())
        if self.resume and self.path.exists():
            self.state = self._read()
            self._load(lambda obj: not isinstance(obj, _RESTORED_AT_START))
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.release)

    def _problem(self, problem: str) -> DataError:
        fix = "delete it, or set resume to false (--resume false), to train from the start"
        return DataError(str(self.path), problem, fix)

    def _read(self) -> dict:
        """The resume file's state; DataError when unreadable or written by another training."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise self._problem(f"cannot be read as a resume checkpoint ({_first_line(e)})") from e
        if not isinstance(state, dict):
            raise self._problem(f"is not a resume checkpoint (it holds a {type(state).__name__})")
        # a resume file from before an object was saved (training cases, the weight average):
        # an object marked optional_in_resume keeps this run's state
        missing = sorted(
            k
            for k in set(self.objects) - set(state)
            if not getattr(self.objects[k], "optional_in_resume", False)
        )
        if missing:
            raise self._problem(f"has no state for {missing}: written by another training")
        return state

    def _load(self, which) -> None:
        for name, obj in self.objects.items():
            if which(obj) and name in self.state:
                try:
                    Checkpoint.load_objects(to_load={name: obj}, checkpoint=self.state)
                except Exception as e:
                    problem = f"does not fit this training's {name} ({_first_line(e)})"
                    raise self._problem(problem) from e

    def load(self, engine: Engine) -> None:
        if self.state is None:
            return
        max_epochs = engine.state.max_epochs
        self._load(lambda obj: isinstance(obj, _RESTORED_AT_START))
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")

    def save(self, engine: Engine) -> None:
        save_checkpoint({k: v.state_dict() for k, v in self.objects.items()}, self.path)

    def release(self, engine: Engine | None = None) -> None:
        """Free the checkpoints for another training (after the final checkpoint is saved)."""
        release(self.lock)


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
