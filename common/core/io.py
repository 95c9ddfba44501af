"""Atomic file writing and careful reading: no half-written file under a final name."""

from __future__ import annotations

import errno
import glob
import hashlib
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


RECORD_CODE = "comment"  # the NIfTI header extension that holds a volume's JSON record
# write errors that the user must act on (disk full, quota, read-only or forbidden folder)
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary is hidden: ``.NAME.XXXXXXXX.tmpSUFFIX`` (``remove_temporaries`` deletes
    those a killed process left). A full disk or an unwritable folder raises DataError
    naming ``path``; the temporary is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}", dir=path.parent
        )
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        raise DataError(
            str(path),
            f"could not be written ({e.strerror}, errno {e.errno})",
            "free disk space or choose a writable output folder, then rerun",
        ) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_temporaries(path: str | Path) -> None:
    """Delete the hidden temporaries of ``path`` that ``atomic_path`` left when killed."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        tmp.unlink(missing_ok=True)


def write_json(obj, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def check_file(path: str | Path, fix: str = "check the path") -> Path:
    """``path`` if it is a readable file; else DataError saying why (missing, a folder, a
    symbolic link loop or a broken link, no permission), with ``fix`` where it is missing."""
    path = Path(path)
    try:
        with open(path, "rb"):
            return path
    except IsADirectoryError as e:
        raise DataError(str(path), "is a folder, not a file", "give the path of a file") from e
    except PermissionError as e:
        raise DataError(
            str(path), "cannot be read (permission denied)", "check its permissions"
        ) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(
                str(path), "is a symbolic link loop", "point the link at a real file"
            ) from e
        if path.is_symlink():
            raise DataError(
                str(path),
                f"is a broken symbolic link (to {os.readlink(path)})",
                "point the link at an existing file",
            ) from e
        if e.errno == errno.ENOENT:
            raise DataError(str(path), "file not found", fix) from e
        raise DataError(str(path), f"cannot be read ({e.strerror})", fix) from e


def read_json(path: str | Path) -> dict:
    """Read a UTF-8 JSON file; a missing, unreadable, non-UTF-8 or malformed file raises
    DataError naming it."""
    data = check_file(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (data[1:64:2] and not data[1:64:2].strip(b"\0")):
        problem = "is UTF-16 text"
    elif b"\0" in data:
        problem = "is not text (a binary file?)"
    else:
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"not valid JSON ({e})", "fix or regenerate the file") from e
    raise DataError(str(path), f"{problem}; JSON files must be UTF-8", "save it as UTF-8 JSON")


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    description: str | None = None,
    record: dict | None = None,
) -> Path:
    """Write a 3D array ``(H, W, D)`` as NIfTI with ``affine``, atomically.

    ``description`` goes to the header's 80-character ``descrip`` field (e.g. label names);
    ``record`` (how the volume was made, JSON) to a header extension, read by ``read_record``.
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if description:
        img.header["descrip"] = description.encode()[:79]
    if record is not None:
        content = json.dumps(record, sort_keys=True).encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension(RECORD_CODE, content))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def read_record(path: str | Path) -> dict | None:
    """The ``record`` that ``save_nifti`` stored in ``path``; None for a missing or unreadable
    file or one without a record. Reads the header only."""
    try:
        extensions = nib.load(str(path)).header.extensions
    except Exception:  # missing, truncated or not NIfTI: no record to trust
        return None
    for ext in extensions:
        if ext.get_code() == nib.nifti1.extension_codes[RECORD_CODE]:
            try:
                return json.loads(ext.get_content().rstrip(b"\0"))
            except ValueError:
                return None
    return None


def _flat(record: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def remake_reason(path: str | Path, record: dict) -> str:
    """``""`` if ``path`` holds ``record`` (``save_nifti``); else why it must be (re)made:
    ``missing``, ``no settings recorded``, or the settings that differ (``steps 20 -> 2``)."""
    if not Path(path).exists():
        return "missing"
    old = read_record(path)
    if old is None:
        return "no settings recorded"
    old, new = _flat(old), _flat(json.loads(json.dumps(record)))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys)


def load_volume(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI/MGZ volume lazily; unreadable or missing files raise DataError."""
    path = check_file(path, "check the path in the datalist")
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


def weights_fingerprint(network: torch.nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over ``network``'s state dict (names, dtypes,
    shapes and values): equal for the same weights, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def read_checkpoint(path: Path, fix: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a folder, a link loop, a broken
    link or an unreadable file raises DataError naming ``path`` with ``fix``."""
    check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(str(path), f"cannot be read as a checkpoint ({e})", fix) from e


def load_weights(network: torch.nn.Module, path: str | Path, key: str = "model") -> torch.nn.Module:
    """Load a state dict (plain, or under ``key``) into ``network`` with ``weights_only=True``.

    A checkpoint of another bundle, preset or label set raises DataError listing the
    missing, unexpected and mis-shaped keys instead of a raw stack trace.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DataError(
            str(path), "checkpoint not found", "train the bundle first or set ckpt_path"
        )
    state = read_checkpoint(path, "re-train or re-download")
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
    state = read_checkpoint(path, "re-train that stage")
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
