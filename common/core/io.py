"""Atomic file writing and careful reading: no half-written file under a final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.networks.utils import copy_model_state

from common.core.errors import DataError


def _suffix(path: Path) -> str:
    """``.nii.gz`` for ``x.nii.gz``, ``.json`` for ``x.json``."""
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def read_json(path: str | Path) -> dict:
    """Read a JSON file; a missing or malformed file raises DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(str(path), "file not found", "check the path") from e
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"not valid JSON ({e})", "fix or regenerate the file") from e


def save_nifti(
    array: np.ndarray, affine: np.ndarray, path: str | Path, description: str | None = None
) -> Path:
    """Write a 3D array ``(H, W, D)`` as NIfTI with ``affine``, atomically.

    ``description`` goes to the header's 80-character ``descrip`` field (e.g. label names).
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if description:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def load_volume(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI/MGZ volume lazily; unreadable or missing files raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "file not found", "check the path in the datalist")
    try:
        img = nib.load(str(path))
        img.header.get_data_shape()
        return img
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DataError(
            str(path),
            f"cannot be read as a NIfTI/MGZ volume ({type(e).__name__}: {e})",
            "re-export or re-download the file",
        ) from e


def load_weights(network: torch.nn.Module, path: str | Path, key: str = "model") -> torch.nn.Module:
    """Load a state dict (plain, or under ``key``) into ``network`` with ``weights_only=True``.

    A checkpoint of another bundle, preset or label set raises DataError listing the
    missing, unexpected and mis-shaped keys instead of a raw stack trace.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            str(path), "checkpoint not found", "train the bundle first or set ckpt_path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(
            str(path), f"cannot be read as a checkpoint ({e})", "re-train or re-download"
        ) from e
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing keys {missing[:5]}" if missing else "",
            f"{len(unexpected)} unexpected keys {unexpected[:5]}" if unexpected else "",
            f"{len(shapes)} shape mismatches {shapes[:5]}" if shapes else "",
        ]
        raise DataError(
            str(path),
            "does not fit this network (" + "; ".join(p for p in parts if p) + ")",
            "use the checkpoint trained with the same bundle, preset and label set",
        )
    network.load_state_dict(state)
    return network


def start_from(network: torch.nn.Module, ckpt: str | Path = "") -> torch.nn.Module:
    """``network`` with the tensors of checkpoint ``ckpt`` whose names and shapes match.

    For fine-tuning: a network for a new label set keeps its fresh output head. ``""`` leaves
    the network as initialised. (MONAI 1.6's ``CheckpointLoader(strict_shape=False)`` loads
    nothing from a plain state dict, see MONAI PR #8948, hence this function.)
    """
    if not ckpt:
        return network
    path = Path(ckpt)
    if not path.is_file():
        raise DataError(str(path), "checkpoint to start from not found", "train that stage first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    _, loaded, fresh = copy_model_state(network, state)
    if not loaded:
        raise DataError(
            str(path),
            "no tensor of this checkpoint fits the network",
            "start from a checkpoint of the same network and preset",
        )
    print(f"started from {path}: {len(loaded)} tensors loaded, {len(fresh)} kept fresh")
    return network
